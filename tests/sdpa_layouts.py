"""CUDA's SDPA output layout, emulated on the CPU.

On CUDA, SDPA's memory-efficient and flash kernels allocate their output as [B, M, H, K] and return it as the
transposed view [B, H, M, K], which is not contiguous; the CPU kernels return a contiguous tensor. Code that
`.view`s an SDPA output therefore passes on the CPU and crashes on every NVIDIA GPU. Wrapping SDPA so that its
output has CUDA's strides makes such code fail here too.

    python -m sdpa_layouts generate ...   # the CLI with the wrapper installed (tests/ on PYTHONPATH)
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

NATIVE_SDPA = F.scaled_dot_product_attention
LAYOUTS = ("cpu", "cuda")


def sdpa_with_cuda_layout(*args, **kwargs) -> torch.Tensor:
    """SDPA's values with the strides of CUDA's kernels: the same numbers, as a transposed [B, M, H, K] buffer."""
    out = NATIVE_SDPA(*args, **kwargs)
    return out.transpose(1, 2).contiguous().transpose(1, 2)


def install() -> None:
    """Replace SDPA process-wide (for a CLI subprocess; tests use the `sdpa_layout` fixture instead)."""
    F.scaled_dot_product_attention = sdpa_with_cuda_layout


if __name__ == "__main__":
    install()
    from nextstep_runtime.cli.main import main

    sys.exit(main(sys.argv[1:]))
