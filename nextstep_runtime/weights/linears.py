"""Swapping a module tree's nn.Linear layers for quantised replacements before weights are loaded."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def replace_linears(root: nn.Module, make: Callable[[str, nn.Linear], nn.Module | None]) -> set[str]:
    """Replace every nn.Linear under `root` (built on the meta device) by `make(name, linear)` (name relative to
    `root`; None keeps the linear), created on the linear's device (meta stays meta: placeholders cost no host
    memory).

    Returns the qualified names (relative to `root`) of the replaced modules."""
    swapped = set()
    for name, module in list(root.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                qualified = f"{name}.{child_name}" if name else child_name
                with torch.device(child.weight.device):
                    replacement = make(qualified, child)
                if replacement is not None:
                    setattr(module, child_name, replacement)
                    swapped.add(qualified)
    return swapped
