"""A CUDA graph capture that fails, emulated on the CPU: torch.cuda's stream and graph calls as the token loop makes
them, with streams that do nothing (the CPU runs everything in order) and a capture that raises a given error when
it begins, as cudaStreamBeginCapture, an op that cannot be captured, or an allocation inside the capture would on a
GPU. What the capture was asked for is recorded."""

from __future__ import annotations

import contextlib

import torch


class _Stream:
    def wait_stream(self, other: "_Stream") -> None:
        pass


class _FailingCapture:
    def __init__(self, error: BaseException) -> None:
        self.error = error

    def __enter__(self) -> None:
        # a fresh copy, as a driver raises a new error each time: raising the shared instance would leave its
        # traceback, and the frames' KV caches, alive for the rest of the session
        raise type(self.error)(*self.error.args)

    def __exit__(self, *exc_info) -> None:
        pass


def failing_capture(monkeypatch, error: BaseException) -> list[dict]:
    """Make torch.cuda's capture calls run on the CPU and the capture raise `error`; returns the keyword arguments
    each torch.cuda.graph call was given."""
    calls: list[dict] = []

    def graph(cuda_graph, **kwargs) -> _FailingCapture:
        calls.append(kwargs)
        return _FailingCapture(error)

    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _Stream())
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: _Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "set_stream", lambda stream: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", object)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    return calls
