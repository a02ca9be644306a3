"""What a failed torch call means, so each caller reacts to its own kind of failure and to no other.

A faster path (the fused fp8 matmul, the CUDA graph of a token step) falls back to a plainer one only when the
operation is not supported by this torch build, driver or GPU. Running out of memory must reach the memory
handling (out_of_memory.py), which says what to change; an accelerator fault (an illegal address, a device-side
assert) or a bug must reach the user. Both are RuntimeErrors too, so catching RuntimeError alone would let one
transient out-of-memory switch a fast path off for the rest of the process.
"""

from __future__ import annotations

import torch

OUT_OF_MEMORY_MARKERS = (
    "DefaultCPUAllocator: can't allocate memory",  # the host allocator
    "CUDA error: out of memory",  # the driver itself (graph capture, cuBLAS handles), not the caching allocator
    "CUBLAS_STATUS_ALLOC_FAILED",  # cuBLAS could not allocate its workspace
)
UNSUPPORTED_MARKERS = ("not supported", "not currently supported", "only supported", "status_not_supported",
                       "unsupported", "not implemented", "no kernel image", "is capturing", "graph capture")
"""What torch and CUDA say, lowercased, when an operation cannot run here: "torch._scaled_mm is only supported on
CUDA devices with compute capability >= 9.0 or 8.9", "Rowwise scaling is not currently supported on your device",
"CUBLAS_STATUS_NOT_SUPPORTED", "no kernel image is available for execution on the device" (a wheel without this
GPU's architecture), "operation not permitted when stream is capturing", "Cannot copy between CPU and CUDA tensors
during CUDA graph capture", ... Whole phrases, not a word such as "support" alone, which unrelated errors (a support
library that failed to load, a range of supported values) contain too."""


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, the host allocator's or the driver's RuntimeError, or Python's own MemoryError."""
    return (isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError))
            or (isinstance(exc, RuntimeError) and any(marker in str(exc) for marker in OUT_OF_MEMORY_MARKERS)))


def is_unsupported(exc: BaseException) -> bool:
    """An operation this torch build, driver or GPU cannot do (a fast path may fall back), as opposed to running out
    of memory, an accelerator fault or a bug, which must reach the caller."""
    if is_out_of_memory(exc):
        return False
    if isinstance(exc, NotImplementedError):  # no kernel for this device or dtype
        return True
    return isinstance(exc, RuntimeError) and any(marker in str(exc).lower() for marker in UNSUPPORTED_MARKERS)
