"""Images to VAE latents and back: the one encode/decode path of the Python API and the nodes.

One image at a time (the full-resolution activations dominate the VAE's memory), in inference mode, with the
inputs checked first and an out-of-memory error explained as every memory error is.
"""

from __future__ import annotations

import torch

from .errors import NextStepError
from .images import check_input_image_size
from .memory.out_of_memory import VAE_DECODING, VAE_ENCODING, run_or_explain_out_of_memory
from .model.vae import NextStepVAE
from .validation import MAX_SIZE, check_finite, check_size


def encode_images(vae: NextStepVAE, pixels: torch.Tensor, what: str = "the input image") -> torch.Tensor:
    """RGB [B, 3, H, W] in [0, 1] (H, W multiples of 16) to VAE-space latents [B, C, H/8, W/8] float32."""
    if not isinstance(pixels, torch.Tensor) or pixels.ndim != 4 or pixels.shape[1] != 3:
        shape = list(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
        raise NextStepError(f"{what} must be an RGB tensor [B, 3, H, W] in [0, 1], got {shape}")
    if pixels.shape[0] == 0:
        raise NextStepError(f"{what} is {list(pixels.shape)} [B, 3, H, W]: a batch of 0 images, nothing to encode")
    check_input_image_size(pixels.shape[-1], pixels.shape[-2], what, MAX_SIZE)
    check_size(pixels.shape[-1], pixels.shape[-2])
    check_finite(pixels, what)

    @torch.inference_mode()
    def encode() -> torch.Tensor:
        return torch.cat([vae.encode(one * 2 - 1).float() for one in pixels.split(1)])
    return run_or_explain_out_of_memory(VAE_ENCODING, vae.device, encode)


def decode_latents(vae: NextStepVAE, latents: torch.Tensor) -> torch.Tensor:
    """VAE-space latents [B, C, h, w] to images [B, 3, 8h, 8w] float32 in about [-1, 1] (not clamped)."""
    channels = vae.config.z_channels
    if not isinstance(latents, torch.Tensor) or latents.ndim != 4 or latents.shape[1] != channels:
        shape = list(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise NextStepError(f"the latents to decode must be [batch, {channels}, height/8, width/8] for this VAE, got "
                            f"{shape}; latents of other model families need their own VAE")
    if latents.numel() == 0:
        raise NextStepError(f"the latents to decode are {list(latents.shape)} [batch, channels, height/8, width/8]: "
                            f"no image to decode (a batch of 0, or a height or width of 0)")
    check_finite(latents, "the latents to decode")

    @torch.inference_mode()
    def decode() -> torch.Tensor:
        return torch.cat([vae.decode(one).float() for one in latents.split(1)])
    return run_or_explain_out_of_memory(VAE_DECODING, vae.device, decode)
