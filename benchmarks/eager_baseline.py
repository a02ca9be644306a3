"""A straightforward eager token loop, the reference the benchmark reports its speed-up against.

It computes what `nextstep_runtime.generate.sample_tokens` computes, the way a direct transcription of
the official pipeline does: each solver step evaluates the whole flow head (time embedding, condition
embedding, every adaLN modulation) for that step alone and draws its noise when it needs it. The
backbone and its KV cache are the runtime's own, so the ratio measures the token loop's head work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nextstep_runtime.backbone import prefix_attention_mask
from nextstep_runtime.model import NextStepModel
from nextstep_runtime.pipeline import GenerationSettings, NextStepPipeline
from nextstep_runtime.prompt import build_rows
from nextstep_runtime.sampling import combine_guidance, guidance_scales, solver_plan


@torch.inference_mode()
def eager_sample(pipe: NextStepPipeline, caption: str, negative: str, settings: GenerationSettings) -> torch.Tensor:
    """Tokens [B, L, D] for a text-to-image call, step by step."""
    model: NextStepModel = pipe.model
    config, device, dtype = model.config, model.device, model.dtype
    head = model.image_head.net
    grid = (settings.height // 16, settings.width // 16)
    total = grid[0] * grid[1]
    rows = build_rows(pipe.tokenizer, caption, negative, None, [], grid, settings.batch, settings.cfg,
                      settings.cfg_img, settings.profile, config.boi)
    plan = solver_plan(settings.sampler, settings.steps, settings.timesteps_shift)
    cfg = guidance_scales(settings.cfg, total, settings.cfg_schedule, settings.profile)
    generator = torch.Generator().manual_seed(settings.seed)
    row_count, prefill = rows.input_ids.shape
    cache = model.new_cache(row_count, prefill + total)
    valid = torch.ones((row_count, prefill + total), dtype=torch.bool, device=device)
    valid[:, :prefill] = rows.attention_mask.to(device).bool()
    positions = torch.arange(prefill, device=device).expand(row_count, -1)
    hidden = model.decode(model.embed_prompt(rows.input_ids.to(device), None), positions, cache,
                          prefix_attention_mask(valid[:, :prefill]))
    tokens = []
    for n in range(total):
        x = torch.randn((settings.batch, config.token_dim), generator=generator).to(device)
        for k in range(settings.steps):
            t = torch.tensor([plan.times[k]], device=device)
            modulations = head.modulations(head.time_embed(t), hidden)
            velocity = head.velocity(x.to(dtype).repeat(rows.groups, 1), modulations, 0).float()
            guided = combine_guidance(velocity.view(rows.groups, settings.batch, -1), torch.tensor(cfg[n]),
                                      torch.tensor(1.0))
            x = plan.a[k] * x + plan.b[k] * guided
            if plan.stochastic:
                x = x + plan.c[k] * torch.randn((settings.batch, config.token_dim), generator=generator).to(device)
        if settings.use_norm:
            x = F.layer_norm(x, (config.token_dim,), eps=1e-6)
        tokens.append(x)
        position = torch.tensor([prefill + n], device=device)
        mask = valid[:, None, None, :] & (torch.arange(valid.shape[1], device=device) <= position)
        hidden = model.decode(model.embed_image_token(x.repeat(rows.groups, 1)), position.expand(row_count, 1), cache,
                              mask, cache_position=position)
    return torch.stack(tokens, dim=1)
