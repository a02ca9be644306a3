"""The autoregressive token loop: prefill once, then per token run the flow head's solver with
guidance and feed the sampled token back through the decoder.

Everything that does not depend on the token is prepared before the loop: the KV cache for all
guidance rows, the time embeddings of the step grid, the solver coefficients and the per-token guidance
scales. The seeded noise is drawn in bounded chunks of tokens as the loop reaches them (the same stream
as one whole draw), so its memory does not grow with image size x batch x steps. The loop itself does no
host-device synchronisation.

Tokens can also be given instead of sampled (continuing, inpainting, outpainting an image): a kept token
is fed through the decoder like a sampled one, so later tokens see it, but the flow head does not run for
it; its noise is still drawn, so every other token's noise stays tied to its index.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..failures import is_unsupported
from ..model.backbone import prefix_attention_mask
from ..model.network import NextStepModel
from ..model.positions import condition_offsets
from ..weights.offload import StreamedLayer
from .compiled_step import SolverSteps
from .prompt import PromptRows
from .solvers import SolverPlan, guidance_weights

log = logging.getLogger(__name__)

TokenCallback = Callable[[int, int, torch.Tensor], None]
"""Called after each token with (tokens done, tokens total, tokens so far [B, done, D]).

Raising from it (e.g. on a user's cancel) stops generation; nothing is kept alive afterwards."""


NOISE_CHUNK_BYTES = 64 * 2**20
"""Upper bound of the seeded noise held at once, on the host and on the run device each (a 2048x2048
image in batch 64 with 200 steps would otherwise hold 54 GB of noise)."""


@dataclass(frozen=True)
class NoiseSpec:
    """The seeded noise of a call: per token its initial noise, then one draw per stochastic step."""

    seed: int
    tokens: int
    draws: int           # 1 + stochastic steps
    batch: int
    dim: int
    chunk_tokens: int    # tokens drawn (and held on the device) at a time

    @classmethod
    def plan(cls, seed: int, tokens: int, steps: int, stochastic: bool, batch: int, dim: int,
             chunk_bytes: int = NOISE_CHUNK_BYTES) -> "NoiseSpec":
        draws = 1 + (steps if stochastic else 0)
        per_token = draws * batch * dim * 4
        return cls(seed, tokens, draws, batch, dim, max(1, min(tokens, chunk_bytes // per_token)))

    @property
    def chunk_bytes(self) -> int:
        """Bytes of one chunk of noise in float32 (the host's draw and the solver's buffers each hold one)."""
        return self.chunk_tokens * self.draws * self.batch * self.dim * 4


class NoiseStream:
    """Draws the noise chunk by chunk from one CPU generator. On the CPU, consecutive draws of whole
    tokens are the same stream as one draw of all of them (each token holds a multiple of 16 values),
    so the chunk size never changes the image."""

    def __init__(self, spec: NoiseSpec) -> None:
        self.spec = spec
        self.generator = torch.Generator(device="cpu").manual_seed(spec.seed)
        self.drawn = 0

    def next_chunk(self) -> torch.Tensor:
        """The next chunk's noise [tokens, draws, B, D] float32 (the last chunk may be shorter)."""
        spec = self.spec
        count = min(spec.chunk_tokens, spec.tokens - self.drawn)
        if count <= 0:
            raise RuntimeError("all of the noise has been drawn already")
        self.drawn += count
        return torch.randn((count, spec.draws, spec.batch, spec.dim), generator=self.generator, dtype=torch.float32)


@dataclass(frozen=True)
class KeptTokens:
    """Tokens given instead of sampled: `tokens` [B, L, D] model space (fed and returned as they are),
    `mask` [B, L] bool, True where the token is kept."""

    tokens: torch.Tensor
    mask: torch.Tensor


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


class TokenSolver:
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
        table = model.gen_pos_embed
        self.offsets = None if table is None else condition_offsets(table, image_tokens)

    def prefill(self, rows: PromptRows, image_tokens: torch.Tensor | None) -> torch.Tensor:
        """Run the prompt rows into the cache; returns the condition for the first image token [R, hidden]."""
        model, device, length = self.model, self.model.device, self.prefill_len
        tokens = image_tokens.to(device) if image_tokens is not None else None
        positions = torch.arange(length, device=device).expand(self.row_count, -1)
        mask = prefix_attention_mask(self.key_valid[:, :length]) if self.padded else None
        offset = None if self.offsets is None else self.offsets[:1]
        return model.decode(model.embed_prompt(rows.input_ids.to(device), tokens), positions, self.cache, mask,
                            position_offset=offset)

    def feed(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """Append a sampled token [B, D] to every guidance row at `position` ([1] long); returns the
        next condition. Attention spans the whole cache, slots after `position` masked."""
        mask = (self.key_valid & (self.slots <= position))[:, None, None, :]
        embeds = self.model.embed_image_token(token.repeat(self.groups, 1))
        # the next token's index is `position - prefill_len + 1`; computed on the device for graph replay
        offset = None if self.offsets is None else self.offsets.index_select(0, position - (self.prefill_len - 1))
        return self.model.decode(embeds, position.expand(self.row_count, 1), self.cache, mask, cache_position=position,
                                 position_offset=offset)


class TokenStep:
    """One image token after the first: feed the previous token, then solve for the next (or, for a kept
    token, only feed the previous one).

    Inputs live in fixed device buffers, so on CUDA the whole step (decoder layers, every solver step
    of the head, guidance) is captured once as a CUDA graph and replayed per token: thousands of small
    kernel launches become one, and nothing waits on the host. With kept tokens the feed alone is
    captured as a second graph.
    """

    def __init__(self, state: DecodeState, solve: TokenSolver, use_cuda_graph: bool, feed_only: bool) -> None:
        device = state.model.device
        self.state, self.solve = state, solve
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.index = torch.zeros(1, dtype=torch.long, device=device)
        self.token_in = torch.zeros((solve.batch, solve.dim), dtype=torch.float32, device=device)
        self.graph = self.feed_graph = None
        if use_cuda_graph:
            try:
                self.graph, self.token_out = self._capture(device, self._run)
                if feed_only:
                    self.feed_graph, _ = self._capture(device, self._feed)
            except (RuntimeError, NotImplementedError) as exc:
                if not is_unsupported(exc):  # out of memory, an accelerator fault: the caller's to explain
                    raise
                # an op this torch or driver cannot capture: stay eager, still correct
                self.graph = self.feed_graph = None
                log.warning("CUDA graph capture failed (%s); running the token loop eagerly", exc)

    def _feed(self) -> torch.Tensor:
        return self.state.feed(self.token_in, self.position)

    def _run(self) -> torch.Tensor:
        return self.solve(self.index, self._feed())

    def _capture(self, device: torch.device, work: Callable[[], torch.Tensor]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        self.position.fill_(self.state.prefill_len)  # warm-up writes the first token's slot; the real step rewrites it
        with torch.cuda.device(device):  # capture and replay on the model's GPU, whichever is current
            caller = torch.cuda.current_stream(device)
            side = torch.cuda.Stream(device)
            side.wait_stream(caller)
            try:
                with torch.cuda.stream(side):
                    for _ in range(2):
                        work()
                caller.wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                # thread_local: a host's other threads (ComfyUI's HTTP routes asking torch.cuda.mem_get_info)
                # neither break this capture nor are broken by it
                with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
                    output = work()
                return graph, output
            finally:  # a failed capture must not leave the side stream current for the rest of the process
                torch.cuda.set_stream(caller)

    def _set(self, previous: torch.Tensor, index: int) -> None:
        self.token_in.copy_(previous)
        self.position.fill_(self.state.prefill_len + index - 1)
        self.index.fill_(index)

    def __call__(self, previous: torch.Tensor, index: int) -> torch.Tensor:
        """Token `index` (>= 1) given token `index - 1`; the result is overwritten by the next call."""
        self._set(previous, index)
        if self.graph is None:
            return self._run()
        with torch.cuda.device(self.token_in.device):
            self.graph.replay()
        return self.token_out

    def feed(self, previous: torch.Tensor, index: int) -> None:
        """Only feed token `index - 1` (token `index` is kept, not sampled)."""
        self._set(previous, index)
        if self.feed_graph is None:
            self._feed()
            return
        with torch.cuda.device(self.token_in.device):
            self.feed_graph.replay()


def cuda_graph_possible(model: NextStepModel) -> bool:
    """Graphs need CUDA, every layer resident (streamed layers synchronise with a copy stream) and one GPU: a graph
    is captured on one device's stream, and a step split over several hands its states across devices (logged once
    per model: that token loop runs eagerly)."""
    if model.device.type != "cuda" or any(isinstance(layer, StreamedLayer) for layer in model.layers):
        return False
    if model.placement is not None and model.placement.is_split:
        if model not in _eager_split_logged:
            _eager_split_logged.add(model)
            log.info("NextStep: the token step runs eagerly (no CUDA graph): the model is split over %s, and a graph "
                     "is captured on one GPU", ", ".join(str(device) for device in model.placement.devices))
        return False
    return True


_eager_split_logged: "weakref.WeakSet[NextStepModel]" = weakref.WeakSet()


def _token_plan(kept: KeptTokens | None, total: int) -> list[str]:
    """Per token, on the host before the loop: "sample" (no image keeps it), "keep" (every image keeps
    it: the flow head is skipped) or "mix" (sampled, then the kept images' rows are replaced)."""
    if kept is None:
        return ["sample"] * total
    kept_by = kept.mask.sum(0).tolist()
    batch = kept.mask.shape[0]
    return ["sample" if count == 0 else "keep" if count == batch else "mix" for count in kept_by]


@torch.inference_mode()
def sample_tokens(model: NextStepModel, inputs: TokenLoopInputs, callback: TokenCallback | None = None,
                  compile: bool = False) -> torch.Tensor:
    """Generate every image token (or take the kept ones as given); returns [B, L, D] float32 (sampled
    tokens after use_norm when on, kept tokens exactly as given). `compile`: the flow head through
    torch.compile (see compiled_step.py), eager where that fails."""
    total_tokens = inputs.grid[0] * inputs.grid[1]
    device = model.device
    plan = _token_plan(inputs.kept, total_tokens)
    state = DecodeState(model, inputs.rows, total_tokens)
    solve = TokenSolver(model, inputs, compile)
    noise = NoiseStream(inputs.noise)
    out = torch.empty((inputs.batch, total_tokens, model.config.token_dim), dtype=torch.float32, device=device)
    if inputs.kept is not None:
        given = inputs.kept.tokens.to(device, torch.float32)
        keep_mask = inputs.kept.mask.to(device)[..., None]
    step = None
    pace = _HostPace(device)
    for n in range(total_tokens):
        if n % solve.chunk_tokens == 0:
            solve.load_noise(noise.next_chunk())  # drawn even when every token of it is kept: the stream stays put
        if n == 0:
            condition = state.prefill(inputs.rows, inputs.image_tokens)
            if plan[0] != "keep":
                out[:, 0] = solve(torch.zeros(1, dtype=torch.long, device=device), condition)
            if total_tokens > 1:
                step = TokenStep(state, solve, cuda_graph_possible(model), feed_only="keep" in plan[1:])
        elif plan[n] == "keep":
            step.feed(out[:, n - 1], n)
        else:
            out[:, n] = step(out[:, n - 1], n)
        if plan[n] == "keep":
            out[:, n] = given[:, n]
        elif plan[n] == "mix":
            out[:, n] = torch.where(keep_mask[:, n], given[:, n], out[:, n])
        pace.token_queued()
        if callback is not None:
            callback(n + 1, total_tokens, out[:, : n + 1])
    return out


class _HostPace:
    """Keeps the host at most a couple of tokens ahead of the GPU (CUDA or Apple), so progress is truthful and a
    cancel (checked by the callback between tokens) takes effect within a token or two, not after the whole
    launch queue drains. A no-op on the CPU."""

    AHEAD = 2

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.events: list | None = [] if device.type in ("cuda", "mps") else None

    def _recorded_event(self) -> torch.cuda.Event | torch.mps.Event:
        if self.device.type == "mps":
            event = torch.mps.Event()
            event.record()  # on the Apple GPU's one stream
            return event
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def token_queued(self) -> None:
        if self.events is None:
            return
        self.events.append(self._recorded_event())
        if len(self.events) > self.AHEAD:
            self.events.pop(0).synchronize()
