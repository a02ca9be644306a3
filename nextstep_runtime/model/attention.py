"""Attention kernel choice: PyTorch SDPA always works; flash-attn is used when installed, on CUDA,
in half precision, for calls that need no padding mask."""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

FLASH_ATTN_AVAILABLE = importlib.util.find_spec("flash_attn") is not None
_SDPA_HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")

_use_flash = FLASH_ATTN_AVAILABLE


def set_attention_backend(name: str) -> str:
    """Select `sdpa`, `flash_attn` or `auto`; returns the backend actually used.

    Asking for flash_attn without the package installed falls back to SDPA (the caller warns).
    """
    global _use_flash
    if name not in ("auto", "sdpa", "flash_attn"):
        raise ValueError(f"unknown attention backend {name!r}; use auto, sdpa or flash_attn")
    _use_flash = FLASH_ATTN_AVAILABLE and name != "sdpa"
    return "flash_attn" if _use_flash else "sdpa"


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Scaled dot-product attention of q [rows, heads, sq, d] over k/v [rows, kv_heads, sk, d].

    With mask None the call is causal (used when no row has padding); otherwise `mask` is a boolean
    [rows, 1, sq, sk] of allowed pairs.
    """
    rows, heads, sq, dim = q.shape
    kv_heads = k.shape[1]
    groups = heads // kv_heads
    if _use_flash and mask is None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        from flash_attn import flash_attn_func  # optional dependency, imported only when used

        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=sq > 1)
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
