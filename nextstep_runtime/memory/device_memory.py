"""How much memory a device has and has free: the probes every memory figure of the runtime starts from."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch


def device_memory(device: torch.device) -> tuple[int, int] | None:
    """(free, total) bytes of a CUDA device, or of host RAM for the CPU (MemAvailable, MemTotal); None where
    unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None
        free, total = torch.cuda.mem_get_info(device)
        return int(free), int(total)
    if device.type == "cpu":
        try:
            lines = Path("/proc/meminfo").read_text().splitlines()
        except OSError:
            return None
        kib = {name: rest.split()[0] for name, _, rest in (line.partition(":") for line in lines) if rest.split()}
        if "MemAvailable" in kib and "MemTotal" in kib:
            return int(kib["MemAvailable"]) * 1024, int(kib["MemTotal"]) * 1024
    return None


FreeMemory = Callable[[torch.device], "int | None"]
"""Bytes free for a run on a device, or None where unknown (the check is then skipped)."""


def free_memory(device: torch.device) -> int | None:
    """Free bytes on `device` for a run started now: host MemAvailable on the CPU; on CUDA the driver's free
    memory plus what PyTorch's caching allocator holds but does not use (it hands that out first)."""
    free = device_memory(device)
    if free is None:
        return None
    if device.type == "cuda":
        return free[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return free[0]
