"""The 2-D sin-cos position embedding that configs with `use_gen_pos_embed: true` add to the condition of
every image token (after the decoder's final norm, before `image_out_projector`).

The official code (2025) builds one table for a fixed 32 x 32 grid, the MAE layout: entry n stands for
column n % side and row n // side, its first half the sines then cosines of the column, its second half
those of the row, frequencies 1/10000^(i / (dim/4)). Image token n takes entry n, for every image size.
The table is a persistent buffer, so official exports store it (`gen_pos_embed`, [1, 1024, hidden]) and
loading fills it from the checkpoint. vLLM-Omni's port builds it with side `base_image_grid_size` instead
(for images at least that many pixels wide, its lookup is the same flat entry n).
"""

from __future__ import annotations

import torch

from ..errors import NextStepError

OFFICIAL_POSITION_GRID = 32
"""Side of the official code's `gen_pos_embed` table (32 x 32 tokens: a 512 x 512 image)."""


def sincos_position_table(dim: int, side: int) -> torch.Tensor:
    """[side * side, dim] float32, computed in float64 as the official numpy code does."""
    if dim % 4:
        raise NextStepError(f"hidden_size {dim} is not a multiple of 4, which the 2-D sin-cos position embedding "
                            f"(use_gen_pos_embed) needs")
    quarter = dim // 4
    frequencies = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    index = torch.arange(side * side, dtype=torch.float64)

    def one_axis(positions: torch.Tensor) -> torch.Tensor:
        angles = positions[:, None] * frequencies[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([one_axis(index % side), one_axis(torch.div(index, side, rounding_mode="floor"))], dim=1).float()


def condition_offsets(table: torch.Tensor, tokens: int) -> torch.Tensor:
    """The rows added to the conditions of an image's `tokens` tokens, in generation order."""
    if tokens > table.shape[0]:
        raise NextStepError(f"this model adds a position embedding (use_gen_pos_embed) from a table of "
                            f"{table.shape[0]} image tokens, fewer than the {tokens} of this image size; choose a "
                            f"smaller size")
    return table[:tokens]
