"""Weight schemes: one object per storage (weights/modes.py) that says how a decoder linear is built, what tensors it
stores (for loading and for repacking) and how many bytes they take (for the memory planner), so the loader,
`convert` and the planner never disagree.

Only the decoder layers' linear layers are ever quantised (`quantized_linears`); the embedding, norms, projectors
and the flow head stay in the compute dtype, whatever the scheme.
"""

from __future__ import annotations

import functools
import re
from typing import Protocol

import torch
from torch import nn

from ..config import ModelConfig
from ..model.backbone import DecoderLayer
from .fp8 import Fp8Scheme
from .int4 import Int4Scheme

STORED_DTYPE = torch.bfloat16
"""What a repacked folder stores everything that is not quantised in (the release compute dtype)."""


class WeightScheme(Protocol):
    storage: str

    def linear(self, linear: nn.Linear, group: int | None = None) -> nn.Module | None: ...

    def stored_tensors(self, owner: str, weight: torch.Tensor) -> dict[str, torch.Tensor]: ...

    def placed_tensors(self, owner: str, attr: str, tensor: torch.Tensor, device: torch.device, runs_on: torch.device,
                       dtype: torch.dtype) -> dict[str, torch.Tensor]: ...

    def weight_bytes(self, shape: tuple[int, int], dtype: torch.dtype, group: int | None = None) -> list[int]: ...


class FullScheme:
    """Decoder linears in the compute dtype, as plain nn.Linear."""

    storage = "full"

    def linear(self, linear: nn.Linear, group: int | None = None) -> None:
        return None

    def stored_tensors(self, owner: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        return {f"{owner}.weight": weight.to(STORED_DTYPE)}

    def placed_tensors(self, owner: str, attr: str, tensor: torch.Tensor, device: torch.device, runs_on: torch.device,
                       dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return {f"{owner}.{attr}": tensor.to(device, dtype)}

    def weight_bytes(self, shape: tuple[int, int], dtype: torch.dtype, group: int | None = None) -> list[int]:
        return [shape[0] * shape[1] * dtype.itemsize]


def scheme_for(storage: str, stored: bool = False) -> WeightScheme:
    """The scheme of a storage; `stored`: the folder holds its quantised tensors already (repacked or GPTQ-packed)."""
    return {"full": FullScheme, "fp8": Fp8Scheme, "int4": Int4Scheme}[storage](*(() if storage == "full" else (stored,)))


@functools.lru_cache(maxsize=8)
def layer_linears(config: ModelConfig) -> frozenset[str]:
    """Names (inside one decoder layer, e.g. `self_attn.q_proj`) of the linear layers a scheme may quantise."""
    with torch.device("meta"):
        layer = DecoderLayer(config, 0)
    return frozenset(name for name, module in layer.named_modules() if isinstance(module, nn.Linear))


_LAYER_LINEAR = re.compile(r"layers\.\d+\.(.+)")


def is_layer_linear(name: str, config: ModelConfig) -> bool:
    """Whether `name` (`layers.N.self_attn.q_proj`) is one of the decoder layers' linears a scheme may quantise."""
    match = _LAYER_LINEAR.fullmatch(name)
    return match is not None and match.group(1) in layer_linears(config)


def apply_scheme(layers: nn.ModuleList, config: ModelConfig, scheme: WeightScheme,
                 groups: dict[str, int] | None = None) -> set[str]:
    """Swap the decoder's linears (built on the meta device) for the scheme's layers: every one, or with `groups`
    (a GPTQ-packed folder's 4-bit linears, `layers.N.<name>` -> kernel group) those it names. Returns the
    qualified names (`layers.N.<name>`) of the swapped linears."""
    swapped = set()
    for index, layer in enumerate(layers):
        for name in sorted(layer_linears(config)):
            qualified = f"layers.{index}.{name}"
            if groups is not None and qualified not in groups:
                continue
            owner_name, _, attribute = name.rpartition(".")
            owner = layer.get_submodule(owner_name)
            with torch.device(getattr(owner, attribute).weight.device):
                replacement = scheme.linear(getattr(owner, attribute), None if groups is None else groups[qualified])
            if replacement is not None:
                setattr(owner, attribute, replacement)
                swapped.add(qualified)
    return swapped

