"""The NextStep nodes, as ComfyUI's NODE_CLASS_MAPPINGS (ids are permanent: saved workflows name them)."""

from .conditioning import NextStepTextEncode
from .loaders import NextStepModelLoader, NextStepVAELoader
from .sampler import NextStepSampler
from .vae import NextStepVAEDecode, NextStepVAEEncode

NODE_CLASS_MAPPINGS = {
    "NextStepModelLoader": NextStepModelLoader,
    "NextStepVAELoader": NextStepVAELoader,
    "NextStepTextEncode": NextStepTextEncode,
    "NextStepSampler": NextStepSampler,
    "NextStepVAEDecode": NextStepVAEDecode,
    "NextStepVAEEncode": NextStepVAEEncode,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "NextStepModelLoader": "NextStep Model Loader",
    "NextStepVAELoader": "NextStep VAE Loader",
    "NextStepTextEncode": "NextStep Text Encode",
    "NextStepSampler": "NextStep Sampler",
    "NextStepVAEDecode": "NextStep VAE Decode",
    "NextStepVAEEncode": "NextStep VAE Encode",
}
