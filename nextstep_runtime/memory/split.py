"""The memory planner over several devices: the decoder's layers in contiguous ranges (model/placement.py), sized
from each device's free memory, and the bytes each device then holds.

Weights per device are the loader's exactly (footprint.range_weight_bytes), the KV cache per device is its layers'
share of `DecodeState`'s allocation exactly, and a run's other memory is the single-device estimate's parts
(estimate.split_job_bytes). Ranges are sized in proportion to the layers each device has room for once its fixed
parts are placed (the embedding on the first; the head, flow head, VAE and sampling buffers on the last), so every
device keeps a similar share of headroom.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..devices import PLANNED_GPU, DeviceTraits
from ..errors import NextStepError
from ..model.placement import DeviceList, Placement
from ..weights.model_folder import ModelFolder
from ..weights.modes import WeightMode, check_loadable, loadable_modes
from .choice import resolve_weight_mode
from .device_memory import FreeMemory
from .estimate import split_job_bytes
from .footprint import ModelFootprint, range_weight_bytes
from .job import Job
from .plan import SWITCH_ADVICE, gb, mode_as_dict, streamed_mode


@dataclass(frozen=True)
class DeviceShare:
    """One device's part of a split and its bytes."""

    device: str
    first_layer: int
    last_layer: int
    """Inclusive."""
    weights_bytes: int
    """Its resident decoder layers, plus the embedding (first device) or the other parts and streaming slots (last)."""
    kv_cache_bytes: int
    vae_bytes: int
    job_bytes: int
    """What one run allocates there besides weights (its KV cache included)."""
    peak_bytes: int
    free_bytes: int | None
    fits: bool | None


@dataclass(frozen=True)
class SplitPlan:
    mode: WeightMode
    placement: Placement
    devices: tuple[DeviceShare, ...]
    weights_host_bytes: int
    fits: bool | None
    advice: str
    suggested_mode: WeightMode | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"mode": mode_as_dict(self.mode), "placement": self.placement.describe(),
                "devices": [asdict(share) for share in self.devices], "weights_host_bytes": self.weights_host_bytes,
                "fits": self.fits, "advice": self.advice,
                "suggested_mode": None if self.suggested_mode is None else mode_as_dict(self.suggested_mode)}


def device_shares(footprint: ModelFootprint, mode: WeightMode, job: Job, placement: Placement,
                  free: list[int | None]) -> tuple[list[DeviceShare], int]:
    """Each device's bytes under `placement`, checked against `free` (None: unknown); and the host's streamed bytes."""
    counts = [layer_range.count for layer_range in placement.ranges]
    weights, host = range_weight_bytes(footprint, mode, counts)
    runs = split_job_bytes(footprint.config, footprint.vae_config, mode.dtype, job, counts)
    vae = footprint.vae_bytes(mode.dtype)
    shares = []
    for index, (layer_range, weight, (kv, run), room) in enumerate(zip(placement.ranges, weights, runs, free)):
        vae_here = vae if index == len(counts) - 1 else 0
        peak = weight + vae_here + run
        shares.append(DeviceShare(str(layer_range.device), layer_range.start, layer_range.stop - 1, weight, kv,
                                  vae_here, run, peak, room, None if room is None else peak <= room))
    return shares, host


def size_ranges(footprint: ModelFootprint, mode: WeightMode, job: Job, devices: tuple[torch.device, ...],
                free: list[int | None]) -> Placement:
    """Ranges over `devices` in proportion to the decoder layers each has room for besides its fixed parts (at least
    one layer each; evenly where a size is unknown). With streamed layers (mode.gpu_layers) the other devices get as
    many as they hold and the last device the rest, which it streams beyond its resident ones."""
    layers = footprint.config.num_hidden_layers
    if len(devices) > layers:
        raise NextStepError(f"{len(devices)} devices for {layers} decoder layers: each device needs at least one "
                            f"layer; list at most {layers} devices")
    if len(devices) == 1:
        return Placement.single(devices[0], layers)
    if any(room is None for room in free):
        room_in_layers = [1.0] * len(devices)
    else:
        ones = [1] * len(devices)  # one layer each: the fixed parts are what is left after one layer's bytes
        fixed = [share.peak_bytes for share in device_shares(footprint, mode, job,
                                                             Placement.from_counts(list(devices), ones), free)[0]]
        per_layer = max(1, range_weight_bytes(footprint, replace(mode, gpu_layers=None), [layers])[0][0] // layers
                        + split_job_bytes(footprint.config, footprint.vae_config, mode.dtype, job, [1])[0][0])
        room_in_layers = [max(0.0, (room - taken) / per_layer) + 1 for room, taken in zip(free, fixed)]
    if mode.gpu_layers is not None and None not in free:
        # streaming: the other devices as full as they hold, the rest to the last device, which streams
        counts = [max(1, int(room)) for room in room_in_layers[:-1]]
        while sum(counts) > layers - 1:
            counts[counts.index(max(counts))] -= 1
        return Placement.from_counts(list(devices), counts + [layers - sum(counts)])
    total = sum(room_in_layers)
    counts = [max(1, int(layers * room / total)) for room in room_in_layers]
    while sum(counts) > layers:  # rounding up to one layer each may overshoot: take from the largest
        counts[counts.index(max(counts))] -= 1
    order = sorted(range(len(devices)), key=lambda i: room_in_layers[i] - counts[i] * total / layers, reverse=True)
    for index in order[: layers - sum(counts)]:  # the remainder to those with most room left
        counts[index] += 1
    return Placement.from_counts(list(devices), counts)


def plan_split(footprint: ModelFootprint, mode: WeightMode, job: Job, devices: DeviceList,
               free: list[int | None], traits: list[DeviceTraits] | None = None) -> SplitPlan:
    """The bytes on each device for `mode` over the devices (their explicit ranges, or ranges sized here from `free`),
    whether each fits, and the advice: the sizes to split at, or the cheapest smaller mode whose split fits. A job the
    sampler would refuse and a mode the folder cannot be loaded in are refused, as plan_memory refuses them."""
    job.validate(footprint.config)
    traits = traits or [PLANNED_GPU] * len(devices.devices)
    for each in traits:
        check_loadable(mode, footprint.stored_format, each)
    devices.check_layers(footprint.config.num_hidden_layers)
    placement = devices.placement or size_ranges(footprint, mode, job, devices.devices, free)
    placement.check_streamed(mode.gpu_layers)
    shares, host = device_shares(footprint, mode, job, placement, free)
    known = [share.fits for share in shares if share.fits is not None]
    fits = None if len(known) < len(shares) else all(known)
    sizes = " + ".join(gb(share.peak_bytes) for share in shares)
    names = " and ".join(share.device for share in shares)
    suggested = None
    if fits is None:
        advice = f"split over {names}: {sizes}; free memory unknown"
    elif fits:
        advice = f"fits: split over {names}: {sizes} ({placement.describe()})"
    else:
        full = [share.device for share in shares if not share.fits]
        advice, suggested = _advise(footprint, mode, job, devices, free, traits, sizes, full)
    return SplitPlan(mode, placement, tuple(shares), host, fits, advice, suggested)


def _advise(footprint: ModelFootprint, mode: WeightMode, job: Job, devices: DeviceList, free: list[int | None],
            traits: list[DeviceTraits], sizes: str, full: list[str]) -> tuple[str, WeightMode | None]:
    prefix = f"needs {sizes}, {' + '.join(gb(room) for room in free)} free ({', '.join(full)} too small)"
    if devices.placement is not None:
        sized = size_ranges(footprint, mode, job, devices.devices, free)
        if all(share.fits for share in device_shares(footprint, mode, job, sized, free)[0]):
            return f"{prefix}: use the ranges {sized.describe()}", None
    found = cheapest_split(footprint, job, devices, free, traits, mode)
    if found is None:
        return f"{prefix}: does not fit split over these devices in any mode; use a smaller size or batch", None
    how = SWITCH_ADVICE[found.storage] if found.storage != mode.storage else ""
    if found.gpu_layers is not None:
        layers = footprint.config.num_hidden_layers
        how += (" and " if how else "") + (f"keep {found.gpu_layers} of {layers} decoder layers on the GPUs "
                                           f"(gpu_layers {found.gpu_layers}, the rest streamed to the last device, "
                                           f"much slower)")
    return f"{prefix}: {how}", found


def cheapest_split(footprint: ModelFootprint, job: Job, devices: DeviceList, free: list[int | None],
                   traits: list[DeviceTraits], asked: WeightMode) -> WeightMode | None:
    """The first whole-model mode from `asked` on (most faithful first) whose split fits every device; else the
    smallest with as many resident layers as fit, the rest streamed to the last device; None when nothing does."""
    loadable = _loadable(footprint, traits, asked.dtype)
    storages = [mode.storage for mode in loadable]
    candidates = loadable[storages.index(asked.storage):] if asked.storage in storages else loadable
    for mode in candidates:
        if _fits(footprint, mode, job, devices, free):
            return mode
    smallest = candidates[-1] if candidates else None
    if smallest is None or any(streamed_mode(footprint, smallest, each) is None for each in traits):
        return None  # nothing smaller, or a device that does not stream layers
    for resident in reversed(range(footprint.config.num_hidden_layers)):
        mode = replace(smallest, gpu_layers=resident)
        if _fits(footprint, mode, job, devices, free):
            return mode
    return None


def _loadable(footprint: ModelFootprint, traits: list[DeviceTraits], dtype: torch.dtype) -> list[WeightMode]:
    """The whole-model modes the folder loads in on every device of the split."""
    per_device = [loadable_modes(footprint.stored_format, each, dtype) for each in traits]
    return [mode for mode in per_device[0] if all(mode in modes for modes in per_device)]


def _fits(footprint: ModelFootprint, mode: WeightMode, job: Job, devices: DeviceList, free: list[int | None]) -> bool:
    placement = size_ranges(footprint, mode, job, devices.devices, free)
    if mode.gpu_layers is not None and mode.gpu_layers < placement.ranges[-1].start:
        return False
    return all(share.fits for share in device_shares(footprint, mode, job, placement, free)[0])


def choose_split_mode(footprint: ModelFootprint, job: Job, devices: DeviceList, free: list[int | None],
                      traits: list[DeviceTraits], dtype: torch.dtype) -> tuple[WeightMode, SplitPlan]:
    """`memory auto` over several devices: the fastest mode whose split fits (see cheapest_split); when nothing fits,
    the smallest whole-model mode, whose plan says it does not fit."""
    loadable = _loadable(footprint, traits, dtype)
    mode = cheapest_split(footprint, job, devices, free, traits, loadable[0]) or loadable[-1]
    return mode, plan_split(footprint, mode, job, devices, free, traits)


def placement_for(footprint: ModelFootprint, mode: WeightMode, job: Job, devices: DeviceList,
                  free: FreeMemory) -> Placement:
    """The placement to load with: the list's explicit ranges, else ranges sized from each device's free memory now
    (`free`), planned for `job`."""
    devices.check_layers(footprint.config.num_hidden_layers)
    placement = devices.placement or size_ranges(footprint, mode, job, devices.devices,
                                                 [free(device) for device in devices.devices])
    placement.check_streamed(mode.gpu_layers)
    return placement


def resolve_split(source: str | Path | ModelFolder, memory: str, devices: DeviceList, dtype: torch.dtype,
                  fp8: bool, gpu_layers: int | None, free: FreeMemory, job: Job = Job()
                  ) -> tuple[WeightMode, Placement, str | None]:
    """The weight mode and placement to load a split with, and the line explaining an `auto` choice: `memory` as
    choice.resolve_weight_mode takes it on the last device; `auto` on GPUs plans the split for `job` (the fastest
    mode whose split fits every device's free memory now)."""
    folder = ModelFolder.open(source)
    footprint = ModelFootprint.from_folder(folder)
    devices.check_layers(footprint.config.num_hidden_layers)
    if memory != "auto" or gpu_layers is not None or devices.devices[-1].type not in ("cuda", "mps"):
        mode, _ = resolve_weight_mode(folder, memory, devices.devices[-1], dtype, fp8, gpu_layers, None, job)
        return mode, placement_for(footprint, mode, job, devices, free), None
    rooms = [free(device) for device in devices.devices]
    traits = [DeviceTraits.of(device) for device in devices.devices]
    mode, plan = choose_split_mode(footprint, job, devices, rooms, traits, dtype)
    verdict = "" if plan.fits else " (does not fit in any mode, trying anyway)"
    return mode, plan.placement, f"memory auto: {mode.describe()}, {plan.advice}{verdict}"
