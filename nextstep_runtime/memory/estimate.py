"""What one sampling call allocates on each device besides the weights: the KV cache exactly as `DecodeState`
allocates it, the token loop's activations (an estimate, documented where it is computed) and the VAE's
working memory."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ModelConfig, VAEConfig
from ..devices import residual_dtype
from ..model.placement import Placement
from ..sampling.noise import NoiseSpec
from ..sampling.prompt import guidance_groups
from .job import Job, image_tokens
from .out_of_memory import VAE_DECODING, VAE_ENCODING

WORKSPACE_ALLOWANCE = 512 * 2**20
"""cuBLAS/cuDNN workspaces, the CUDA graph's memory pool and allocator rounding: not computable from shapes."""
VAE_DECODE_PER_LATENT_PIXEL = 2562 * 64
VAE_ENCODE_PER_PIXEL = 1767
"""Working memory (in elements of the VAE's dtype) of the Flux/LDM-style KL autoencoder, per latent pixel
decoded and per image pixel encoded: ComfyUI's measured figures for this architecture (its own reservation
before a VAE call), so a plan agrees with what ComfyUI frees. They are linear in pixels, as the VAE's memory is:
its mid-block attention over all h/8 x w/8 positions gets contiguous q/k/v (model/vae.py), so SDPA runs a fused
kernel (CUDA's memory-efficient one, the CPU's flash one) that allocates its [positions, channels] output and not
the (positions x positions) score matrix of the math backend (17 GB at 2048x2048); on Apple GPUs, whose SDPA does
form it, the queries go in chunks that bound it to SCORE_CHUNK_BYTES (model/vae.py)."""


def kv_cache_bytes(config: ModelConfig, dtype: torch.dtype, job: Job, layers: int | None = None) -> int:
    """Keys and values of `layers` decoder layers (default: all) for all guidance rows, over prompt + input-image +
    image positions (the last image token is never fed back), exactly as `DecodeState` allocates them."""
    rows, capacity = _rows_and_capacity(config, job)
    per_position = config.num_key_value_heads * config.head_dim * dtype.itemsize
    return 2 * (config.num_hidden_layers if layers is None else layers) * rows * capacity * per_position


def _rows_and_capacity(config: ModelConfig, job: Job) -> tuple[int, int]:
    settings = job.settings
    rows = settings.batch * guidance_groups(settings.cfg, settings.cfg_img, bool(job.input_images))
    return rows, job.prompt_length(config) + image_tokens(config, settings.height, settings.width) - 1


def vae_decode_bytes(latent_height: int, latent_width: int, dtype: torch.dtype) -> int:
    """Working memory to decode one image from a latent of that size (the VAE decodes one image at a time)."""
    return VAE_DECODE_PER_LATENT_PIXEL * latent_height * latent_width * dtype.itemsize


def vae_encode_bytes(height: int, width: int, dtype: torch.dtype) -> int:
    """Working memory to encode one image of that many pixels."""
    return VAE_ENCODE_PER_PIXEL * height * width * dtype.itemsize


def layer_work_bytes(config: ModelConfig, dtype: torch.dtype, job: Job) -> int:
    """An estimate of what the token loop allocates besides the KV cache on every device that runs decoder layers:

    - prefill of the prompt, one layer at a time: the embeddings, residual stream and normed input
      (3 x rows x P x hidden; the residual stream in devices.residual_dtype, float32 beside float16), then the
      larger of attention (q, K/V repeated to every head, output, and the rows x heads x P x P score matrix of
      SDPA's math backend, an upper bound: CUDA's fused kernels need none) and the MLP (gate, up and their product, 3 x rows x P x intermediate); rotary tables and the
      padding mask;
    - one decode step's activations, the key-valid mask and slot indices (each device keeps its own);
    - WORKSPACE_ALLOWANCE.
    """
    c, size, residual = config, dtype.itemsize, residual_dtype(dtype).itemsize
    rows, capacity = _rows_and_capacity(config, job)
    prompt = job.prompt_length(config)
    heads_width = c.num_attention_heads * c.head_dim
    attention = rows * prompt * (3 * heads_width + 2 * heads_width) + rows * c.num_attention_heads * prompt * prompt
    mlp = 3 * rows * prompt * c.intermediate_size
    prefill = (2 * rows * prompt * c.hidden_size + max(attention, mlp) + 2 * rows * prompt * c.head_dim) * size
    prefill += rows * prompt * c.hidden_size * residual
    prefill += rows * prompt * prompt  # boolean padding mask
    masks = rows * capacity + capacity * 8
    step = rows * ((3 * c.hidden_size + 3 * c.intermediate_size + c.num_attention_heads * capacity) * size
                   + c.hidden_size * residual)
    return prefill + masks + step + WORKSPACE_ALLOWANCE


def loop_buffer_bytes(config: ModelConfig, dtype: torch.dtype, job: Job) -> int:
    """What the token loop allocates on the run device alone: one chunk of the seeded noise in float32 (NoiseSpec: the
    whole image's when it is at most NOISE_CHUNK_BYTES), drawn on the host and held in the solver's buffers there, the
    output tokens and the flow head's adaLN modulations for every step."""
    c, settings = config, job.settings
    rows, _ = _rows_and_capacity(config, job)
    tokens = image_tokens(config, settings.height, settings.width)
    noise = 2 * NoiseSpec.plan(0, tokens, settings.steps, True, settings.batch, c.token_dim).chunk_bytes
    output = settings.batch * tokens * c.token_dim * 4
    modulations = (3 * c.head_depth + 2 + 1) * settings.steps * rows * c.head_width * dtype.itemsize
    return noise + output + modulations


def range_run_bytes(config: ModelConfig, placement: Placement, job: Job) -> list[tuple[int, int]]:
    """Per range of `placement`, (its layers' KV cache bytes, what sampling allocates on its device besides weights):
    its KV cache and `layer_work_bytes`, in the range's dtype; the last range (on the run device) also the loop's
    buffers."""
    shares = [(kv_cache_bytes(config, r.dtype, job, r.count), layer_work_bytes(config, r.dtype, job))
              for r in placement.ranges]
    kv, work = shares[-1]
    shares[-1] = (kv, work + loop_buffer_bytes(config, placement.run_dtype, job))
    return [(kv, kv + work) for kv, work in shares]


@dataclass(frozen=True)
class VAEPlacement:
    """Where the VAE runs and in which dtype, for the estimate of its phases there."""

    config: VAEConfig
    device: torch.device
    dtype: torch.dtype


def device_run_bytes(config: ModelConfig, placement: Placement, job: Job,
                     vae: VAEPlacement | None = None) -> dict[torch.device, tuple[int, int]]:
    """Per device (the placement's, and the VAE's), (KV cache bytes, what one call allocates there besides weights):
    its ranges' sampling bytes (range_run_bytes), or on the VAE's device VAE encode or decode where larger (the three
    phases never overlap). `vae` None: no VAE runs in this call (the nodes decode in their own node)."""
    needs: dict[torch.device, tuple[int, int]] = {}
    for layer_range, (kv, run) in zip(placement.ranges, range_run_bytes(config, placement, job)):
        held_kv, held_run = needs.get(layer_range.device, (0, 0))
        needs[layer_range.device] = (held_kv + kv, held_run + run)
    if vae is not None:
        kv, run = needs.get(vae.device, (0, 0))
        needs[vae.device] = (kv, max(run, *vae_phase_bytes(vae.config, vae.dtype, job).values()))
    return needs


def vae_phase_bytes(vae_config: VAEConfig, dtype: torch.dtype, job: Job) -> dict[str, int]:
    """What VAE encoding (the largest input image) and VAE decoding (one image at a time) allocate on the run device,
    by the work out_of_memory.py names."""
    downscale = 2 ** (len(vae_config.ch_mult) - 1)
    return {
        VAE_ENCODING: max((vae_encode_bytes(h, w, dtype) for h, w in job.input_images), default=0),
        VAE_DECODING: vae_decode_bytes(job.settings.height // downscale, job.settings.width // downscale, dtype),
    }
