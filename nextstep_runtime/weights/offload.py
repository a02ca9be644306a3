"""Layer streaming for GPUs too small for the whole decoder: the first N layers stay on the GPU, the
others live in pinned host memory and are copied into one of two GPU slots just before they run.

While layer i computes, layer i+1 is copied on a side stream (double buffering), so the transfer of
all streamed layers overlaps the compute of the layers before them. Each token still reads every
streamed layer over PCIe once, so this trades speed for memory: use as few streamed layers as fit.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..model.backbone import DecoderLayer


class LayerStreamer:
    """Two device-resident slot layers that host layers are copied into in turn."""

    def __init__(self, host_layers: list[DecoderLayer], device: torch.device) -> None:
        self.host_layers = host_layers
        self.device = device
        self.slots = [copy.deepcopy(host_layers[0]).to(device) for _ in range(min(2, len(host_layers)))]
        self.slot_holds = [-1] * len(self.slots)
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.copied = [None] * len(self.slots)

    def _copy_into_slot(self, position: int, slot_index: int) -> None:
        slot, host = self.slots[slot_index], self.host_layers[position]
        if self.copy_stream is None:
            for target, source in zip(slot.state_dict().values(), host.state_dict().values()):
                target.copy_(source)
        else:
            # the slot's previous layer may still be computing: wait for everything queued so far
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.copy_stream):
                for target, source in zip(slot.state_dict().values(), host.state_dict().values()):
                    target.copy_(source, non_blocking=True)
                self.copied[slot_index] = torch.cuda.Event()
                self.copied[slot_index].record(self.copy_stream)
        slot.self_attn.layer_index = host.self_attn.layer_index
        self.slot_holds[slot_index] = position

    def layer(self, position: int) -> DecoderLayer:
        """The slot holding streamed layer `position`, ready to run; starts copying the next one into the
        other slot (never into the one about to run, whatever the number of streamed layers)."""
        if position in self.slot_holds:
            slot_index = self.slot_holds.index(position)
        else:
            slot_index = 0
            self._copy_into_slot(position, slot_index)
        if self.copied[slot_index] is not None:
            torch.cuda.current_stream(self.device).wait_event(self.copied[slot_index])
        following = (position + 1) % len(self.host_layers)  # after the last layer, the next token's first
        if following not in self.slot_holds:
            self._copy_into_slot(following, 1 - slot_index)
        return self.slots[slot_index]


class StreamedLayer(nn.Module):
    """Stands in model.layers for a host-resident layer; runs it from the streamer's GPU slot."""

    def __init__(self, streamer: LayerStreamer, position: int) -> None:
        super().__init__()
        self._streamer = [streamer]  # a list, so the host layer's weights are not registered as parameters
        self.position = position

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self._streamer[0].layer(self.position)(*args, **kwargs)


def stream_layers(layers: nn.ModuleList, resident: int, device: torch.device) -> None:
    """Keep layers[:resident] where they are; replace the rest by StreamedLayers fed from host memory.

    The streamed layers must already be on the CPU (pinned where CUDA is present)."""
    host_layers = list(layers[resident:])
    if not host_layers:
        return
    if device.type == "cuda":
        for layer in host_layers:
            _pin(layer)
    streamer = LayerStreamer(host_layers, device)
    for position in range(len(host_layers)):
        layers[resident + position] = StreamedLayer(streamer, position)


def _pin(layer: nn.Module) -> None:
    """Move a host layer's parameters and buffers to page-locked memory (needed for async copies)."""
    for module in layer.modules():
        for name, param in module.named_parameters(recurse=False):
            param.data = param.data.pin_memory()
        for name, buffer in module.named_buffers(recurse=False):
            module._buffers[name] = buffer.pin_memory()
