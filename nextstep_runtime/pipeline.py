"""The runtime's Python API: load a model once, then generate (or edit) many times.

    pipe = NextStepPipeline.from_pretrained("models/nextstep/NextStep-1.1")
    result = pipe.generate("a red fox in the snow", settings=GenerationSettings(seed=1))
    result.images  # [B, 3, H, W] in about [-1, 1]; see `images_to_unit`
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .devices import DeviceTraits, compile_default, resolve_device, vae_dtype
from .errors import NextStepError, NonFiniteResult
from .image_codec import decode_latents, encode_images
from .memory.check import check_job_memory
from .memory.device_memory import FreeMemory, free_memory
from .memory.estimate import VAEPlacement
from .memory.footprint import ModelFootprint
from .memory.job import Job
from .memory.out_of_memory import SAMPLING, run_or_explain_out_of_memory
from .memory.planner import Targets, plan_load
from .model.attention import FlashAttention, attention_kernels
from .model.network import NextStepModel
from .model.placement import DeviceList
from .model.tokens import LatentNormalization, image_size_of, patchify, token_grid, token_pixels, unpatchify
from .model.vae import NextStepVAE
from .sampling.decode_state import non_finite_fix
from .sampling.keep_mask import KeptTokens, kept_tokens, regenerated_cells
from .sampling.loop_inputs import TokenLoopInputs
from .sampling.noise import NoiseSpec
from .sampling.prompt import build_rows, load_tokenizer
from .sampling.solvers import guidance_scales, solver_plan
from .sampling.token_loop import TokenCallback, sample_tokens
from .settings import GenerationSettings
from .validation import check_context_length, check_finite, check_text
from .weights.loading import check_vae_matches, load_model, load_vae
from .weights.model_folder import ModelFolder
from .weights.vae_files import VAEFiles

log = logging.getLogger(__name__)


@dataclass
class GenerationResult:
    tokens: torch.Tensor                 # [B, L, D] model-space tokens (after use_norm)
    latents: torch.Tensor                # [B, C, H/8, W/8] VAE-space latents
    images: torch.Tensor | None = None   # [B, 3, H, W] VAE output, not clamped


class NextStepPipeline:
    """A loaded model, its tokenizer and (optionally) its VAE."""

    def __init__(self, model: NextStepModel, tokenizer, normalization: LatentNormalization,
                 vae: NextStepVAE | None = None, vae_description: str = "VAE",
                 free_memory: FreeMemory = free_memory, compile: bool = True,
                 attention: tuple[FlashAttention | None, ...] | None = None) -> None:
        """`free_memory` tells the memory check what a run may use on a device (a host such as ComfyUI
        passes its own accounting); `compile` runs the flow head through torch.compile (see sample); `attention`:
        each range's attention kernel (attention.attention_kernels; default: SDPA everywhere)."""
        self.model = model
        self.free_memory = free_memory
        self.compile = compile
        self.attention = attention or (None,) * len(model.placement.ranges)
        self.tokenizer = tokenizer
        self.normalization = normalization
        self.vae = vae
        if vae is not None:
            check_vae_matches(model, vae, vae_description)

    @classmethod
    def from_pretrained(cls, folder: str | Path | ModelFolder, vae: str | Path | None = None, device: str = "auto",
                        dtype: str = "auto", memory: str = "auto", gpu_layers: int | None = None,
                        compile: bool | None = None, attention: str = "auto",
                        devices: "str | torch.device | list[str | torch.device] | None" = None,
                        job: Job | None = None) -> "NextStepPipeline":
        """Load the model folder, or a Hugging Face repo id (`org/name[@revision]`) from the local Hugging Face
        cache; the VAE from `vae` or the config's `vae_name_or_path`. The latent scale/shift come from the
        config of the VAE actually loaded.

        `memory`: the decoder's linear weights in the compute dtype (`full`), as float8 (`fp8`, about half the memory
        of bf16), grouped 4-bit (`int4`, about a quarter), or `auto`: the fastest that fits the GPU's free memory for
        `job` (default: one 512x512 image), as the Model Loader chooses (memory/planner.py); the full model on the CPU.
        `gpu_layers` keeps only that many decoder layers on the GPU and streams the rest;
        `compile` runs the flow head through torch.compile (compiled at the first call of each shape;
        eager, with one warning, where compiling fails); None: the device's default (devices.compile_default:
        on, except on Apple GPUs). `attention`: auto, sdpa or flash_attn, chosen for each device
        (attention.attention_kernels). `dtype` auto: each device's own (devices.auto_dtype).
        `devices` (instead of `device`) splits the decoder's layers over several devices (docs/multi-gpu.md):
        "cuda:0,cuda:1" sized by the memory planner from each one's free memory now, or explicit inclusive ranges
        "cuda:0:0-23,cuda:1:24-47"; the flow head and VAE run on the last, streamed layers stream to the last."""
        folder = ModelFolder.open(folder)
        if devices is not None and device != "auto":
            raise NextStepError(f"both device {device!r} and devices {devices!r} were given; give one of them")
        listed = DeviceList((resolve_device(device),)) if devices is None else DeviceList.parse(devices).check_present()
        targets = Targets.on(listed, dtype, free_memory, vae_on_run_device=True)
        plan, choice = plan_load(ModelFootprint.from_folder(folder), memory, gpu_layers, job or Job(), targets,
                                 str(folder.path))
        placement = plan.placement
        layers = f", layers {placement.split}" if placement.split else ""
        log.info("NextStep: %s", choice or f"loading {folder.path.name} as {plan.loads_as}{layers}")
        model = load_model(folder, plan.mode, placement)
        model.float32_fits = plan.float32_fits
        vae_files = folder.vae if vae is None else VAEFiles.locate(vae)
        vae_model = load_vae(vae_files, vae_dtype(placement.run_dtype), placement.run_device)
        if compile is None:
            compile = compile_default(DeviceTraits.of(placement.run_device))
        kernels = attention_kernels(attention, [layer_range.device for layer_range in placement.ranges])
        return cls(model, load_tokenizer(folder), vae_files.normalization, vae_model, str(vae_files.location),
                   compile=compile, attention=kernels)

    def _require_vae(self) -> NextStepVAE:
        if self.vae is None:
            raise NextStepError("this pipeline was loaded without a VAE; load one to encode or decode images")
        return self.vae

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """RGB [B, 3, H, W] in [0, 1] (H, W multiples of 16) to VAE-space latents [B, C, H/8, W/8] (image_codec.py)."""
        return encode_images(self._require_vae(), pixels)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE-space latents to images [B, 3, H, W] in about [-1, 1] (clamp with `images_to_unit`)."""
        return decode_latents(self._require_vae(), latents)

    def latents_to_tokens(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE-space latents [B, C, h, w] to model-space tokens [B, h*w/p^2, D]: exactly the tokens the model
        would have sampled for that latent (an editing input, or an image to continue)."""
        config = self.model.config
        if latents.ndim != 4 or latents.shape[1] != config.latent_channels:
            raise NextStepError(f"the image latent is {list(latents.shape)} but this model needs [batch, "
                                f"{config.latent_channels}, height/8, width/8] (a latent of another model family?); "
                                f"encode the image with this model's VAE")
        return patchify(self.normalization.to_model_space(latents.float()), config.latent_patch_size)

    def _kept(self, init_latents: torch.Tensor, mask: torch.Tensor | None,
              settings: GenerationSettings) -> KeptTokens | None:
        """The tokens of `init_latents` that `mask` keeps (None: all regenerated)."""
        tokens = self.latents_to_tokens(check_finite(init_latents, "the init image's latents"))
        height, width = image_size_of(init_latents)
        if (width, height) != (settings.width, settings.height):
            raise NextStepError(f"the init image is {width}x{height} pixels but width x height is "
                                f"{settings.width}x{settings.height}; set the size to the init image's")
        regenerate = None if mask is None else regenerated_cells(check_finite(mask, "the mask"), settings.height,
                                                                 settings.width, token_pixels(self.model.config))
        return kept_tokens(tokens, regenerate, settings.batch)

    def prepare(self, caption: str, settings: GenerationSettings, negative: str | None = None,
                positive: str | None = None, edit_latents: list[torch.Tensor] | None = None,
                init_latents: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> TokenLoopInputs:
        """Everything the token loop needs, in one pass: the settings, texts and latents checked first; then the
        prompt tokenized and the job's memory checked on every device (memory/check.py); then the loop's inputs
        (rows, noise, schedules, kept tokens)."""
        if not isinstance(settings, GenerationSettings):
            raise NextStepError(f"settings must be a GenerationSettings, got {type(settings).__name__}")
        settings.validate()
        check_text("caption", caption)
        check_text("negative", negative, optional=True)
        check_text("positive", positive, optional=True)
        kept = self._kept(init_latents, mask, settings) if init_latents is not None else None
        edit_latents = [check_finite(latent, f"editing input image {index + 1}'s latent")
                        for index, latent in enumerate(edit_latents or [])]
        config = self.model.config
        grid = token_grid(config, settings.height, settings.width)
        input_grids = [(lat.shape[-2] // config.latent_patch_size, lat.shape[-1] // config.latent_patch_size)
                       for lat in edit_latents]
        rows = build_rows(self.tokenizer, caption, negative, positive, input_grids, grid, settings.batch,
                          settings.cfg, settings.cfg_img, settings.profile, config.boi)
        check_context_length(rows.input_ids.shape[1], grid[0] * grid[1], config.max_positions)
        placeholders = sum(h * w for h, w in input_grids)
        job = Job.with_latents(settings, edit_latents, prompt_tokens=rows.input_ids.shape[1] - placeholders)
        vae = None if self.vae is None else VAEPlacement(self.vae.config, self.vae.device, self.vae.dtype)
        check_job_memory(config, self.model.placement, job, self.free_memory, vae)
        image_tokens = None
        if edit_latents:
            per_row = torch.cat([self.latents_to_tokens(lat).flatten(0, 1) for lat in edit_latents])
            image_tokens = per_row.repeat(sum(rows.image_rows), 1)
        plan = solver_plan(settings.sampler, settings.steps, settings.timesteps_shift)
        total = grid[0] * grid[1]
        return TokenLoopInputs(
            rows=rows,
            image_tokens=image_tokens,
            plan=plan,
            cfg=guidance_scales(settings.cfg, total, settings.cfg_schedule, settings.profile),
            cfg_img=guidance_scales(settings.cfg_img, total, settings.cfg_schedule, settings.profile),
            noise=NoiseSpec.plan(settings.seed, total, settings.steps, plan.stochastic, settings.batch,
                                 config.token_dim),
            batch=settings.batch,
            grid=grid,
            use_norm=settings.use_norm,
            kept=kept,
        )

    def sample(self, caption: str, settings: GenerationSettings, negative: str | None = None,
               positive: str | None = None, edit_latents: list[torch.Tensor] | None = None,
               callback: TokenCallback | None = None, init_latents: torch.Tensor | None = None,
               mask: torch.Tensor | None = None, compile: bool | None = None,
               attention: tuple[FlashAttention | None, ...] | None = None) -> GenerationResult:
        """Generate tokens and VAE-space latents (no decoding). `edit_latents`: one VAE-space latent
        [1, C, h, w] per `<image>` tag in the caption. `init_latents` [1 or B, C, H/8, W/8] (VAE space, the
        settings' size) with `mask` (pixels, 1 = regenerate, see keep_mask): the tokens the mask keeps are
        taken from the init latents, the rest generated after them in raster order. Without a mask every
        token is generated. `compile` and `attention` (each range's kernel): None uses the pipeline's."""
        use_compile = self.compile if compile is None else compile
        kernels = self.attention if attention is None else attention

        def run() -> tuple[torch.Tensor, TokenLoopInputs]:
            inputs = self.prepare(caption, settings, negative, positive, edit_latents, init_latents, mask)
            return sample_tokens(self.model, inputs, kernels, callback, use_compile), inputs

        tokens, inputs = run_or_explain_out_of_memory(SAMPLING, self.model.device, run)
        if not bool(torch.isfinite(tokens).all()):  # else the VAE decode after would be blamed, not the model
            raise NonFiniteResult(f"the image tokens of {self.model.source} came out NaN or infinite (computing in "
                                  f"{self.model.placement.describe_dtypes()}); {non_finite_fix(self.model)}")
        patch = self.model.config.latent_patch_size
        latents = self.normalization.to_vae_space(unpatchify(tokens, *inputs.grid, patch))
        if inputs.kept is not None:  # the input's own values, not their round trip through the model's scaling
            kept = inputs.kept.mask[..., None].expand(-1, -1, tokens.shape[-1])
            keep = unpatchify(kept, *inputs.grid, patch).to(latents.device)
            latents = torch.where(keep, init_latents.to(latents).expand_as(latents), latents)
        return GenerationResult(tokens=tokens, latents=latents)

    def generate(self, caption: str, settings: GenerationSettings | None = None, negative: str | None = None,
                 positive: str | None = None, edit_images: list[torch.Tensor] | None = None,
                 callback: TokenCallback | None = None, init_image: torch.Tensor | None = None,
                 mask: torch.Tensor | None = None, init_latents: torch.Tensor | None = None,
                 compile: bool | None = None) -> GenerationResult:
        """Prompt to decoded images. `edit_images`: RGB [1, 3, H, W] in [0, 1], one per `<image>` tag.
        `init_image`: RGB [1 or B, 3, H, W] in [0, 1] of the settings' size (or `init_latents`, VAE space), to
        inpaint, outpaint or continue where `mask` (pixels, 1 = regenerate) says; see `sample`. `compile`: None
        uses the pipeline's setting."""
        settings = settings or GenerationSettings()
        edit_latents = [self.encode_image(image) for image in edit_images or []]
        if init_image is not None:
            init_latents = self.encode_image(init_image)
        result = self.sample(caption, settings, negative, positive, edit_latents, callback, init_latents, mask,
                             compile)
        result.images = self.decode(result.latents)
        return result
