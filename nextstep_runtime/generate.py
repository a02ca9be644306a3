"""The autoregressive token loop: prefill once, then per token run the flow head's solver with
guidance and feed the sampled token back through the decoder.

Everything that does not depend on the token is prepared before the loop: the KV cache for all
guidance rows, the time embeddings of the step grid, the solver coefficients, the per-token guidance
scales and the whole image's noise. The loop itself does no host-device synchronisation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .backbone import prefix_attention_mask
from .compiled_step import SolverSteps
from .model import NextStepModel
from .offload import StreamedLayer
from .prompt import PromptRows
from .sampling import SolverPlan, guidance_weights

log = logging.getLogger(__name__)

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

    The token index is a device tensor (noise and guidance scales are gathered with it), so the same
    work can be replayed for every token. The solver state stays in float32 whatever the model dtype;
    only the head runs in that dtype.
    """

    def __init__(self, model: NextStepModel, inputs: TokenLoopInputs, compile: bool = False) -> None:
        device = model.device
        plan = inputs.plan
        self.steps = SolverSteps(compile)
        self.step_indices = [torch.tensor([k], device=device) for k in range(len(plan.a))]
        self.head = model.image_head.net
        self.groups, self.batch = inputs.rows.groups, inputs.batch
        self.dim = model.config.token_dim
        self.use_norm = inputs.use_norm
        self.keep = torch.tensor(plan.a, device=device)
        self.time_embeddings = self.head.time_embed(torch.tensor(plan.times, device=device))
        noise = inputs.noise.to(device)
        self.initial_noise = noise[:, 0]
        # per token and step: the solver's velocity coefficient times each row's guidance weight [L, S, G, 1],
        # and the step's noise already scaled [L, S, B, D]: a step is then x' = (a x + c n) + sum_g W_g v_g,
        # elementwise in float32 (a matmul here could silently run in TF32 where a host enables it)
        weights = torch.tensor(guidance_weights(self.groups, inputs.cfg, inputs.cfg_img), device=device)
        self.step_weights = (weights[:, None, :] * torch.tensor(plan.b, device=device)[None, :, None])[..., None]
        coefficients = torch.tensor(plan.c, device=device)[None, :, None, None]
        self.step_noise = noise[:, 1:] * coefficients if plan.stochastic else None

    def __call__(self, index: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """Token `index` ([1] long) [B, D] float32 from the decoder's condition [R, hidden]."""
        weights = self.step_weights.index_select(0, index)[0]
        noise = self.step_noise.index_select(0, index)[0].flatten(1) if self.step_noise is not None else None
        modulations = self.steps.modulations(self.head, self.time_embeddings, condition)
        x = self.initial_noise.index_select(0, index).flatten(1)  # [1, B*D]
        for step in self.step_indices:
            x = self.steps.step(self.head, x, modulations, step, weights, noise, self.keep)
        x = x.view(self.batch, self.dim)
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
        self.slots = torch.arange(capacity, device=device)
        self.cache = model.new_cache(self.row_count, capacity)

    def prefill(self, rows: PromptRows, image_tokens: torch.Tensor | None) -> torch.Tensor:
        """Run the prompt rows into the cache; returns the condition for the first image token [R, hidden]."""
        model, device, length = self.model, self.model.device, self.prefill_len
        tokens = image_tokens.to(device) if image_tokens is not None else None
        positions = torch.arange(length, device=device).expand(self.row_count, -1)
        mask = prefix_attention_mask(self.key_valid[:, :length]) if self.padded else None
        return model.decode(model.embed_prompt(rows.input_ids.to(device), tokens), positions, self.cache, mask)

    def feed(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """Append a sampled token [B, D] to every guidance row at `position` ([1] long); returns the
        next condition. Attention spans the whole cache, slots after `position` masked."""
        mask = (self.key_valid & (self.slots <= position))[:, None, None, :]
        embeds = self.model.embed_image_token(token.repeat(self.groups, 1))
        return self.model.decode(embeds, position.expand(self.row_count, 1), self.cache, mask, cache_position=position)


class TokenStep:
    """One image token after the first: feed the previous token, then solve for the next.

    Inputs live in fixed device buffers, so on CUDA the whole step (decoder layers, every solver step
    of the head, guidance) is captured once as a CUDA graph and replayed per token: thousands of small
    kernel launches become one, and nothing waits on the host.
    """

    def __init__(self, state: DecodeState, solve: TokenSolver, use_cuda_graph: bool) -> None:
        device = state.model.device
        self.state, self.solve = state, solve
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.index = torch.zeros(1, dtype=torch.long, device=device)
        self.token_in = torch.zeros((solve.batch, solve.dim), dtype=torch.float32, device=device)
        self.graph = None
        if use_cuda_graph:
            try:
                self._capture(device)
            except RuntimeError as exc:  # an op the installed torch cannot capture: stay eager, still correct
                log.warning("CUDA graph capture failed (%s); running the token loop eagerly", exc)

    def _run(self) -> torch.Tensor:
        return self.solve(self.index, self.state.feed(self.token_in, self.position))

    def _capture(self, device: torch.device) -> None:
        self.position.fill_(self.state.prefill_len)  # warm-up writes the first token's slot; the real step rewrites it
        with torch.cuda.device(device):  # capture and replay on the model's GPU, whichever is current
            caller = torch.cuda.current_stream(device)
            side = torch.cuda.Stream(device)
            side.wait_stream(caller)
            try:
                with torch.cuda.stream(side):
                    for _ in range(2):
                        self._run()
                caller.wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=side):
                    self.token_out = self._run()
                self.graph = graph
            finally:  # a failed capture must not leave the side stream current for the rest of the process
                torch.cuda.set_stream(caller)

    def __call__(self, previous: torch.Tensor, index: int) -> torch.Tensor:
        """Token `index` (>= 1) given token `index - 1`; the result is overwritten by the next call."""
        self.token_in.copy_(previous)
        self.position.fill_(self.state.prefill_len + index - 1)
        self.index.fill_(index)
        if self.graph is None:
            return self._run()
        with torch.cuda.device(self.token_in.device):
            self.graph.replay()
        return self.token_out


def cuda_graph_possible(model: NextStepModel) -> bool:
    """Graphs need CUDA and every layer resident (streamed layers synchronise with a copy stream)."""
    return model.device.type == "cuda" and not any(isinstance(layer, StreamedLayer) for layer in model.layers)


@torch.inference_mode()
def sample_tokens(model: NextStepModel, inputs: TokenLoopInputs, callback: TokenCallback | None = None,
                  compile: bool = False) -> torch.Tensor:
    """Generate every image token; returns [B, L, D] float32 (after use_norm when on). `compile`: the flow
    head through torch.compile (see compiled_step.py), eager where that fails."""
    total_tokens = inputs.grid[0] * inputs.grid[1]
    state = DecodeState(model, inputs.rows, total_tokens)
    solve = TokenSolver(model, inputs, compile)
    out = torch.empty((inputs.batch, total_tokens, model.config.token_dim), dtype=torch.float32, device=model.device)
    out[:, 0] = solve(torch.zeros(1, dtype=torch.long, device=model.device), state.prefill(inputs.rows, inputs.image_tokens))
    step = TokenStep(state, solve, cuda_graph_possible(model)) if total_tokens > 1 else None
    pace = _HostPace(model.device)
    for n in range(total_tokens):
        if n:
            out[:, n] = step(out[:, n - 1], n)
        pace.token_queued()
        if callback is not None:
            callback(n + 1, total_tokens, out[:, : n + 1])
    return out


class _HostPace:
    """Keeps the host at most a couple of tokens ahead of the GPU, so progress is truthful and a cancel
    (checked by the callback between tokens) takes effect within a token or two, not after the whole
    launch queue drains. A no-op on the CPU."""

    AHEAD = 2

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.events: list[torch.cuda.Event] | None = [] if device.type == "cuda" else None

    def token_queued(self) -> None:
        if self.events is None:
            return
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self.events.append(event)
        if len(self.events) > self.AHEAD:
            self.events.pop(0).synchronize()
