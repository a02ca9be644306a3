"""Which tokens of a given image are kept and which are regenerated (inpainting, outpainting, continuing).

A mask is in pixels, 1 = regenerate, as ComfyUI's SetLatentNoiseMask stores it and as a white-on-black
mask file reads. One token covers a 16x16-pixel cell; it is regenerated where any pixel of its cell has
mask >= 0.5, so a soft or feathered edge errs towards regenerating. A mask of another size than the image
is first stretched to the image's size bilinearly, as KSampler does with its noise mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import NextStepError

REGENERATE_THRESHOLD = 0.5


@dataclass(frozen=True)
class KeptTokens:
    """Tokens given instead of sampled: `tokens` [B, L, D] model space (fed and returned as they are),
    `mask` [B, L] bool, True where the token is kept."""

    tokens: torch.Tensor
    mask: torch.Tensor


def regenerated_cells(mask: torch.Tensor, height: int, width: int, token_pixels: int) -> torch.Tensor:
    """Pixel mask [H', W'], [B, H', W'] or [B, 1, H', W'] (1 = regenerate) to [B, tokens] bool, True where
    the token of the height x width image is regenerated (raster order)."""
    if mask.ndim not in (2, 3, 4) or (mask.ndim == 4 and mask.shape[1] != 1):
        raise NextStepError(f"a mask must be [height, width], [batch, height, width] or [batch, 1, height, width]; "
                            f"got {list(mask.shape)}")
    pixels = mask.float().reshape(-1, 1, mask.shape[-2], mask.shape[-1])
    if tuple(pixels.shape[-2:]) != (height, width):
        pixels = F.interpolate(pixels, size=(height, width), mode="bilinear")
    return (F.max_pool2d(pixels, token_pixels) >= REGENERATE_THRESHOLD).flatten(1)


def _batched(tensor: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    """A batch of one stands for every image; otherwise the batch sizes must match."""
    if tensor.shape[0] == batch:
        return tensor
    if tensor.shape[0] == 1:
        return tensor.expand(batch, *tensor.shape[1:])
    raise NextStepError(f"the {what} holds {tensor.shape[0]} images but the batch size is {batch}; give one "
                        f"{what} for all images or exactly {batch}")


def kept_tokens(tokens: torch.Tensor, regenerate: torch.Tensor | None, batch: int) -> KeptTokens | None:
    """The tokens to keep from `tokens` [1 or B, L, D] where `regenerate` [1 or B, L] is False; None when
    every token is regenerated (no mask: the image only gives the size)."""
    tokens = _batched(tokens, batch, "init image")
    if regenerate is None:
        return None
    keep = ~_batched(regenerate, batch, "mask")
    if not bool(keep.any()):
        return None
    return KeptTokens(tokens.float().contiguous(), keep.contiguous())
