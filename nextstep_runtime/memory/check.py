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
from ..model.placement import Placement
from .device_memory import FreeMemory, free_memory
from .estimate import split_job_bytes, vae_phase_bytes
from .job import Job
from .out_of_memory import SAMPLING, memory_remedy
from .plan import gb


def _largest_batch(config: ModelConfig, vae_config: VAEConfig | None, dtype: torch.dtype, job: Job,
                   free: list[int], counts: list[int]) -> int:
    """The largest batch below the job's whose run fits in `free` bytes on every device; 0 when even one image does
    not."""
    low, high = 0, job.settings.batch - 1
    while low < high:  # memory grows with the batch: bisect for the last batch that fits
        middle = (low + high + 1) // 2
        smaller = replace(job, settings=replace(job.settings, batch=middle))
        if all(run <= room for (_, run), room in zip(split_job_bytes(config, vae_config, dtype, smaller, counts), free)):
            low = middle
        else:
            high = middle - 1
    return low


def check_job_memory(config: ModelConfig, vae_config: VAEConfig | None, dtype: torch.dtype, job: Job,
                     device: torch.device, free_bytes: FreeMemory = free_memory,
                     placement: Placement | None = None) -> None:
    """Raise a NextStepError when `job` needs more than is free on `device` (the weights already loaded), or on any
    device of a split `placement`. `vae_config` None: the pipeline has no VAE, so only sampling runs here."""
    ranges = [(device, config.num_hidden_layers)] if placement is None or not placement.is_split else \
        [(layer_range.device, layer_range.count) for layer_range in placement.ranges]
    free = [free_bytes(each) for each, _ in ranges]
    if any(room is None for room in free):
        return
    job.validate()
    counts = [count for _, count in ranges]
    needs = split_job_bytes(config, vae_config, dtype, job, counts)
    short = next((index for index, ((_, run), room) in enumerate(zip(needs, free)) if run > room), None)
    if short is None:
        return
    (kv, needed), room, where = needs[short], free[short], ranges[short][0]
    work = _largest_work(vae_config, dtype, job, needed) if short == len(ranges) - 1 else SAMPLING
    if work != SAMPLING:  # the VAE works one image at a time: its own remedy (a smaller image)
        change = None
    elif batch := _largest_batch(config, vae_config, dtype, job, free, counts):
        change = f"use a batch of at most {batch}, or a smaller image"
    else:
        change = "make the image or the input images smaller, or use fewer steps"
    raise NextStepError(f"this run needs about {gb(needed)} on {where} besides the model's weights, most for "
                        f"{work} (KV cache {gb(kv)}), but only {gb(room)} is free; {memory_remedy(work, where, change)}")


def _largest_work(vae_config: VAEConfig | None, dtype: torch.dtype, job: Job, needed: int) -> str:
    """The phase that needs `needed` bytes on the run device: VAE encoding or decoding where one of them is the
    largest, else sampling."""
    vae = vae_phase_bytes(vae_config, dtype, job) if vae_config is not None else {}
    return next((work for work, size in vae.items() if size >= needed), SAMPLING)
