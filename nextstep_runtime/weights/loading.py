"""Loading a NextStep model's network and a VAE into memory, tensor by tensor, with clear errors."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch

from ..config import ModelConfig
from ..devices import DeviceTraits
from ..errors import NextStepError
from ..model.network import NextStepModel
from ..model.placement import INPUT_PARTS, Placement
from ..model.positions import OFFICIAL_POSITION_GRID, sincos_position_table
from ..model.vae import NextStepVAE
from .checkpoint import POSITION_TABLE_KEY, expected_shapes, iter_safetensors, load_weights, open_safetensors
from .fp8 import quantize_per_channel, use_fp8_linears
from .gptq import DECODER_PREFIX, int4_groups, layers_stored_alike, unpacked_tensors
from .int4 import pack_for_device, quantize_grouped, use_int4_linears
from .model_folder import ModelFolder
from .modes import GPTQ_PACKED, WeightMode, check_loadable
from .offload import PinHostMemory, stream_layers
from .vae_files import VAEFiles

log = logging.getLogger(__name__)


def model_shape_hint(config: ModelConfig) -> Callable[[str], str]:
    """Name the config keys that decide a tensor's expected shape, so a mismatch points at the fix."""
    def hint(name: str) -> str:
        if name.startswith("image_head."):
            keys = f"head width {config.head_width} (genloss_width/fm_head_dim), token dim {config.token_dim}"
        elif name.startswith("image_in_projector"):
            keys = f"token dim {config.token_dim} (latent channels x patch^2)"
        elif name.startswith("embed_tokens"):
            keys = f"vocab_size {config.vocab_size}, hidden_size {config.hidden_size}"
        else:
            keys = (f"hidden_size {config.hidden_size}, heads {config.num_attention_heads}/"
                    f"{config.num_key_value_heads} x head_dim {config.head_dim}, intermediate_size "
                    f"{config.intermediate_size}")
        return f" (from config.json: {keys}); config.json and the weights disagree"
    return hint


def _position_table(folder: ModelFolder) -> torch.Tensor:
    """The `gen_pos_embed` table of a `use_gen_pos_embed` model: computed for the config's
    `base_image_grid_size` when it names one (vLLM-Omni's port); else the table stored in the weights, as
    the official loader fills its persistent buffer from them; else the official 32 x 32 table."""
    config = folder.config
    header = folder.tensors.get(POSITION_TABLE_KEY)
    if config.base_image_grid_size is None and header is not None:
        if header.shape[-1] != config.hidden_size:
            raise NextStepError(f"{header.file}: {header.key} has shape {list(header.shape)} but {folder.config_path} "
                                f"implies rows of hidden_size {config.hidden_size}")
        with open_safetensors(header.file) as handle:
            return handle.get_tensor(header.key).reshape(-1, config.hidden_size).float()
    return sincos_position_table(config.hidden_size, config.base_image_grid_size or OFFICIAL_POSITION_GRID)


def weight_converter(model: NextStepModel, dtype: torch.dtype, device: torch.device, fp8: bool, int4: bool, stored: str,
                     resident_layers: int | None, groups: dict[str, int] | None = None,
                     placement: Placement | None = None) -> Callable[[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per tensor: its device (streamed decoder layers stay on the CPU; in a split, a layer goes to its range's
    device, the embedding and image-in projector to the first device, the rest to `device`, the last) and storage
    (fp8 or packed 4-bit for the decoder's linear weights when asked, quantised here unless the folder holds them
    already; the compute dtype otherwise). `groups` names the decoder linears a GPTQ-packed folder holds 4-bit, with
    their kernel groups (gptq.int4_groups); only those are 4-bit then."""
    if fp8:
        quantized = {f"layers.{name}" for name in use_fp8_linears(model.layers)}
    elif int4:
        in_layers = None if groups is None else {name.removeprefix("layers."): group for name, group in groups.items()}
        quantized = {f"layers.{name}" for name in use_int4_linears(model.layers, stored != "bf16", in_layers)}
    else:
        quantized = set()
    cpu = torch.device("cpu")

    def target_of(name: str) -> torch.device:
        parts = name.split(".")
        streamed = resident_layers is not None and parts[0] == "layers" and int(parts[1]) >= resident_layers
        if streamed:
            return cpu
        if placement is None:
            return device
        if parts[0] == "layers":
            return placement.device_of_layer(int(parts[1]))
        return placement.first if parts[0] in INPUT_PARTS else device

    def convert(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        owner, _, attr = name.rpartition(".")
        target = target_of(name)
        if owner not in quantized or attr == "bias":
            return {name: tensor.to(device=target, dtype=dtype)}
        if fp8 and attr == "weight":
            if stored == "fp8":
                return {name: tensor.to(target)}
            weight, scale = quantize_per_channel(tensor.to(target))
            return {name: weight, f"{owner}.weight_scale": scale}
        if int4 and attr == "weight":  # packed on the run device, then moved where the layer waits
            packed_on = device if target == cpu else target
            nibbles, scales_and_zeros = (tensor, None) if stored != "bf16" else quantize_grouped(tensor.to(packed_on))
            values = {name: pack_for_device(nibbles, packed_on).to(target)}
            if scales_and_zeros is not None:
                values[f"{owner}.scales_and_zeros"] = scales_and_zeros.to(device=target, dtype=dtype)
            return values
        if attr == "scales_and_zeros":
            return {name: tensor.to(device=target, dtype=dtype)}
        return {name: tensor.to(device=target, dtype=torch.float32)}  # fp8 weight_scale
    return convert


def load_model(source: str | Path | ModelFolder, dtype: torch.dtype, device: torch.device | str, fp8: bool = False,
               resident_layers: int | None = None, int4: bool = False,
               pin: PinHostMemory | None = None, placement: Placement | None = None) -> NextStepModel:
    """Build the network from the folder's config and fill it from its safetensors weights (`source`: a folder, a
    Hugging Face repo id in the local cache, or an open ModelFolder).

    `dtype` is the compute dtype; with `fp8` the decoder's linear weights are stored as float8, with
    `int4` as grouped 4-bit (int4.py). With `resident_layers` N, only the first N decoder layers are
    placed on `device`; the rest stay in host memory, page-locked by `pin` (default: offload.page_lock) on a
    CUDA GPU, and are streamed in as they run (see offload.py).
    With a split `placement` (model/placement.py) the decoder's layers go to their ranges' devices, `device` being
    its last one; streamed layers are then streamed to that last device.
    A folder repacked by `convert`, or of GPTQ-packed 4-bit weights (gptq.py), loads in the format it stores
    (modes.py)."""
    folder = ModelFolder.open(source)
    config = folder.config
    device = torch.device(device)
    if placement is not None and not placement.is_split:
        placement = None
    for each in (device,) if placement is None else placement.devices:
        check_loadable(WeightMode(dtype, fp8, resident_layers, int4), folder.stored_format, DeviceTraits.of(each),
                       str(folder.path))
    if placement is not None:
        if placement.last != device:
            raise NextStepError(f"the run device {device} is not the last device of the split {placement.describe()}")
        placement.check_layers(config.num_hidden_layers)
        placement.check_streamed(resident_layers)
    folder.check_block_counts()
    if resident_layers is not None and not 0 <= resident_layers <= config.num_hidden_layers:
        raise NextStepError(f"layers kept on the GPU must be between 0 and {config.num_hidden_layers} "
                            f"(got {resident_layers})")
    with torch.device("meta"):
        model = NextStepModel(config)
    tensors = iter_safetensors(list(folder.weight_files))
    groups = None
    if folder.stored_format == GPTQ_PACKED:
        shapes = expected_shapes(model)
        groups = int4_groups(folder.packed_linears, shapes)
        unfit = sorted(name for name in folder.packed_linears if name.startswith(DECODER_PREFIX) and name not in groups)
        if unfit:
            log.warning("%s: %d decoder layers (%s, ...) are packed in groups the int4 kernels do not take (under "
                        "32); they are dequantised to %s, which takes more memory", folder.path, len(unfit), unfit[0],
                        str(dtype).removeprefix("torch."))
        if resident_layers is not None and not layers_stored_alike(groups, config.num_hidden_layers):
            raise NextStepError(f"the decoder layers of {folder.path} are not all packed alike, so they cannot be "
                                f"streamed through shared GPU slots; keep every layer on the GPU")
        tensors = unpacked_tensors(tensors, folder.packed_linears, folder.gptq, shapes, groups)
    convert = weight_converter(model, dtype, device, fp8, int4, folder.stored_format, resident_layers, groups,
                               placement)
    load_weights(model, tensors, dtype, device, str(folder.config_path), model_shape_hint(config), convert)
    if config.use_gen_pos_embed:
        model.gen_pos_embed = _position_table(folder).to(device, dtype)
    if resident_layers is not None:
        stream_layers(model.layers, resident_layers, device, pin)
    model.placement = placement
    return model.eval().requires_grad_(False)


def load_vae(source: str | Path | VAEFiles, dtype: torch.dtype, device: torch.device | str) -> NextStepVAE:
    """A VAE from a folder (`config.json` + `checkpoint.pt`, or one `.safetensors`) or one `.safetensors` file."""
    files = source if isinstance(source, VAEFiles) else VAEFiles.locate(source)
    tensors = files.tensors()
    with torch.device("meta"):
        vae = NextStepVAE(files.config)
    source = f"the VAE config of {files.weights} ({files.config_source})"
    load_weights(vae, tensors, dtype, torch.device(device), source,
                 lambda name: " (check ch, ch_mult, num_res_blocks, z_channels)")
    return vae.eval().requires_grad_(False)


def check_vae_matches(model: NextStepModel, vae: NextStepVAE, vae_description: str) -> None:
    """The model's tokens must be the VAE's latent patches, or images come out as noise."""
    mc, vc = model.config, vae.config
    if mc.latent_channels != vc.z_channels or vc.psz not in (None, mc.latent_patch_size):
        raise NextStepError(f"VAE {vae_description} has {vc.z_channels} latent channels and patch {vc.psz}, but the "
                            f"model expects {mc.latent_channels} channels and patch {mc.latent_patch_size}; "
                            f"use the VAE that ships with the model")
