"""The devices the runtime runs on, and every rule that depends on one, as functions of plain values.

`DeviceTraits.of(device)` reads what decides the runtime's choices on a device (its type, a CUDA GPU's compute
capability, bfloat16 support); the rules (the `auto` dtype, which weight formats have kernels there) take those
traits instead of asking torch themselves, so one place holds each rule and the rules for GPUs this machine does
not have are tested as plain functions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import NextStepError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INT4_CUDA_CAPABILITY = (8, 0)
"""torch's CUDA int4 kernel needs bfloat16 tensor cores: Ampere or newer."""


@dataclass(frozen=True)
class DeviceTraits:
    """What the runtime's rules need to know about a device."""

    type: str
    """"cpu" or "cuda"."""
    capability: tuple[int, int] | None = None
    """A CUDA GPU's compute capability; None for other devices, and for a GPU that is only planned for (`plan
    --gpu-memory` on a machine without it), whose kernels are then assumed present."""
    bf16: bool = False
    """Whether bfloat16 is the `auto` dtype here."""

    @classmethod
    def of(cls, device: torch.device | str) -> "DeviceTraits":
        device = torch.device(device)
        if device.type == "cuda":
            return cls("cuda", torch.cuda.get_device_capability(device), torch.cuda.is_bf16_supported())
        return cls(device.type)

    def describe(self) -> str:
        if self.type == "cuda" and self.capability is not None:
            return f"a CUDA GPU of compute capability {self.capability[0]}.{self.capability[1]}"
        return "a CUDA GPU" if self.type == "cuda" else f"the {self.type.upper()}"


PLANNED_GPU = DeviceTraits("cuda")
"""A CUDA GPU this machine does not have, planned for by size alone."""


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present; otherwise cpu, cuda or cuda:N that exists on this machine."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise NextStepError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise NextStepError(f"device {name} was asked for but no CUDA GPU is available; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise NextStepError(f"device {name} does not exist: this machine has {torch.cuda.device_count()} "
                                f"CUDA GPU(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def auto_dtype(traits: DeviceTraits) -> torch.dtype:
    """bfloat16 on CUDA where supported (float16 on older GPUs), float32 on the CPU."""
    if traits.type == "cuda":
        return torch.bfloat16 if traits.bf16 else torch.float16
    return torch.float32


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """A dtype name, or `auto` (see auto_dtype)."""
    if name == "auto":
        return auto_dtype(DeviceTraits.of(device))
    if name not in DTYPES:
        raise NextStepError(f"unknown dtype {name!r}; choose auto, float32, bfloat16 or float16")
    return DTYPES[name]


def int4_refusal(traits: DeviceTraits, dtype: torch.dtype) -> str | None:
    """Why 4-bit weights cannot run here, or None: the CPU kernel takes float32, bf16 and fp16; the CUDA one needs
    bfloat16 and compute capability 8.0+."""
    if traits.type == "cpu":
        return None
    if traits.type == "cuda":
        if dtype != torch.bfloat16:
            return f"4-bit weights on CUDA compute in bfloat16 (got {str(dtype).removeprefix('torch.')})"
        if traits.capability is not None and traits.capability < INT4_CUDA_CAPABILITY:
            return (f"4-bit weights on CUDA need a GPU of compute capability 8.0+ (Ampere or newer); this is "
                    f"{traits.describe()}")
        return None
    return f"4-bit weights run on the CPU or CUDA GPUs, not on {traits.type}"
