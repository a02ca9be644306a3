"""Weight modes: how the decoder's linear weights are held, and the one rule for which modes a model folder can be
loaded in on a device.

Loading refuses what `mode_refusal` refuses; `memory: auto`, the memory planner's advice, the CLI and the server
routes offer only `loadable_modes`, so no advice can name a mode that loading then refuses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..devices import DeviceTraits, fp8_refusal, int4_refusal, streaming_refusal
from ..errors import NextStepError

STORAGES = ("full", "fp8", "int4")
"""How a loaded model holds the decoder's linear weights: in the compute dtype (`full`), as float8 with a scale per
output channel, or as grouped 4-bit (weights/schemes.py), most faithful first."""
FLOAT_WEIGHTS = "float"
"""The stored format of a plain floating-point checkpoint (the released float32 ones, a bfloat16 copy)."""
STORED_FORMATS = (FLOAT_WEIGHTS, "fp8", "int4")
"""How a folder stores the decoder's linear weights: as floats, or repacked by `convert` as fp8 or int4."""
GPTQ_PACKED = "gptq"
"""The stored format of a folder of GPTQ-packed 4-bit weights (an AutoRound or GPTQ export, see gptq.py): it
loads as int4, in its own format only, like a folder repacked as int4."""


def own_storage(stored: str) -> str:
    """The storage (one of STORAGES) a folder storing `stored` weights loads in."""
    return {FLOAT_WEIGHTS: "full", GPTQ_PACKED: "int4"}.get(stored, stored)


@dataclass(frozen=True)
class WeightMode:
    """How the decoder's weights are held: their storage, and how many decoder layers stay on the GPUs."""

    storage: str = "full"
    gpu_layers: int | None = None
    """Decoder layers resident on their devices; the others are streamed from host RAM to the run device. None: all."""

    def __post_init__(self) -> None:
        if self.storage not in STORAGES:
            raise NextStepError(f"unknown weight storage {self.storage!r}; choose {', '.join(STORAGES)}")

    def check_layers(self, layers: int) -> None:
        """Refuse more resident layers than a model of `layers` decoder layers has."""
        if self.gpu_layers is not None and not 0 <= self.gpu_layers <= layers:
            raise NextStepError(f"gpu_layers must be between 0 and {layers} (got {self.gpu_layers})")

    def describe(self) -> str:
        parts = [] if self.storage == "full" else [self.storage]
        if self.gpu_layers is not None:
            parts.append(f"gpu_layers {self.gpu_layers}")
        return ", ".join(parts)


def describe_load(mode: WeightMode, dtypes: str) -> str:
    """What a model loads as, in words: its compute dtype(s) (Placement.describe_dtypes), then the mode."""
    return ", ".join(part for part in (dtypes, mode.describe()) if part)


def mode_refusal(mode: WeightMode, stored: str, traits: DeviceTraits, dtype: torch.dtype,
                 folder: str = "this folder") -> str | None:
    """Why `mode` cannot load a folder storing `stored` weights on a device with `traits` computing in `dtype`, or
    None.

    A repacked or 4-bit community folder loads only in its own format: its original weights are gone, and
    dequantising 4-bit or fp8 values to bf16 would take the memory of bf16 with the accuracy of the quantised form.
    The device must have kernels for the format (devices.py), and memory of its own for streamed layers to save
    any."""
    if stored != FLOAT_WEIGHTS and mode.storage != own_storage(stored):
        if stored == GPTQ_PACKED:
            return (f"{folder} holds 4-bit GPTQ-packed weights (an AutoRound or GPTQ export), not the original ones; "
                    f"load it with int4 weights, or use the original model for {mode.storage}")
        return (f"{folder} holds {stored} weights (repacked); load it with {stored} weights, or convert the "
                f"original model to {mode.storage} instead")
    refusal = {"fp8": lambda: fp8_refusal(traits), "int4": lambda: int4_refusal(traits, dtype)}.get(
        mode.storage, lambda: None)()
    if refusal is None and mode.gpu_layers is not None:
        refusal = streaming_refusal(traits)
    return refusal


def check_loadable(mode: WeightMode, stored: str, traits: DeviceTraits, dtype: torch.dtype,
                   folder: str = "this folder") -> None:
    """Raise the refusal of `mode_refusal` as a NextStepError."""
    refusal = mode_refusal(mode, stored, traits, dtype, folder)
    if refusal is not None:
        raise NextStepError(refusal)


def loadable_modes(stored: str, devices: list[tuple[DeviceTraits, torch.dtype]],
                   folder: str = "this folder") -> list[WeightMode]:
    """The whole-model modes (every layer resident) a folder storing `stored` weights loads in on every one of these
    (device traits, compute dtype), in the order `auto` tries them: the most faithful first, each next one smaller.
    Never empty: where the folder loads in no mode there, the refusal of its own format is raised."""
    candidates = [WeightMode(storage) for storage in STORAGES]
    loadable = [mode for mode in candidates
                if all(mode_refusal(mode, stored, traits, dtype) is None for traits, dtype in devices)]
    if not loadable:
        own = next(mode for mode in candidates if mode.storage == own_storage(stored))
        for traits, dtype in devices:
            check_loadable(own, stored, traits, dtype, folder)
    return loadable
