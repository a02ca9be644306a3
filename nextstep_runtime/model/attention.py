"""Attention kernel choice: PyTorch SDPA always works; flash-attn is used where it imports and runs on the GPU of a
range of layers, in half precision, for calls that need no padding mask.

The kernel of each range is chosen once, when the model is placed (`attention_kernels`, from each range's device, not
from wherever its weights are at the time), and handed to its layers at every call. Whether flash-attn can run is
decided by importing it: an installed package that does not import is common (a wheel built for another torch or
CUDA fails with "DLL load failed" on Windows, an undefined symbol on Linux, typically after a torch upgrade), and
finding the package on the path says nothing about that. Where it cannot run, attention falls back to SDPA with one
warning.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Callable

import torch
import torch.nn.functional as F

from ..devices import DeviceTraits, flash_attn_refusal

BACKENDS = ("auto", "sdpa", "flash_attn")
NOT_INSTALLED = "flash-attn is not installed (`pip install flash-attn` in this Python environment to use it)"
_SDPA_HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")

log = logging.getLogger(__name__)

FlashAttention = Callable[..., torch.Tensor]
"""flash-attn's `flash_attn_func`."""
_last_warning: str | None = None
"""The fallback last warned about, so choosing the same backend again (every model loaded) does not repeat it."""


def _import_flash_attn() -> tuple[Callable | None, str | None]:
    """(flash_attn_func, None), or (None, why it cannot be used)."""
    if importlib.util.find_spec("flash_attn") is None:
        return None, NOT_INSTALLED
    try:
        from flash_attn import flash_attn_func
    except Exception as exc:  # noqa: BLE001 - ImportError/OSError from a wheel for another torch or CUDA ("DLL
        # load failed", an undefined symbol), or whatever else a broken optional package raises: never fail the run
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else "no message"
        return None, (f"flash-attn is installed but does not import ({type(exc).__name__}: {text[:300]}); it was "
                      f"probably built for another torch or CUDA than torch {torch.__version__}: install a wheel "
                      f"built for this torch, or uninstall it")
    return flash_attn_func, None


def flash_attn_problem(device: torch.device | str | DeviceTraits) -> str | None:
    """Why flash-attn cannot run on `device`, or None when it can: not installed, installed but broken, or a device
    it does not run on (devices.flash_attn_refusal). Absent where no CUDA GPU is, the device is the reason (never
    advice to install a kernel that could not run here); a broken install is reported everywhere."""
    traits = device if isinstance(device, DeviceTraits) else DeviceTraits.of(device)
    problem = _import_flash_attn()[1]
    if problem == NOT_INSTALLED and traits.type != "cuda":
        return flash_attn_refusal(traits)
    return problem or flash_attn_refusal(traits)


def attention_choice(name: str, device: torch.device | str | DeviceTraits) -> tuple[FlashAttention | None, str | None]:
    """(flash-attn's kernel when backend `name` runs it on `device`, else None: SDPA; the warning that choice
    deserves, or None). `auto` stays quiet when flash-attn is simply absent or the device is not a CUDA GPU; a
    flash-attn asked for (`flash_attn`), or installed but unusable (`auto`: broken, or a GPU too old for it) is
    warned about."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; use {', '.join(BACKENDS)}")
    if name == "sdpa":
        return None, None
    traits = device if isinstance(device, DeviceTraits) else DeviceTraits.of(device)
    flash, import_problem = _import_flash_attn()
    problem = flash_attn_problem(traits)
    if problem is None:
        return flash, None
    expected = import_problem == NOT_INSTALLED or (flash is not None and traits.type != "cuda")
    return None, None if name == "auto" and expected else problem


def attention_kernels(name: str, devices: list[torch.device | DeviceTraits]) -> tuple[FlashAttention | None, ...]:
    """The kernel of each range of layers on `devices` (attention_choice): flash-attn where it imports and runs on
    that range's device, else None (SDPA), with one warning where the choice gives one."""
    global _last_warning
    kernels = []
    for device in devices:
        kernel, problem = attention_choice(name, device)
        if problem is not None and problem != _last_warning:
            log.warning("NextStep: %s; using PyTorch SDPA attention instead", problem)
            _last_warning = problem
        kernels.append(kernel)
    return tuple(kernels)


def flash_attn_difference(device: torch.device | str) -> float:
    """The largest difference between flash-attn and PyTorch SDPA on one small causal bfloat16 call on `device`
    (a CUDA GPU flash-attn runs on: `flash_attn_problem` is None there): whether the installed kernel computes
    attention, not only imports."""
    flash, _ = _import_flash_attn()
    generator = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn((1, 4, 32, 64), generator=generator).to(device, torch.bfloat16) for _ in range(3))
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    got = flash(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True).transpose(1, 2)
    return float((got.float() - expected).abs().max())


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
           flash: FlashAttention | None = None) -> torch.Tensor:
    """Scaled dot-product attention of q [rows, heads, sq, d] over k/v [rows, kv_heads, sk, d]: through `flash`
    (flash-attn) where given and the call suits it (no mask, half precision), else SDPA.

    With mask None the call is causal (used when no row has padding); otherwise `mask` is a boolean
    [rows, 1, sq, sk] of allowed pairs.
    """
    rows, heads, sq, dim = q.shape
    kv_heads = k.shape[1]
    groups = heads // kv_heads
    if flash is not None and mask is None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        out = flash(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=sq > 1)
        return out.transpose(1, 2)
    if sq == 1 and groups > 1:
        # one query per head (decoding): the query heads sharing a KV head become that head's query rows,
        # so K/V are read once, unrepeated, by any SDPA backend. CUDA's kernels return a transposed view
        # (their buffer is [rows, groups, kv_heads, dim]): reshape, never view, their output.
        out = F.scaled_dot_product_attention(q.view(rows, kv_heads, groups, dim), k, v, attn_mask=mask)
        return out.reshape(rows, heads, 1, dim)
    if _SDPA_HAS_GQA and groups > 1 and mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=sq > 1, enable_gqa=True)
    # a mask with GQA would force the math backend; repeating K/V keeps the efficient kernels usable
    return F.scaled_dot_product_attention(q, _repeat_kv(k, groups), _repeat_kv(v, groups), attn_mask=mask,
                                          is_causal=mask is None and sq > 1)
