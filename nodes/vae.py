"""NextStep VAE Decode (LATENT -> IMAGE) and NextStep VAE Encode (IMAGE -> LATENT, for editing)."""

from __future__ import annotations

import logging

import torch

from nextstep_runtime import (
    center_crop_to_multiple,
    check_input_image_size,
    decode_latents,
    encode_images,
    images_to_unit,
    vae_decode_bytes,
    vae_encode_bytes,
)
from nextstep_runtime.validation import MAX_SIZE, SIZE_MULTIPLE

from . import host
from .latents import nextstep_samples
from .models import LoadedVAE
from .sockets import CATEGORY, VAE

log = logging.getLogger("NextStep")


class NextStepVAEDecode:
    """Decodes NextStep latents into images."""

    CATEGORY = CATEGORY
    DESCRIPTION = "Turns the LATENT of NextStep Sampler into images."
    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The decoded images.",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "vae": (VAE, {"tooltip": "The NextStep VAE (NextStep VAE Loader)."}),
                "samples": ("LATENT", {"tooltip": "Latents from NextStep Sampler (16 channels, 1/8 of the image "
                                                  "size); another model's latents need that model's VAE Decode."}),
            },
        }

    def decode(self, vae: LoadedVAE, samples: dict) -> tuple[torch.Tensor]:
        latent = nextstep_samples(samples, vae.vae.config.z_channels, "NextStep VAE Decode")
        host.prepare_model(vae.registration,
                           {vae.device: vae_decode_bytes(latent.shape[2], latent.shape[3], vae.vae.dtype)})
        images = images_to_unit(decode_latents(vae.vae, latent))
        return (images.movedim(1, -1).to(host.intermediate_device(), torch.float32),)


class NextStepVAEEncode:
    """Encodes images into NextStep latents, the input of an editing prompt."""

    CATEGORY = CATEGORY
    DESCRIPTION = "Turns an image into a NextStep LATENT for the image input of NextStep Text Encode (editing)."
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The image as VAE-space latents, for the `image` input of NextStep Text Encode.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "vae": (VAE, {"tooltip": "The NextStep VAE (NextStep VAE Loader)."}),
                "pixels": ("IMAGE", {"tooltip": "The image to edit. Sides that are not multiples of 16 are "
                                                "centre-cropped to the nearest multiple below."}),
            },
        }

    def encode(self, vae: LoadedVAE, pixels: torch.Tensor) -> tuple[dict]:
        images = pixels[..., :3].movedim(-1, 1)
        check_input_image_size(images.shape[-1], images.shape[-2], "the image to encode", MAX_SIZE)
        cropped = center_crop_to_multiple(images, SIZE_MULTIPLE)
        if cropped.shape != images.shape:
            log.info("NextStep VAE Encode: centre-cropped %dx%d to %dx%d", images.shape[-1], images.shape[-2],
                     cropped.shape[-1], cropped.shape[-2])
        host.prepare_model(vae.registration,
                           {vae.device: vae_encode_bytes(cropped.shape[2], cropped.shape[3], vae.vae.dtype)})
        latents = encode_images(vae.vae, cropped, "the image to encode")
        return ({"samples": latents.to(host.intermediate_device(), torch.float32)},)
