"""NextStep inference in plain PyTorch, independent of ComfyUI.

The public API: what the ComfyUI nodes, the benchmarks and users import, by layer. The limits of a call
(`nextstep_runtime.validation`) and the recommended settings (`nextstep_runtime.presets`) are public modules too;
everything else is internal and may move.

    pipe = NextStepPipeline.from_pretrained("models/nextstep/NextStep-1.1")
    result = pipe.generate("a red fox in the snow", settings=GenerationSettings(seed=1))
"""

from .config import ModelConfig, VAEConfig
from .devices import DTYPES, DeviceTraits, compile_default, parse_device, resolve_device, resolve_dtype
from .doctor import doctor_report, loader_warnings
from .errors import NextStepError
from .image_codec import decode_latents, encode_images
from .images import center_crop_to_multiple, check_input_image_size, images_to_unit, load_rgb, to_uint8
from .memory.device_memory import FreeMemory, device_memory, free_memory
from .memory.estimate import VAEPlacement, device_run_bytes, vae_decode_bytes, vae_encode_bytes
from .memory.footprint import ModelFootprint
from .memory.job import Job
from .memory.out_of_memory import LOADING, memory_remedy
from .memory.planner import GB, MEMORY_CHOICES, DeviceShare, Plan, Targets, memory_setting, plan_load, plan_mode
from .model.attention import FlashAttention, attention_kernels
from .model.network import NextStepModel
from .model.placement import DeviceList, LayerRange, Placement
from .model.tokens import LatentNormalization, image_size_of, token_pixels, unpatchify
from .model.vae import NextStepVAE
from .pipeline import GenerationResult, NextStepPipeline
from .sampling.prompt import IMAGE_TAG, PROFILES, load_tokenizer
from .sampling.solvers import CFG_SCHEDULES, SAMPLERS
from .settings import GenerationSettings
from .weights.hub import cache_root
from .weights.loading import load_model, load_vae
from .weights.model_folder import ModelFolder, cached_nextstep_repos, holds_model_config
from .weights.modes import WeightMode
from .weights.offload import PinHostMemory, release_streaming_slots, released_slot_bytes

__all__ = [
    "CFG_SCHEDULES", "DTYPES", "DeviceList", "DeviceShare", "DeviceTraits", "FlashAttention", "FreeMemory", "GB",
    "GenerationResult", "GenerationSettings", "IMAGE_TAG", "Job", "LOADING", "LatentNormalization", "LayerRange",
    "MEMORY_CHOICES", "ModelConfig", "ModelFolder", "ModelFootprint", "NextStepError", "NextStepModel",
    "NextStepPipeline", "NextStepVAE", "PROFILES", "PinHostMemory", "Placement", "Plan", "SAMPLERS", "Targets",
    "VAEConfig", "VAEPlacement", "WeightMode", "attention_kernels", "cache_root", "cached_nextstep_repos",
    "center_crop_to_multiple", "check_input_image_size", "compile_default", "decode_latents", "device_memory",
    "device_run_bytes", "doctor_report", "encode_images", "free_memory", "holds_model_config", "image_size_of",
    "images_to_unit", "load_model", "load_rgb", "load_tokenizer", "load_vae", "loader_warnings", "memory_remedy",
    "memory_setting", "parse_device", "plan_load", "plan_mode", "release_streaming_slots", "released_slot_bytes",
    "resolve_device", "resolve_dtype", "to_uint8", "token_pixels", "unpatchify", "vae_decode_bytes",
    "vae_encode_bytes",
]
