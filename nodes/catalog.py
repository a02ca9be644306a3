"""What the loader nodes offer: NextStep model folders and VAEs, by the names shown in their drop-downs.

Model names are folder names under the `nextstep` model folders (a folder counts when it holds config.json),
then the repo ids (`stepfun-ai/NextStep-1.1`) of NextStep models in the local Hugging Face cache, then the released
models not on disk yet (by the folder names the templates use: a run fetches them, fetching.py). VAE names
are `<model>/vae` for every model that ships its VAE folder (a released model's too, before it is fetched), then
`.safetensors` files under the `vae` model folders. Names are resolved only against these lists, so a name from an API request can never point outside
the model folders and the cache.
"""

from __future__ import annotations

import os
from pathlib import Path

from nextstep_runtime import ModelFolder, NextStepError, cache_root, cached_nextstep_repos, holds_model_config
from nextstep_runtime.weights.released import RELEASED_MODELS

from . import host

MODEL_VAE_SUBFOLDER = "vae"
VAE_FILE_SUFFIX = ".safetensors"
"""The only single-file VAE format the runtime reads (config in the safetensors metadata)."""


def _readable_children(root: Path) -> list[Path]:
    """The entries of a search folder, none when it is missing or this user may not list it."""
    try:
        return sorted(root.iterdir()) if root.is_dir() else []
    except OSError:
        return []


def _holds_model_config(folder: Path) -> bool:
    """holds_model_config, False for a folder this user may not read (it is skipped, and doctor says why)."""
    try:
        return holds_model_config(folder)
    except OSError:
        return False


def _model_folders() -> dict[str, Path]:
    """Model name -> folder; the first search folder holding a name wins, cached Hugging Face repos last. Entries
    that cannot be read are skipped, so one broken folder never hides the others."""
    found: dict[str, Path] = {}
    for root in map(Path, host.folder_roots(host.MODEL_FOLDER_KEY)):
        for child in _readable_children(root):
            if child.name not in found and _holds_model_config(child):
                found[child.name] = child
    for repo, snapshot in cached_nextstep_repos().items():
        found.setdefault(repo, snapshot)
    return found


def absent_released_models() -> list[str]:
    """The released models (by folder name) that are not complete on disk in any `nextstep` folder; none when no
    `nextstep` folder is registered to fetch them into."""
    if not host.folder_roots(host.MODEL_FOLDER_KEY):
        return []
    present = _model_folders()
    return [name for name in RELEASED_MODELS if name not in present]


def fetch_folder(name: str) -> Path:
    """Where released model `name` is fetched to: models/nextstep/<name>/ in the first `nextstep` folder (the one
    extra_model_paths.yaml puts first, else ComfyUI's own)."""
    roots = host.folder_roots(host.MODEL_FOLDER_KEY)
    if not roots:
        raise NextStepError(f"no `{host.MODEL_FOLDER_KEY}` model folder is registered to fetch {name} into")
    return Path(roots[0]) / name


def _vae_entries() -> dict[str, Path]:
    """VAE name -> path: model-folder VAEs first (the usual choice), then files under the vae folders; a released model's
    VAE before it is fetched names the folder it will be fetched into."""
    found = {f"{name}/{MODEL_VAE_SUBFOLDER}": folder / MODEL_VAE_SUBFOLDER
             for name, folder in _model_folders().items() if (folder / MODEL_VAE_SUBFOLDER).is_dir()}
    for name in absent_released_models():
        found[f"{name}/{MODEL_VAE_SUBFOLDER}"] = fetch_folder(name) / MODEL_VAE_SUBFOLDER
    for root in map(Path, host.folder_roots(host.VAE_FOLDER_KEY)):
        for directory, files in sorted(_walk_once(root)):
            for file in sorted(name for name in files if name.endswith(VAE_FILE_SUFFIX)):
                path = Path(directory) / file
                found.setdefault(path.relative_to(root).as_posix(), path)
    return found


def _walk_once(root: Path) -> list[tuple[str, list[str]]]:
    """(folder, file names) of every folder under `root`, following links to folders but entering each real folder
    once: a link to `.` or to a parent would otherwise be walked without end. Folders this user may not list are
    skipped (os.walk's default)."""
    visited: set[str] = set()
    walked = []
    for directory, subfolders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(directory)
        if real in visited:
            subfolders.clear()
            continue
        visited.add(real)
        subfolders.sort()  # a fixed order, so the same alias of a folder reached twice is always the one listed
        walked.append((directory, files))
    return walked


def model_names() -> list[str]:
    return list(_model_folders()) + absent_released_models()


def vae_names() -> list[str]:
    return list(_vae_entries())


def model_of_vae(name: str) -> str | None:
    """The model whose folder VAE `name` (`<model>/vae`) is, or None for a single-file VAE."""
    model, _, subfolder = name.rpartition("/")
    return model if subfolder == MODEL_VAE_SUBFOLDER and model else None


def _searched(key: str) -> str:
    return ", ".join(host.folder_roots(key)) or f"no `{key}` folder registered"


def model_folder(name: str) -> ModelFolder:
    """Model `name`, opened, or an error that says where models are looked for."""
    folder = _model_folders().get(name)
    if folder is None and name in absent_released_models():
        raise NextStepError(f"NextStep model {name} is not downloaded yet: running a workflow that loads it fetches "
                            f"{RELEASED_MODELS[name]} into {fetch_folder(name)}")
    if folder is None:
        raise NextStepError(f"NextStep model {name!r} not found (searched {_searched(host.MODEL_FOLDER_KEY)} and the "
                            f"Hugging Face cache {cache_root()}); fetch it with `python -m nextstep_runtime download "
                            f"stepfun-ai/NextStep-1.1` (into the cache), or put the whole repo folder in "
                            f"models/{host.MODEL_FOLDER_KEY}/{name}/ so that it holds config.json")
    return ModelFolder.open(folder)


def vae_path(name: str) -> Path:
    """The folder or file of VAE `name`, or an error that says where VAEs are looked for."""
    path = _vae_entries().get(name)
    if path is None:
        raise NextStepError(f"NextStep VAE {name!r} not found: expected <model>/{MODEL_VAE_SUBFOLDER} of a model in "
                            f"{_searched(host.MODEL_FOLDER_KEY)}, or a {VAE_FILE_SUFFIX} file in "
                            f"{_searched(host.VAE_FOLDER_KEY)}")
    return path
