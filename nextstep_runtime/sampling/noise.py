"""The seeded noise of a call: per token its initial noise, then one draw per stochastic solver step, drawn in
bounded chunks of tokens as the token loop reaches them (the same stream as one whole draw), so its memory does not
grow with image size x batch x steps. It is drawn on the CPU from one generator: a seed gives the same image on every
device."""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
