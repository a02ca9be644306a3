"""The runtime's per-token callback inside a node: cancel check, progress bar, throttled live preview."""

from __future__ import annotations

import time

import torch

from . import host
from .preview import TokenPreview

PREVIEW_INTERVAL_S = 0.25
"""At most four previews a second (plus the last): drawing one reads the tokens back from the GPU, which
waits for the GPU to finish the current token, so doing it for every token would stall the pipeline."""


class TokenProgress:
    """callback(done, total, tokens_so_far) for NextStepPipeline.sample."""

    def __init__(self, sink: host.ProgressSink, preview: TokenPreview | None) -> None:
        self.sink = sink
        self.preview = preview
        self.last_preview = float("-inf")

    def __call__(self, done: int, total: int, tokens: torch.Tensor) -> None:
        host.check_interrupt()  # raising here stops the token loop; it keeps nothing alive
        image = None
        now = time.monotonic()
        if self.preview is not None and (done == total or now - self.last_preview >= PREVIEW_INTERVAL_S):
            image = self.preview.render(tokens)
            self.last_preview = now
        self.sink(done, total, image)
