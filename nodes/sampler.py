"""NextStep Sampler: generates the image tokens autoregressively and returns them as a VAE-space LATENT."""

from __future__ import annotations

import traceback

import torch

from nextstep_runtime.attention import set_attention_backend
from nextstep_runtime.config import ModelConfig
from nextstep_runtime.errors import NextStepError
from nextstep_runtime.pipeline import SIZE_MULTIPLE, GenerationSettings, check_size
from nextstep_runtime.memory_plan import Job, sampling_bytes
from nextstep_runtime.presets import PRESETS
from nextstep_runtime.prompt import PROFILES
from nextstep_runtime.sampling import CFG_SCHEDULES, SAMPLERS

from . import host
from .conditioning import NextStepConditioning, negative_text
from .models import NextStepModelHandle
from .preview import TokenPreview
from .progress import TokenProgress
from .sockets import CATEGORY, CONDITIONING, MODEL

MAX_SIZE = 2048

_DEFAULTS = GenerationSettings()


def _working_memory(config: ModelConfig, settings: GenerationSettings, images: tuple[torch.Tensor, ...],
                    dtype: torch.dtype) -> int:
    """Bytes the token loop allocates besides the weights (KV cache and activations, the planner's figure);
    ComfyUI frees this much (plus its reserve) before the run."""
    job = Job(width=settings.width, height=settings.height, batch=settings.batch, cfg=settings.cfg,
              cfg_img=settings.cfg_img, steps=settings.steps,
              input_images=tuple((8 * latent.shape[-2], 8 * latent.shape[-1]) for latent in images))
    return sampling_bytes(config, dtype, job)


def _size_input(label: str) -> tuple:
    return ("INT", {"default": getattr(_DEFAULTS, label), "min": SIZE_MULTIPLE, "max": MAX_SIZE, "step": SIZE_MULTIPLE,
                    "tooltip": f"Image {label} in pixels, a multiple of {SIZE_MULTIPLE} (one token is 16x16 pixels). "
                               f"NextStep was trained around 512x512 (also e.g. 384x672, 448x576); 1024 was never "
                               f"trained."})


class NextStepSampler:
    """Generates NextStep images token by token (raster order), with classifier-free guidance."""

    CATEGORY = CATEGORY
    DESCRIPTION = ("NextStep's autoregressive sampler. Each 16x16-pixel token is sampled by the flow-matching head "
                   "with guidance; the preview fills in row by row. Defaults are the official NextStep-1.1 settings.")
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The generated images as VAE-space latents; decode them with NextStep VAE Decode.",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        d, edit = _DEFAULTS, PRESETS["NextStep-1-Large-Edit"]
        return {
            "required": {
                "model": (MODEL, {"tooltip": "The NextStep model from NextStep Model Loader."}),
                "positive": (CONDITIONING, {"tooltip": "What to generate (NextStep Text Encode). For editing, the "
                                                       "prompt that carries the input image."}),
                "width": _size_input("width"),
                "height": _size_input("height"),
                "batch_size": ("INT", {"default": d.batch, "min": 1, "max": 64,
                                       "tooltip": "How many images to generate from the prompt."}),
                "seed": ("INT", {"default": d.seed, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                                 "tooltip": "Seed of the noise. The noise is drawn on the CPU, so a seed gives the "
                                            "same image on every device."}),
                "steps": ("INT", {"default": d.steps, "min": 1, "max": 200,
                                  "tooltip": f"Flow-matching solver steps per token (official: {d.steps}). Time grows "
                                             "with steps x tokens."}),
                "cfg": ("FLOAT", {"default": d.cfg, "min": 1.0, "max": 30.0, "step": 0.1, "round": 0.01,
                                  "tooltip": f"Text guidance scale (official: {d.cfg}). 1 turns guidance off and skips "
                                             "the negative prompt."}),
                "cfg_img": ("FLOAT", {"default": d.cfg_img, "min": 1.0, "max": 30.0, "step": 0.1, "round": 0.01,
                                      "tooltip": f"Editing only: image guidance scale (NextStep-1-Large-Edit: {edit.cfg_img}). "
                                                 "1 turns it off; ignored without an input image or when cfg is 1."}),
                "cfg_schedule": (list(CFG_SCHEDULES), {"default": d.cfg_schedule,
                                                       "tooltip": "constant (official): the same guidance for every "
                                                                  "token. linear: rising from half with profile "
                                                                  "official, falling to 1 with profile hf."}),
                "timesteps_shift": ("FLOAT", {"default": d.timesteps_shift, "min": 0.01, "max": 20.0, "step": 0.1,
                                              "round": 0.01,
                                              "tooltip": "Shifts the solver's time grid towards the noisy end "
                                                         f"({d.timesteps_shift} for text-to-image, {edit.timesteps_shift} for NextStep-1-Large-Edit)."}),
                "sampler": (list(SAMPLERS), {"default": d.sampler,
                                             "tooltip": "sde: the official stochastic solver. cps: its coefficient-"
                                                        "preserving variant. ode: deterministic. sde_score: the "
                                                        "solver of the Hugging Face repos' pipeline (profile hf)."}),
                "profile": (list(PROFILES), {"default": d.profile,
                                             "tooltip": "official: the GitHub inference code (BOS token on every "
                                                        "prompt). hf: the pipeline shipped inside the Hugging Face "
                                                        "repos (no BOS)."}),
                "use_norm": ("BOOLEAN", {"default": d.use_norm,
                                         "tooltip": "LayerNorm each sampled token: on for NextStep-1-Large and "
                                                    "NextStep-1-Large-Edit, off for NextStep-1.1."}),
            },
            "optional": {
                "negative": (CONDITIONING, {"tooltip": "What to steer away from (NextStep Text Encode, text only). "
                                                       "Unconnected means an empty negative prompt."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, width: int | None = None, height: int | None = None) -> bool | str:
        """Reject sizes before the run (API requests skip the widgets' step); None means a linked input."""
        for label, value in (("width", width), ("height", height)):
            if value is not None and value > MAX_SIZE:
                return f"{label} {value} is larger than {MAX_SIZE}"
        try:
            check_size(SIZE_MULTIPLE if width is None else width, SIZE_MULTIPLE if height is None else height)
        except NextStepError as exc:
            return str(exc)
        return True

    def sample(self, model: NextStepModelHandle, positive: NextStepConditioning, width: int, height: int,
               batch_size: int, seed: int, steps: int, cfg: float, cfg_img: float, cfg_schedule: str,
               timesteps_shift: float, sampler: str, profile: str, use_norm: bool,
               negative: NextStepConditioning | None = None) -> tuple[dict]:
        settings = GenerationSettings(width=width, height=height, batch=batch_size, steps=steps, cfg=cfg,
                                      cfg_img=cfg_img, cfg_schedule=cfg_schedule, timesteps_shift=timesteps_shift,
                                      sampler=sampler, profile=profile, use_norm=use_norm, seed=seed)
        settings.validate()  # before moving the model anywhere
        negative_prompt = negative_text(negative)
        pipeline = model.loaded.pipeline
        config = pipeline.model.config
        set_attention_backend(model.attention)
        host.prepare_model(model.loaded.registration,
                           _working_memory(config, settings, positive.images, pipeline.model.dtype))
        token_pixels = 8 * config.latent_patch_size
        grid = (height // token_pixels, width // token_pixels)
        preview = None
        if host.previews_enabled():
            preview = TokenPreview(model.loaded.preview_colours(), pipeline.normalization, grid,
                                   config.latent_patch_size)
        progress = TokenProgress(host.progress_sink(grid[0] * grid[1]), preview)
        try:
            result = pipeline.sample(positive.text, settings, negative=negative_prompt,
                                     edit_latents=list(positive.images), callback=progress)
        except BaseException as exc:
            # The traceback holds the token loop's frames and with them the KV cache; let it go now, not at
            # the next garbage collection, so a cancelled or failed run hands its memory straight back.
            traceback.clear_frames(exc.__traceback__)
            raise
        return ({"samples": result.latents.to(host.intermediate_device(), torch.float32)},)
