"""The autoregressive token loop: prefill the prompt once, then per image token sample it with the flow head and
its guidance (guided_head.py), merge the tokens given instead (inpainting, outpainting, continuing), and feed it back
through the decoder for the next.

A kept token is fed through the decoder like a sampled one, so later tokens see it, but the flow head does not run
for it; its noise is still drawn, so every other token's noise stays tied to its index. The loop itself does no
host-device synchronisation.

Feeding a token and solving the next are one step (`TokenStep`), run range by range as stages whose inputs sit in
fixed buffers on their devices: the eager path runs the stages as they are (the reference, also what the benchmarks
time), and on CUDA each stage is captured once as a graph and replayed (cuda_graphs.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from ..devices import residual_dtype
from ..failures import is_unsupported
from ..model.attention import FlashAttention
from ..model.network import NextStepModel
from .cuda_graphs import Replay, capture, cuda_graphs_possible
from .decode_state import DecodeState
from .fallback import Fallback
from .guided_head import GuidedHead
from .keep_mask import KeptTokens
from .loop_inputs import TokenLoopInputs
from .noise import NoiseStream

TokenCallback = Callable[[int, int, torch.Tensor], None]
"""Called after each token with (tokens done, tokens total, tokens so far [B, done, D]).

Raising from it (e.g. on a user's cancel) stops generation; nothing is kept alive afterwards."""


@dataclass
class StepBuffers:
    """The fixed buffers a token step's stages read: the fed token on the first range's device, each range's
    position, the token index on the run device, and the input of each stage after the first."""

    token_in: torch.Tensor
    positions: list[torch.Tensor]
    index: torch.Tensor
    handoff: list[torch.Tensor]


def _stage(state: DecodeState, head: GuidedHead, buffers: StepBuffers, index: int, solve: bool) -> torch.Tensor:
    """Stage `index` of a token step: range `index` (the first also embeds the fed token; the last also reads the
    condition and, when `solve`, runs the flow head). A function of its inputs, not a method, so the stages a
    TokenStep holds do not refer back to it: a finished run's KV cache is freed at once, not by the garbage
    collector."""
    if index == 0:
        x = state.model.embed_image_token(buffers.token_in.repeat(state.groups, 1))
    else:
        x = buffers.handoff[index - 1]
    x = state.feed_range(index, x, buffers.positions[index])
    if index < len(buffers.positions) - 1:
        return x
    condition = state.condition(x, buffers.positions[index])
    return head(buffers.index, condition) if solve else condition


class TokenStep:
    """One image token after the first: its predecessor fed through every range of layers, then the flow head
    solving it (for a kept token, the feed alone). Stage `i` runs range `i` (`_stage`); the hidden states are
    copied from each stage's output into the next stage's input buffer."""

    def __init__(self, state: DecodeState, head: GuidedHead, use_cuda_graphs: bool, feed_only: bool) -> None:
        placement = state.model.placement
        self.state = state
        hidden = state.model.config.hidden_size
        self.buffers = StepBuffers(
            token_in=torch.zeros((head.batch, head.dim), dtype=torch.float32, device=placement.input_device),
            positions=[torch.zeros(1, dtype=torch.long, device=r.device) for r in placement.ranges],
            index=torch.zeros(1, dtype=torch.long, device=placement.run_device),
            handoff=[torch.zeros((state.row_count, 1, hidden), dtype=residual_dtype(r.dtype), device=r.device)
                     for r in placement.ranges[1:]])
        last = len(placement.ranges) - 1
        self.sample_stages: list[Replay] = [partial(_stage, state, head, self.buffers, index, True)
                                            for index in range(last + 1)]
        self.feed_stages: list[Replay] = [*self.sample_stages[:-1],
                                          partial(_stage, state, head, self.buffers, last, False)]
        if use_cuda_graphs:
            graphs = Fallback("CUDA graph capture failed", "running the token loop eagerly", is_unsupported)
            graphs.run(partial(self._capture, feed_only), lambda: None)

    def _capture(self, feed_only: bool) -> None:
        """Replace the stages by their CUDA graphs (the feed-only last stage too where kept tokens need it)."""
        for position in self.buffers.positions:  # warm-up writes the first token's slot; the real step rewrites it
            position.fill_(self.state.prefill_len)
        devices = [r.device for r in self.state.model.placement.ranges]
        sample = [capture(device, stage) for device, stage in zip(devices, self.sample_stages)]
        feed = [*sample[:-1], capture(devices[-1], self.feed_stages[-1])] if feed_only else self.feed_stages
        self.sample_stages, self.feed_stages = sample, feed

    def _run(self, stages: list[Replay], previous: torch.Tensor, index: int) -> torch.Tensor:
        buffers = self.buffers
        buffers.token_in.copy_(previous)
        for position in buffers.positions:
            position.fill_(self.state.prefill_len + index - 1)
        buffers.index.fill_(index)
        for stage, handoff in zip(stages, buffers.handoff):
            handoff.copy_(stage())
        return stages[-1]()

    def __call__(self, previous: torch.Tensor, index: int) -> torch.Tensor:
        """Token `index` (>= 1) given token `index - 1`; the result is overwritten by the next call."""
        return self._run(self.sample_stages, previous, index)

    def feed(self, previous: torch.Tensor, index: int) -> None:
        """Only feed token `index - 1` (token `index` is kept, not sampled)."""
        self._run(self.feed_stages, previous, index)


def _token_plan(kept: KeptTokens | None, total: int) -> list[str]:
    """Per token, on the host before the loop: "sample" (no image keeps it), "keep" (every image keeps
    it: the flow head is skipped) or "mix" (sampled, then the kept images' rows are replaced)."""
    if kept is None:
        return ["sample"] * total
    kept_by = kept.mask.sum(0).tolist()
    batch = kept.mask.shape[0]
    return ["sample" if count == 0 else "keep" if count == batch else "mix" for count in kept_by]


@torch.inference_mode()
def sample_tokens(model: NextStepModel, inputs: TokenLoopInputs, kernels: tuple[FlashAttention | None, ...],
                  callback: TokenCallback | None = None, compile: bool = False,
                  cuda_graphs: bool = True) -> torch.Tensor:
    """Generate every image token (or take the kept ones as given); returns [B, L, D] float32 (sampled tokens after
    use_norm when on, kept tokens exactly as given). `kernels`: each range's attention kernel
    (attention.attention_kernels). `compile`: the flow head through torch.compile (see compiled_step.py), eager where
    that fails. `cuda_graphs`: replay each token step's stages as captured CUDA graphs where possible; off, the steps
    run eagerly (the doctor's self-check tells the two apart)."""
    total = inputs.grid[0] * inputs.grid[1]
    device = model.device
    plan = _token_plan(inputs.kept, total)
    state = DecodeState(model, inputs.rows, total, kernels)
    head = GuidedHead(model, inputs, compile)
    noise = NoiseStream(inputs.noise)
    out = torch.empty((inputs.batch, total, model.config.token_dim), dtype=torch.float32, device=device)
    if inputs.kept is not None:
        given = inputs.kept.tokens.to(device, torch.float32)
        keep_mask = inputs.kept.mask.to(device)[..., None]
    pace = _HostPace(device)
    head.load_noise(noise.next_chunk())
    condition = state.prefill(inputs.rows, inputs.image_tokens)
    step = TokenStep(state, head, cuda_graphs and cuda_graphs_possible(model), feed_only="keep" in plan[1:])
    for n in range(total):
        if n and n % head.chunk_tokens == 0:
            head.load_noise(noise.next_chunk())  # drawn even when every token of it is kept: the stream stays put
        if n == 0:
            token = None if plan[0] == "keep" else head(torch.zeros(1, dtype=torch.long, device=device), condition)
        elif plan[n] == "keep":
            step.feed(out[:, n - 1], n)
        else:
            token = step(out[:, n - 1], n)
        if plan[n] == "keep":
            out[:, n] = given[:, n]
        elif plan[n] == "mix":
            out[:, n] = torch.where(keep_mask[:, n], given[:, n], token)
        else:
            out[:, n] = token
        pace.token_queued()
        if callback is not None:
            callback(n + 1, total, out[:, : n + 1])
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
