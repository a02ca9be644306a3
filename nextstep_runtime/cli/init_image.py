"""The CLI's image inputs read from files: an init image to continue, inpaint or outpaint (with its mask),
and an editing input image resized to the output size.

An init image is a picture (centre-cropped to multiples of 16, then VAE-encoded) or a `.safetensors` file
written by `--save-tensors`, whose VAE-space `latents` are continued exactly (no VAE round trip, so kept
tokens are the saved run's own tokens).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import NextStepError
from ..images import center_crop_to_multiple, check_input_image_size, load_rgb, read_pixels
from ..validation import MAX_SIZE, SIZE_MULTIPLE, check_finite


@dataclass(frozen=True)
class InitImage:
    """Exactly one of `pixels` [1, 3, H, W] in [0, 1] and `latents` [B, C, H/8, W/8] (VAE space) is set."""

    pixels: torch.Tensor | None
    latents: torch.Tensor | None
    original_size: tuple[int, int]     # (width, height) in the file, before cropping

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the output."""
        shape = self.pixels.shape if self.pixels is not None else self.latents.shape
        scale = 1 if self.pixels is not None else 8
        return shape[-1] * scale, shape[-2] * scale


def _note_crop(path: str | Path, before: torch.Tensor, after: torch.Tensor) -> None:
    if after.shape != before.shape:
        sys.stderr.write(f"note: {path} centre-cropped from {before.shape[-1]}x{before.shape[-2]} to "
                         f"{after.shape[-1]}x{after.shape[-2]} (multiples of {SIZE_MULTIPLE})\n")


def load_cropped_rgb(path: str | Path, size: tuple[int, int] | None = None) -> torch.Tensor:
    """An image file as RGB [1, 3, H, W] in [0, 1], resized to `size` (width, height) when given (as the
    official editing example resizes its input to the output size), centre-cropped to multiples of 16."""
    image = load_rgb(path, size, max_side=MAX_SIZE)
    cropped = center_crop_to_multiple(image, SIZE_MULTIPLE)
    _note_crop(path, image, cropped)
    return cropped


def load_init_image(path: str | Path) -> InitImage:
    """A picture or a `--save-tensors` file (see the module docstring)."""
    if str(path).endswith(".safetensors"):
        latents = _saved_latents(path)
        return InitImage(None, latents, (latents.shape[-1] * 8, latents.shape[-2] * 8))
    image = load_rgb(path, max_side=MAX_SIZE)
    cropped = center_crop_to_multiple(image, SIZE_MULTIPLE)
    _note_crop(path, image, cropped)
    return InitImage(cropped, None, (image.shape[-1], image.shape[-2]))


def _saved_latents(path: str | Path) -> torch.Tensor:
    """The `latents` of a --save-tensors file as float32, its shape checked from the file's header (the size rule of
    every input image) and its values for NaN before use."""
    what = f"init image {path}"
    try:
        with safe_open(path, "pt") as saved:
            if "latents" not in saved.keys():
                raise NextStepError(f"{what} holds no `latents` [batch, channels, height/8, width/8]; give a file "
                                    f"written by --save-tensors, or a picture")
            shape = saved.get_slice("latents").get_shape()
            if len(shape) != 4:
                raise NextStepError(f"{what} holds `latents` of shape {list(shape)}, not [batch, channels, height/8, "
                                    f"width/8]; give a file written by --save-tensors, or a picture")
            check_input_image_size(shape[-1] * 8, shape[-2] * 8, what, MAX_SIZE)
            latents = saved.get_tensor("latents")
    except (FileNotFoundError, SafetensorError, OSError) as exc:
        raise NextStepError(f"cannot read {what} ({exc})") from None
    return check_finite(latents, f"{what} (its `latents`)").float()


def load_mask(path: str | Path, init: InitImage) -> torch.Tensor:
    """A mask file as [1, H, W] in [0, 1] (white = regenerate; colour images count by luminance). A mask of
    the init image's original size is cropped like the image; any other size is stretched to it later."""
    array = read_pixels(path, f"mask {path}", "L", max_side=MAX_SIZE)
    mask = torch.from_numpy(array)[None, None]
    if (array.shape[1], array.shape[0]) == init.original_size:
        mask = center_crop_to_multiple(mask, SIZE_MULTIPLE)
    return mask[:, 0]
