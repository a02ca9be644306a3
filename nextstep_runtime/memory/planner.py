"""The memory planner: where a model's parts go over one device or several, how many bytes each device then holds
for a job, whether that fits, and which weight mode `memory auto` loads in.

One device is a placement with one range (model/placement.py), so every question has one answer for one device and
for several: the loader, the CLI's `generate` and `plan`, the plan route, the Model Loader's panel and
`from_pretrained` all resolve `memory` through `plan_load`. What a device has free comes from the host (`Targets`):
ComfyUI's budget inside ComfyUI, the device's free memory outside it.

Weights per device are the loader's exactly (footprint.placed_weight_bytes), the KV cache per device its layers'
share of `DecodeState`'s allocation exactly, a run's other memory the estimate's (estimate.device_run_bytes). A
device listed twice (two ranges on one GPU) holds the sum of its ranges and counts its memory once. Ranges not given
explicitly are sized in proportion to the decoder layers each device has room for once its fixed parts are placed
(the embedding on the first; the head, flow head and sampling buffers on the last; the VAE where it runs), so every
device keeps a similar share of headroom.

Sizes in the advice are decimal gigabytes (1 GB = 10^9 bytes), as GPU makers count them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Callable

import torch

from ..devices import DeviceTraits, planned_traits, plans_memory, resolve_dtype, vae_dtype
from ..errors import NextStepError
from ..model.placement import DeviceList, Placement
from ..weights.modes import STORAGES, WeightMode, check_loadable, describe_load, loadable_modes, mode_refusal
from .device_memory import FreeMemory
from .estimate import VAEPlacement, device_run_bytes
from .footprint import ModelFootprint, part_bytes, placed_weight_bytes
from .job import Job

GB = 10**9
MEMORY_CHOICES = ("auto", *STORAGES)
"""The `memory` setting: auto (the fastest mode that fits, see plan_load), or a storage (weights/modes.py)."""
SWITCH_ADVICE = {"fp8": "set memory to fp8", "int4": "set memory to int4"}
"""The advice that selects each smaller whole-model mode."""


def memory_setting(memory: str, fp8: bool) -> str:
    """The `memory` setting with the older fp8 switch (the Model Loader's `fp8` widget, the CLI's --fp8) mapped onto
    it; the two must agree."""
    if memory not in MEMORY_CHOICES:
        raise NextStepError(f"unknown memory setting {memory!r}; choose {', '.join(MEMORY_CHOICES)}")
    if fp8 and memory not in ("auto", "fp8"):
        raise NextStepError(f"fp8 is on but memory is {memory!r}; turn fp8 off or set memory to fp8")
    return "fp8" if fp8 else memory


def gb(value: int) -> str:
    return f"{value / GB:.1f} GB"


@dataclass(frozen=True)
class Target:
    """One entry of a device list as the planner sees it."""

    device: torch.device
    traits: DeviceTraits
    dtype: torch.dtype
    """The compute dtype of the layers placed there (devices.resolve_dtype for the device)."""


@dataclass(frozen=True)
class Targets:
    """What a plan is made for: the listed devices (in order, with explicit layer ranges or none) and each one's
    traits and compute dtype, the bytes free on each distinct device, the VAE's included (None: unknown), and where
    the VAE runs and in which dtype (None: no VAE is planned)."""

    listed: DeviceList
    entries: tuple[Target, ...]
    free: dict[torch.device, int | None]
    vae: tuple[torch.device, torch.dtype] | None = None

    @classmethod
    def on(cls, listed: DeviceList, dtype: str, free: FreeMemory, vae: tuple[torch.device, torch.dtype] | None = None,
           vae_on_run_device: bool = False,
           traits: Callable[[torch.device], DeviceTraits] | None = None) -> "Targets":
        """The devices of this machine (their traits and `free(device)` each), computing in `dtype` (a name, or
        auto: each device's own); the VAE on `vae`, or with `vae_on_run_device` on the last listed device in the
        dtype that goes with its compute dtype (devices.vae_dtype), as the runtime runs it. `traits`: what a device
        is (default: DeviceTraits.of, asking this machine)."""
        traits = traits or DeviceTraits.of
        entries = tuple(Target(device, traits(device), resolve_dtype(dtype, traits(device)))
                        for device in listed.devices)
        if vae_on_run_device:
            vae = (entries[-1].device, vae_dtype(entries[-1].dtype))
        devices = dict.fromkeys([*listed.devices, *([] if vae is None else [vae[0]])])
        return cls(listed, entries, {device: free(device) for device in devices}, vae)

    @classmethod
    def planned(cls, listed: DeviceList, dtype: str, sizes: list[int | None]) -> "Targets":
        """GPUs this machine need not have, one size (all free) per listed device, each assumed a current one of its
        kind (devices.planned_traits); the VAE on the last, as the runtime runs it."""
        if len(sizes) != len(listed.devices):
            raise NextStepError(f"{len(sizes)} GPU sizes for {len(listed.devices)} devices; give one size per device, "
                                f"e.g. {','.join(['24'] * len(listed.devices))}")
        return cls.on(listed, dtype, dict(zip(listed.devices, sizes)).get, vae_on_run_device=True,
                      traits=planned_traits)

    def fixed_to(self, placement: Placement) -> "Targets":
        """These targets with the layer ranges of `placement` (what was loaded), to plan that load for another job."""
        spans = tuple((layer_range.start, layer_range.stop) for layer_range in placement.ranges)
        return replace(self, listed=DeviceList(self.listed.devices, spans))

    def loadable(self, footprint: ModelFootprint, folder: str = "this folder") -> list[WeightMode]:
        return loadable_modes(footprint.stored_format, [(t.traits, t.dtype) for t in self.entries], folder)

    def check_loadable(self, mode: WeightMode, footprint: ModelFootprint, folder: str = "this folder") -> None:
        """Refuse a mode the folder cannot be loaded in on every device (streamed layers on the run device only)."""
        for index, target in enumerate(self.entries):
            here = mode if index == len(self.entries) - 1 else replace(mode, gpu_layers=None)
            check_loadable(here, footprint.stored_format, target.traits, target.dtype, folder)

    def streams(self, footprint: ModelFootprint, mode: WeightMode) -> bool:
        """Whether the run device streams layers in this mode's storage."""
        run = self.entries[-1]
        streamed = replace(mode, gpu_layers=0)
        return mode_refusal(streamed, footprint.stored_format, run.traits, run.dtype) is None


@dataclass(frozen=True)
class DeviceShare:
    """One device's part of a plan and its bytes."""

    device: str
    layers: str
    """The decoder layers it holds (inclusive ranges, `0-23`; several where the device is listed twice), `` for a
    device that only runs the VAE."""
    weights_bytes: int
    """Its resident decoder layers, plus the embedding (first range) or the other parts and streaming slots (run
    device)."""
    kv_cache_bytes: int
    vae_bytes: int
    job_bytes: int
    """What one run allocates there besides weights (its KV cache included; the VAE's work where the VAE runs)."""
    peak_bytes: int
    free_bytes: int | None
    fits: bool | None


@dataclass(frozen=True)
class Plan:
    mode: WeightMode
    placement: Placement
    devices: tuple[DeviceShare, ...]
    weights_host_bytes: int
    """Streamed decoder layers, held in (pinned) host RAM."""
    fits: bool | None
    """None when some device's free memory is unknown."""
    advice: str
    suggested_mode: WeightMode | None = None
    """The cheapest mode that fits when the asked one does not (None when it fits or nothing does)."""
    float32_fits: bool | None = None
    """Where a device computes in float16: whether this mode fits every device in float32, the fix a float16 overflow
    names (devices.float16_overflow_fix); None elsewhere, or when free memory is unknown."""

    @property
    def loads_as(self) -> str:
        return describe_load(self.mode, self.placement.describe_dtypes())

    def to_dict(self) -> dict[str, Any]:
        return {"mode": asdict(self.mode), "loads_as": self.loads_as, "placement": self.placement.describe(),
                "devices": [asdict(share) for share in self.devices], "weights_host_bytes": self.weights_host_bytes,
                "fits": self.fits, "advice": self.advice,
                "suggested_mode": None if self.suggested_mode is None else asdict(self.suggested_mode)}


def _vae_placement(footprint: ModelFootprint, targets: Targets) -> VAEPlacement | None:
    return None if targets.vae is None else VAEPlacement(footprint.vae_config, *targets.vae)


def _shares(footprint: ModelFootprint, mode: WeightMode, job: Job, targets: Targets,
            placement: Placement) -> tuple[list[DeviceShare], int]:
    weights, host = placed_weight_bytes(footprint, mode, placement)
    runs = device_run_bytes(footprint.config, placement, job, _vae_placement(footprint, targets))
    held: dict[torch.device, int] = {}
    layers: dict[torch.device, list[str]] = {}
    for layer_range, weight in zip(placement.ranges, weights):
        held[layer_range.device] = held.get(layer_range.device, 0) + weight
        layers.setdefault(layer_range.device, []).append(f"{layer_range.start}-{layer_range.stop - 1}")
    shares = []
    for device, (kv, run) in runs.items():
        vae = footprint.vae_bytes(targets.vae[1]) if targets.vae is not None and targets.vae[0] == device else 0
        peak = held.get(device, 0) + vae + run
        room = targets.free.get(device)
        shares.append(DeviceShare(str(device), ",".join(layers.get(device, [])), held.get(device, 0), kv, vae, run,
                                  peak, room, None if room is None else peak <= room))
    return shares, host


def _fits(shares: list[DeviceShare]) -> bool | None:
    known = [share.fits for share in shares if share.fits is not None]
    return None if len(known) < len(shares) else all(known)


def _layer_counts(footprint: ModelFootprint, mode: WeightMode, job: Job, targets: Targets) -> list[int]:
    """Layers per listed device: in proportion to the layers each has room for besides its fixed parts (at least one
    each; evenly where a size is unknown). With streamed layers (from mode.gpu_layers on) the other devices get as many
    as they hold, up to the first streamed layer, and the last the rest, which it streams beyond its resident ones."""
    layers, entries = footprint.config.num_hidden_layers, targets.entries
    if any(targets.free[target.device] is None for target in entries):
        room = [1.0] * len(entries)
    else:
        ones = Placement.from_counts([(t.device, t.dtype) for t in entries], [1] * len(entries))
        whole = replace(mode, gpu_layers=None)  # what one range with one layer takes, streaming aside
        shares = {share.device: share for share in _shares(footprint, whole, job, targets, ones)[0]}
        listed = [t.device for t in entries]
        room = []
        for target in entries:
            share = shares[str(target.device)]
            per_layer = part_bytes(footprint, mode.storage, target.dtype).per_layer + \
                (share.kv_cache_bytes // listed.count(target.device))
            spare = (targets.free[target.device] - share.peak_bytes) / listed.count(target.device)
            room.append(min(float(layers), max(0.0, spare / max(1, per_layer)) + 1))
    if mode.gpu_layers is not None and None not in targets.free.values():
        counts = [max(1, int(each)) for each in room[:-1]]  # at most `layers` each: this loop is short
        while sum(counts) > max(len(counts), min(mode.gpu_layers, layers - 1)):  # the streamed layers are the last's
            counts[counts.index(max(counts))] -= 1
        return counts + [layers - sum(counts)]
    total = sum(room)
    counts = [max(1, int(layers * each / total)) for each in room]
    while sum(counts) > layers:  # rounding up to one layer each may overshoot: take from the largest
        counts[counts.index(max(counts))] -= 1
    order = sorted(range(len(entries)), key=lambda i: room[i] - counts[i] * total / layers, reverse=True)
    for index in order[: layers - sum(counts)]:  # the remainder to those with most room left
        counts[index] += 1
    return counts


def placement_for(footprint: ModelFootprint, mode: WeightMode, job: Job, targets: Targets) -> Placement:
    """The placement to load `mode` with: the explicit ranges, else ranges sized from each device's free memory."""
    spans = targets.listed.spans
    counts = [stop - start for start, stop in spans] if spans else _layer_counts(footprint, mode, job, targets)
    placement = Placement.from_counts([(target.device, target.dtype) for target in targets.entries], counts)
    placement.check_streamed(mode.gpu_layers)
    return placement


def _plan(footprint: ModelFootprint, mode: WeightMode, job: Job, targets: Targets) -> tuple[Placement, list, int]:
    placement = placement_for(footprint, mode, job, targets)
    shares, host = _shares(footprint, mode, job, targets, placement)
    return placement, shares, host


def _fits_mode(footprint: ModelFootprint, mode: WeightMode, job: Job, targets: Targets) -> bool:
    try:
        _, shares, _ = _plan(footprint, mode, job, targets)
    except NextStepError:  # streamed layers outside the last range
        return False
    return bool(_fits(shares))


def cheapest(footprint: ModelFootprint, job: Job, targets: Targets, candidates: list[WeightMode]) -> WeightMode | None:
    """The first of `candidates` (whole-model modes, most faithful first) whose plan fits every device; else, where the
    run device streams layers, the last of them with the most resident decoder layers that fit; None when nothing
    does."""
    for mode in candidates:
        if _fits_mode(footprint, mode, job, targets):
            return mode
    if not candidates or not targets.streams(footprint, candidates[-1]):
        return None
    streamed = _all_streamed(footprint, candidates[-1], job, targets)
    low, high = streamed.gpu_layers, footprint.config.num_hidden_layers - 1
    if not _fits_mode(footprint, streamed, job, targets):
        return None
    while low < high:  # memory grows with resident layers: bisect for the most that fit
        middle = (low + high + 1) // 2
        if _fits_mode(footprint, replace(streamed, gpu_layers=middle), job, targets):
            low = middle
        else:
            high = middle - 1
    return replace(streamed, gpu_layers=low)


def _all_streamed(footprint: ModelFootprint, mode: WeightMode, job: Job, targets: Targets) -> WeightMode:
    """`mode` with as many layers streamed as can be: every layer of the last range (the only one that streams), whose
    start is the explicit ranges', or where the sizing of a streamed mode puts it."""
    spans = targets.listed.spans
    streamed = replace(mode, gpu_layers=footprint.config.num_hidden_layers - 1)
    return replace(mode, gpu_layers=spans[-1][0] if spans else
                   sum(_layer_counts(footprint, streamed, job, targets)[:-1]))


def _sizes(shares: list[DeviceShare]) -> tuple[str, str]:
    free = " + ".join("unknown" if share.free_bytes is None else gb(share.free_bytes) for share in shares)
    return " + ".join(gb(share.peak_bytes) for share in shares), free


def _advise(footprint: ModelFootprint, mode: WeightMode, job: Job, targets: Targets, placement: Placement,
            shares: list[DeviceShare]) -> tuple[str, WeightMode | None]:
    """The one advice text of a plan, and the mode it suggests when the asked one does not fit."""
    needed, free = _sizes(shares)
    ranges = f" ({placement.split})" if placement.split else ""
    fits = _fits(shares)
    if fits is None:
        return f"needs {needed}; free memory unknown{ranges}", None
    if fits:
        return f"fits: needs {needed}, {free} free{ranges}", None
    small = [share.device for share in shares if share.fits is False]
    prefix = f"needs {needed}, {free} free" + (f" ({', '.join(small)} too small)" if len(shares) > 1 else "")
    if targets.listed.spans is not None:
        sized = replace(targets, listed=DeviceList(targets.listed.devices))
        if _fits_mode(footprint, mode, job, sized):
            return f"{prefix}: use the ranges {placement_for(footprint, mode, job, sized).describe()}", None
    loadable = targets.loadable(footprint)
    storages = [candidate.storage for candidate in loadable]
    smaller = loadable[storages.index(mode.storage) + 1:] if mode.storage in storages else []
    found = cheapest(footprint, job, targets, smaller or [replace(mode, gpu_layers=None)])
    if found is None:
        streamed = " even with every decoder layer streamed" if targets.streams(footprint, mode) else ""
        return f"{prefix}: does not fit in any mode{streamed}; use a smaller size or batch, or run on the CPU", None
    how = [SWITCH_ADVICE[found.storage]] if found.storage != mode.storage else []
    if found.gpu_layers is not None:
        layers = footprint.config.num_hidden_layers
        how.append(f"keep {found.gpu_layers} of {layers} decoder layers on the GPU (gpu_layers {found.gpu_layers}, the "
                   f"rest streamed from RAM, much slower)")
    return f"{prefix}: {' and '.join(how)}", found


def plan_mode(footprint: ModelFootprint, mode: WeightMode, job: Job, targets: Targets,
              folder: str = "this folder") -> Plan:
    """The bytes on each device for `mode` (placed on the explicit ranges, or on ranges sized here), whether each
    fits, and the advice. A job the sampler would refuse (its settings, a prompt that does not fit the model's
    context) and a mode the folder cannot be loaded in on these devices are refused."""
    job.validate(footprint.config)
    targets.listed.check_layers(footprint.config.num_hidden_layers)
    targets.check_loadable(mode, footprint, folder)
    placement, shares, host = _plan(footprint, mode, job, targets)
    advice, suggested = _advise(footprint, mode, job, targets, placement, shares)
    return Plan(mode, placement, tuple(shares), host, _fits(shares), advice, suggested,
                _float32_fits(footprint, mode, job, targets))


def _float32_fits(footprint: ModelFootprint, mode: WeightMode, job: Job, targets: Targets) -> bool | None:
    """Where some device computes in float16, whether `mode` would fit every device computing in float32; else None."""
    if all(target.dtype != torch.float16 for target in targets.entries):
        return None
    wide = replace(targets, entries=tuple(replace(target, dtype=torch.float32) for target in targets.entries))
    try:
        wide.check_loadable(mode, footprint)
        _, shares, _ = _plan(footprint, mode, job, wide)
    except NextStepError:  # a mode float32 cannot load in
        return False
    return _fits(shares)


def plan_load(footprint: ModelFootprint, memory: str, gpu_layers: int | None, job: Job, targets: Targets,
              folder: str = "this folder") -> tuple[Plan, str | None]:
    """The weight mode and placement to load with, for the `memory` setting and an explicit `gpu_layers` (None: all
    layers resident), and the line that explains an `auto` choice. `auto` is the fastest mode whose plan fits every
    device (the folder's loadable modes in order, then streaming as few layers as possible) where the devices are
    GPUs; when nothing fits, the smallest, whose plan says so. On the CPU, and with an explicit `gpu_layers`, `auto`
    is the folder's first loadable mode (the compute dtype, or a repacked folder's own)."""
    if memory not in MEMORY_CHOICES:
        raise NextStepError(f"unknown memory setting {memory!r}; choose {', '.join(MEMORY_CHOICES)}")
    job.validate(footprint.config)
    targets.listed.check_layers(footprint.config.num_hidden_layers)
    if memory != "auto":
        return plan_mode(footprint, WeightMode(memory, gpu_layers), job, targets, folder), None
    loadable = targets.loadable(footprint, folder)
    known = None not in targets.free.values()
    if gpu_layers is not None or not known or not all(plans_memory(t.traits) for t in targets.entries):
        return plan_mode(footprint, replace(loadable[0], gpu_layers=gpu_layers), job, targets, folder), None
    smallest = _all_streamed(footprint, loadable[-1], job, targets) if targets.streams(footprint, loadable[-1]) \
        else loadable[-1]
    plan = plan_mode(footprint, cheapest(footprint, job, targets, loadable) or smallest, job, targets, folder)
    needed, free = _sizes(list(plan.devices))
    verdict = "needs" if plan.fits else ("does not fit even fully streamed, trying anyway:"
                                         if plan.mode.gpu_layers is not None else
                                         "does not fit in any mode, trying anyway:")
    ranges = f", layers {plan.placement.split}" if plan.placement.split else ""
    return plan, (f"memory auto: {plan.loads_as} ({verdict} {needed} of {free} free for {job.settings.width}x"
                  f"{job.settings.height}{ranges})")
