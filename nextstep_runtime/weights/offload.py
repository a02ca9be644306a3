"""Layer streaming for GPUs too small for the whole decoder: the first N layers stay on the GPU, the
others live in page-locked host memory and are copied into one of two GPU slots just before they run.

While layer i computes, layer i+1 is copied on a side stream (double buffering), so the transfer of
all streamed layers overlaps the compute of the layers before them. Each token still reads every
streamed layer over PCIe once, so this trades speed for memory: use as few streamed layers as fit.

Each streamed layer, and each slot, is packed into one buffer (`pack_layer`): its tensors become views at
aligned offsets of the same layout, so a layer moves in one copy, and the host side is exactly the planner's
bytes (`packed_bytes`). The host buffers are page-locked as ComfyUI does it (`cudaHostRegister` on the memory
they already have), not through torch's pinned allocator, which rounds every block up to a power of two (a
NextStep-14B layer of 551 MB in bf16 took 973 MB pinned tensor by tensor); and only up to ComfyUI's cap, since
Windows refuses to lock much more than half of RAM (the rest streams from pageable memory, slower but correct).
"""

from __future__ import annotations

import copy
import logging
import platform
import weakref
from typing import Callable

import torch
from torch import nn

from ..devices import host_memory
from ..model.backbone import DecoderLayer

PACK_ALIGNMENT = 512
"""Every tensor of a packed layer starts at a multiple of this many bytes, as CUDA's caching allocator aligns its
blocks: vectorised kernels and cuBLAS read the slot's views as fast as separately allocated tensors."""

PinHostMemory = Callable[[torch.Tensor], "Callable[[], None] | None"]
"""Page-locks a host buffer for asynchronous copies to the GPU; returns what unlocks it, or None where it stays
pageable (over the cap, or refused). A host application passes its own (ComfyUI: its pinned-memory budget)."""

log = logging.getLogger(__name__)


def packed_bytes(tensor_bytes: list[int]) -> int:
    """Bytes of one buffer packing tensors of these sizes (each at a PACK_ALIGNMENT-aligned offset)."""
    return sum(-(-size // PACK_ALIGNMENT) * PACK_ALIGNMENT for size in tensor_bytes)


def pack_layer(layer: nn.Module, device: torch.device) -> torch.Tensor:
    """Move every parameter and buffer of `layer` into one uint8 buffer on `device`, in state_dict order at aligned
    offsets; they become views of it. Returns the buffer: a layer packed the same way is copied in one call."""
    entries = [(module, name, tensor) for module in layer.modules()
               for name, tensor in [*module._parameters.items(), *module._buffers.items()] if tensor is not None]
    buffer = torch.empty(packed_bytes([tensor.nbytes for _, _, tensor in entries]), dtype=torch.uint8, device=device)
    offset = 0
    for module, name, tensor in entries:
        view = buffer[offset: offset + tensor.nbytes].view(tensor.dtype).view(tensor.shape)
        view.copy_(tensor)
        if name in module._parameters:
            module._parameters[name].data = view
        else:
            module._buffers[name] = view
        offset += packed_bytes([tensor.nbytes])
    return buffer


def pinned_memory_cap(windows: bool, total_ram: int) -> int:
    """Bytes of host RAM that may be page-locked: ComfyUI's rule (comfy/model_management.py, MAX_PINNED_MEMORY),
    45% of RAM on Windows, which refuses to lock much more than half, 95% elsewhere."""
    return int(total_ram * (0.45 if windows else 0.95))


_page_locked = 0
"""Bytes this process has page-locked through `page_lock`."""


def page_lock(buffer: torch.Tensor) -> Callable[[], None] | None:
    """Page-lock a host buffer in place with cudaHostRegister within `pinned_memory_cap` (the runtime's own
    PinHostMemory, outside a host that pins memory itself)."""
    global _page_locked
    memory = host_memory()
    size = buffer.nbytes
    if memory is not None and _page_locked + size > pinned_memory_cap(platform.system() == "Windows", memory[1]):
        return None
    if torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), size, 1) != 0:  # 1: cudaHostRegisterPortable
        _discard_cuda_error()
        return None
    _page_locked += size

    def unlock() -> None:  # holds the buffer: its memory is not handed back while still registered
        global _page_locked
        torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())
        _page_locked -= size
    return unlock


def _discard_cuda_error() -> None:
    """A refused cudaHostRegister can leave an error that the next kernel launch would report as its own; flush it
    here (as ComfyUI does)."""
    try:
        torch.ones(1, device="cuda").add_(1)
        torch.cuda.synchronize()
    except RuntimeError:
        pass


def _unlock_all(unlocks: list[Callable[[], None]]) -> None:
    for unlock in unlocks:
        unlock()


class LayerStreamer:
    """Two device-resident slot layers that host layers are copied into in turn. The slots can be released while
    the model waits (`release_slots`) and are made again at its next use."""

    def __init__(self, host_layers: list[DecoderLayer], device: torch.device,
                 pin: PinHostMemory | None = None) -> None:
        self.host_layers = host_layers
        self.host_buffers = [pack_layer(layer, torch.device("cpu")) for layer in host_layers]
        self.device = device
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.slots: list[DecoderLayer] = []
        self.slot_buffers: list[torch.Tensor] = []
        if device.type == "cuda":
            self._page_lock(pin or page_lock)
        self._make_slots()

    def _page_lock(self, pin: PinHostMemory) -> None:
        unlocks = [unlock for unlock in map(pin, self.host_buffers) if unlock is not None]
        weakref.finalize(self, _unlock_all, unlocks).atexit = False
        if len(unlocks) < len(self.host_buffers):
            log.warning("NextStep: %d of %d streamed decoder layers are in page-locked memory (locking more was "
                        "refused: the limit of locked host memory, or locking is turned off); the others are copied "
                        "from pageable memory, more slowly", len(unlocks), len(self.host_buffers))

    @property
    def slot_bytes(self) -> int:
        """Device bytes of the two slots (one with a single streamed layer), made or not."""
        return min(2, len(self.host_buffers)) * self.host_buffers[0].nbytes

    def _make_slots(self) -> None:
        self.slots = [copy.deepcopy(self.host_layers[0]) for _ in range(min(2, len(self.host_layers)))]
        self.slot_buffers = [pack_layer(slot, self.device) for slot in self.slots]
        self.slot_holds = [-1] * len(self.slots)
        self.copied: list[torch.cuda.Event | None] = [None] * len(self.slots)

    def release_slots(self) -> int:
        """Free the slots' device memory (the model is detached; nothing runs); returns the bytes freed."""
        if not self.slots:
            return 0
        if self.copy_stream is not None:
            self.copy_stream.synchronize()
        freed = sum(buffer.nbytes for buffer in self.slot_buffers)
        self.slots, self.slot_buffers = [], []
        return freed

    def _copy_into_slot(self, position: int, slot_index: int) -> None:
        target, source = self.slot_buffers[slot_index], self.host_buffers[position]
        if self.copy_stream is None:
            target.copy_(source)
        else:
            # the slot's previous layer may still be computing: wait for everything queued so far
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.copy_stream):
                target.copy_(source, non_blocking=True)
                self.copied[slot_index] = torch.cuda.Event()
                self.copied[slot_index].record(self.copy_stream)
        self.slots[slot_index].self_attn.layer_index = self.host_layers[position].self_attn.layer_index
        self.slot_holds[slot_index] = position

    def layer(self, position: int) -> DecoderLayer:
        """The slot holding streamed layer `position`, ready to run; starts copying the next one into the
        other slot (never into the one about to run, whatever the number of streamed layers)."""
        if not self.slots:
            self._make_slots()
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


def stream_layers(layers: nn.ModuleList, resident: int, device: torch.device, pin: PinHostMemory | None = None) -> None:
    """Keep layers[:resident] where they are; replace the rest by StreamedLayers fed from host memory, page-locked
    with `pin` (default: `page_lock`) where the device is a CUDA GPU. The streamed layers must be on the CPU."""
    host_layers = list(layers[resident:])
    if not host_layers:
        return
    streamer = LayerStreamer(host_layers, device, pin)
    for position in range(len(host_layers)):
        layers[resident + position] = StreamedLayer(streamer, position)


def streamers(model: nn.Module) -> list[LayerStreamer]:
    """The layer streamers of a model (none, or one)."""
    found = {id(module._streamer[0]): module._streamer[0] for module in model.modules()
             if isinstance(module, StreamedLayer)}
    return list(found.values())


def release_streaming_slots(model: nn.Module) -> int:
    """Free the device memory of a model's streaming slots while it waits (a host unloaded or detached it): they
    are registered nowhere a host's model management can see. Made again at the next run; returns bytes freed."""
    return sum(streamer.release_slots() for streamer in streamers(model))


def released_slot_bytes(model: nn.Module) -> int:
    """Device bytes a model's next run allocates for streaming slots that were released (0 when they are in place, or
    without streamed layers): what a host must free for them besides the model's registered weights."""
    return sum(streamer.slot_bytes for streamer in streamers(model) if not streamer.slots)
