"""The runtime's Python API: load a model once, then generate (or edit) many times.

    pipe = NextStepPipeline.from_pretrained("models/nextstep/NextStep-1.1")
    result = pipe.generate("a red fox in the snow", settings=GenerationSettings(seed=1))
    result.images  # [B, 3, H, W] in about [-1, 1]; see `images_to_unit`
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig
from .errors import NextStepError
from .generate import TokenCallback, TokenLoopInputs, draw_noise, sample_tokens
from .loading import check_vae_matches, load_model, load_vae, resolve_vae_path
from .model import NextStepModel
from .presets import DEFAULT_PRESET, PRESETS, Preset
from .prompt import PROFILES, build_rows, load_tokenizer
from .sampling import guidance_scales, solver_plan
from .tokens import LatentNormalization, patchify, unpatchify
from .vae import NextStepVAE

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SIZE_MULTIPLE = 16


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise NextStepError("device cuda was asked for but no CUDA GPU is available; use --device cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 on CUDA (where supported) and float32 on the CPU."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise NextStepError(f"unknown dtype {name!r}; choose auto, float32, bfloat16 or float16")
    return DTYPES[name]


def _nearest_sizes(value: int) -> str:
    """The closest valid size, or both neighbours when the value sits exactly between them."""
    lower = max(SIZE_MULTIPLE, value // SIZE_MULTIPLE * SIZE_MULTIPLE)
    upper = lower + SIZE_MULTIPLE if value > lower else lower
    if value - lower == upper - value and lower != upper:
        return f"{lower} or {upper}"
    return str(lower if value - lower < upper - value else upper)


def check_size(width: int, height: int) -> None:
    """Width and height must be positive multiples of 16 (one token is 16x16 pixels)."""
    for label, value in (("width", width), ("height", height)):
        if value <= 0 or value % SIZE_MULTIPLE:
            raise NextStepError(f"{label} {value} is not a positive multiple of {SIZE_MULTIPLE}; "
                                f"try {label} {_nearest_sizes(value)}")


_RECOMMENDED = PRESETS[DEFAULT_PRESET]
PRESET_SETTINGS = ("width", "height", "steps", "cfg", "cfg_img", "timesteps_shift", "sampler", "profile", "use_norm")


def token_grid(config: ModelConfig, height: int, width: int) -> tuple[int, int]:
    """Image tokens down and across an image of that many pixels: one token is a patch of latent pixels,
    each 8 image pixels square."""
    patch_pixels = 8 * config.latent_patch_size
    return height // patch_pixels, width // patch_pixels


@dataclass
class GenerationSettings:
    """One call's settings; the defaults are the official NextStep-1.1 recommendation (presets.py)."""

    width: int = _RECOMMENDED.width
    height: int = _RECOMMENDED.height
    batch: int = 1
    steps: int = _RECOMMENDED.steps
    cfg: float = _RECOMMENDED.cfg
    cfg_img: float = _RECOMMENDED.cfg_img
    cfg_schedule: str = "constant"
    timesteps_shift: float = _RECOMMENDED.timesteps_shift
    sampler: str = _RECOMMENDED.sampler
    profile: str = _RECOMMENDED.profile
    use_norm: bool = _RECOMMENDED.use_norm
    seed: int = 0

    @classmethod
    def from_preset(cls, preset: Preset, **overrides: Any) -> "GenerationSettings":
        """A preset's sampling settings (its size included; the negative prompt is not a setting), with
        `overrides` (any field) winning."""
        fields = {name: getattr(preset, name) for name in PRESET_SETTINGS}
        return cls(**{**fields, **overrides})

    def validate(self) -> None:
        check_size(self.width, self.height)
        if self.batch < 1:
            raise NextStepError(f"batch must be at least 1 (got {self.batch})")
        if self.cfg < 1.0:
            raise NextStepError(f"cfg must be at least 1.0 (got {self.cfg}); 1.0 turns guidance off")
        if self.cfg_img < 1.0:
            raise NextStepError(f"cfg_img must be at least 1.0 (got {self.cfg_img}); 1.0 turns image guidance off")
        if self.profile not in PROFILES:
            raise NextStepError(f"unknown profile {self.profile!r}; choose official or hf")
        solver_plan(self.sampler, self.steps, self.timesteps_shift)
        guidance_scales(self.cfg, 1, self.cfg_schedule, self.profile)


@dataclass
class GenerationResult:
    tokens: torch.Tensor                 # [B, L, D] model-space tokens (after use_norm)
    latents: torch.Tensor                # [B, C, H/8, W/8] VAE-space latents
    images: torch.Tensor | None = None   # [B, 3, H, W] VAE output, not clamped


def images_to_unit(images: torch.Tensor) -> torch.Tensor:
    """VAE output in [-1, 1] to [0, 1], clamped, as the official post-processing does."""
    return (images / 2 + 0.5).clamp(0, 1)


class NextStepPipeline:
    """A loaded model, its tokenizer and (optionally) its VAE."""

    def __init__(self, model: NextStepModel, tokenizer, normalization: LatentNormalization,
                 vae: NextStepVAE | None = None, vae_description: str = "VAE") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.normalization = normalization
        self.vae = vae
        if vae is not None:
            check_vae_matches(model, vae, vae_description)

    @classmethod
    def from_pretrained(cls, folder: str | Path, vae: str | Path | None = None, device: str = "auto",
                        dtype: str = "auto", fp8: bool = False,
                        resident_layers: int | None = None) -> "NextStepPipeline":
        """Load the model folder; the VAE from `vae` or the config's `vae_name_or_path`. The latent
        scale/shift come from the config of the VAE actually loaded.

        `fp8` stores the decoder's linear weights as float8 (about half the memory of bf16);
        `resident_layers` keeps only that many decoder layers on the device and streams the rest."""
        torch_device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, torch_device)
        model = load_model(folder, torch_dtype, torch_device, fp8=fp8, resident_layers=resident_layers)
        tokenizer = load_tokenizer(folder)
        vae_path = resolve_vae_path(folder, vae)
        vae_model = load_vae(vae_path, torch_dtype, torch_device)
        normalization = LatentNormalization(vae_model.config.scaling_factor, vae_model.config.shift_factor)
        return cls(model, tokenizer, normalization, vae_model, str(vae_path))

    def _require_vae(self) -> NextStepVAE:
        if self.vae is None:
            raise NextStepError("this pipeline was loaded without a VAE; load one to encode or decode images")
        return self.vae

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """RGB [B, 3, H, W] in [0, 1] (H, W multiples of 16) to VAE-space latents [B, C, H/8, W/8]."""
        check_size(pixels.shape[-1], pixels.shape[-2])
        with torch.inference_mode():
            return self._require_vae().encode(pixels * 2 - 1).float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE-space latents to images [B, 3, H, W] in about [-1, 1] (clamp with `images_to_unit`).

        One image at a time: the full-resolution activations dominate memory, and a batch would multiply them."""
        vae = self._require_vae()
        with torch.inference_mode():
            return torch.cat([vae.decode(one).float() for one in latents.split(1)])

    def latents_to_tokens(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE-space latents [1, C, h, w] to model-space tokens [h*w/p^2, D] for an editing prompt."""
        config = self.model.config
        if latents.shape[1] != config.latent_channels:
            raise NextStepError(f"the input image latent has {latents.shape[1]} channels but the model expects "
                                f"{config.latent_channels}; encode it with this model's VAE")
        return patchify(self.normalization.to_model_space(latents.float()), config.latent_patch_size).reshape(-1, config.token_dim)

    def prepare(self, caption: str, settings: GenerationSettings, negative: str | None = None,
                positive: str | None = None, edit_latents: list[torch.Tensor] | None = None) -> TokenLoopInputs:
        """Validate and tokenize, and prepare everything the token loop needs (rows, noise, schedules)."""
        settings.validate()
        config = self.model.config
        grid = token_grid(config, settings.height, settings.width)
        edit_latents = list(edit_latents or [])
        input_grids = [(lat.shape[-2] // config.latent_patch_size, lat.shape[-1] // config.latent_patch_size)
                       for lat in edit_latents]
        rows = build_rows(self.tokenizer, caption, negative, positive, input_grids, grid, settings.batch,
                          settings.cfg, settings.cfg_img, settings.profile, config.boi)
        image_tokens = None
        if edit_latents:
            per_row = torch.cat([self.latents_to_tokens(lat) for lat in edit_latents])
            image_tokens = per_row.repeat(sum(rows.image_rows), 1)
        plan = solver_plan(settings.sampler, settings.steps, settings.timesteps_shift)
        total = grid[0] * grid[1]
        return TokenLoopInputs(
            rows=rows,
            image_tokens=image_tokens,
            plan=plan,
            cfg=guidance_scales(settings.cfg, total, settings.cfg_schedule, settings.profile),
            cfg_img=guidance_scales(settings.cfg_img, total, settings.cfg_schedule, settings.profile),
            noise=draw_noise(settings.seed, total, settings.steps, plan.stochastic, settings.batch, config.token_dim),
            batch=settings.batch,
            grid=grid,
            use_norm=settings.use_norm,
        )

    def sample(self, caption: str, settings: GenerationSettings, negative: str | None = None,
               positive: str | None = None, edit_latents: list[torch.Tensor] | None = None,
               callback: TokenCallback | None = None) -> GenerationResult:
        """Generate tokens and VAE-space latents (no decoding). `edit_latents`: one VAE-space latent
        [1, C, h, w] per `<image>` tag in the caption."""
        inputs = self.prepare(caption, settings, negative, positive, edit_latents)
        tokens = sample_tokens(self.model, inputs, callback)
        model_latents = unpatchify(tokens, *inputs.grid, self.model.config.latent_patch_size)
        return GenerationResult(tokens=tokens, latents=self.normalization.to_vae_space(model_latents))

    def generate(self, caption: str, settings: GenerationSettings | None = None, negative: str | None = None,
                 positive: str | None = None, edit_images: list[torch.Tensor] | None = None,
                 callback: TokenCallback | None = None) -> GenerationResult:
        """Prompt to decoded images. `edit_images`: RGB [1, 3, H, W] in [0, 1], one per `<image>` tag."""
        settings = settings or GenerationSettings()
        edit_latents = [self.encode_image(image) for image in edit_images or []]
        result = self.sample(caption, settings, negative, positive, edit_latents, callback)
        result.images = self.decode(result.latents)
        return result
