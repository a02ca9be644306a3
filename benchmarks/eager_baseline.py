"""A straightforward eager token loop, the reference the benchmark reports its speed-up against.

It computes what `nextstep_runtime.sampling.token_loop.sample_tokens` computes, the way a direct transcription of
the official pipeline does: each solver step evaluates the whole flow head (time embedding, condition
embedding, every adaLN modulation) for that step alone and draws its noise when it needs it. The
backbone and its KV cache are the runtime's own, so the ratio measures the token loop's head work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nextstep_runtime import GenerationSettings, NextStepPipeline
from nextstep_runtime.model.network import NextStepModel
from nextstep_runtime.sampling.solvers import combine_guidance
from nextstep_runtime.sampling.token_loop import DecodeState


@torch.inference_mode()
def eager_sample(pipe: NextStepPipeline, caption: str, negative: str, settings: GenerationSettings) -> torch.Tensor:
    """Tokens [B, L, D] for a text-to-image call, step by step."""
    model: NextStepModel = pipe.model
    config, device, dtype = model.config, model.device, model.dtype
    head = model.image_head.net
    inputs = pipe.prepare(caption, settings, negative=negative)
    rows, plan = inputs.rows, inputs.plan
    total = inputs.grid[0] * inputs.grid[1]
    generator = torch.Generator().manual_seed(settings.seed)
    state = DecodeState(model, rows, total)
    hidden = state.prefill(rows, None)
    tokens = []
    for n in range(total):
        x = torch.randn((settings.batch, config.token_dim), generator=generator).to(device)
        for k in range(settings.steps):
            t = torch.tensor([plan.times[k]], device=device)
            modulations = head.modulations(head.time_embed(t), hidden)
            velocity = head.velocity(x.to(dtype).repeat(rows.groups, 1), modulations, torch.zeros(1, dtype=torch.long, device=device)).float()
            guided = combine_guidance(velocity.view(rows.groups, settings.batch, -1), torch.tensor(inputs.cfg[n]),
                                      torch.tensor(1.0))
            x = plan.a[k] * x + plan.b[k] * guided
            if plan.stochastic:
                x = x + plan.c[k] * torch.randn((settings.batch, config.token_dim), generator=generator).to(device)
        if settings.use_norm:
            x = F.layer_norm(x, (config.token_dim,), eps=1e-6)
        tokens.append(x)
        if n + 1 < total:
            hidden = state.feed(x, torch.tensor([state.prefill_len + n], device=device))
    return torch.stack(tokens, dim=1)
