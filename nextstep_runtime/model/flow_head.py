"""The flow-matching head: a small residual MLP with adaLN that predicts a token's velocity.

Split so the token loop can do per-token and per-step work once: `time_embeddings` for a whole
step grid, `cond_embed` once per token, then `velocity` per step.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

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

    def modulation(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """shift, 1 + scale, gate [..., W] for conditions y [..., W]."""
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return shift, 1 + scale, gate

    def forward(self, x: torch.Tensor, shift: torch.Tensor, scale_plus_one: torch.Tensor,
                gate: torch.Tensor) -> torch.Tensor:
        hidden = self.mlp[0](torch.addcmul(shift, self.in_ln(x), scale_plus_one))
        return torch.addcmul(x, gate, self.mlp[2](F.silu(hidden)))


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_dim: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(width, eps=1e-6, elementwise_affine=False)
        self.linear = nn.Linear(width, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def modulation(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """shift, 1 + scale [..., W]."""
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return shift, 1 + scale

    def forward(self, x: torch.Tensor, shift: torch.Tensor, scale_plus_one: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.addcmul(shift, self.norm_final(x), scale_plus_one))


class FlowNet(nn.Module):
    """Parameters live under `image_head.net.*` in the checkpoints.

    The adaLN input y = time_embed(t_k) + cond_embed(c) is known for every solver step as soon as the
    token's condition c is, so `modulations` computes all steps' shift/scale/gate in one batched matmul
    per block (the adaLN weights, 60% of the head, are read once per token instead of once per step);
    `velocity` then only runs the per-step MLPs.
    """

    def __init__(self, token_dim: int, cond_dim: int, width: int, depth: int) -> None:
        super().__init__()
        self.input_proj = nn.Linear(token_dim, width)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.time_embed = TimestepEmbedder(width)
        self.res_blocks = nn.ModuleList(ResBlock(width) for _ in range(depth))
        self.final_layer = FinalLayer(width, token_dim)

    def modulations(self, time_embeddings: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """[S, 3 depth + 2, R, W] for S step embeddings and R condition rows: per step, each block's shift,
        1 + scale and gate, then the final layer's shift and 1 + scale. Step-major, so a step's modulations are
        one contiguous slice, read with one gather per step (not one per block)."""
        y = time_embeddings[:, None] + self.cond_embed(condition)[None]
        parts = [part for layer in (*self.res_blocks, self.final_layer) for part in layer.modulation(y)]
        return torch.stack(parts, dim=1)

    def velocity(self, tokens: torch.Tensor, modulations: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """Velocity at solver step `step` ([1] long: a tensor, so one compiled graph serves every step) for the
        R modulation rows: tokens [B, token_dim] are projected once and shared by the R / B guidance rows."""
        h = self.input_proj(tokens)
        groups = modulations.shape[2] // tokens.shape[0]
        if groups > 1:
            h = torch.cat([h] * groups)
        parts = modulations.index_select(0, step)[0].unbind(0)
        for index, block in enumerate(self.res_blocks):
            h = block(h, *parts[3 * index: 3 * index + 3])
        return self.final_layer(h, *parts[-2:])


class FlowHead(nn.Module):
    def __init__(self, token_dim: int, cond_dim: int, width: int, depth: int) -> None:
        super().__init__()
        self.net = FlowNet(token_dim, cond_dim, width, depth)
