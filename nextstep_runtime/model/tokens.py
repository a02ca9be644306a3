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


VAE_DOWNSCALE = 8
"""Image pixels per latent pixel, down and across (the f8 VAE)."""


def image_size_of(latent: torch.Tensor) -> tuple[int, int]:
    """(height, width) in pixels of the image a VAE latent [..., h, w] stands for."""
    return VAE_DOWNSCALE * latent.shape[-2], VAE_DOWNSCALE * latent.shape[-1]


def token_pixels(config: ModelConfig) -> int:
    """Image pixels per token, down and across: a patch of latent pixels."""
    return VAE_DOWNSCALE * config.latent_patch_size


def token_grid(config: ModelConfig, height: int, width: int) -> tuple[int, int]:
    """Image tokens down and across an image of that many pixels."""
    return height // token_pixels(config), width // token_pixels(config)


def patchify(latent: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/p)(W/p), C*p*p], tokens in raster order, values (c, row, col)."""
    return rearrange(latent, "b c (h p) (w q) -> b (h w) (c p q)", p=patch, q=patch)


def unpatchify(tokens: torch.Tensor, grid_h: int, grid_w: int, patch: int) -> torch.Tensor:
    """[B, grid_h*grid_w, C*p*p] -> [B, C, grid_h*p, grid_w*p]."""
    return rearrange(tokens, "b (h w) (c p q) -> b c (h p) (w q)", h=grid_h, w=grid_w, p=patch, q=patch)
