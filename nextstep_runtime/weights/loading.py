"""Loading a NextStep model folder (config, weights, tokenizer) and its VAE, with clear errors."""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ..config import RELEASED_VAE_CONFIG, ModelConfig, VAEConfig, read_json
from ..errors import NextStepError
from ..model.network import NextStepModel
from ..model.positions import OFFICIAL_POSITION_GRID, sincos_position_table
from ..model.tokens import LatentNormalization
from ..model.vae import NextStepVAE
from .checkpoint import POSITION_TABLE_KEY, canonical_key, iter_safetensors, load_weights, open_safetensors
from .fp8 import quantize_per_channel, use_fp8_linears
from .hub import resolve_model_source
from .int4 import check_int4_device, pack_for_device, quantize_grouped, use_int4_linears
from .offload import stream_layers

VAE_CONFIG_METADATA_KEY = "nextstep_vae_config"
BUNDLED_VAE_FOLDER = "vae"


def weight_files(folder: Path) -> list[Path]:
    """The model's safetensors files: the shards named by the index, or the single file."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise NextStepError(f"{index} has no weight_map")
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
        for path in files:
            if not path.is_file():
                raise NextStepError(f"shard {path.name} named by {index.name} is missing from {folder}; "
                                    f"download it again")
        return files
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise NextStepError(f"no weights in {folder}: expected model.safetensors or model.safetensors.index.json "
                        f"with its shards")


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


def _count_blocks(files: list[Path]) -> tuple[int, int]:
    """(decoder layers, flow-head blocks) present in the weights, from key names alone (no data read)."""
    layers, head_blocks = set(), set()
    for path in files:
        with open_safetensors(path) as handle:
            for key in handle.keys():
                parts = key.removeprefix("model.").split(".")
                if parts[0] == "layers" and len(parts) > 1 and parts[1].isdigit():
                    layers.add(int(parts[1]))
                elif parts[:3] == ["image_head", "net", "res_blocks"] and len(parts) > 3 and parts[3].isdigit():
                    head_blocks.add(int(parts[3]))
    return len(layers), len(head_blocks)


def _position_table(files: list[Path], config: ModelConfig, source: str) -> torch.Tensor:
    """The `gen_pos_embed` table of a `use_gen_pos_embed` model: computed for the config's
    `base_image_grid_size` when it names one (vLLM-Omni's port); else the table stored in the weights, as
    the official loader fills its persistent buffer from them; else the official 32 x 32 table."""
    if config.base_image_grid_size is None:
        for path, key, load in iter_safetensors(files):
            if canonical_key(key) == POSITION_TABLE_KEY:
                table = load()
                if table.shape[-1] != config.hidden_size:
                    raise NextStepError(f"{path}: {key} has shape {list(table.shape)} but {source} implies rows of "
                                        f"hidden_size {config.hidden_size}")
                return table.reshape(-1, config.hidden_size).float()
    return sincos_position_table(config.hidden_size, config.base_image_grid_size or OFFICIAL_POSITION_GRID)


WEIGHTS_FORMAT_KEY = "nextstep_weights"
"""config.json key a repacked folder records its decoder weight storage under (see repack.py)."""
STORED_FORMATS = ("bf16", "fp8", "int4")


def model_config_path(folder: Path) -> Path:
    """`folder/config.json`, or an error saying what a model folder holds."""
    if not folder.is_dir():
        raise NextStepError(f"model folder {folder} does not exist")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise NextStepError(f"{folder} has no config.json; point at a NextStep model folder "
                            f"(config.json, model*.safetensors, tokenizer files)")
    return config_path


def stored_weights_format(config_raw: dict[str, Any], config_path: Path) -> str:
    """How the folder stores the decoder's linear weights: `fp8`/`int4` for repacked folders, else `bf16`
    (a plain checkpoint of any float dtype)."""
    stored = config_raw.get(WEIGHTS_FORMAT_KEY, "bf16")
    if stored not in STORED_FORMATS:
        raise NextStepError(f"{config_path}: {WEIGHTS_FORMAT_KEY}={stored!r} is not one of {', '.join(STORED_FORMATS)}; "
                            f"convert the model again with this version")
    return stored


def _check_mode_matches_storage(stored: str, fp8: bool, int4: bool, folder: Path) -> None:
    """A repacked folder loads in its own format: its original weights are gone, and dequantising 4-bit or
    fp8 values to bf16 would take the memory of bf16 with the accuracy of the quantised form."""
    if fp8 and int4:
        raise NextStepError("choose fp8 or int4 weights, not both")
    asked = "fp8" if fp8 else "int4" if int4 else "bf16"
    if stored != "bf16" and asked != stored:
        raise NextStepError(f"{folder} holds {stored} weights (repacked); load it with {stored} weights, or "
                            f"convert the original model to {asked} instead")


def weight_converter(model: NextStepModel, dtype: torch.dtype, device: torch.device, fp8: bool, int4: bool,
               stored: str, resident_layers: int | None) -> Callable[[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per tensor: its device (streamed decoder layers stay on the CPU) and storage (fp8 or packed 4-bit
    for the decoder's linear weights when asked, quantised here unless the folder holds them already;
    the compute dtype otherwise)."""
    if fp8:
        quantized = {f"layers.{name}" for name in use_fp8_linears(model.layers)}
    elif int4:
        check_int4_device(device, dtype)
        quantized = {f"layers.{name}" for name in use_int4_linears(model.layers, stored=stored == "int4")}
    else:
        quantized = set()
    cpu = torch.device("cpu")

    def placement(name: str) -> torch.device:
        parts = name.split(".")
        streamed = resident_layers is not None and parts[0] == "layers" and int(parts[1]) >= resident_layers
        return cpu if streamed else device

    def convert(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        owner, _, attr = name.rpartition(".")
        target = placement(name)
        if owner not in quantized or attr == "bias":
            return {name: tensor.to(device=target, dtype=dtype)}
        if fp8 and attr == "weight":
            if stored == "fp8":
                return {name: tensor.to(target)}
            weight, scale = quantize_per_channel(tensor.to(target))
            return {name: weight, f"{owner}.weight_scale": scale}
        if int4 and attr == "weight":  # packed on the run device, then moved where the layer waits
            nibbles, scales_and_zeros = (tensor, None) if stored == "int4" else quantize_grouped(tensor.to(device))
            values = {name: pack_for_device(nibbles, device).to(target)}
            if scales_and_zeros is not None:
                values[f"{owner}.scales_and_zeros"] = scales_and_zeros.to(device=target, dtype=dtype)
            return values
        if attr == "scales_and_zeros":
            return {name: tensor.to(device=target, dtype=dtype)}
        return {name: tensor.to(device=target, dtype=torch.float32)}  # fp8 weight_scale
    return convert


def load_model(folder: str | Path, dtype: torch.dtype, device: torch.device | str, fp8: bool = False,
               resident_layers: int | None = None, int4: bool = False) -> NextStepModel:
    """Build the network from `folder/config.json` and fill it from the safetensors weights (`folder` may
    also be a Hugging Face repo id in the local cache, see hub.py).

    `dtype` is the compute dtype; with `fp8` the decoder's linear weights are stored as float8, with
    `int4` as grouped 4-bit (int4.py). With `resident_layers` N, only the first N decoder layers are
    placed on `device`; the rest stay in host memory and are streamed in as they run (see offload.py).
    A folder repacked by `convert` loads in the format it stores."""
    folder = resolve_model_source(folder)
    config_path = model_config_path(folder)
    raw_config = read_json(config_path)
    config = ModelConfig.from_dict(raw_config, str(config_path))
    stored = stored_weights_format(raw_config, config_path)
    _check_mode_matches_storage(stored, fp8, int4, folder)
    files = weight_files(folder)
    found_layers, found_depth = _count_blocks(files)
    if found_layers != config.num_hidden_layers:
        raise NextStepError(f"{config_path} says num_hidden_layers={config.num_hidden_layers} but the weights "
                            f"hold {found_layers} decoder layers")
    if found_depth != config.head_depth:
        raise NextStepError(f"{config_path} says the flow head has {config.head_depth} blocks "
                            f"(genloss_depth/fm_head_layers) but the weights hold {found_depth}")
    device = torch.device(device)
    with torch.device("meta"):
        model = NextStepModel(config)
    if resident_layers is not None and not 0 <= resident_layers <= config.num_hidden_layers:
        raise NextStepError(f"layers kept on the GPU must be between 0 and {config.num_hidden_layers} "
                            f"(got {resident_layers})")
    convert = weight_converter(model, dtype, device, fp8, int4, stored, resident_layers)
    load_weights(model, iter_safetensors(files), dtype, device, str(config_path), model_shape_hint(config), convert)
    if config.use_gen_pos_embed:
        model.gen_pos_embed = _position_table(files, config, str(config_path)).to(device, dtype)
    if resident_layers is not None:
        stream_layers(model.layers, resident_layers, device)
    return model.eval().requires_grad_(False)


@dataclass
class VAESource:
    """Where a VAE's config and tensors come from."""

    config: dict[str, Any]
    tensors: Iterator
    description: str
    config_description: str | None = None  # where `config` was read, when not from `description` itself


def _load_state_dict(checkpoint: Path) -> Any:
    """torch.load restricted to plain tensors (weights_only); memory-mapped when the format allows. A file
    that needs more than that to unpickle (code, arbitrary objects) is refused outright: loading it fully
    would run whatever it holds."""
    try:
        try:
            return torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            return torch.load(checkpoint, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise NextStepError(f"{checkpoint} holds more than tensors; refused") from None
    except Exception as exc:  # truncated zips and bad headers raise several types
        raise NextStepError(f"cannot read {checkpoint} as a plain state dict ({exc}); it may be corrupt: download "
                            f"it again") from None


def _vae_from_folder(folder: Path) -> VAESource:
    config_path, checkpoint = folder / "config.json", folder / "checkpoint.pt"
    if not checkpoint.is_file():
        safetensors = sorted(folder.glob("*.safetensors"))
        if len(safetensors) == 1:
            return _vae_from_safetensors(safetensors[0])
        raise NextStepError(f"VAE folder {folder} has no checkpoint.pt")
    has_config = config_path.is_file()
    config = read_json(config_path) if has_config else dict(RELEASED_VAE_CONFIG)
    state = _load_state_dict(checkpoint)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise NextStepError(f"{checkpoint} does not hold a state dict")

    def tensors():
        for key in list(state):
            yield checkpoint, key, (lambda key=key: state.pop(key))
    return VAESource(config, tensors(), str(checkpoint), str(config_path) if has_config else None)


def _vae_from_safetensors(path: Path) -> VAESource:
    with open_safetensors(path) as handle:
        metadata = handle.metadata() or {}
    raw = metadata.get(VAE_CONFIG_METADATA_KEY)
    try:
        config = json.loads(raw) if raw else dict(RELEASED_VAE_CONFIG)
    except json.JSONDecodeError as exc:
        raise NextStepError(f"{path}: metadata {VAE_CONFIG_METADATA_KEY!r} is not valid JSON ({exc})") from None
    return VAESource(config, iter_safetensors([path]), str(path))


def resolve_vae_path(model_folder: str | Path, vae: str | Path | None = None) -> Path:
    """An explicit VAE path, else the config's `vae_name_or_path` taken relative to the model folder.

    When that names nothing on disk (a hub id such as `stepfun-ai/...`, or a path on the machine that
    exported the model), the model folder's own `vae/` is used if present."""
    if vae is not None:
        return Path(vae)
    model_folder = resolve_model_source(model_folder)
    raw = read_json(model_folder / "config.json").get("vae_name_or_path") or BUNDLED_VAE_FOLDER
    candidate = Path(raw) if Path(raw).is_absolute() else model_folder / raw
    bundled = model_folder / BUNDLED_VAE_FOLDER
    return bundled if not candidate.exists() and bundled.exists() else candidate


def latent_normalization(model_folder: str | Path) -> LatentNormalization:
    """The scale/shift the model was trained with, from the config of the VAE its folder names.

    Read without loading VAE weights, so a sampler can return VAE-space latents on its own.
    Without a VAE config next to the model, the released tokenizer's values apply.
    """
    path = resolve_vae_path(model_folder)
    if path.is_dir() and (path / "config.json").is_file():
        config = VAEConfig.from_dict(read_json(path / "config.json"), str(path / "config.json"))
    elif path.is_file() and path.suffix == ".safetensors":
        config = VAEConfig.from_dict(_vae_from_safetensors(path).config, str(path))
    else:
        config = VAEConfig.from_dict({}, "released defaults")
    return LatentNormalization(config.scaling_factor, config.shift_factor)


def load_vae(path: str | Path, dtype: torch.dtype, device: torch.device | str) -> NextStepVAE:
    """A VAE from a folder (`config.json` + `checkpoint.pt`) or one `.safetensors` file."""
    path = Path(path)
    if path.is_dir():
        source = _vae_from_folder(path)
    elif path.is_file() and path.suffix == ".safetensors":
        source = _vae_from_safetensors(path)
    elif path.exists():
        raise NextStepError(f"VAE {path} must be a folder with checkpoint.pt or a .safetensors file")
    else:
        raise NextStepError(f"VAE {path} not found; download the model's vae/ folder or give the path of a VAE")
    config = VAEConfig.from_dict(source.config, source.config_description or source.description)
    with torch.device("meta"):
        vae = NextStepVAE(config)
    vae_keys = (item for item in source.tensors if item[1].startswith(("encoder.", "decoder.")))
    load_weights(vae, vae_keys, dtype, torch.device(device), f"the VAE config of {source.description}",
                 lambda name: " (check ch, ch_mult, num_res_blocks, z_channels)")
    return vae.eval().requires_grad_(False)


def check_vae_matches(model: NextStepModel, vae: NextStepVAE, vae_description: str) -> None:
    """The model's tokens must be the VAE's latent patches, or images come out as noise."""
    mc, vc = model.config, vae.config
    if mc.latent_channels != vc.z_channels or vc.psz not in (None, mc.latent_patch_size):
        raise NextStepError(f"VAE {vae_description} has {vc.z_channels} latent channels and patch {vc.psz}, but the "
                            f"model expects {mc.latent_channels} channels and patch {mc.latent_patch_size}; "
                            f"use the VAE that ships with the model")
