"""The NextStep nodes, as ComfyUI's NODE_CLASS_MAPPINGS (ids are permanent: saved workflows name them), and
the HTTP routes their front-end extension asks."""

from nextstep_runtime.validation import check_flag

from . import host
from .conditioning import NextStepTextEncode
from .loaders import NextStepModelLoader, NextStepVAELoader
from .routes import register_routes
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

register_routes()
host.refuse_non_boolean_inputs(NODE_CLASS_MAPPINGS, check_flag)
