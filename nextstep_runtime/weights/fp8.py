"""float8 (e4m3fn) storage for the decoder's linear layers, computing in the activation dtype.

Halves the 14B backbone's weights (about 28 GB in bf16 to about 15 GB for the whole model) so it fits
24 GB cards. Weights are quantised per output channel (scale = max |w| / 448) while loading, tensor by
tensor. On GPUs with fp8 tensor cores (compute capability 8.9+) the product runs as one fp8 matmul with
row-wise activation scales (`torch._scaled_mm`), so decoding also reads half the bytes; elsewhere the
weight is dequantised to the activation dtype right before an ordinary matmul.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

from ..devices import DeviceTraits, fp8_matmul_fused
from ..failures import is_unsupported

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)
SCALED_MM_ALIGN = 16
"""torch._scaled_mm wants every matrix dimension divisible by 16; activations rows are padded to it."""

log = logging.getLogger(__name__)


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, float32 per-output-channel scale) with weight ~= fp8 * scale[:, None]."""
    w32 = weight.float()
    scale = w32.abs().amax(dim=1).clamp(min=1e-12) / FP8_MAX
    return (w32 / scale[:, None]).to(FP8_DTYPE), scale


@functools.cache
def _fused_on(device: torch.device) -> bool:
    return fp8_matmul_fused(DeviceTraits.of(device))


class FP8Linear(nn.Module):
    """A Linear whose `weight` is fp8 with a float32 `weight_scale` per output channel."""

    fused_refused = False
    """Set once, for all layers, when this torch build or GPU refuses the fused kernel at run time."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE), requires_grad=False)
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32))
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not FP8Linear.fused_refused and x.dtype == torch.bfloat16 and _fused_on(x.device):
            out = self.fused_or_none(x)
            if out is not None:
                return out
        return self.dequantized(x)

    def dequantized(self, x: torch.Tensor) -> torch.Tensor:
        """The product through the weight dequantised to the activation dtype. The per-output-channel scale commutes
        with the matmul: it scales the (small) output, in float32 as the fused kernel applies it (a scale rounded to
        bf16 would be off by up to 0.4% per channel)."""
        out = (F.linear(x, self.weight.to(x.dtype)).float() * self.weight_scale).to(x.dtype)
        return out if self.bias is None else out + self.bias

    def fused_or_none(self, x: torch.Tensor) -> torch.Tensor | None:
        """The product as one fp8 matmul, or None (and the fused kernel off for the process) where this torch build,
        driver or GPU does not support it, e.g. without row-wise fp8 scaling. Out of memory and accelerator errors
        are raised: the caller's memory handling explains them, and a transient one must not switch the fast path
        off for good."""
        try:
            return self._fused(x)
        except (RuntimeError, NotImplementedError) as exc:
            if not is_unsupported(exc):
                raise
            FP8Linear.fused_refused = True
            log.warning("fp8 matmul unavailable (%s); dequantising fp8 weights instead", exc)
            return None

    def _fused(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        rows = flat.shape[0]
        flat = F.pad(flat, (0, 0, 0, (-rows) % SCALED_MM_ALIGN))
        x_scale = flat.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
        x8 = (flat / x_scale).to(FP8_DTYPE)
        out = torch._scaled_mm(x8, self.weight.t(), scale_a=x_scale, scale_b=self.weight_scale[None],
                               bias=self.bias, out_dtype=x.dtype)
        return out[:rows].reshape(*x.shape[:-1], out.shape[-1])


class Fp8Scheme:
    """float8 decoder linears (weights/schemes.py): how the layer is built, the tensors it holds, and their bytes."""

    storage = "fp8"

    def __init__(self, stored: bool = False) -> None:
        self.stored = stored

    def linear(self, linear: nn.Linear, group: int | None = None) -> FP8Linear:
        return FP8Linear(linear.in_features, linear.out_features, linear.bias is not None)

    def stored_tensors(self, owner: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """What a folder repacked as fp8 stores for the linear's float weight."""
        quantized, scale = quantize_per_channel(weight)
        return {f"{owner}.weight": quantized, f"{owner}.weight_scale": scale}

    def placed_tensors(self, owner: str, attr: str, tensor: torch.Tensor, device: torch.device, runs_on: torch.device,
                       dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The loaded layer's tensors on `device` for one checkpoint tensor: a float weight quantised there, a
        repacked folder's fp8 weight and scale as they are; the bias in the compute dtype."""
        if attr == "weight" and not self.stored:
            return self.stored_tensors(owner, tensor.to(device))
        if attr in ("weight", "weight_scale"):
            return {f"{owner}.{attr}": tensor.to(device)}
        return {f"{owner}.{attr}": tensor.to(device, dtype)}

    def weight_bytes(self, shape: tuple[int, int], dtype: torch.dtype, group: int | None = None) -> list[int]:
        """Bytes of the tensors standing for an [out, in] weight: the fp8 weight and its float32 scale per output."""
        return [shape[0] * shape[1] * FP8_DTYPE.itemsize, shape[0] * torch.float32.itemsize]
