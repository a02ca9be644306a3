"""Live previews of an image while its tokens arrive: an affine latent -> RGB map per latent pixel.

Decoding with the VAE after every token would cost far more than the token itself, so the preview
approximates the decoder by one affine map from the 16 VAE-space latent channels to RGB, drawn at latent
resolution (1/8 of the image). The map is fitted once per model by least squares on the model's own VAE:
a fixed chart of random colour squares is encoded, decoded, and each latent pixel is paired with the mean
colour of the 8x8 pixels the decoder drew for it. Without a VAE at hand the preview shows the first three
latent channels instead (structure, not colour). Tokens not generated yet are drawn grey.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from nextstep_runtime import LatentNormalization, NextStepVAE, images_to_unit, unpatchify

VAE_DOWNSCALE = 8
CHART_CELLS = 8
"""The fitting chart is CHART_CELLS x CHART_CELLS squares of one token (16 px) each: 256 latent pixels,
enough for the 17 x 3 unknowns; encoding and decoding it with the full-size VAE takes a fraction of a second
on a GPU (about 4 s on two CPU cores), once per model."""
UNFILLED_GREY = 0.5


@dataclass(frozen=True)
class LatentToRGB:
    """rgb = latent @ weight + bias per latent pixel, clamped to [0, 1]."""

    weight: torch.Tensor   # [C, 3]
    bias: torch.Tensor     # [3]

    def __call__(self, latent: torch.Tensor) -> torch.Tensor:
        """VAE-space latent [C, h, w] to RGB [h, w, 3] in [0, 1]."""
        pixels = latent.movedim(0, -1).float().cpu()
        return (pixels @ self.weight + self.bias).clamp(0, 1)


def fit_latent_to_rgb(vae: NextStepVAE) -> LatentToRGB:
    """Least-squares fit of the affine map on `vae`'s own encode/decode of a fixed colour chart."""
    token_pixels = 2 * VAE_DOWNSCALE
    colours = torch.rand((1, 3, CHART_CELLS, CHART_CELLS), generator=torch.Generator().manual_seed(0))
    chart = colours.repeat_interleave(token_pixels, dim=2).repeat_interleave(token_pixels, dim=3)
    with torch.inference_mode():
        latent = vae.encode(chart * 2 - 1).float().cpu()
        drawn = images_to_unit(vae.decode(latent).float().cpu())
    target = F.avg_pool2d(drawn, VAE_DOWNSCALE)
    inputs = latent[0].flatten(1).T
    design = torch.cat([inputs, torch.ones(len(inputs), 1)], dim=1)
    solution = torch.linalg.lstsq(design, target[0].flatten(1).T).solution
    return LatentToRGB(solution[:-1].contiguous(), solution[-1].contiguous())


def channel_view(channels: int) -> LatentToRGB:
    """Channels 0, 1, 2 as red, green, blue, mid-grey at 0 and saturating at about +-2.5 (a unit-variance
    latent's usual range)."""
    weight = torch.zeros(channels, 3)
    weight[[0, 1, 2], [0, 1, 2]] = 0.2
    return LatentToRGB(weight, torch.full((3,), UNFILLED_GREY))


@dataclass(frozen=True)
class TokenPreview:
    """Draws the first image of a batch from the tokens generated so far."""

    to_rgb: LatentToRGB
    normalization: LatentNormalization
    grid: tuple[int, int]          # tokens per column, per row
    patch: int                     # latent pixels per token side

    def render(self, tokens: torch.Tensor) -> Image.Image:
        """Model-space tokens [B, done, D] to an RGB image at latent resolution, grey where none yet."""
        rows, cols = self.grid
        done = tokens.shape[1]
        first = tokens[:1].float().cpu()
        padded = torch.cat([first, first.new_zeros(1, rows * cols - done, first.shape[2])], dim=1)
        latent = self.normalization.to_vae_space(unpatchify(padded, rows, cols, self.patch))[0]
        rgb = self.to_rgb(latent)
        filled = (torch.arange(rows * cols) < done).view(rows, cols)
        filled = filled.repeat_interleave(self.patch, 0).repeat_interleave(self.patch, 1)
        rgb[~filled] = UNFILLED_GREY
        return Image.fromarray((rgb * 255).round().to(torch.uint8).numpy())
