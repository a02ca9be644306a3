"""The memory check before every run: refuse a job the run device cannot hold, before any work.

The estimate is the memory planner's (`estimate.job_bytes`: the largest of VAE encode, sampling and VAE decode,
weights excluded since they are already loaded), compared with what is free on the run device now. A refusal
says what the job needs, what is free, and the largest batch that would fit when a smaller batch is the remedy.
What the estimate cannot foresee (another process taking memory mid-run) is still caught as an out-of-memory
error by `out_of_memory.py`.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..config import ModelConfig, VAEConfig
from ..errors import NextStepError
from .device_memory import FreeMemory, free_memory
from .estimate import kv_cache_bytes, phase_bytes, sampling_bytes
from .job import Job
from .out_of_memory import SAMPLING, memory_remedy
from .plan import gb


def _phases(config: ModelConfig, vae_config: VAEConfig | None, dtype: torch.dtype, job: Job) -> dict[str, int]:
    """Bytes of each phase of the run: with a VAE in the pipeline encode, sampling and decode; without one (the
    nodes, which encode and decode in their own nodes) sampling alone."""
    if vae_config is None:
        return {SAMPLING: sampling_bytes(config, dtype, job)}
    return phase_bytes(config, vae_config, dtype, job)


def _needs(config: ModelConfig, vae_config: VAEConfig | None, dtype: torch.dtype, job: Job) -> tuple[int, int]:
    """(KV cache bytes, bytes the run needs: its largest phase)."""
    return kv_cache_bytes(config, dtype, job), max(_phases(config, vae_config, dtype, job).values())


def _largest_batch(config: ModelConfig, vae_config: VAEConfig | None, dtype: torch.dtype, job: Job,
                   free: int) -> int:
    """The largest batch below the job's whose run fits in `free` bytes; 0 when even one image does not."""
    low, high = 0, job.settings.batch - 1
    while low < high:  # memory grows with the batch: bisect for the last batch that fits
        middle = (low + high + 1) // 2
        if _needs(config, vae_config, dtype, replace(job, settings=replace(job.settings, batch=middle)))[1] <= free:
            low = middle
        else:
            high = middle - 1
    return low


def check_job_memory(config: ModelConfig, vae_config: VAEConfig | None, dtype: torch.dtype, job: Job,
                     device: torch.device, free_bytes: FreeMemory = free_memory) -> None:
    """Raise a NextStepError when `job` needs more than is free on `device` (the weights already loaded).
    `vae_config` None: the pipeline has no VAE, so only sampling runs here."""
    free = free_bytes(device)
    if free is None:
        return
    job.validate()
    phases = _phases(config, vae_config, dtype, job)
    work = max(phases, key=phases.get)
    kv, needed = kv_cache_bytes(config, dtype, job), phases[work]
    if needed <= free:
        return
    if work != SAMPLING:  # the VAE works one image at a time: its own remedy (a smaller image)
        change = None
    elif batch := _largest_batch(config, vae_config, dtype, job, free):
        change = f"use a batch of at most {batch}, or a smaller image"
    else:
        change = "make the image or the input images smaller, or use fewer steps"
    raise NextStepError(f"this run needs about {gb(needed)} on {device} besides the model's weights, most for "
                        f"{work} (KV cache {gb(kv)}), but only {gb(free)} is free; {memory_remedy(work, device, change)}")
