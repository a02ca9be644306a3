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

STORED_FORMATS = ("bf16", "fp8", "int4")
"""How a folder stores the decoder's linear weights: `bf16` for any plain float checkpoint (the released float32
ones included), `fp8` and `int4` for folders repacked by `convert` (what `convert --weights` writes)."""
GPTQ_PACKED = "gptq"
"""The stored format of a folder of GPTQ-packed 4-bit weights (an AutoRound or GPTQ export, see gptq.py): it
loads as int4, in its own format only, like a folder repacked as int4."""


def own_storage(stored: str) -> str:
    """The weight storage (one of STORED_FORMATS) a folder storing `stored` weights loads in, besides `bf16`."""
    return "int4" if stored == GPTQ_PACKED else stored


@dataclass(frozen=True)
class WeightMode:
    """How the decoder's weights are held."""

    dtype: torch.dtype = torch.bfloat16
    fp8: bool = False
    gpu_layers: int | None = None
    """Decoder layers resident on the run device; the others are streamed from host RAM. None = all."""
    int4: bool = False

    @property
    def storage(self) -> str:
        """The decoder's linear weights as one of STORED_FORMATS."""
        return "fp8" if self.fp8 else "int4" if self.int4 else "bf16"

    def describe(self) -> str:
        parts = [str(self.dtype).removeprefix("torch.")] + ([self.storage] if self.storage != "bf16" else [])
        if self.gpu_layers is not None:
            parts.append(f"gpu_layers {self.gpu_layers}")
        return ", ".join(parts)


def mode_refusal(mode: WeightMode, stored: str, traits: DeviceTraits, folder: str = "this folder") -> str | None:
    """Why `mode` cannot load a folder storing `stored` weights on a device with `traits`, or None.

    A repacked or 4-bit community folder loads only in its own format: its original weights are gone, and
    dequantising 4-bit or fp8 values to bf16 would take the memory of bf16 with the accuracy of the quantised form.
    The device must have kernels for the format (devices.py), and memory of its own for streamed layers to save
    any."""
    if mode.fp8 and mode.int4:
        return "choose fp8 or int4 weights, not both"
    if stored != "bf16" and mode.storage != own_storage(stored):
        if stored == GPTQ_PACKED:
            return (f"{folder} holds 4-bit GPTQ-packed weights (an AutoRound or GPTQ export), not the original ones; "
                    f"load it with int4 weights, or use the original model for {mode.storage}")
        return (f"{folder} holds {stored} weights (repacked); load it with {stored} weights, or convert the "
                f"original model to {mode.storage} instead")
    refusal = fp8_refusal(traits) if mode.fp8 else int4_refusal(traits, mode.dtype) if mode.int4 else None
    if refusal is None and mode.gpu_layers is not None:
        refusal = streaming_refusal(traits)
    return refusal


def check_loadable(mode: WeightMode, stored: str, traits: DeviceTraits, folder: str = "this folder") -> None:
    """Raise the refusal of `mode_refusal` as a NextStepError."""
    refusal = mode_refusal(mode, stored, traits, folder)
    if refusal is not None:
        raise NextStepError(refusal)


def loadable_modes(stored: str, traits: DeviceTraits, dtype: torch.dtype,
                   folder: str = "this folder") -> list[WeightMode]:
    """The whole-model modes (every layer resident) a folder storing `stored` weights loads in on that device, in
    the order `auto` tries them: the most faithful first, each next one smaller (compute dtype, fp8, int4). Never
    empty: where the folder loads in no mode here, the refusal of its own format is raised."""
    candidates = [WeightMode(dtype), WeightMode(dtype, fp8=True), WeightMode(dtype, int4=True)]
    loadable = [mode for mode in candidates if mode_refusal(mode, stored, traits) is None]
    if not loadable:
        check_loadable(next(mode for mode in candidates if mode.storage == own_storage(stored)), stored, traits,
                       folder)
    return loadable
