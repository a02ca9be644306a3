"""The CLI's output paths, checked before the model is loaded, so a typo costs seconds, not a whole run."""

from __future__ import annotations

import tempfile
from pathlib import Path, PurePath
from typing import Callable

from PIL import Image

from ..errors import NextStepError

TENSORS_SUFFIX = ".safetensors"


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
"""Formats that hold an RGB image without plugins or surprises (Pillow also "writes" e.g. .h5 stubs)."""


def image_suffixes() -> tuple[str, ...]:
    """Those of IMAGE_SUFFIXES this Pillow build can write (WebP support is optional)."""
    Image.init()
    registry = Image.registered_extensions()
    return tuple(suffix for suffix in IMAGE_SUFFIXES if registry.get(suffix) in Image.SAVE)


def nearest_existing(path: PurePath, exists: Callable[[PurePath], bool]) -> PurePath | None:
    """The nearest of `path` and its ancestors that exists, or None when not even the root does (a missing drive or
    an unreachable network share on Windows, where the root of `Z:/` or `//server/share` is its own parent)."""
    while not exists(path):
        if path.parent == path:
            return None
        path = path.parent
    return path


def _check_writable(flag: str, path: Path) -> None:
    """`path` can be created: it is not a folder, and its nearest existing ancestor is a folder we can write
    in (missing folders below it are created when saving). Tried for real, which also covers read-only
    file systems and running as root."""
    if path.is_dir():
        raise NextStepError(f"{flag} {path} is a folder; give a file name inside it")
    folder = nearest_existing(path.absolute().parent, Path.exists)
    if folder is None:
        raise NextStepError(f"{flag} {path}: {path.absolute().anchor} does not exist (a missing drive or an "
                            f"unreachable network share?)")
    if not folder.is_dir():
        raise NextStepError(f"{flag} {path}: {folder} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise NextStepError(f"{flag} {path}: cannot write in {folder} ({exc.strerror or exc})") from None


def check_output_paths(out: str, save_tensors: str | None) -> None:
    """--out needs an image extension Pillow can write; --save-tensors the .safetensors extension."""
    out_path = Path(out)
    suffixes = image_suffixes()
    if out_path.suffix.lower() not in suffixes:
        raise NextStepError(f"--out {out} does not end in an image extension; use one of {', '.join(suffixes)}")
    _check_writable("--out", out_path)
    if save_tensors is not None:
        tensors_path = Path(save_tensors)
        if tensors_path.suffix != TENSORS_SUFFIX:
            raise NextStepError(f"--save-tensors {save_tensors} must end in {TENSORS_SUFFIX}")
        _check_writable("--save-tensors", tensors_path)
