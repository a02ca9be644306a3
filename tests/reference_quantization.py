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


def gptq_codes(words: torch.Tensor) -> torch.Tensor:
    """GPTQ's packing read plainly: int32 words [R, C] -> 4-bit codes [8 R, C], code k of word r (its k-th least
    significant nibble) in row 8 r + k."""
    unsigned = words.long() & 0xFFFFFFFF
    return torch.stack([(unsigned >> (4 * k)) & 0xF for k in range(8)], dim=1).reshape(-1, words.shape[1])


def gptq_words(codes: torch.Tensor) -> torch.Tensor:
    """The inverse of gptq_codes: codes [8 R, C] (0..15) -> int32 words [R, C]."""
    grouped = codes.long().reshape(-1, 8, codes.shape[1])
    unsigned = sum(grouped[:, k] << (4 * k) for k in range(8))
    return torch.where(unsigned >= 2**31, unsigned - 2**32, unsigned).to(torch.int32)


def dequantize_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, in_features: int,
                    zero_offset: int) -> torch.Tensor:
    """W [out, in] (float32) = (q[i, j] - zero[i // g, j]) * scales[i // g, j], zero = stored + zero_offset, the
    padded input rows dropped: the documented meaning of the AutoRound/GPTQ packing."""
    codes = gptq_codes(qweight)
    zeros = gptq_codes(qzeros.t().contiguous()).t()[:, :qweight.shape[1]] + zero_offset
    group = codes.shape[0] // scales.shape[0]
    rows = torch.arange(codes.shape[0]) // group
    return ((codes - zeros[rows]).double() * scales.double()[rows]).float()[:in_features].t().contiguous()


def quantize_gptq(weight: torch.Tensor, group: int) -> dict[str, torch.Tensor]:
    """A plain symmetric 4-bit GPTQ (v1) packing of `weight` [out, in] in groups of `group`: qweight, qzeros (7,
    for zero 8), scales (float16, max |w| / 7 per group)."""
    out_features, in_features = weight.shape
    grouped = weight.float().t().reshape(in_features // group, group, out_features)
    scales = (grouped.abs().amax(dim=1) / 7).clamp(min=1e-4).half()
    codes = (grouped / scales.float()[:, None]).round().clamp(-8, 7).reshape(in_features, out_features) + 8
    zeros = torch.full((out_features, in_features // group), 7)
    return {"qweight": gptq_words(codes), "qzeros": gptq_words(zeros).t().contiguous(), "scales": scales}
