"""The f8ch16 image tokenizer: a Flux/LDM-style AutoencoderKL with NextStep's latent normalisation.

Module names follow the checkpoint (`encoder.down.I.block.J`, `decoder.up.I`, `mid.attn_1`, ...).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VAEConfig
from .tokens import patchify, unpatchify


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions of the (lowest-resolution) feature map."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        normed = self.norm(x)
        q, k, v = (proj(normed).reshape(b, 1, c, h * w).transpose(2, 3) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v).transpose(2, 3).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Mid(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class _Level(nn.Module):
    """One resolution level: res blocks plus an optional resampler (`downsample` or `upsample`)."""

    def __init__(self, channels: list[tuple[int, int]]) -> None:
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(i, o) for i, o in channels)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        in_mult = (1,) + cfg.ch_mult
        self.down = nn.ModuleList()
        for level, mult in enumerate(cfg.ch_mult):
            block_in, block_out = cfg.ch * in_mult[level], cfg.ch * mult
            stage = _Level([(block_in, block_out)] + [(block_out, block_out)] * (cfg.num_res_blocks - 1))
            if level != len(cfg.ch_mult) - 1:
                stage.downsample = Downsample(block_out)
            self.down.append(stage)
        top = cfg.ch * cfg.ch_mult[-1]
        self.mid = _Mid(top)
        self.norm_out = _group_norm(top)
        self.conv_out = nn.Conv2d(top, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        block_in = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = _Mid(block_in)
        levels: list[_Level] = []
        for level in reversed(range(len(cfg.ch_mult))):
            block_out = cfg.ch * cfg.ch_mult[level]
            stage = _Level([(block_in, block_out)] + [(block_out, block_out)] * cfg.num_res_blocks)
            if level != 0:
                stage.upsample = Upsample(block_out)
            levels.insert(0, stage)
            block_in = block_out
        self.up = nn.ModuleList(levels)
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for stage in reversed(self.up):
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class NextStepVAE(nn.Module):
    """Encoder and decoder; latents in and out are in VAE space (see LatentNormalization)."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder.conv_in.weight.device

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Images [B,3,H,W] in [-1,1] to the VAE-space latent [B,z,H/8,W/8]: the encoder mean,
        patch-normalised when `encoder_norm` (LayerNorm over each psz x psz x z patch; over the z values of
        each position when psz is null)."""
        moments = self.encoder(pixels.to(self.device, self.dtype))
        mean = moments[:, : self.config.z_channels]
        if self.config.encoder_norm:
            psz = self.config.psz or 1
            tokens = patchify(mean, psz)
            tokens = F.layer_norm(tokens, tokens.shape[-1:], eps=1e-6)
            mean = unpatchify(tokens, mean.shape[2] // psz, mean.shape[3] // psz, psz)
        return mean

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """VAE-space latent [B,z,h,w] to images [B,3,8h,8w] in about [-1,1] (not clamped)."""
        return self.decoder(latent.to(self.device, self.dtype))


def vae_parameter_count(config: VAEConfig) -> int:
    """Parameters of the network this config describes, counted on the meta device (no memory used)."""
    with torch.device("meta"):
        vae = NextStepVAE(config)
    return sum(tensor.numel() for tensor in vae.state_dict().values())
