"""What a model folder's weights take in memory, per weight mode, from its config and safetensors headers alone.

Weight bytes follow the loader exactly (same tensors, dtypes, fp8 scales, int4 groups and streaming slots), so
a plan for the 14B models takes milliseconds and works before anything but the small files is downloaded.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import ModelConfig, VAEConfig
from ..errors import NextStepError
from ..model.backbone import DecoderLayer
from ..model.network import NextStepModel
from ..model.placement import INPUT_PARTS
from ..model.vae import vae_parameter_count
from ..weights.checkpoint import IGNORED_KEYS
from ..weights.fp8 import FP8_DTYPE, use_fp8_linears
from ..weights.gptq import PACKED_PARTS, int4_groups
from ..weights.int4 import group_size_for
from ..weights.model_folder import ModelFolder
from ..weights.modes import GPTQ_PACKED, WeightMode
from ..weights.offload import packed_bytes


@dataclass(frozen=True)
class ModelFootprint:
    """What the planner needs to know about a model folder."""

    config: ModelConfig
    tensor_shapes: dict[str, tuple[int, ...]]
    """The tensors the loader keeps (no `model.` prefix, lm_head and other ignored keys left out) -> shape."""
    vae_parameters: int
    vae_config: VAEConfig = VAEConfig()
    stored_format: str = "bf16"
    """How the folder stores the decoder's linear weights (see weights/modes.py)."""
    int4_groups: dict[str, int] | None = None
    """A folder of GPTQ-packed weights: the linears it holds 4-bit -> the kernel group each loads with
    (weights/gptq.py); its other linears load in the compute dtype. None: the mode decides (every decoder linear
    for int4)."""
    vae_config_assumed: str | None = None
    """Where the VAE has no config: which file is missing and the released values assumed (VAEFiles), for the
    planner to say so."""

    @classmethod
    def from_folder(cls, source: str | Path | ModelFolder) -> "ModelFootprint":
        """From the folder's config, its weights' headers and its VAE's config (or header); `source` as the loader
        takes it."""
        folder = ModelFolder.open(source)
        folder.check_block_counts()
        shapes = {name: header.shape for name, header in folder.tensors.items() if name not in IGNORED_KEYS}
        _unpack_repacked_shapes(shapes)
        expected = cls.from_config(folder.config, vae_parameters=0).tensor_shapes
        groups = None
        if folder.stored_format == GPTQ_PACKED:
            groups = int4_groups(folder.packed_linears, expected)
            _unpack_gptq_shapes(shapes, folder, expected)
        shapes = {name: shape for name, shape in shapes.items() if name in expected}  # the loader skips the rest
        if shapes != expected:
            differing = sorted(set(expected) - set(shapes) or {k for k in shapes if shapes[k] != expected[k]})
            raise NextStepError(f"the weights in {folder.path} do not match its config.json (first difference: "
                                f"{differing[0]}); the model would not load: download it again")
        return cls(folder.config, shapes, folder.vae.parameter_count(), folder.vae.config, folder.stored_format,
                   groups, folder.vae.assumed_config)

    @classmethod
    def from_config(cls, config: ModelConfig, vae_parameters: int | None = None,
                    vae_config: VAEConfig = VAEConfig()) -> "ModelFootprint":
        """The shapes a checkpoint of this config holds (the network built on the meta device); the VAE's
        parameter count from `vae_config` unless given."""
        with torch.device("meta"):
            model = NextStepModel(config)
        shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
        if vae_parameters is None:
            vae_parameters = vae_parameter_count(vae_config)
        return cls(config, shapes, vae_parameters, vae_config)

    def vae_bytes(self, dtype: torch.dtype) -> int:
        return self.vae_parameters * dtype.itemsize


def _unpack_repacked_shapes(shapes: dict[str, tuple[int, ...]]) -> None:
    """A repacked folder (repack.py) stores quantised weights with side tensors (fp8 `weight_scale`, int4
    `scales_and_zeros`) and int4 nibbles at half width: plan them as the [N, K] weights they stand for, so a
    mode's bytes are computed one way whatever the folder holds."""
    for name in [name for name in shapes if name.endswith((".weight_scale", ".scales_and_zeros"))]:
        owner = name.rpartition(".")[0]
        if name.endswith(".scales_and_zeros"):
            rows, half_width = shapes[f"{owner}.weight"]
            shapes[f"{owner}.weight"] = (rows, 2 * half_width)
        del shapes[name]


def _unpack_gptq_shapes(shapes: dict[str, tuple[int, ...]], folder: ModelFolder,
                        expected: dict[str, tuple[int, ...]]) -> None:
    """A GPTQ-packed linear's tensors stand for its [out, in] weight (the padding of its input left out), checked
    against the config as loading checks it."""
    for name, linear in folder.packed_linears.items():
        for part in PACKED_PARTS:
            shapes.pop(f"{name}.{part}", None)
        weight = f"{name}.weight"
        if weight in expected:
            linear.check_shape(expected[weight])
            shapes[weight] = expected[weight]


@dataclass(frozen=True)
class WeightBytes:
    """A mode's weight bytes on the run device and in host RAM."""

    gpu: int
    host: int


def _quantized_linear_names(config: ModelConfig) -> set[str]:
    """Names (inside one decoder layer) of the linears the loader stores as fp8 or int4: the loader's own
    swap, run on a meta-device layer."""
    with torch.device("meta"):
        layer = nn.ModuleList([DecoderLayer(config, 0)])
    return {name.removeprefix("0.") for name in use_fp8_linears(layer)}


_LAYER_KEY = re.compile(r"layers\.(\d+)\.(.+)")


def weight_bytes(footprint: ModelFootprint, mode: WeightMode) -> WeightBytes:
    """Bytes of the model's weights on the run device and in host RAM, as `load_model` stores them: the
    compute dtype everywhere, except fp8 decoder linear weights (1 byte each plus a float32 scale per output
    channel) and int4 ones (half a byte each plus a scale and zero per group, in the compute dtype); streamed
    layers in host RAM, each packed in one buffer (offload.pack_layer), and two device slots (one with a single
    streamed layer) packed alike, that they are copied into."""
    gpu, host = range_weight_bytes(footprint, mode, [footprint.config.num_hidden_layers])
    return WeightBytes(gpu=gpu[0], host=host)


def range_weight_bytes(footprint: ModelFootprint, mode: WeightMode, counts: list[int]) -> tuple[list[int], int]:
    """Weight bytes on each device of a split whose ranges hold these many decoder layers in order (one count: one
    device), as `load_model` places them (model/placement.py): each range's resident layers; the embedding and the
    image-in projector on the first device; the other parts, and the streaming slots, on the last. Also the bytes
    of streamed layers in host RAM (see weight_bytes)."""
    layers = footprint.config.num_hidden_layers
    if mode.gpu_layers is not None and not 0 <= mode.gpu_layers <= layers:
        raise NextStepError(f"gpu_layers must be between 0 and {layers} (got {mode.gpu_layers})")
    quantized_owners = _quantized_linear_names(footprint.config) if mode.fp8 or mode.int4 else set()
    itemsize = mode.dtype.itemsize
    per_layer: list[list[int]] = [[] for _ in range(layers)]
    inputs = outputs = 0
    for name, shape in footprint.tensor_shapes.items():
        count = math.prod(shape)
        match = _LAYER_KEY.fullmatch(name)
        owner, _, attr = (match.group(2) if match else name).rpartition(".")
        group = None
        if footprint.int4_groups is not None:
            group = footprint.int4_groups.get(name.removesuffix(".weight")) if attr == "weight" else None
        elif match and owner in quantized_owners and attr == "weight" and mode.int4:
            group = group_size_for(shape[1])
        if group is not None:  # the packed nibbles, scales and zeros
            sizes = [count // 2, 2 * (count // group) * itemsize]
        elif match and owner in quantized_owners and attr == "weight" and mode.fp8:  # the weight, its scale
            sizes = [count * FP8_DTYPE.itemsize, shape[0] * torch.float32.itemsize]
        else:
            sizes = [count * itemsize]
        if match:
            per_layer[int(match.group(1))] += sizes
        elif name.split(".")[0] in INPUT_PARTS:
            inputs += sum(sizes)
        else:
            outputs += sum(sizes)
    resident = layers if mode.gpu_layers is None else mode.gpu_layers
    streamed = [packed_bytes(sizes) for sizes in per_layer[resident:]]
    slots = min(2, len(streamed)) * (streamed[0] if streamed else 0)
    on_device, start = [], 0
    for count in counts:
        on_device.append(sum(sum(sizes) for sizes in per_layer[start:min(start + count, resident)]))
        start += count
    on_device[0] += inputs
    on_device[-1] += outputs + slots
    return on_device, sum(streamed)
