"""The autoregressive token loop: prefill once, then per token run the flow head's solver with
guidance and feed the sampled token back through the decoder.

Everything that does not depend on the token is prepared before the loop: the KV cache for all
guidance rows, the time embeddings of the step grid, the solver coefficients, the per-token guidance
scales and the whole image's noise. The loop itself does no host-device synchronisation.
"""

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


class TokenSolver:
    """Samples one image token from its condition: the flow head's solver steps with guidance.

    The solver state stays in float32 whatever the model dtype; only the head runs in that dtype.
    """

    def __init__(self, model: NextStepModel, inputs: TokenLoopInputs) -> None:
        device = model.device
        self.head = model.image_head.net
        self.dtype = model.dtype
        self.plan = inputs.plan
        self.groups, self.batch = inputs.rows.groups, inputs.batch
        self.dim = model.config.token_dim
        self.use_norm = inputs.use_norm
        self.time_embeddings = self.head.time_embed(torch.tensor(inputs.plan.times, device=device))
        self.noise = inputs.noise.to(device)
        self.cfg = torch.tensor(inputs.cfg, dtype=torch.float32, device=device)
        self.cfg_img = torch.tensor(inputs.cfg_img, dtype=torch.float32, device=device)

    def __call__(self, index: int, condition: torch.Tensor) -> torch.Tensor:
        """Token `index` [B, D] float32 from the decoder's condition [R, hidden]."""
        plan, noise = self.plan, self.noise[index]
        modulations = self.head.modulations(self.time_embeddings, condition)
        x = noise[0]
        for k in range(len(plan.times)):
            velocity = self.head.velocity(x.to(self.dtype).repeat(self.groups, 1), modulations, k).float()
            guided = combine_guidance(velocity.view(self.groups, self.batch, self.dim), self.cfg[index],
                                      self.cfg_img[index])
            x = plan.a[k] * x + plan.b[k] * guided
            if plan.stochastic:
                x = x + plan.c[k] * noise[1 + k]
        return F.layer_norm(x, (self.dim,), eps=1e-6) if self.use_norm else x


class DecodeState:
    """The KV cache of every guidance row plus which cached keys are real (not left padding)."""

    def __init__(self, model: NextStepModel, rows: PromptRows, image_tokens: int) -> None:
        device = model.device
        self.model = model
        self.groups = rows.groups
        self.row_count, self.prefill_len = rows.input_ids.shape
        capacity = self.prefill_len + image_tokens - 1
        self.padded = bool((rows.attention_mask == 0).any())
        self.key_valid = torch.ones((self.row_count, capacity), dtype=torch.bool, device=device)
        self.key_valid[:, : self.prefill_len] = rows.attention_mask.to(device).bool()
        self.cache = model.new_cache(self.row_count, capacity)

    def prefill(self, rows: PromptRows, image_tokens: torch.Tensor | None) -> torch.Tensor:
        """Run the prompt rows from an empty cache; returns the condition for the first image token [R, hidden]."""
        model, device, length = self.model, self.model.device, self.prefill_len
        self.cache.length = 0
        tokens = image_tokens.to(device) if image_tokens is not None else None
        positions = torch.arange(length, device=device).expand(self.row_count, -1)
        mask = padded_attention_mask(self.key_valid[:, :length], 0, length) if self.padded else None
        return model.decode(model.embed_prompt(rows.input_ids.to(device), tokens), positions, self.cache, mask)

    def feed(self, token: torch.Tensor) -> torch.Tensor:
        """Append a sampled token [B, D] to every guidance row; returns the next condition."""
        position = self.cache.length
        mask = self.key_valid[:, None, None, : position + 1] if self.padded else None
        positions = torch.full((self.row_count, 1), position, device=self.model.device)
        return self.model.decode(self.model.embed_image_token(token.repeat(self.groups, 1)), positions, self.cache, mask)


@torch.inference_mode()
def sample_tokens(model: NextStepModel, inputs: TokenLoopInputs, callback: TokenCallback | None = None) -> torch.Tensor:
    """Generate every image token; returns [B, L, D] float32 (after use_norm when on)."""
    total_tokens = inputs.grid[0] * inputs.grid[1]
    state = DecodeState(model, inputs.rows, total_tokens)
    condition = state.prefill(inputs.rows, inputs.image_tokens)
    solve = TokenSolver(model, inputs)
    out = torch.empty((inputs.batch, total_tokens, model.config.token_dim), dtype=torch.float32, device=model.device)
    for n in range(total_tokens):
        x = solve(n, condition)
        out[:, n] = x
        if callback is not None:
            callback(n + 1, total_tokens, out[:, : n + 1])
        if n + 1 < total_tokens:
            condition = state.feed(x)
    return out
