"""NextStep Sampler: generates the image tokens autoregressively and returns them as a VAE-space LATENT."""

from __future__ import annotations

import traceback

import torch

from nextstep_runtime import (
    CFG_SCHEDULES,
    PROFILES,
    SAMPLERS,
    GenerationSettings,
    Job,
    ModelConfig,
    NextStepError,
    NextStepModel,
    device_run_bytes,
    image_size_of,
    released_slot_bytes,
    token_pixels,
)
from nextstep_runtime.presets import PRESETS
from nextstep_runtime.validation import (
    MAX_BATCH,
    MAX_CFG,
    MAX_SEED,
    MAX_SHIFT,
    MAX_SIZE,
    MAX_STEPS,
    MIN_CFG,
    MIN_SHIFT,
    SIZE_MULTIPLE,
    check_finite,
    check_setting,
    check_size,
)

from . import host
from .conditioning import NextStepConditioning, negative_text
from .latents import nextstep_samples
from .models import NextStepModelHandle
from .preview import TokenPreview
from .progress import TokenProgress
from .sockets import CATEGORY, CONDITIONING, MODEL

_DEFAULTS = GenerationSettings()


def _init_latent(latent_image: dict | None, config: ModelConfig) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(VAE-space latents, pixel noise mask or None) of the optional latent_image, checked against the model."""
    if latent_image is None:
        return None, None
    samples = nextstep_samples(latent_image, config.latent_channels, "NextStep Sampler's latent_image")
    height, width = image_size_of(samples)
    if max(height, width) > MAX_SIZE:
        raise NextStepError(f"latent_image is {width}x{height} pixels, larger than {MAX_SIZE}; scale the image down")
    check_size(width, height)
    check_finite(samples, "latent_image")
    mask = latent_image.get("noise_mask")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise NextStepError(f"the noise_mask of latent_image must be a mask tensor, got {type(mask).__name__}")
        check_finite(mask, "the noise_mask of latent_image")
    return samples.float(), None if mask is None else mask.float()


def sampling_needs(model: NextStepModel, job: Job) -> dict[torch.device, int]:
    """What ComfyUI frees on each device before a run: what the token loop allocates there besides the weights (the
    planner's figure for that device's ranges, memory/estimate.py), and on the run device the streaming slots, which
    ComfyUI does not count as the model's (they are freed when it unloads the model)."""
    needs = {device: run for device, (_, run) in device_run_bytes(model.config, model.placement, job).items()}
    needs[model.device] += released_slot_bytes(model)
    return needs


def _size_input(label: str) -> tuple:
    return ("INT", {"default": getattr(_DEFAULTS, label), "min": SIZE_MULTIPLE, "max": MAX_SIZE, "step": SIZE_MULTIPLE,
                    "tooltip": f"Image {label} in pixels, a multiple of {SIZE_MULTIPLE} (one token is 16x16 pixels). "
                               f"NextStep was trained around 512x512 (also e.g. 384x672, 448x576); 1024 was never "
                               f"trained. Ignored when latent_image is connected (its size is used)."})


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
                "batch_size": ("INT", {"default": d.batch, "min": 1, "max": MAX_BATCH,
                                       "tooltip": "How many images to generate from the prompt."}),
                "seed": ("INT", {"default": d.seed, "min": 0, "max": MAX_SEED, "control_after_generate": True,
                                 "tooltip": "Seed of the noise. The noise is drawn on the CPU, so a seed gives the "
                                            "same image on every device."}),
                "steps": ("INT", {"default": d.steps, "min": 1, "max": MAX_STEPS,
                                  "tooltip": f"Flow-matching solver steps per token (official: {d.steps}). Time grows "
                                             "with steps x tokens."}),
                "cfg": ("FLOAT", {"default": d.cfg, "min": MIN_CFG, "max": MAX_CFG, "step": 0.1, "round": 0.01,
                                  "tooltip": f"Text guidance scale (official: {d.cfg}). 1 turns guidance off and skips "
                                             "the negative prompt."}),
                "cfg_img": ("FLOAT", {"default": d.cfg_img, "min": MIN_CFG, "max": MAX_CFG, "step": 0.1, "round": 0.01,
                                      "tooltip": f"Editing only: image guidance scale (NextStep-1-Large-Edit: {edit.cfg_img}). "
                                                 "1 turns it off; ignored without an input image or when cfg is 1."}),
                "cfg_schedule": (list(CFG_SCHEDULES), {"default": d.cfg_schedule,
                                                       "tooltip": "constant (official): the same guidance for every "
                                                                  "token. linear: rising from half with profile "
                                                                  "official, falling to 1 with profile hf."}),
                "timesteps_shift": ("FLOAT", {"default": d.timesteps_shift, "min": MIN_SHIFT, "max": MAX_SHIFT, "step": 0.1,
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
                "latent_image": ("LATENT", {"tooltip": "Optional image to inpaint, outpaint or continue (NextStep VAE "
                                                       "Encode, then SetLatentNoiseMask). Its size replaces width "
                                                       "and height; a batch of one serves every image. Without a "
                                                       "noise mask every token is generated. With one (1 = "
                                                       "regenerate) a 16x16 token is regenerated where any pixel of "
                                                       "its cell is >= 0.5 and kept elsewhere; a mask of another "
                                                       "size is stretched to the image as KSampler does. A token "
                                                       "sees only the tokens before it (raster order): outpainting "
                                                       "down or right works best. Another model's LATENT does not "
                                                       "fit: decode it, then NextStep VAE Encode."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, width=None, height=None, batch_size=None, seed=None, steps=None, cfg=None, cfg_img=None,
                        timesteps_shift=None, use_norm=None) -> bool | str:
        """The runtime's own check of each value (NaN, ranges) before the run. ComfyUI skips its own min/max for
        the inputs named here, after converting them with int(), float() or bool() (a string where a boolean is
        meant is refused before that, see host.refuse_non_boolean_inputs); None means a linked input."""
        given = {"width": width, "height": height, "batch": batch_size, "seed": seed, "steps": steps, "cfg": cfg,
                 "cfg_img": cfg_img, "timesteps_shift": timesteps_shift, "use_norm": use_norm}
        for name, value in given.items():
            if value is None:
                continue
            try:
                check_setting(name, value, "batch_size" if name == "batch" else name)
            except NextStepError as exc:
                return str(exc)
        return True

    def sample(self, model: NextStepModelHandle, positive: NextStepConditioning, width: int, height: int,
               batch_size: int, seed: int, steps: int, cfg: float, cfg_img: float, cfg_schedule: str,
               timesteps_shift: float, sampler: str, profile: str, use_norm: bool,
               negative: NextStepConditioning | None = None, latent_image: dict | None = None) -> tuple[dict]:
        init_latents, mask = _init_latent(latent_image, model.loaded.pipeline.model.config)
        if init_latents is not None:
            height, width = image_size_of(init_latents)
        settings = GenerationSettings(width=width, height=height, batch=batch_size, steps=steps, cfg=cfg,
                                      cfg_img=cfg_img, cfg_schedule=cfg_schedule, timesteps_shift=timesteps_shift,
                                      sampler=sampler, profile=profile, use_norm=use_norm, seed=seed)
        settings.validate()  # before moving the model anywhere
        negative_prompt = negative_text(negative)
        pipeline = model.loaded.pipeline
        config = pipeline.model.config
        host.prepare_model(model.loaded.registration, sampling_needs(pipeline.model, Job.with_latents(settings,
                                                                                                     positive.images)))
        grid = (height // token_pixels(config), width // token_pixels(config))
        preview = None
        if host.previews_enabled():
            preview = TokenPreview(model.loaded.preview_colours(), pipeline.normalization, grid,
                                   config.latent_patch_size)
        progress = TokenProgress(host.progress_sink(grid[0] * grid[1]), preview)
        try:
            result = pipeline.sample(positive.text, settings, negative=negative_prompt,
                                     edit_latents=list(positive.images), callback=progress,
                                     init_latents=init_latents, mask=mask, compile=model.compile,
                                     attention=model.attention)
        except BaseException as exc:
            # The traceback holds the token loop's frames and with them the KV cache; let it go now, not at
            # the next garbage collection, so a cancelled or failed run hands its memory straight back.
            traceback.clear_frames(exc.__traceback__)
            raise
        return ({"samples": result.latents.to(host.intermediate_device(), torch.float32)},)
