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

from ..config import ModelConfig, VAEConfig
from ..errors import NextStepError
from ..model.network import checkpoint_shapes
from ..model.placement import INPUT_PARTS, Placement
from ..model.vae import vae_parameter_count
from ..weights.checkpoint import IGNORED_KEYS, shape_error
from ..weights.gptq import PACKED_PARTS, int4_groups
from ..weights.loading import model_shape_hint
from ..weights.model_folder import ModelFolder
from ..weights.modes import FLOAT_WEIGHTS, GPTQ_PACKED, WeightMode
from ..weights.offload import packed_bytes
from ..weights.schemes import is_layer_linear, scheme_for


@dataclass(frozen=True)
class ModelFootprint:
    """What the planner needs to know about a model folder."""

    config: ModelConfig
    tensor_shapes: dict[str, tuple[int, ...]]
    """The tensors the loader keeps (no `model.` prefix, lm_head and other ignored keys left out) -> shape."""
    vae_parameters: int
    vae_config: VAEConfig = VAEConfig()
    stored_format: str = FLOAT_WEIGHTS
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
        missing = sorted(set(expected) - set(shapes))
        if missing:
            raise NextStepError(f"the weights in {folder.path} do not match its config.json (first difference: "
                                f"{missing[0]} is missing); the model would not load: download it again")
        differing = sorted(name for name in shapes if shapes[name] != expected[name])
        if differing:
            header = folder.tensors[differing[0]]
            raise shape_error(header.file, header.key, shapes[differing[0]], str(folder.config_path),
                              tuple(expected[differing[0]]), model_shape_hint(folder.config)(differing[0]))
        return cls(folder.config, shapes, folder.vae.parameter_count(), folder.vae.config, folder.stored_format,
                   groups, folder.vae.assumed_config)

    @classmethod
    def from_config(cls, config: ModelConfig, vae_parameters: int | None = None,
                    vae_config: VAEConfig = VAEConfig()) -> "ModelFootprint":
        """The shapes a checkpoint of this config holds (network.checkpoint_shapes); the VAE's parameter count from
        `vae_config` unless given."""
        shapes = checkpoint_shapes(config)
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


_LAYER_KEY = re.compile(r"layers\.(\d+)\..+")


@dataclass(frozen=True)
class PartBytes:
    """A mode's weight bytes in one compute dtype, part by part, as the loader stores them (weights/schemes.py)."""

    layers: list[list[int]]
    """Per decoder layer, its tensors' bytes (streamed layers are packed from these: offload.packed_bytes)."""
    inputs: int
    """The embedding and the image-in projector (on the first range's device)."""
    outputs: int
    """The final norm, the image-out projector and the flow head (on the run device)."""

    @property
    def per_layer(self) -> int:
        """A decoder layer's bytes on average (every layer of a released model is alike)."""
        return sum(sum(sizes) for sizes in self.layers) // len(self.layers)


def part_bytes(footprint: ModelFootprint, storage: str, dtype: torch.dtype) -> PartBytes:
    """The bytes of every part of the model when its decoder linears are held as `storage` and everything else in
    `dtype`; a GPTQ-packed folder's 4-bit linears as int4 whatever the storage (it loads in its own format only)."""
    scheme, int4 = scheme_for(storage), scheme_for("int4")
    layers: list[list[int]] = [[] for _ in range(footprint.config.num_hidden_layers)]
    inputs = outputs = 0
    for name, shape in footprint.tensor_shapes.items():
        match = _LAYER_KEY.fullmatch(name)
        owner, _, attr = name.rpartition(".")
        if footprint.int4_groups is not None:
            group = footprint.int4_groups.get(owner) if attr == "weight" else None
            sizes = int4.weight_bytes(shape, dtype, group) if group else [math.prod(shape) * dtype.itemsize]
        elif attr == "weight" and is_layer_linear(owner, footprint.config):
            sizes = scheme.weight_bytes(shape, dtype)
        else:
            sizes = [math.prod(shape) * dtype.itemsize]
        if match:
            layers[int(match.group(1))] += sizes
        elif name.split(".")[0] in INPUT_PARTS:
            inputs += sum(sizes)
        else:
            outputs += sum(sizes)
    return PartBytes(layers, inputs, outputs)


def placed_weight_bytes(footprint: ModelFootprint, mode: WeightMode, placement: Placement) -> tuple[list[int], int]:
    """Weight bytes on each range's device as `load_model` places them, and the bytes of streamed layers in host RAM:
    each range's resident layers in its dtype; the embedding and the image-in projector on the first range's device;
    the other parts on the run device, with the streaming slots: streamed layers (from `mode.gpu_layers` on) are held
    in host RAM each packed in one buffer (offload.pack_layer), and copied into two run-device slots (one with a
    single streamed layer) packed alike."""
    layers = footprint.config.num_hidden_layers
    mode.check_layers(layers)
    resident = layers if mode.gpu_layers is None else mode.gpu_layers
    by_dtype = {dtype: part_bytes(footprint, mode.storage, dtype) for dtype in {r.dtype for r in placement.ranges}}
    on_device = [sum(sum(sizes) for sizes in by_dtype[r.dtype].layers[r.start:min(r.stop, resident)])
                 for r in placement.ranges]
    run = by_dtype[placement.run_dtype]
    streamed = [packed_bytes(sizes) for sizes in run.layers[resident:]]
    on_device[0] += by_dtype[placement.input_dtype].inputs
    on_device[-1] += run.outputs + min(2, len(streamed)) * (streamed[0] if streamed else 0)
    return on_device, sum(streamed)
