"""NextStep inference in plain PyTorch, independent of ComfyUI.

The public API: what the ComfyUI nodes, the benchmarks and users import, by layer. The limits of a call
(`nextstep_runtime.validation`) and the recommended settings (`nextstep_runtime.presets`) are public modules too;
everything else is internal and may move.

    pipe = NextStepPipeline.from_pretrained("models/nextstep/NextStep-1.1")
    result = pipe.generate("a red fox in the snow", settings=GenerationSettings(seed=1))
"""

from .config import ModelConfig, VAEConfig
from .devices import DTYPES, DeviceTraits, compile_default, resolve_device, resolve_dtype
from .doctor import doctor_report, loader_warnings
from .errors import NextStepError
from .image_codec import decode_latents, encode_images
from .images import center_crop_to_multiple, check_input_image_size, images_to_unit, load_rgb, to_uint8
from .memory.choice import MEMORY_CHOICES, resolve_weight_mode
from .memory.device_memory import FreeMemory, device_memory, free_memory
from .memory.estimate import sampling_bytes, vae_decode_bytes, vae_encode_bytes
from .memory.footprint import ModelFootprint
from .memory.job import Job
from .memory.out_of_memory import LOADING, memory_remedy
from .memory.plan import GB, MemoryPlan, plan_memory
from .memory.split import SplitPlan, plan_split, resolve_split
from .model.attention import set_attention_backend
from .model.placement import DeviceList, Placement
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
    "CFG_SCHEDULES", "DTYPES", "DeviceTraits", "FreeMemory", "GB", "GenerationResult", "GenerationSettings",
    "IMAGE_TAG", "Job", "LOADING", "LatentNormalization", "MEMORY_CHOICES", "MemoryPlan", "ModelConfig",
    "ModelFolder", "ModelFootprint", "NextStepError", "NextStepPipeline", "NextStepVAE", "PROFILES", "SAMPLERS",
    "VAEConfig", "WeightMode", "cache_root", "cached_nextstep_repos", "center_crop_to_multiple",
    "check_input_image_size", "decode_latents", "device_memory", "doctor_report", "encode_images", "free_memory",
    "holds_model_config", "loader_warnings", "image_size_of", "images_to_unit", "load_model", "load_rgb", "load_tokenizer",
    "load_vae", "memory_remedy", "plan_memory", "resolve_device", "resolve_dtype", "resolve_weight_mode",
    "sampling_bytes", "set_attention_backend", "to_uint8", "token_pixels", "unpatchify", "vae_decode_bytes",
    "vae_encode_bytes", "PinHostMemory", "compile_default", "release_streaming_slots", "released_slot_bytes",
    "DeviceList", "Placement", "SplitPlan", "plan_split", "resolve_split",
]
