"""The f8ch16 image tokenizer: a Flux/LDM-style AutoencoderKL with NextStep's latent normalisation.

Module names follow the checkpoint (`encoder.down.I.block.J`, `decoder.up.I`, `mid.attn_1`, ...).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VAEConfig
from ..devices import DeviceTraits, sdpa_forms_scores
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


SCORE_CHUNK_BYTES = 256 * 2**20
"""Bound of the float32 score matrix a device whose SDPA forms it (devices.sdpa_forms_scores) holds at once."""


def attend_positions(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scores_formed: bool,
                     chunk_bytes: int = SCORE_CHUNK_BYTES) -> torch.Tensor:
    """SDPA of q over k/v [b, 1, positions, c]. Where the device's SDPA forms the whole (positions x positions) score
    matrix (Apple GPUs: 8.6 GB in bf16 for a 2048x2048 image), the queries go in chunks that bound it; each query's
    row is independent, so the result is the same."""
    if not scores_formed:
        return F.scaled_dot_product_attention(q, k, v)
    rows = max(1, chunk_bytes // (4 * k.shape[2]))
    return torch.cat([F.scaled_dot_product_attention(q[:, :, start: start + rows], k, v)
                      for start in range(0, q.shape[2], rows)], dim=2)


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
        # [b, 1, positions, c] made contiguous: SDPA's fused kernels (CUDA's memory-efficient one, the CPU's flash
        # one) need unit stride in the last dimension; a transposed view would send the call to the math backend,
        # which materialises the (h*w)^2 score matrix (17 GB at 2048x2048) and upcasts bf16 to float32
        q, k, v = (proj(normed).reshape(b, 1, c, h * w).transpose(2, 3).contiguous()
                   for proj in (self.q, self.k, self.v))
        out = attend_positions(q, k, v, sdpa_forms_scores(DeviceTraits.of(x.device)))
        return x + self.proj_out(out.transpose(2, 3).reshape(b, c, h, w))


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
