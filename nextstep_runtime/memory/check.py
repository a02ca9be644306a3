"""The memory check before every run: refuse a job the devices cannot hold, before any work.

The estimate is the memory planner's (`estimate.device_run_bytes`: per device, the largest of VAE encode, sampling
and VAE decode, weights excluded since they are already loaded), compared with what is free on each device now. A
refusal says what the job needs, what is free, and the largest batch that would fit when a smaller batch is the
remedy. What the estimate cannot foresee (another process taking memory mid-run) is still caught as an
out-of-memory error by `out_of_memory.py`.
"""

from __future__ import annotations

from dataclasses import replace

from ..config import ModelConfig
from ..errors import NextStepError
from ..model.placement import Placement
from .device_memory import FreeMemory
from .estimate import VAEPlacement, device_run_bytes, vae_phase_bytes
from .job import Job
from .out_of_memory import SAMPLING, memory_remedy
from .planner import gb


def _short(needs: dict, free: dict) -> list:
    return [device for device, (_, run) in needs.items() if run > free[device]]


def check_job_memory(config: ModelConfig, placement: Placement, job: Job, free_bytes: FreeMemory,
                     vae: VAEPlacement | None = None) -> None:
    """Raise a NextStepError when `job` (already validated) needs more than is free on a device of `placement` (the
    weights already loaded), or on the VAE's device. `vae` None: no VAE runs in this call."""
    needs = device_run_bytes(config, placement, job, vae)
    free = {device: free_bytes(device) for device in needs}
    if any(room is None for room in free.values()) or not (short := _short(needs, free)):
        return
    where = short[0]
    (kv, needed), room = needs[where], free[where]
    phases = vae_phase_bytes(vae.config, vae.dtype, job) if vae is not None and vae.device == where else {}
    work = next((name for name, size in phases.items() if size >= needed), SAMPLING)
    change = None  # the VAE works one image at a time: its own remedy (a smaller image)
    if work == SAMPLING:
        low, high = 0, job.settings.batch - 1
        while low < high:  # memory grows with the batch: bisect for the last batch that fits
            middle = (low + high + 1) // 2
            smaller = replace(job, settings=replace(job.settings, batch=middle))
            if _short(device_run_bytes(config, placement, smaller, vae), free):
                high = middle - 1
            else:
                low = middle
        change = (f"use a batch of at most {low}, or a smaller image" if low else
                  "make the image or the input images smaller, or use fewer steps")
    raise NextStepError(f"this run needs about {gb(needed)} on {where} besides the model's weights, most for "
                        f"{work} (KV cache {gb(kv)}), but only {gb(room)} is free; {memory_remedy(work, where, change)}")
