"""The memory plan of a model folder for a job: the bytes of each part on the run device and in host RAM, whether
it fits a GPU of a given size, and, when it does not, the cheapest mode that would (only modes the folder loads
in on that device: weights/modes.py).

Sizes in the advice are decimal gigabytes (1 GB = 10^9 bytes), as GPU makers count them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, NamedTuple

from ..devices import PLANNED_GPU, DeviceTraits
from ..weights.modes import WeightMode, check_loadable, loadable_modes, mode_refusal
from .estimate import job_bytes
from .footprint import ModelFootprint, WeightBytes, weight_bytes
from .job import Job

GB = 10**9
SWITCH_ADVICE = {"fp8": "set memory to fp8", "int4": "set memory to int4"}
"""The advice that selects each smaller whole-model mode."""


def gb(value: int) -> str:
    return f"{value / GB:.1f} GB"


@dataclass(frozen=True)
class MemoryPlan:
    weights_gpu_bytes: int
    """Every weight the runtime keeps on the run device in that mode (streaming slots included)."""
    weights_host_bytes: int
    """Streamed decoder layers, held in (pinned) host RAM."""
    kv_cache_bytes: int
    vae_bytes: int
    job_bytes: int
    """What one run allocates on the run device besides weights: the largest of VAE encode, sampling (KV
    cache, prefill activations, noise and solver buffers) and VAE decode, which never overlap."""
    peak_gpu_bytes: int
    """weights_gpu_bytes + vae_bytes + job_bytes (the runtime keeps the VAE on the model's device)."""
    gpu_total_bytes: int | None
    gpu_free_bytes: int | None
    fits: bool | None
    """None when no GPU size is known."""
    advice: str
    mode: WeightMode = WeightMode()
    suggested_mode: WeightMode | None = None
    """The cheapest mode that fits when the asked one does not (None when it fits or nothing does)."""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["mode"] = mode_as_dict(self.mode)
        data["suggested_mode"] = None if self.suggested_mode is None else mode_as_dict(self.suggested_mode)
        return data


def mode_as_dict(mode: WeightMode) -> dict[str, Any]:
    """A mode as JSON takes it (the dtype by name)."""
    return {**asdict(mode), "dtype": str(mode.dtype).removeprefix("torch.")}


class Peak(NamedTuple):
    """A mode's bytes for a job on the run device: the weights, the VAE, the KV cache, everything one run allocates
    besides the weights, and their peak (weights + VAE + run: the runtime keeps the VAE on the model's device)."""

    weights: WeightBytes
    vae: int
    kv_cache: int
    run: int
    total: int


def peak_bytes(footprint: ModelFootprint, mode: WeightMode, job: Job) -> Peak:
    weights = weight_bytes(footprint, mode)
    vae = footprint.vae_bytes(mode.dtype)
    kv, run = job_bytes(footprint.config, footprint.vae_config, mode.dtype, job)
    return Peak(weights, vae, kv, run, weights.gpu + vae + run)


def cheapest_fitting(footprint: ModelFootprint, job: Job, free: int, candidates: list[WeightMode],
                     device: DeviceTraits) -> WeightMode | None:
    """The first of `candidates` (whole-model modes, most faithful first) whose peak fits in `free` bytes; else, where
    `device` streams layers, streaming on top of the last of them with the most resident decoder layers that fit;
    None when nothing does."""
    for mode in candidates:
        if peak_bytes(footprint, mode, job).total <= free:
            return mode
    if streamed_mode(footprint, candidates[-1], device) is None:
        return None
    for resident in reversed(range(footprint.config.num_hidden_layers)):  # memory grows with resident layers
        mode = replace(candidates[-1], gpu_layers=resident)
        if peak_bytes(footprint, mode, job).total <= free:
            return mode
    return None


def streamed_mode(footprint: ModelFootprint, mode: WeightMode, device: DeviceTraits) -> WeightMode | None:
    """`mode` with every decoder layer streamed, where the device streams layers (weights/modes.py); else None."""
    streamed = replace(mode, gpu_layers=0)
    return streamed if mode_refusal(streamed, footprint.stored_format, device) is None else None


def _advise(footprint: ModelFootprint, mode: WeightMode, job: Job, free: int, needed: int,
            device: DeviceTraits) -> tuple[str, WeightMode | None]:
    """The advice for a mode that does not fit: the cheapest smaller mode the folder loads in on `device` that fits."""
    prefix = f"needs {gb(needed)}, {gb(free)} free"
    loadable = loadable_modes(footprint.stored_format, device, mode.dtype)
    smaller = loadable[[candidate.storage for candidate in loadable].index(mode.storage) + 1:]
    found = cheapest_fitting(footprint, job, free, smaller or [replace(mode, gpu_layers=None)], device)
    if found is None:
        streamed = " even with every decoder layer streamed" if streamed_mode(footprint, mode, device) else ""
        return f"{prefix}: does not fit{streamed}; use a smaller size or batch, or run on the CPU", None
    how = SWITCH_ADVICE[found.storage] if found.storage != mode.storage else ""
    if found.gpu_layers is None:
        return f"{prefix}: {how}", found
    layers = footprint.config.num_hidden_layers
    keep = (f"keep {found.gpu_layers} of {layers} decoder layers on the GPU (gpu_layers {found.gpu_layers}, much "
            f"slower)")
    return f"{prefix}: {how + ' and ' if how else ''}{keep}", found


def plan_memory(footprint: ModelFootprint, mode: WeightMode, job: Job, gpu_total: int | None = None,
                gpu_free: int | None = None, device: DeviceTraits = PLANNED_GPU) -> MemoryPlan:
    """The memory `mode` needs for `job`, checked against a GPU of `gpu_total` bytes with `gpu_free` free
    (free defaults to total), and the advice. A job the sampler would refuse (its settings, a prompt that does not
    fit the model's context) and a mode the folder cannot be loaded in on `device` are refused."""
    job.validate(footprint.config)
    check_loadable(mode, footprint.stored_format, device)
    peak = peak_bytes(footprint, mode, job)
    free = gpu_total if gpu_free is None else gpu_free
    fits, suggested = None, None
    if free is None:
        advice = f"needs {gb(peak.total)}; GPU size unknown"
    elif peak.total <= free:
        fits, advice = True, f"fits: needs {gb(peak.total)}, {gb(free)} free"
    else:
        fits = False
        advice, suggested = _advise(footprint, mode, job, free, peak.total, device)
    return MemoryPlan(weights_gpu_bytes=peak.weights.gpu, weights_host_bytes=peak.weights.host,
                      kv_cache_bytes=peak.kv_cache, vae_bytes=peak.vae, job_bytes=peak.run,
                      peak_gpu_bytes=peak.total, gpu_total_bytes=gpu_total, gpu_free_bytes=free, fits=fits,
                      advice=advice, mode=mode, suggested_mode=suggested)
