"""How much memory a device has and has free: the probes every memory figure of the runtime starts from."""

from __future__ import annotations

from typing import Callable

import torch

from ..devices import host_memory

MPS_SHARE_WITHOUT_TORCH_FIGURE = 2 / 3
"""The share of the Mac's RAM taken as the Apple GPU's where torch cannot give Metal's figure (before torch 2.5, which
added `torch.mps.recommended_max_memory`): Metal's recommended working set is two thirds to three quarters of the
RAM, and the lower share keeps a plan from promising the GPU more than Metal lets it use."""


def apple_gpu_total() -> int | None:
    """Bytes an Apple GPU may use: Metal's recommended working set where torch reads it, else the RAM's share above."""
    recommended = getattr(torch.mps, "recommended_max_memory", None)
    if recommended is not None:
        return int(recommended())
    host = host_memory()
    return None if host is None else int(host[1] * MPS_SHARE_WITHOUT_TORCH_FIGURE)


def device_memory(device: torch.device) -> tuple[int, int] | None:
    """(free, total) bytes of a CUDA device; of the share of the Mac's memory Metal lets an Apple GPU use (its
    recommended working set, less what Metal has allocated); of host RAM for the CPU; None where unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None
        free, total = torch.cuda.mem_get_info(device)
        return int(free), int(total)
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            return None
        total = apple_gpu_total()
        if total is None:
            return None
        return max(0, total - int(torch.mps.driver_allocated_memory())), total
    if device.type == "cpu":
        return host_memory()
    return None


FreeMemory = Callable[[torch.device], "int | None"]
"""Bytes free for a run on a device, or None where unknown (the check is then skipped)."""


def free_memory(device: torch.device) -> int | None:
    """Free bytes on `device` for a run started now: host MemAvailable on the CPU; on a GPU what device_memory says
    is free plus what PyTorch's caching allocator holds but does not use (it hands that out first)."""
    free = device_memory(device)
    if free is None:
        return None
    if device.type == "cuda":
        return free[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "mps":
        return free[0] + torch.mps.driver_allocated_memory() - torch.mps.current_allocated_memory()
    return free[0]
