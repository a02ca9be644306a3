"""Loading a NextStep model's network and a VAE into memory, tensor by tensor, with clear errors."""

from __future__ import annotations

import logging
from dataclasses import replace
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
from .checkpoint import POSITION_TABLE_KEY, expected_shapes, load_weights, open_safetensors
from .gptq import DECODER_PREFIX, int4_groups, layers_stored_alike, unpacked_tensors
from .model_folder import ModelFolder
from .modes import FLOAT_WEIGHTS, GPTQ_PACKED, WeightMode, check_loadable
from .offload import PinHostMemory, stream_layers
from .schemes import apply_scheme, scheme_for
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


def weight_converter(model: NextStepModel, mode: WeightMode, stored: str, placement: Placement,
                     groups: dict[str, int] | None = None) -> Callable[[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per checkpoint tensor, the tensors the loaded model holds: on its range's device in the range's dtype (the
    embedding and the image-in projector on the first range's, the other parts on the run device; streamed decoder
    layers stay on the CPU), the decoder's linears as the mode's scheme stores them (weights/schemes.py), quantised
    here unless the folder holds them so already. `groups` names the decoder linears a GPTQ-packed folder holds
    4-bit, with their kernel groups (gptq.int4_groups); only those are 4-bit then."""
    scheme = scheme_for(mode.storage, stored != FLOAT_WEIGHTS)
    quantized = apply_scheme(model.layers, model.config, scheme, groups)
    resident = placement.layers if mode.gpu_layers is None else mode.gpu_layers
    cpu = torch.device("cpu")

    def convert(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = name.split(".")
        is_layer = parts[0] == "layers"
        if is_layer:
            where = placement.ranges[placement.range_index_of_layer(int(parts[1]))]
            runs_on, dtype = where.device, where.dtype
        elif parts[0] in INPUT_PARTS:
            runs_on, dtype = placement.input_device, placement.input_dtype
        else:
            runs_on, dtype = placement.run_device, placement.run_dtype
        device = cpu if is_layer and int(parts[1]) >= resident else runs_on
        owner, _, attr = name.rpartition(".")
        if owner in quantized:
            return scheme.placed_tensors(owner, attr, tensor, device, runs_on, dtype)
        return {name: tensor.to(device, dtype)}
    return convert


def load_model(source: str | Path | ModelFolder, mode: WeightMode, placement: Placement,
               pin: PinHostMemory | None = None) -> NextStepModel:
    """Build the network from the folder's config and fill it from its safetensors weights (`source`: a folder, a
    Hugging Face repo id in the local cache, or an open ModelFolder), each part on its device of `placement` in its
    range's compute dtype (model/placement.py), the decoder's linear weights held as `mode` says (fp8, int4: see
    weights/schemes.py). With `mode.gpu_layers` N, only the first N decoder layers are placed on their devices; the
    rest stay in host memory, page-locked by `pin` (default: offload.page_lock) for a CUDA run device, and are
    streamed to the run device as they run (see offload.py).
    A folder repacked by `convert`, or of GPTQ-packed 4-bit weights (gptq.py), loads in the format it stores
    (modes.py)."""
    folder = ModelFolder.open(source)
    config = folder.config
    placement.check_layers(config.num_hidden_layers)
    for index, layer_range in enumerate(placement.ranges):
        streams = mode if index == len(placement.ranges) - 1 else replace(mode, gpu_layers=None)
        check_loadable(streams, folder.stored_format, DeviceTraits.of(layer_range.device), layer_range.dtype,
                       str(folder.path))
    placement.check_streamed(mode.gpu_layers)
    folder.check_block_counts()
    mode.check_layers(config.num_hidden_layers)
    with torch.device("meta"):
        model = NextStepModel(config)
    tensors = folder.tensor_sources()
    groups = None
    if folder.stored_format == GPTQ_PACKED:
        shapes = expected_shapes(model)
        groups = int4_groups(folder.packed_linears, shapes)
        unfit = sorted(name for name in folder.packed_linears if name.startswith(DECODER_PREFIX) and name not in groups)
        if unfit:
            log.warning("%s: %d decoder layers (%s, ...) are packed in groups the int4 kernels do not take (under "
                        "32); they are dequantised to %s, which takes more memory", folder.path, len(unfit), unfit[0],
                        str(placement.run_dtype).removeprefix("torch."))
        if mode.gpu_layers is not None and not layers_stored_alike(groups, config.num_hidden_layers):
            raise NextStepError(f"the decoder layers of {folder.path} are not all packed alike, so they cannot be "
                                f"streamed through shared GPU slots; keep every layer on the GPU")
        tensors = unpacked_tensors(tensors, folder.packed_linears, folder.gptq, shapes, groups)
    convert = weight_converter(model, mode, folder.stored_format, placement, groups)
    load_weights(model, tensors, placement.run_dtype, placement.run_device, str(folder.config_path),
                 model_shape_hint(config), convert)
    if config.use_gen_pos_embed:
        model.gen_pos_embed = _position_table(folder).to(placement.run_device, placement.run_dtype)
    if mode.gpu_layers is not None:
        stream_layers(model.layers, mode.gpu_layers, placement.run_device, pin)
    model.placement = placement
    model.source = str(folder.path)
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
