"""Weight-only 4-bit storage for the decoder's linear layers, computing in the activation dtype.

Puts the 14B decoder at about 8 GB, so the model fits 12-16 GB cards without layer streaming. Each run
of `group_size` input weights of an output row shares a scale and a zero point (asymmetric min/max
quantisation): w ~= (q - 8) * scale + zero, q in 0..15. The products run in PyTorch's own int4 kernels
(`aten._weight_int4pack_mm` on CUDA and Apple GPUs, `_weight_int4pack_mm_for_cpu` on the CPU), which read the
packed weight directly; nothing dequantises the whole matrix. Those kernels want the weight packed in a
device-specific tiling (a 4-D one shared by CUDA and Apple GPUs, a 2-D one on the CPU), so the device-neutral form
(`quantize_grouped`, also what repacked folders store) is packed for the run device while loading, and a packed
layer only runs on a device of that tiling.
torchao wraps the same kernels; calling them directly avoids a dependency whose releases are tied to
exact torch versions.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import NextStepError

LEVELS = 16
MIDPOINT = 8
"""The kernels dequantise as (q - 8) * scale + zero."""
KERNEL_GROUP_SIZES = (256, 128, 64, 32)
"""Group sizes the kernels accept, largest (fewest scales) first."""
GROUP_SIZES = KERNEL_GROUP_SIZES[1:]
"""Group sizes `quantize_grouped` chooses from, largest first; the first that divides the input width is used
(groups of 256 would halve the scales but round more coarsely)."""
INNER_K_TILES = (8, 4, 2)
"""CUDA packing tiles; the input width must be a multiple of 16 x tiles."""
SCALE_DTYPE = torch.bfloat16
"""Scales and zeros are rounded to bf16 when quantising (what the CUDA kernel reads), so the stored form
and the form packed for any compute dtype hold the same values."""


def group_size_for(in_features: int) -> int:
    for size in GROUP_SIZES:
        if in_features % size == 0:
            return size
    raise NextStepError(f"4-bit weights need layer input widths divisible by {GROUP_SIZES[-1]} "
                        f"(got {in_features}); load this model in bf16 or fp8")


def quantize_grouped(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(nibbles, scales_and_zeros): the weight [N, K] as 4-bit values packed two per byte (even column in
    the high nibble) [N, K/2] uint8, and per-group [K/group, N, 2] (scale, zero) in bf16."""
    rows, columns = weight.shape
    group = group_size_for(columns)
    grouped = weight.float().reshape(rows, columns // group, group)
    low, high = grouped.amin(dim=2), grouped.amax(dim=2)
    scale = ((high - low) / (LEVELS - 1)).clamp(min=1e-6).to(SCALE_DTYPE).float()
    zero = (low + scale * MIDPOINT).to(SCALE_DTYPE).float()
    q = torch.round((grouped - (zero - scale * MIDPOINT)[..., None]) / scale[..., None]).clamp(0, LEVELS - 1)
    nibbles = pack_nibbles(q.reshape(rows, columns))
    scales_and_zeros = torch.stack([scale, zero], dim=2).transpose(0, 1).contiguous().to(SCALE_DTYPE)
    return nibbles, scales_and_zeros


def pack_nibbles(values: torch.Tensor) -> torch.Tensor:
    """[N, K] values 0..15 -> [N, K/2] uint8, two per byte, the even column in the high nibble: the
    device-neutral form `pack_for_device` takes."""
    values = values.to(torch.uint8)
    return values[:, ::2] << 4 | values[:, 1::2]


def unpack_nibbles(nibbles: torch.Tensor) -> torch.Tensor:
    """[N, K/2] uint8 -> [N, K] int32 values 0..15 (inverse of the packing in quantize_grouped)."""
    return torch.stack([nibbles >> 4, nibbles & 0xF], dim=2).reshape(nibbles.shape[0], -1).to(torch.int32)


GPU_TILED = ("cuda", "mps")
"""Device types whose int4 kernel (`_weight_int4pack_mm`) reads the 4-D tensor `_convert_weight_to_int4pack` makes on
that device: CUDA's tensor-core tiling, or on Apple GPUs a tensor of the same 4-D shape holding the [N, K/2] bytes
row-major with each byte's two nibbles swapped, not CUDA's tiling. Either way the packed tensor is only meaningful
on the device type it was made on."""


def pack_for_device(nibbles: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The kernel's packed weight for `device`: the 4-D GPU tiling, packed on the GPU itself, or the CPU's 2-D one."""
    if device.type in GPU_TILED:
        columns = nibbles.shape[1] * 2
        tiles = next(t for t in INNER_K_TILES if columns % (16 * t) == 0)
        return torch.ops.aten._convert_weight_to_int4pack(nibbles.to(device).contiguous(), tiles)
    if device.type == "cpu":
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_nibbles(nibbles.cpu()), 1)
    raise NextStepError(f"4-bit weights run on the CPU, CUDA GPUs and Apple GPUs, not on {device}; choose bf16 or fp8")


class Int4Linear(nn.Module):
    """A Linear whose weight is packed 4-bit for one device type, with grouped bf16 scales and zeros.

    Built on the meta device, its placeholders have the shapes of the tensors the loader will read:
    the plain [N, K] weight, or with `stored` the [N, K/2] nibbles of a repacked folder or of a GPTQ-packed one
    (gptq.py), whose `group_size` the folder decides."""

    def __init__(self, in_features: int, out_features: int, bias: bool, stored: bool = False,
                 group_size: int | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.group_size = group_size or group_size_for(in_features)
        weight_shape = (out_features, in_features // 2) if stored else (out_features, in_features)
        self.register_buffer("weight", torch.empty(weight_shape, dtype=torch.uint8 if stored else torch.bfloat16))
        self.register_buffer("scales_and_zeros",
                             torch.empty(in_features // self.group_size, out_features, 2, dtype=SCALE_DTYPE))
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        on_gpu = self.weight.device.type in GPU_TILED  # the kernel is the weight's device's
        if (self.weight.dim() == 4) != on_gpu or x.device != self.weight.device:
            packed_for = "a GPU" if self.weight.dim() == 4 else "the CPU"  # the GPU tiling is 4-D, the CPU one 2-D
            raise NextStepError(f"a 4-bit layer packed for {packed_for} was run on {x.device}; load the model on the "
                                f"device it runs on")
        flat = x.reshape(-1, self.in_features).contiguous()
        mm = torch.ops.aten._weight_int4pack_mm if on_gpu else torch.ops.aten._weight_int4pack_mm_for_cpu
        out = mm(flat, self.weight, self.group_size, self.scales_and_zeros)
        out = out.reshape(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias


class Int4Scheme:
    """Grouped 4-bit decoder linears (weights/schemes.py): how the layer is built, the tensors it holds, and their
    bytes. `stored` folders (repacked as int4, or GPTQ-packed: gptq.py) give the nibbles and the scales and zeros;
    float weights are quantised while loading."""

    storage = "int4"

    def __init__(self, stored: bool = False) -> None:
        self.stored = stored

    def linear(self, linear: nn.Linear, group: int | None = None) -> Int4Linear:
        return Int4Linear(linear.in_features, linear.out_features, linear.bias is not None, self.stored, group)

    def stored_tensors(self, owner: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """What a folder repacked as int4 stores for the linear's float weight (the device-neutral form)."""
        nibbles, scales_and_zeros = quantize_grouped(weight)
        return {f"{owner}.weight": nibbles, f"{owner}.scales_and_zeros": scales_and_zeros}

    def placed_tensors(self, owner: str, attr: str, tensor: torch.Tensor, device: torch.device, runs_on: torch.device,
                       dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The loaded layer's tensors on `device` for one checkpoint tensor: the weight packed on `runs_on` for its
        kernel (quantised there first when it is a float one; a streamed layer is then kept on the host), scales and
        zeros and the bias in the compute dtype."""
        if attr != "weight":
            return {f"{owner}.{attr}": tensor.to(device, dtype)}
        placed = {f"{owner}.weight": tensor} if self.stored else self.stored_tensors(owner, tensor.to(runs_on))
        return {name: pack_for_device(value, runs_on).to(device) if name.endswith(".weight")
                else value.to(device, dtype) for name, value in placed.items()}

    def weight_bytes(self, shape: tuple[int, int], dtype: torch.dtype, group: int | None = None) -> list[int]:
        """Bytes of the tensors standing for an [out, in] weight: half a byte per value, and a scale and a zero per
        group of `group` inputs (default: group_size_for) in the compute dtype."""
        count = shape[0] * shape[1]
        return [count // 2, 2 * (count // (group or group_size_for(shape[1]))) * dtype.itemsize]
