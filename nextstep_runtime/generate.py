"""The autoregressive token loop: prefill once, then per token run the flow head's solver with
guidance and feed the sampled token back through the decoder."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .backbone import padded_attention_mask
from .model import NextStepModel
from .prompt import PromptRows
from .sampling import SolverPlan, combine_guidance

TokenCallback = Callable[[int, int, torch.Tensor], None]
"""Called after each token with (tokens done, tokens total, tokens so far [B, done, D]).

Raising from it (e.g. on a user's cancel) stops generation; nothing is kept alive afterwards."""


@dataclass(frozen=True)
class TokenLoopInputs:
    """Everything the loop needs, prepared on the host before the first token."""

    rows: PromptRows
    image_tokens: torch.Tensor | None   # [placeholders over all image rows, D], model space
    plan: SolverPlan
    cfg: list[float]                    # per token
    cfg_img: list[float]                # per token
    noise: torch.Tensor                 # [L, 1 + stochastic steps, B, D] float32, CPU-seeded
    batch: int
    grid: tuple[int, int]
    use_norm: bool


def draw_noise(seed: int, tokens: int, steps: int, stochastic: bool, batch: int, dim: int) -> torch.Tensor:
    """The whole image's noise in one draw from a CPU generator: per token its initial noise, then one
    draw per stochastic step. On CPU this is the same stream as drawing them one by one."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    draws = 1 + (steps if stochastic else 0)
    return torch.randn((tokens, draws, batch, dim), generator=generator, dtype=torch.float32)


@torch.inference_mode()
def sample_tokens(model: NextStepModel, inputs: TokenLoopInputs, callback: TokenCallback | None = None) -> torch.Tensor:
    """Generate every image token; returns [B, L, D] float32 (after use_norm when on)."""
    device, dtype = model.device, model.dtype
    rows, plan = inputs.rows, inputs.plan
    batch, groups = inputs.batch, inputs.rows.groups
    total_tokens = inputs.grid[0] * inputs.grid[1]
    dim = model.config.token_dim
    head = model.image_head.net

    input_ids = rows.input_ids.to(device)
    prefill_len = input_ids.shape[1]
    capacity = prefill_len + total_tokens - 1
    padded = bool((rows.attention_mask == 0).any())
    key_valid = torch.ones((input_ids.shape[0], capacity), dtype=torch.bool, device=device)
    key_valid[:, :prefill_len] = rows.attention_mask.to(device).bool()
    cache = model.new_cache(input_ids.shape[0], capacity)

    image_tokens = inputs.image_tokens.to(device) if inputs.image_tokens is not None else None
    embeds = model.embed_prompt(input_ids, image_tokens)
    positions = torch.arange(prefill_len, device=device).expand(input_ids.shape[0], -1)
    prefill_mask = padded_attention_mask(key_valid[:, :prefill_len], 0, prefill_len) if padded else None
    condition = model.decode(embeds, positions, cache, prefill_mask)

    time_embeddings = head.time_embed(torch.tensor(plan.times, device=device))
    noise = inputs.noise.to(device)
    cfg = torch.tensor(inputs.cfg, dtype=torch.float32, device=device)
    cfg_img = torch.tensor(inputs.cfg_img, dtype=torch.float32, device=device)
    out = torch.empty((batch, total_tokens, dim), dtype=torch.float32, device=device)

    for n in range(total_tokens):
        cond_embedding = head.cond_embed(condition)
        x = noise[n, 0]
        for k in range(len(plan.times)):
            rows_x = x.to(dtype).repeat(groups, 1)
            velocity = head.velocity(rows_x, time_embeddings[k], cond_embedding).float()
            guided = combine_guidance(velocity.view(groups, batch, dim), cfg[n], cfg_img[n])
            x = plan.a[k] * x + plan.b[k] * guided
            if plan.stochastic:
                x = x + plan.c[k] * noise[n, 1 + k]
        if inputs.use_norm:
            x = F.layer_norm(x, (dim,), eps=1e-6)
        out[:, n] = x
        if callback is not None:
            callback(n + 1, total_tokens, out[:, : n + 1])
        if n + 1 < total_tokens:
            step_pos = prefill_len + n
            mask = key_valid[:, None, None, : step_pos + 1] if padded else None
            condition = model.decode(model.embed_image_token(x.repeat(groups, 1)),
                                     torch.full((input_ids.shape[0], 1), step_pos, device=device), cache, mask)
    return out
