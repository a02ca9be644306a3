"""The flow head sampling one image token from its condition: the solver's steps, each with classifier-free guidance.

Per token the head runs S solver steps on every guidance row; each step is x' = a x + c n + b v_guided, with the
guided velocity a weighted sum of the rows' velocities (solvers.guidance_weights). Everything that does not depend on
the token is prepared once per call: the time embeddings of the step grid, the step coefficients times each row's
guidance weight, the noise scaled by its coefficient; per token, the adaLN modulations of every step are computed in
one batched matmul (FlowNet.modulations).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model.network import NextStepModel
from .compiled_step import SolverSteps
from .loop_inputs import TokenLoopInputs
from .solvers import guidance_weights


class GuidedHead:
    """Samples one image token from its condition: the flow head's solver steps with guidance.

    The token index is a device tensor (noise and guidance scales are gathered with it), so the same
    work can be replayed for every token. The noise lives in fixed chunk buffers, refilled in place by
    `load_noise` between chunks; a token reads slot `index % chunk_tokens`. The solver state stays in
    float32 whatever the model dtype; only the head runs in that dtype.
    """

    def __init__(self, model: NextStepModel, inputs: TokenLoopInputs, compile: bool = False) -> None:
        device = model.device
        plan = inputs.plan
        self.steps = SolverSteps(compile, device)
        self.step_indices = [torch.tensor([k], device=device) for k in range(len(plan.a))]
        self.head = model.image_head.net
        self.groups, self.batch = inputs.rows.groups, inputs.batch
        self.dim = model.config.token_dim
        self.use_norm = inputs.use_norm
        self.keep = torch.tensor(plan.a, device=device)
        self.time_embeddings = self.head.time_embed(torch.tensor(plan.times, device=device))
        spec = inputs.noise
        self.chunk_tokens = spec.chunk_tokens
        self.initial_noise = torch.zeros((spec.chunk_tokens, spec.batch, spec.dim), device=device)
        # per token and step: the solver's velocity coefficient times each row's guidance weight [L, S, G, 1],
        # and the step's noise already scaled [chunk, S, B, D]: a step is then x' = (a x + c n) + sum_g W_g v_g,
        # elementwise in float32 (a matmul here could silently run in TF32 where a host enables it)
        weights = torch.tensor(guidance_weights(self.groups, inputs.cfg, inputs.cfg_img), device=device)
        self.step_weights = (weights[:, None, :] * torch.tensor(plan.b, device=device)[None, :, None])[..., None]
        self.noise_coefficients = torch.tensor(plan.c, device=device)[None, :, None, None]
        self.step_noise = (torch.zeros((spec.chunk_tokens, spec.draws - 1, spec.batch, spec.dim), device=device)
                           if plan.stochastic else None)

    def load_noise(self, chunk: torch.Tensor) -> None:
        """Refill the noise buffers in place with the next chunk [tokens, draws, B, D] (moved to the device
        once); stream-ordered after the tokens still reading the previous chunk."""
        chunk = chunk.to(self.initial_noise.device)
        count = chunk.shape[0]
        self.initial_noise[:count].copy_(chunk[:, 0])
        if self.step_noise is not None:
            torch.mul(chunk[:, 1:], self.noise_coefficients, out=self.step_noise[:count])

    def __call__(self, index: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """Token `index` ([1] long) [B, D] float32 from the decoder's condition [R, hidden]."""
        weights = self.step_weights.index_select(0, index)[0]
        slot = torch.remainder(index, self.chunk_tokens)
        noise = self.step_noise.index_select(0, slot)[0].flatten(1) if self.step_noise is not None else None
        modulations = self.steps.modulations(self.head, self.time_embeddings, condition)
        x = self.initial_noise.index_select(0, slot).flatten(1)  # [1, B*D]
        for step in self.step_indices:
            x = self.steps.step(self.head, x, modulations, step, weights, noise, self.keep)
        x = x.view(self.batch, self.dim)
        return F.layer_norm(x, (self.dim,), eps=1e-6) if self.use_norm else x
