"""Planning for GPUs this machine does not have: targets of given traits and free memory, as the planner's pure
functions take them (the device rules for GPUs and Macs are tested this way, memory/planner.py)."""

from __future__ import annotations

from nextstep_runtime import GB, DeviceList, DeviceTraits, Targets
from nextstep_runtime.devices import PLANNED_GPU


def gpus(*sizes: float, traits: tuple[DeviceTraits, ...] | DeviceTraits = PLANNED_GPU, dtype: str = "auto",
         devices: str | None = None, vae: bool = True) -> Targets:
    """GPUs of these free sizes in GB (None: unknown), listed as cuda:0, cuda:1, ... (or `devices`), each of
    `traits` (one for all, or one each), computing in `dtype` (auto: each device's own); the VAE on the last, as the
    runtime runs it (`vae` False: none)."""
    listed = DeviceList.parse(devices or ",".join(f"cuda:{index}" for index in range(len(sizes))))
    each = traits if isinstance(traits, tuple) else (traits,) * len(listed.devices)
    by_device = dict(zip(listed.devices, each))
    free = dict(zip(listed.devices, (None if size is None else int(size * GB) for size in sizes)))
    return Targets.on(listed, dtype, free.get, vae_on_run_device=vae, traits=by_device.__getitem__)
