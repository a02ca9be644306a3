"""Image tokens <-> latents: a token is one p x p patch of every channel, channel-major, raster order."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange

from ..config import ModelConfig


@dataclass(frozen=True)
class LatentNormalization:
    """Model-space tokens are `(vae_latent - shift) * scale`; ComfyUI LATENTs are in VAE space."""

    scale: float = 1.0
    shift: float = 0.0

    def to_model_space(self, latent: torch.Tensor) -> torch.Tensor:
        return (latent - self.shift) * self.scale

    def to_vae_space(self, latent: torch.Tensor) -> torch.Tensor:
        return latent / self.scale + self.shift


def token_grid(config: ModelConfig, height: int, width: int) -> tuple[int, int]:
    """Image tokens down and across an image of that many pixels: one token is a patch of latent pixels,
    each 8 image pixels square."""
    patch_pixels = 8 * config.latent_patch_size
    return height // patch_pixels, width // patch_pixels


def patchify(latent: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/p)(W/p), C*p*p], tokens in raster order, values (c, row, col)."""
    return rearrange(latent, "b c (h p) (w q) -> b (h w) (c p q)", p=patch, q=patch)


def unpatchify(tokens: torch.Tensor, grid_h: int, grid_w: int, patch: int) -> torch.Tensor:
    """[B, grid_h*grid_w, C*p*p] -> [B, C, grid_h*p, grid_w*p]."""
    return rearrange(tokens, "b (h w) (c p q) -> b c (h p) (w q)", h=grid_h, w=grid_w, p=patch, q=patch)
