"""float8 (e4m3fn) storage for the decoder's linear layers, computing in the activation dtype.

Halves the 14B backbone's weights (about 28 GB in bf16 to about 15 GB for the whole model) so it fits
24 GB cards. Weights are quantised per output channel (scale = max |w| / 448) while loading, tensor by
tensor. On GPUs with fp8 tensor cores (compute capability 8.9+) the product runs as one fp8 matmul with
row-wise activation scales (`torch._scaled_mm`), so decoding also reads half the bytes; elsewhere the
weight is dequantised to the activation dtype right before an ordinary matmul.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from .linears import replace_linears

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


def _scaled_mm_supported(device: torch.device) -> bool:
    return (device.type == "cuda" and hasattr(torch, "_scaled_mm")
            and torch.cuda.get_device_capability(device) >= (8, 9))


class FP8Linear(nn.Module):
    """A Linear whose `weight` is fp8 with a float32 `weight_scale` per output channel."""

    _scaled_mm_failed = False  # set once, for all layers, if the fused kernel is refused at run time

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE), requires_grad=False)
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32))
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not FP8Linear._scaled_mm_failed and x.dtype == torch.bfloat16 and _scaled_mm_supported(x.device):
            try:
                return self._fused(x)
            except RuntimeError as exc:  # older drivers/cuBLAS without row-wise fp8 scaling
                FP8Linear._scaled_mm_failed = True
                log.warning("fp8 matmul unavailable (%s); dequantising fp8 weights instead", exc)
        # the per-output-channel scale commutes with the matmul: scale the (small) output, not the weight
        out = F.linear(x, self.weight.to(x.dtype)) * self.weight_scale.to(x.dtype)
        return out if self.bias is None else out + self.bias

    def _fused(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        rows = flat.shape[0]
        flat = F.pad(flat, (0, 0, 0, (-rows) % SCALED_MM_ALIGN))
        x_scale = flat.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
        x8 = (flat / x_scale).to(FP8_DTYPE)
        out = torch._scaled_mm(x8, self.weight.t(), scale_a=x_scale, scale_b=self.weight_scale[None],
                               bias=self.bias, out_dtype=x.dtype)
        return out[:rows].reshape(*x.shape[:-1], out.shape[-1])


def use_fp8_linears(decoder_layers: nn.Module) -> set[str]:
    """Swap every nn.Linear under `decoder_layers` (built on the meta device) for FP8Linear; returns their names."""
    return replace_linears(decoder_layers, lambda name, linear: FP8Linear(linear.in_features, linear.out_features,
                                                                         linear.bias is not None))
