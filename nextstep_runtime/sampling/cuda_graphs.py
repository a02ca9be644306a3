"""CUDA graphs of the token step: each stage (one range of layers, model/placement.py; the last with the flow head)
captured once and replayed per token, so thousands of small kernel launches become one per device and nothing waits
on the host. A graph is captured on one device's stream, so a model over several GPUs has one graph per range; one
device has one graph for the whole step, as before splits existed."""

from __future__ import annotations

from typing import Callable

import torch

from ..model.network import NextStepModel
from ..weights.offload import StreamedLayer

Replay = Callable[[], torch.Tensor]
"""Runs a captured stage again and returns its output buffer (overwritten by the next replay)."""


def cuda_graphs_possible(model: NextStepModel) -> bool:
    """Graphs need CUDA and every layer resident (streamed layers synchronise with a copy stream)."""
    return model.device.type == "cuda" and not any(isinstance(layer, StreamedLayer) for layer in model.layers)


def capture(device: torch.device, work: Callable[[], torch.Tensor]) -> Replay:
    """Capture `work` (reading and writing only fixed buffers on `device`) as a CUDA graph there, after two warm-up
    runs on a side stream; the returned replay runs it on `device`'s current stream."""
    with torch.cuda.device(device):  # capture and replay on the stage's GPU, whichever is current
        caller = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(caller)
        try:
            with torch.cuda.stream(side):
                for _ in range(2):
                    work()
            caller.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: a host's other threads (ComfyUI's HTTP routes asking torch.cuda.mem_get_info) neither
            # break this capture nor are broken by it
            with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
                output = work()
        finally:  # a failed capture must not leave the side stream current for the rest of the process
            torch.cuda.set_stream(caller)

    def replay() -> torch.Tensor:
        with torch.cuda.device(device):
            graph.replay()
        return output
    return replay
