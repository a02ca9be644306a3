"""How much GPU (and host) memory a model folder needs for a job, and the cheapest weight mode that fits.

Reads only `config.json`, the safetensors headers and the VAE's config: nothing of the weights, so a plan for
the 14B models takes milliseconds and works before anything is downloaded but those small files. Weight
bytes follow the loader exactly (same tensors, dtypes, fp8 scales and streaming slots); the KV cache is what
`DecodeState` allocates; activations are an estimate, documented where it is computed.

Sizes in the advice are decimal gigabytes (1 GB = 10^9 bytes), as GPU makers count them.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ModelConfig, VAEConfig, read_json
from ..errors import NextStepError
from ..model.backbone import DecoderLayer
from ..model.network import NextStepModel
from ..model.tokens import token_grid
from ..model.vae import NextStepVAE
from ..presets import DEFAULT_PRESET, PRESETS
from ..sampling.prompt import guidance_groups
from ..sampling.token_loop import NoiseSpec
from ..validation import check_size
from ..weights.checkpoint import IGNORED_KEYS, canonical_key, open_safetensors
from ..weights.fp8 import FP8_DTYPE, use_fp8_linears
from ..weights.hub import resolve_model_source
from ..weights.int4 import group_size_for
from ..weights.loading import VAE_CONFIG_METADATA_KEY, resolve_vae_path, weight_files

GB = 10**9
PROMPT_ALLOWANCE = 512
"""Text positions per guidance row assumed when the prompt is not tokenized yet (a long caption, the size
suffix and boi); input images' placeholder tokens come on top."""
WORKSPACE_ALLOWANCE = 512 * 2**20
"""cuBLAS/cuDNN workspaces, the CUDA graph's memory pool and allocator rounding: not computable from shapes."""
VAE_DECODE_PER_LATENT_PIXEL = 2562 * 64
VAE_ENCODE_PER_PIXEL = 1767
"""Working memory (in elements of the VAE's dtype) of the Flux/LDM-style KL autoencoder, per latent pixel
decoded and per image pixel encoded: ComfyUI's measured figures for this architecture (its own reservation
before a VAE call), so a plan agrees with what ComfyUI frees."""


@dataclass(frozen=True)
class WeightMode:
    """How the decoder's weights are held."""

    dtype: torch.dtype = torch.bfloat16
    fp8: bool = False
    gpu_layers: int | None = None
    """Decoder layers resident on the run device; the others are streamed from host RAM. None = all."""
    int4: bool = False

    def describe(self) -> str:
        parts = [str(self.dtype).removeprefix("torch.")] + (["fp8"] if self.fp8 else []) + (["int4"] if self.int4 else [])
        if self.gpu_layers is not None:
            parts.append(f"gpu_layers {self.gpu_layers}")
        return ", ".join(parts)


@dataclass(frozen=True)
class Job:
    """One sampling call."""

    width: int = PRESETS[DEFAULT_PRESET].width
    height: int = PRESETS[DEFAULT_PRESET].height
    batch: int = 1
    cfg: float = PRESETS[DEFAULT_PRESET].cfg
    cfg_img: float = PRESETS[DEFAULT_PRESET].cfg_img
    input_images: tuple[tuple[int, int], ...] = ()
    """(height, width) in pixels of each editing input image."""
    prompt_tokens: int | None = None
    """Positions of the longest guidance row besides input-image placeholders (text, size suffix, boi);
    None: PROMPT_ALLOWANCE."""
    steps: int = PRESETS[DEFAULT_PRESET].steps

    def validate(self) -> None:
        check_size(self.width, self.height)
        for height, width in self.input_images:
            check_size(width, height)
        if self.batch < 1:
            raise NextStepError(f"batch must be at least 1 (got {self.batch})")
        if self.steps < 1:
            raise NextStepError(f"steps must be at least 1 (got {self.steps})")


@dataclass(frozen=True)
class ModelFootprint:
    """What the planner needs to know about a model folder."""

    config: ModelConfig
    tensor_shapes: dict[str, tuple[int, ...]]
    """The tensors the loader keeps (no `model.` prefix, lm_head and other ignored keys left out) -> shape."""
    vae_parameters: int
    vae_config: VAEConfig = VAEConfig()

    @classmethod
    def from_folder(cls, folder: str | Path) -> "ModelFootprint":
        """From config.json, the weights' safetensors headers and the VAE's config (or header). `folder` may be
        a Hugging Face repo id in the local cache, as for the loader."""
        folder = resolve_model_source(folder)
        if not (folder / "config.json").is_file():
            raise NextStepError(f"{folder} has no config.json; point at a NextStep model folder")
        config = ModelConfig.from_dict(read_json(folder / "config.json"), str(folder / "config.json"))
        shapes: dict[str, tuple[int, ...]] = {}
        for path in weight_files(folder):
            with open_safetensors(path) as handle:
                for key in handle.keys():
                    name = canonical_key(key)
                    if name not in IGNORED_KEYS:
                        shapes[name] = tuple(handle.get_slice(key).get_shape())
        _unpack_repacked_shapes(shapes)
        expected = cls.from_config(config, vae_parameters=0).tensor_shapes
        shapes = {name: shape for name, shape in shapes.items() if name in expected}  # the loader skips the rest
        if shapes != expected:
            differing = sorted(set(expected) - set(shapes) or {k for k in shapes if shapes[k] != expected[k]})
            raise NextStepError(f"the weights in {folder} do not match its config.json (first difference: "
                                f"{differing[0]}); the model would not load: download it again")
        vae_config, vae_parameters = _vae_size(resolve_vae_path(folder))
        return cls(config, shapes, vae_parameters, vae_config)

    @classmethod
    def from_config(cls, config: ModelConfig, vae_parameters: int | None = None,
                    vae_config: VAEConfig = VAEConfig()) -> "ModelFootprint":
        """The shapes a checkpoint of this config holds (the network built on the meta device); the VAE's
        parameter count from `vae_config` unless given."""
        with torch.device("meta"):
            model = NextStepModel(config)
        shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
        if vae_parameters is None:
            vae_parameters = _meta_vae_parameters(vae_config)
        return cls(config, shapes, vae_parameters, vae_config)


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


def _meta_vae_parameters(config: VAEConfig) -> int:
    with torch.device("meta"):
        vae = NextStepVAE(config)
    return sum(tensor.numel() for tensor in vae.state_dict().values())


def _vae_size(path: Path) -> tuple[VAEConfig, int]:
    """(config, parameter count) of the VAE the loader would use, without reading its weights: a `.pt`
    checkpoint has no readable header, so its count comes from the config; a `.safetensors` one is counted
    from its header. A VAE not on disk yet is planned as the released tokenizer."""
    if path.is_dir():
        safetensors = sorted(path.glob("*.safetensors"))
        if not (path / "checkpoint.pt").is_file() and len(safetensors) == 1:
            path = safetensors[0]
        else:
            raw = read_json(path / "config.json") if (path / "config.json").is_file() else {}
            config = VAEConfig.from_dict(raw, str(path / "config.json"))
            return config, _meta_vae_parameters(config)
    if path.is_file() and path.suffix == ".safetensors":
        with open_safetensors(path) as handle:
            raw = (handle.metadata() or {}).get(VAE_CONFIG_METADATA_KEY)
            count = sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys()
                        if key.startswith(("encoder.", "decoder.")))
        return VAEConfig.from_dict(json.loads(raw) if raw else {}, str(path)), count
    config = VAEConfig()
    return config, _meta_vae_parameters(config)


@dataclass(frozen=True)
class MemoryPlan:
    weights_gpu_bytes: int
    """Every weight the runtime keeps on the run device in that mode (streaming slots included)."""
    weights_host_bytes: int
    """Streamed decoder layers, held in (pinned) host RAM."""
    kv_cache_bytes: int
    vae_bytes: int
    job_bytes: int
    """What one run allocates on the run device besides weights: the largest of VAE encode, sampling (KV
    cache, prefill activations, noise and solver buffers) and VAE decode, which never overlap."""
    peak_gpu_bytes: int
    """weights_gpu_bytes + vae_bytes + job_bytes (the runtime keeps the VAE on the model's device)."""
    gpu_total_bytes: int | None
    gpu_free_bytes: int | None
    fits: bool | None
    """None when no GPU size is known."""
    advice: str
    mode: WeightMode = WeightMode()
    suggested_mode: WeightMode | None = None
    """The cheapest mode that fits when the asked one does not (None when it fits or nothing does)."""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["mode"] = _mode_dict(self.mode)
        data["suggested_mode"] = None if self.suggested_mode is None else _mode_dict(self.suggested_mode)
        return data


def _mode_dict(mode: WeightMode) -> dict[str, Any]:
    return {**asdict(mode), "dtype": str(mode.dtype).removeprefix("torch.")}


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
    channel) and int4 ones (half a byte each plus a scale and zero per group, in the compute dtype); streamed layers in host RAM, and two device slots (one with a single streamed layer) they are
    copied into."""
    layers = footprint.config.num_hidden_layers
    if mode.gpu_layers is not None and not 0 <= mode.gpu_layers <= layers:
        raise NextStepError(f"gpu_layers must be between 0 and {layers} (got {mode.gpu_layers})")
    quantized_owners = _quantized_linear_names(footprint.config) if mode.fp8 or mode.int4 else set()
    itemsize = mode.dtype.itemsize
    per_layer = [0] * layers
    rest = 0
    for name, shape in footprint.tensor_shapes.items():
        count = math.prod(shape)
        match = _LAYER_KEY.fullmatch(name)
        owner, _, attr = (match.group(2) if match else name).rpartition(".")
        if match and owner in quantized_owners and attr == "weight" and mode.fp8:
            size = count * FP8_DTYPE.itemsize + shape[0] * torch.float32.itemsize
        elif match and owner in quantized_owners and attr == "weight":
            size = count // 2 + 2 * (count // group_size_for(shape[1])) * itemsize
        else:
            size = count * itemsize
        if match:
            per_layer[int(match.group(1))] += size
        else:
            rest += size
    resident = layers if mode.gpu_layers is None else mode.gpu_layers
    streamed = per_layer[resident:]
    slots = min(2, len(streamed)) * (streamed[0] if streamed else 0)
    return WeightBytes(gpu=rest + sum(per_layer[:resident]) + slots, host=sum(streamed))


def kv_cache_bytes(config: ModelConfig, dtype: torch.dtype, job: Job) -> int:
    """Keys and values of every layer for all guidance rows, over prompt + input-image + image positions
    (the last image token is never fed back), exactly as `DecodeState` allocates them."""
    rows, capacity = _rows_and_capacity(config, job)
    return 2 * config.num_hidden_layers * rows * config.num_key_value_heads * capacity * config.head_dim * dtype.itemsize


def _image_tokens(config: ModelConfig, height: int, width: int) -> int:
    grid_h, grid_w = token_grid(config, height, width)
    return grid_h * grid_w


def _prompt_length(config: ModelConfig, job: Job) -> int:
    text = PROMPT_ALLOWANCE if job.prompt_tokens is None else job.prompt_tokens
    return text + sum(_image_tokens(config, h, w) for h, w in job.input_images)


def _rows_and_capacity(config: ModelConfig, job: Job) -> tuple[int, int]:
    rows = job.batch * guidance_groups(job.cfg, job.cfg_img, bool(job.input_images))
    return rows, _prompt_length(config, job) + _image_tokens(config, job.height, job.width) - 1


def vae_decode_bytes(latent_height: int, latent_width: int, dtype: torch.dtype) -> int:
    """Working memory to decode one image from a latent of that size (the VAE decodes one image at a time)."""
    return VAE_DECODE_PER_LATENT_PIXEL * latent_height * latent_width * dtype.itemsize


def vae_encode_bytes(height: int, width: int, dtype: torch.dtype) -> int:
    """Working memory to encode one image of that many pixels."""
    return VAE_ENCODE_PER_PIXEL * height * width * dtype.itemsize


def sampling_activation_bytes(config: ModelConfig, dtype: torch.dtype, job: Job) -> int:
    """An estimate of what the token loop allocates besides the KV cache, in bytes.

    - prefill of the prompt, one layer at a time: the embeddings, residual stream and normed input
      (3 x rows x P x hidden), then the larger of attention (q, K/V repeated to every head, output, and the
      rows x heads x P x P score matrix of SDPA's math backend, an upper bound: CUDA's fused kernels need
      none) and the MLP (gate, up and their product, 3 x rows x P x intermediate); rotary tables and the
      padding mask;
    - the token loop: one chunk of the seeded noise in float32 (NoiseSpec: the whole image's when it is at
      most NOISE_CHUNK_BYTES), drawn on the host and held in the solver's buffers on the run device,
      the output tokens, the flow head's adaLN modulations for every step, the key-valid mask and slot
      indices, and one decode step's activations;
    - WORKSPACE_ALLOWANCE.
    """
    c, size = config, dtype.itemsize
    rows, capacity = _rows_and_capacity(config, job)
    prompt = _prompt_length(config, job)
    tokens = _image_tokens(config, job.height, job.width)
    heads_width = c.num_attention_heads * c.head_dim
    attention = rows * prompt * (3 * heads_width + 2 * heads_width) + rows * c.num_attention_heads * prompt * prompt
    mlp = 3 * rows * prompt * c.intermediate_size
    prefill = (3 * rows * prompt * c.hidden_size + max(attention, mlp) + 2 * rows * prompt * c.head_dim) * size
    prefill += rows * prompt * prompt  # boolean padding mask
    noise = 2 * NoiseSpec.plan(0, tokens, job.steps, True, job.batch, c.token_dim).chunk_bytes
    output = job.batch * tokens * c.token_dim * 4
    modulations = (3 * c.head_depth + 2 + 1) * job.steps * rows * c.head_width * size
    masks = rows * capacity + capacity * 8
    step = rows * (4 * c.hidden_size + 3 * c.intermediate_size + c.num_attention_heads * capacity) * size
    return prefill + noise + output + modulations + masks + step + WORKSPACE_ALLOWANCE


def sampling_bytes(config: ModelConfig, dtype: torch.dtype, job: Job) -> int:
    """What the token loop allocates on the run device besides the weights: KV cache plus activations."""
    return kv_cache_bytes(config, dtype, job) + sampling_activation_bytes(config, dtype, job)


def job_bytes(footprint: ModelFootprint, dtype: torch.dtype, job: Job) -> tuple[int, int]:
    """(KV cache bytes, everything one run allocates besides weights): the largest of its three phases."""
    job.validate()
    config = footprint.config
    kv = kv_cache_bytes(config, dtype, job)
    sampling = sampling_bytes(config, dtype, job)
    downscale = 2 ** (len(footprint.vae_config.ch_mult) - 1)
    decode = vae_decode_bytes(job.height // downscale, job.width // downscale, dtype)
    encode = max((vae_encode_bytes(h, w, dtype) for h, w in job.input_images), default=0)
    return kv, max(sampling, decode, encode)


def _gb(value: int) -> str:
    return f"{value / GB:.1f} GB"


def _peak(footprint: ModelFootprint, mode: WeightMode, job: Job) -> tuple[WeightBytes, int, int, int, int]:
    weights = weight_bytes(footprint, mode)
    vae = footprint.vae_parameters * mode.dtype.itemsize
    kv, run = job_bytes(footprint, mode.dtype, job)
    return weights, vae, kv, run, weights.gpu + vae + run


def cheaper_modes(mode: WeightMode) -> list[tuple[WeightMode, str]]:
    """Whole-model modes to try, in order, when `mode` does not fit, each with the advice that selects it.
    Streaming (the slowest remedy) is tried after these, on top of the last one."""
    candidates = []
    if not mode.fp8 and not mode.int4:
        candidates.append((replace(mode, fp8=True, gpu_layers=None), "turn on fp8"))
    if not mode.int4:
        candidates.append((replace(mode, fp8=False, int4=True, gpu_layers=None), "use int4 weights"))
    return candidates


def _advise(footprint: ModelFootprint, mode: WeightMode, job: Job, free: int,
            needed: int) -> tuple[str, WeightMode | None]:
    """The cheapest mode that fits in `free` bytes: the whole-model modes of `cheaper_modes` in order, then
    streaming on top of the last of them with the most resident layers that fit."""
    prefix = f"needs {_gb(needed)}, {_gb(free)} free"
    candidates = cheaper_modes(mode)
    for candidate, how in candidates:
        if _peak(footprint, candidate, job)[-1] <= free:
            return f"{prefix}: {how}", candidate
    base, how = candidates[-1] if candidates else (mode, "")
    layers = footprint.config.num_hidden_layers
    for resident in reversed(range(layers)):  # memory grows with resident layers: the first fit is the best
        candidate = replace(base, gpu_layers=resident)
        if _peak(footprint, candidate, job)[-1] <= free:
            keep = f"keep {resident} of {layers} decoder layers on the GPU (gpu_layers {resident}, much slower)"
            return f"{prefix}: {how + ' and ' if how else ''}{keep}", candidate
    return (f"{prefix}: does not fit even with every decoder layer streamed; use a smaller size or batch, "
            f"or run on the CPU"), None


def plan_memory(footprint: ModelFootprint, mode: WeightMode, job: Job,
                gpu_total: int | None = None, gpu_free: int | None = None) -> MemoryPlan:
    """The memory `mode` needs for `job`, checked against a GPU of `gpu_total` bytes with `gpu_free` free
    (free defaults to total), and the advice."""
    weights, vae, kv, run, peak = _peak(footprint, mode, job)
    free = gpu_total if gpu_free is None else gpu_free
    fits, suggested = None, None
    if free is None:
        advice = f"needs {_gb(peak)}; GPU size unknown"
    elif peak <= free:
        fits, advice = True, f"fits: needs {_gb(peak)}, {_gb(free)} free"
    else:
        fits = False
        advice, suggested = _advise(footprint, mode, job, free, peak)
    return MemoryPlan(weights_gpu_bytes=weights.gpu, weights_host_bytes=weights.host, kv_cache_bytes=kv,
                      vae_bytes=vae, job_bytes=run, peak_gpu_bytes=peak, gpu_total_bytes=gpu_total,
                      gpu_free_bytes=free, fits=fits, advice=advice, mode=mode, suggested_mode=suggested)


def device_memory(device: torch.device) -> tuple[int, int] | None:
    """(free, total) bytes of a CUDA device, or of host RAM for the CPU (MemAvailable, MemTotal); None where
    unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None
        free, total = torch.cuda.mem_get_info(device)
        return int(free), int(total)
    if device.type == "cpu":
        try:
            lines = Path("/proc/meminfo").read_text().splitlines()
        except OSError:
            return None
        kib = {name: rest.split()[0] for name, _, rest in (line.partition(":") for line in lines) if rest.split()}
        if "MemAvailable" in kib and "MemTotal" in kib:
            return int(kib["MemAvailable"]) * 1024, int(kib["MemTotal"]) * 1024
    return None
