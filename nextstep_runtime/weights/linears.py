"""Swapping a module tree's nn.Linear layers for quantised replacements before weights are loaded."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def replace_linears(root: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> set[str]:
    """Replace every nn.Linear under `root` (built on the meta device) by `make(linear)`, created on the
    linear's device (meta stays meta: placeholders cost no host memory).

    Returns the qualified names (relative to `root`) of the replaced modules."""
    swapped = set()
    for name, module in list(root.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                with torch.device(child.weight.device):
                    setattr(module, child_name, make(child))
                swapped.add(f"{name}.{child_name}" if name else child_name)
    return swapped
