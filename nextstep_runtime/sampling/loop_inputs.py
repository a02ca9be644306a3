"""Everything the token loop needs for one call, prepared on the host before the first token (pipeline.prepare)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .keep_mask import KeptTokens
from .noise import NoiseSpec
from .prompt import PromptRows
from .solvers import SolverPlan


@dataclass(frozen=True)
class TokenLoopInputs:
    """Everything the loop needs, prepared on the host before the first token."""

    rows: PromptRows
    image_tokens: torch.Tensor | None   # [placeholders over all image rows, D], model space
    plan: SolverPlan
    cfg: list[float]                    # per token
    cfg_img: list[float]                # per token
    noise: NoiseSpec
    batch: int
    grid: tuple[int, int]
    use_norm: bool
    kept: KeptTokens | None = None      # None: every token is sampled
