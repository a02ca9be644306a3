"""The ComfyUI install this runtime belongs to, found from its own place (custom_nodes/<pack>/nextstep_runtime), and
that install's NextStep model folders in the order ComfyUI searches them, so that `download` and `doctor` work
from any folder: extra_model_paths.yaml's `nextstep` entries (`is_default` ones first), then models/nextstep."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PACK_FOLDER = Path(__file__).parents[2]
"""The folder holding nextstep_runtime/: the pack's folder when it sits in a ComfyUI's custom_nodes (as imported,
not resolved, so a pack linked into custom_nodes is found there)."""
CUSTOM_NODES = "custom_nodes"
COMFYUI_MARKER = "folder_paths.py"
"""A file every ComfyUI root holds (its model-folder registry)."""
EXTRA_PATHS = "extra_model_paths.yaml"
MODEL_FOLDER_KEY = "nextstep"


@dataclass(frozen=True)
class ComfyUIInstall:
    root: Path
    model_folders: tuple[Path, ...]
    """The `nextstep` folders, in ComfyUI's search order; the first is where models are fetched to."""


def _extra_model_folders(config: Path) -> list[Path]:
    """The `nextstep` folders an extra_model_paths.yaml adds (paths relative to its base_path, which is relative to
    the file's own folder), `is_default` sections first, as ComfyUI orders them."""
    import yaml

    try:
        sections = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return []
    first, last = [], []
    for section in sections.values() if isinstance(sections, dict) else []:
        if not isinstance(section, dict) or not section.get(MODEL_FOLDER_KEY):
            continue
        base = config.parent / os.path.expandvars(os.path.expanduser(str(section.get("base_path", ""))))
        folders = [Path(os.path.normpath(base / os.path.expandvars(os.path.expanduser(line.strip()))))
                   for line in str(section[MODEL_FOLDER_KEY]).splitlines() if line.strip()]
        (first if section.get("is_default") else last).extend(folders)
    return first + last


def enclosing_comfyui(pack: Path = PACK_FOLDER) -> ComfyUIInstall | None:
    """The ComfyUI whose custom_nodes holds `pack`, with its `nextstep` model folders; None when the pack is not
    inside a ComfyUI (a pip install, a checkout of its own)."""
    root = pack.parent.parent
    if pack.parent.name != CUSTOM_NODES or not (root / COMFYUI_MARKER).is_file():
        return None
    folders = _extra_model_folders(root / EXTRA_PATHS) + [root / "models" / MODEL_FOLDER_KEY]
    return ComfyUIInstall(root, tuple(dict.fromkeys(folders)))
