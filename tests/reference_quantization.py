"""The documented meaning of the quantised forms the runtime stores, written out plainly, to check the kernels and
loaders against."""

from __future__ import annotations

import torch

from nextstep_runtime.weights.int4 import unpack_nibbles


def dequantize_grouped(nibbles: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """The kernels' documented meaning of the stored form, (q - 8) * scale + zero, written out for checking."""
    group = nibbles.shape[1] * 2 // scales_and_zeros.shape[0]
    scale, zero = (scales_and_zeros[..., i].float().t().repeat_interleave(group, dim=1) for i in (0, 1))
    return (unpack_nibbles(nibbles).float() - 8) * scale + zero
