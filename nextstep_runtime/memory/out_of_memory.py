"""An allocation that fails during a run (CUDA, or the host allocator) becomes one clear NextStepError.

The memory check refuses what the estimate can tell; this covers the rest (other processes taking memory
mid-run, an address-space limit, fragmentation). The failed run's frames hold the KV cache and activations:
they are cleared before the error is raised, so the memory is handed back at once and the loaded model stays
usable for the next run.
"""

from __future__ import annotations

import gc
import re
import traceback
from typing import Callable, TypeVar

import torch

from ..devices import DeviceTraits, auto_dtype
from ..errors import NextStepError
from ..failures import is_out_of_memory
from ..weights.modes import FLOAT_WEIGHTS, WeightMode, mode_refusal

T = TypeVar("T")

SAMPLING, VAE_DECODING, VAE_ENCODING, LOADING = "sampling", "VAE decoding", "VAE encoding", "loading the model"
"""The work a memory error names; each has its own remedy."""
JOB_CHANGES = {
    SAMPLING: "make the batch or the image smaller, use fewer steps or a shorter prompt",
    VAE_DECODING: "make the image smaller (the VAE decodes one image at a time: a smaller batch, fewer steps or "
                  "another weight mode do not help)",
    VAE_ENCODING: "encode a smaller image",
}
GPU_NAMES = {"cuda": "a GPU", "mps": "an Apple GPU"}
"""The devices whose memory the model's weights take apart from the host's RAM, as a remedy names them."""


def model_changes(traits: DeviceTraits) -> str:
    """What frees the memory the model's weights take on a GPU (the Model Loader's widgets, the CLI's --memory and
    --gpu-layers), naming only what loads there (weights/modes.py): fp8 and int4 where their kernels exist, layer
    streaming where the GPU has memory of its own."""
    dtype = auto_dtype(traits)
    modes = [storage for storage in ("fp8", "int4")
             if mode_refusal(WeightMode(storage), FLOAT_WEIGHTS, traits, dtype) is None]
    memory = ", ".join(modes) + " or auto" if modes else "auto"
    text = f"load the model with memory {memory}"
    if mode_refusal(WeightMode(gpu_layers=0), FLOAT_WEIGHTS, traits, dtype) is None:
        text += ", or keep fewer decoder layers on the GPU (gpu_layers)"
    return text


def memory_remedy(work: str, device: torch.device, change: str | None = None) -> str:
    """The remedy every memory error of `work` on `device` ends with: `change` to the job (default: the usual one
    for that work), and on a GPU, for sampling and loading, what frees the model's memory there. The VAE's work does
    not grow with the model's weights, so its remedy is about the images alone."""
    parts = [change or JOB_CHANGES.get(work)]
    device = torch.device(device)
    if device.type in GPU_NAMES and work in (SAMPLING, LOADING):
        parts.append(f"on {GPU_NAMES[device.type]}, {model_changes(DeviceTraits.of(device))}")
    return ", or ".join(part for part in parts if part)


def _requested(message: str) -> str:
    """The size of the failed allocation, when the allocator said it."""
    cuda = re.search(r"Tried to allocate ([\d.]+ [KMGT]?i?B)", message)
    if cuda:
        return f" (an allocation of {cuda.group(1)} failed)"
    host = re.search(r"tried to allocate (\d+) bytes", message)
    if host:
        return f" (an allocation of {int(host.group(1)) / 2**30:.2f} GiB failed)"
    return ""


def release_cached_memory() -> None:
    """Collect the dropped tensors now and hand the GPU allocators' cached blocks back (CUDA's, and the Apple GPU's,
    which otherwise keeps them from the rest of the Mac's shared memory), so the next run starts clean."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if torch.backends.mps.is_available():
        torch.mps.empty_cache()


def run_or_explain_out_of_memory(what: str, device: torch.device, call: Callable[[], T]) -> T:
    """`call()`; if it runs out of memory, free what it held and raise a NextStepError naming `what` (SAMPLING,
    VAE_DECODING, ...), the device and what to change. A plain call, not a context manager, so the error is raised
    with no failed run attached as its context."""
    message = None
    try:
        return call()
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        traceback.clear_frames(exc.__traceback__)
        message = f"out of memory on {device} during {what}{_requested(str(exc))}; {memory_remedy(what, device)}"
    release_cached_memory()
    raise NextStepError(message)
