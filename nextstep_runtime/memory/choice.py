"""The `memory` setting of the loader and the CLI: an explicit weight mode, or `auto`, the fastest mode that fits
this GPU according to the memory planner (the folder's loadable modes in order, then streaming as few layers as
possible)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from ..devices import DeviceTraits
from ..errors import NextStepError
from ..weights.model_folder import ModelFolder
from ..weights.modes import WeightMode, check_loadable, loadable_modes
from .footprint import ModelFootprint
from .job import Job
from .plan import MemoryPlan, cheapest_fitting, gb, plan_memory, streamed_mode

MEMORY_CHOICES = ("auto", "full", "fp8", "int4")
"""auto: chosen for this GPU; full: the compute dtype; fp8/int4: the decoder's linear weights quantised."""


def choose_mode(footprint: ModelFootprint, job: Job, gpu_free: int, device: DeviceTraits,
                dtype: torch.dtype = torch.bfloat16) -> tuple[WeightMode, MemoryPlan]:
    """The fastest mode the folder loads in on `device` whose planned peak fits in `gpu_free` bytes, and its plan.
    When nothing fits, the smallest: every layer streamed where the device streams layers, and the plan's `fits` is
    False."""
    loadable = loadable_modes(footprint.stored_format, device, dtype)
    smallest = streamed_mode(footprint, loadable[-1], device) or loadable[-1]
    mode = cheapest_fitting(footprint, job, gpu_free, loadable, device) or smallest
    return mode, plan_memory(footprint, mode, job, gpu_free=gpu_free, device=device)


def resolve_weight_mode(source: str | Path | ModelFolder, memory: str, device: torch.device, dtype: torch.dtype,
                        fp8: bool = False, gpu_layers: int | None = None, gpu_free: int | None = None,
                        job: Job = Job()) -> tuple[WeightMode, str | None]:
    """The weight mode to load the folder with, refused here when loading would refuse it. `fp8` (the older switch)
    means memory fp8; an explicit `gpu_layers` count keeps its meaning (that many resident layers, in the folder's
    first loadable mode under `auto`). `auto` plans against `gpu_free` bytes on a GPU (CUDA, or an Apple GPU, whose
    share of the Mac's memory is its limit) and also returns its choice as one line to show; elsewhere it is the first
    loadable mode (the compute dtype, or a repacked folder's own)."""
    if memory not in MEMORY_CHOICES:
        raise NextStepError(f"unknown memory setting {memory!r}; choose {', '.join(MEMORY_CHOICES)}")
    if fp8:
        if memory not in ("auto", "fp8"):
            raise NextStepError(f"fp8 is on but memory is {memory!r}; turn fp8 off or set memory to fp8")
        memory = "fp8"
    folder = ModelFolder.open(source)
    traits = DeviceTraits.of(device)
    if memory != "auto":
        mode = WeightMode(dtype, fp8=memory == "fp8", int4=memory == "int4", gpu_layers=gpu_layers)
        check_loadable(mode, folder.stored_format, traits, str(folder.path))
        return mode, None
    if gpu_layers is not None or device.type not in ("cuda", "mps") or gpu_free is None:
        mode = replace(loadable_modes(folder.stored_format, traits, dtype, str(folder.path))[0], gpu_layers=gpu_layers)
        check_loadable(mode, folder.stored_format, traits, str(folder.path))
        return mode, None
    mode, plan = choose_mode(ModelFootprint.from_folder(folder), job, gpu_free, traits, dtype)
    smallest = "even fully streamed" if mode.gpu_layers is not None else "in any mode"
    verdict = "needs" if plan.fits else f"does not fit {smallest}, trying anyway:"
    size = f"{job.settings.width}x{job.settings.height}"
    return mode, (f"memory auto: {mode.describe()} ({verdict} {gb(plan.peak_gpu_bytes)} of {gb(gpu_free)} free for "
                  f"{size})")
