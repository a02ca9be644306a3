"""The one rule for the folder `download --to DIR` writes into: never overwrite a user's file, never mix two models.

huggingface_hub replaces a same-named file in the folder with the repo's, and leaves every other file in place. So a
user's own `config.json` would be lost, and a new single-file model fetched beside an older model's index and
shards would load the old shards with the new config, silently. The folder may therefore hold only files that an
earlier `download` of this same model put there (huggingface_hub records each one under `.cache/huggingface/
download/`, which is what lets an interrupted download continue); anything else the runtime would read is refused,
naming the files, before a byte is fetched. Files the runtime never reads (a readme, notes) are left alone.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import NextStepError
from .hub import NEVER_FETCHED, RUNTIME_FILES

DOWNLOAD_RECORDS = Path(".cache") / "huggingface" / "download"
"""Where huggingface_hub records, per file fetched into a folder, the commit it came from (its first line) and when
it was written (its third line); fetch.py keeps its partial transfers there too."""
NAMED_FILES = 6
VAE_FOLDER = "vae"


def _recorded_commit(folder: Path, name: str) -> str | None:
    """The commit `name` was downloaded from, when huggingface_hub recorded it and the file has not been modified
    since (a file edited by the user is the user's); None otherwise."""
    record = folder / DOWNLOAD_RECORDS / f"{name}.metadata"
    try:
        commit, _, written = record.read_text(encoding="utf-8").splitlines()[:3]
        return commit if (folder / name).stat().st_mtime <= float(written) + 1 else None
    except (OSError, ValueError):
        return None


def _runtime_files_in(folder: Path) -> list[str]:
    """The files under `folder` that the runtime would read as part of a model (RUNTIME_FILES), as repo paths."""
    from huggingface_hub.utils import filter_repo_objects

    present = [entry.name for entry in os.scandir(folder) if not entry.is_dir()]
    for directory, _, files in os.walk(folder / VAE_FOLDER):  # the only subfolder RUNTIME_FILES reach into
        present += [(Path(directory) / name).relative_to(folder).as_posix() for name in files]
    return sorted(filter_repo_objects(present, allow_patterns=RUNTIME_FILES, ignore_patterns=NEVER_FETCHED))


def _named(files: list[str]) -> str:
    more = f" and {len(files) - NAMED_FILES} more" if len(files) > NAMED_FILES else ""
    return ", ".join(files[:NAMED_FILES]) + more


def check_target_folder(folder: Path) -> None:
    """Before the Hub is asked anything: `folder` is a folder or does not exist yet, and holds no model file that an
    earlier download did not put there."""
    if folder.exists() and not folder.is_dir():
        raise NextStepError(f"--to {folder} is a file; give a folder to write the model into (new or empty)")
    if not folder.exists():
        return
    foreign = [name for name in _runtime_files_in(folder) if _recorded_commit(folder, name) is None]
    if foreign:
        raise NextStepError(f"{folder} already holds {_named(foreign)}, not written by a download there; downloading "
                            f"would overwrite or mix with them: move them away, or choose a new folder")


def check_no_mixing(folder: Path, repo: str, commit: str, fetched: list[str]) -> None:
    """After the Hub listed the files of `repo` at `commit` and before any is fetched: every model file already in
    `folder` is one of them and comes from that commit, so that the folder ends up holding one model."""
    if not folder.is_dir():
        return
    mixed = [name for name in _runtime_files_in(folder)
             if name not in fetched or _recorded_commit(folder, name) != commit]
    if mixed:
        raise NextStepError(f"{folder} holds {_named(mixed)} from another download, which {repo} ({commit[:12]}) "
                            f"would be mixed with (an old model's shards beside a new config load silently wrong): "
                            f"choose a new folder, or empty this one")
