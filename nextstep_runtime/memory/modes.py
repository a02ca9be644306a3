"""The `memory` setting of the loader and the CLI: an explicit weight mode, or `auto`, the fastest mode that fits
this GPU according to the memory planner (full dtype, then fp8, then int4, then streaming as few layers as
possible)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from ..config import read_json
from ..errors import NextStepError
from ..weights.hub import resolve_model_source
from ..weights.int4 import int4_supported
from ..weights.loading import model_config_path, stored_weights_format
from .plan import GB, Job, MemoryPlan, ModelFootprint, WeightMode, plan_memory

MEMORY_CHOICES = ("auto", "full", "fp8", "int4")
"""auto: chosen for this GPU; full: the compute dtype; fp8/int4: the decoder's linear weights quantised."""


def choose_mode(footprint: ModelFootprint, job: Job, gpu_free: int, dtype: torch.dtype = torch.bfloat16,
                stored: str = "bf16", int4_ok: bool = True) -> tuple[WeightMode, MemoryPlan]:
    """The fastest mode whose planned peak fits in `gpu_free` bytes, and its plan: the whole model in the
    compute dtype, in fp8, in int4 (where `int4_ok`), then streaming on top of the last of these with the
    most resident decoder layers that fit. A repacked folder (`stored` fp8 or int4) only has its own format.
    When nothing fits, every layer is streamed and the plan's `fits` is False."""
    whole = [WeightMode(dtype)] if stored == "bf16" else []
    if stored in ("bf16", "fp8"):
        whole.append(WeightMode(dtype, fp8=True))
    if stored in ("bf16", "int4") and (int4_ok or stored == "int4"):
        whole.append(WeightMode(dtype, int4=True))
    for mode in whole:
        plan = plan_memory(footprint, mode, job, gpu_free=gpu_free)
        if plan.fits:
            return mode, plan
    for resident in reversed(range(footprint.config.num_hidden_layers)):
        mode = replace(whole[-1], gpu_layers=resident)
        plan = plan_memory(footprint, mode, job, gpu_free=gpu_free)
        if plan.fits:
            return mode, plan
    return mode, plan


def resolve_weight_mode(folder: str | Path, memory: str, device: torch.device, dtype: torch.dtype,
                        fp8: bool = False, gpu_layers: int | None = None, gpu_free: int | None = None,
                        job: Job = Job()) -> tuple[WeightMode, str | None]:
    """The weight mode to load `folder` with. `fp8` (the older switch) means memory fp8; an explicit
    `gpu_layers` count keeps its meaning (that many resident layers, in the full dtype under `auto`).
    `auto` plans against `gpu_free` bytes on CUDA and also returns its choice as one line to show;
    elsewhere it is the plain dtype (or the folder's own format when it is repacked)."""
    if memory not in MEMORY_CHOICES:
        raise NextStepError(f"unknown memory setting {memory!r}; choose {', '.join(MEMORY_CHOICES)}")
    if fp8:
        if memory not in ("auto", "fp8"):
            raise NextStepError(f"fp8 is on but memory is {memory!r}; turn fp8 off or set memory to fp8")
        memory = "fp8"
    folder = resolve_model_source(folder)
    config_path = model_config_path(folder)
    stored = stored_weights_format(read_json(config_path), config_path)
    if memory == "auto" and (gpu_layers is not None or device.type != "cuda" or gpu_free is None):
        memory = "full" if stored == "bf16" else stored
    if memory != "auto":
        return WeightMode(dtype, fp8=memory == "fp8", int4=memory == "int4", gpu_layers=gpu_layers), None
    mode, plan = choose_mode(ModelFootprint.from_folder(folder), job, gpu_free, dtype, stored,
                             int4_supported(device, dtype))
    verdict = "needs" if plan.fits else "does not fit even fully streamed, trying anyway:"
    return mode, (f"memory auto: {mode.describe()} ({verdict} {plan.peak_gpu_bytes / GB:.1f} GB of "
                  f"{gpu_free / GB:.1f} GB free for {job.width}x{job.height})")
