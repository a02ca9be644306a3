"""The flow-matching head: a small residual MLP with adaLN that predicts a token's velocity.

Split so the token loop can do per-token and per-step work once: `time_embeddings` for a whole
step grid, `cond_embed` once per token, then `velocity` per step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SINUSOID_DIM = 256


def sinusoidal_embedding(t: torch.Tensor) -> torch.Tensor:
    """[cos(t f), sin(t f)] with f_i = exp(-ln(10000) i / 128): t is flow time in [0, 1], unscaled."""
    half = SINUSOID_DIM // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat((torch.cos(angles), torch.sin(angles)), dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(SINUSOID_DIM, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoidal_embedding(t).to(self.mlp[0].weight.dtype))


class ResBlock(nn.Module):
    """x + gate * mlp(LN(x) * (1 + scale) + shift), with (shift, scale, gate) from adaLN(y)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(torch.addcmul(shift, self.in_ln(x), 1 + scale))


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_dim: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(width, eps=1e-6, elementwise_affine=False)
        self.linear = nn.Linear(width, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(torch.addcmul(shift, self.norm_final(x), 1 + scale))


class FlowNet(nn.Module):
    """Parameters live under `image_head.net.*` in the checkpoints."""

    def __init__(self, token_dim: int, cond_dim: int, width: int, depth: int) -> None:
        super().__init__()
        self.input_proj = nn.Linear(token_dim, width)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.time_embed = TimestepEmbedder(width)
        self.res_blocks = nn.ModuleList(ResBlock(width) for _ in range(depth))
        self.final_layer = FinalLayer(width, token_dim)

    def velocity(self, x: torch.Tensor, time_embedding: torch.Tensor, cond_embedding: torch.Tensor) -> torch.Tensor:
        """Velocity for tokens x [N, token_dim] given precomputed time [N or 1, W] and cond [N, W] embeddings."""
        y = time_embedding + cond_embedding
        h = self.input_proj(x)
        for block in self.res_blocks:
            h = block(h, y)
        return self.final_layer(h, y)


class FlowHead(nn.Module):
    def __init__(self, token_dim: int, cond_dim: int, width: int, depth: int) -> None:
        super().__init__()
        self.net = FlowNet(token_dim, cond_dim, width, depth)
