"""Pixel conversions between PIL images, [B,3,H,W] tensors in [0,1], and uint8 arrays."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import NextStepError


def read_pixels(path: str | Path, what: str, mode: str, size: tuple[int, int] | None = None,
                max_side: int | None = None) -> np.ndarray:
    """An image file in PIL `mode` ("RGB", or "L" for a mask) as float32 [H, W(, C)] in [0, 1], resized to `size`
    (width, height) with PIL's default filter when given. With `max_side`, a larger file is refused from its
    header, before its pixels are decoded. The one way input images and masks are read, so one size rule covers
    both and PIL's decompression-bomb warning or error never reaches the user raw."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size check below says it better
            with Image.open(path) as image:
                if max_side is not None:
                    check_input_image_size(*image.size, what, max_side)
                converted = image.convert(mode)
                return np.asarray(converted.resize(size) if size else converted, dtype=np.float32) / 255.0
    except NextStepError:
        raise
    except FileNotFoundError:
        raise NextStepError(f"{what} not found") from None
    except Image.DecompressionBombError as exc:  # a header claiming more pixels than PIL will decode at all
        raise NextStepError(f"{what} is far too large to read ({exc}); scale it down first") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise NextStepError(f"cannot read {what} ({exc})") from None


def load_rgb(path: str | Path, size: tuple[int, int] | None = None, max_side: int | None = None) -> torch.Tensor:
    """An image file as RGB [1, 3, H, W] float32 in [0, 1] (see read_pixels)."""
    array = read_pixels(path, f"input image {path}", "RGB", size, max_side)
    return torch.from_numpy(array).permute(2, 0, 1)[None].contiguous()


def check_input_image_size(width: int, height: int, what: str, max_side: int) -> None:
    """Input images for editing are limited like outputs: every 16x16 pixels become one prompt token of every
    guidance row, and the VAE encoder's activations grow with the area (about 8 GB at 8000x8000)."""
    if max(width, height) > max_side:
        raise NextStepError(f"{what} is {width}x{height} pixels; input images may be at most {max_side} pixels per "
                            f"side (each 16x16 pixels become a prompt token and the VAE encoder's memory grows with "
                            f"the area): scale it down first")


def images_to_unit(images: torch.Tensor) -> torch.Tensor:
    """VAE output in [-1, 1] to [0, 1], clamped, as the official post-processing does."""
    return (images / 2 + 0.5).clamp(0, 1)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] to uint8 with round-to-nearest, as PIL saving of the official pipeline does."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def save_png(images: torch.Tensor, out: str | Path) -> list[Path]:
    """Save [B, 3, H, W] in [0, 1] as OUT.png, or OUT_0.png, OUT_1.png, ... for a batch."""
    out = Path(out)
    pixels = to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()
    paths = [out] if len(pixels) == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(len(pixels))]
    for path, array in zip(paths, pixels):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(path)
    return paths


def center_crop_to_multiple(images: torch.Tensor, multiple: int) -> torch.Tensor:
    """Centre-crop [B, C, H, W] so H and W are multiples of `multiple` (at least one multiple)."""
    height, width = images.shape[-2:]
    new_h, new_w = height - height % multiple, width - width % multiple
    if new_h == 0 or new_w == 0:
        raise NextStepError(f"image of {width}x{height} is smaller than {multiple}x{multiple}; it cannot be encoded")
    top, left = (height - new_h) // 2, (width - new_w) // 2
    return images[..., top:top + new_h, left:left + new_w]
