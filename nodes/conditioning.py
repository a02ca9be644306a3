"""NextStep Text Encode: a prompt, optionally with input images for editing, checked against the model.

NextStep tokenizes all guidance rows of a call together (left padding to the longest row), so the text is
kept as text and tokenized by the sampler; what this node settles is where each input image goes and
whether the images fit the model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from nextstep_runtime import IMAGE_TAG, NextStepError

from .latents import nextstep_samples
from .models import NextStepModelHandle
from .sockets import CATEGORY, CONDITIONING, MODEL

log = logging.getLogger("NextStep")

TRAINED_IMAGE_TOKENS = 1024
"""Input-image tokens NextStep's editing was trained around (512x512 pixels); far more costs time and memory
(a 1024x1024 input is 4096 tokens) without a better edit."""
LARGE_INPUT_FACTOR = 1.5


@dataclass(frozen=True)
class NextStepConditioning:
    """A NEXTSTEP_CONDITIONING: the prompt with one IMAGE_TAG per input image, and those images as
    VAE-space latents [1, C, h, w] in tag order."""

    text: str
    images: tuple[torch.Tensor, ...] = ()


def _split_images(image: dict | None, channels: int) -> list[torch.Tensor]:
    if image is None:
        return []
    samples = nextstep_samples(image, channels, "NextStep Text Encode's image")
    if samples.numel() == 0:
        raise NextStepError(f"the `image` LATENT is {list(samples.shape)} [batch, channels, height/8, width/8]: no "
                            f"image (a batch of 0, or a height or width of 0)")
    return list(samples.split(1))


def _place_tags(text: str, count: int) -> str:
    """Keep the user's `<image>` tags; a single image without one goes at the start, as in the official edits."""
    tags = text.count(IMAGE_TAG)
    if count == 0 and tags:
        raise NextStepError(f"the prompt contains {IMAGE_TAG} but no image is connected; connect a LATENT from "
                            f"NextStep VAE Encode to `image`, or remove {IMAGE_TAG}")
    if count == 1 and tags == 0:
        return IMAGE_TAG + text
    if tags != count:
        raise NextStepError(f"the `image` LATENT holds {count} images but the prompt has {tags} {IMAGE_TAG} tag(s); "
                            f"write one {IMAGE_TAG} where each image belongs")
    return text


def encode_prompt(model: NextStepModelHandle, text: str, image: dict | None = None) -> NextStepConditioning:
    """Check the input images against the model and place them in the prompt."""
    pipeline = model.loaded.pipeline
    images = _split_images(image, pipeline.model.config.latent_channels)
    patch = pipeline.model.config.latent_patch_size
    for latent in images:
        if latent.shape[-2] % patch or latent.shape[-1] % patch:
            raise NextStepError(f"the input image is {latent.shape[-1] * 8}x{latent.shape[-2] * 8} pixels; NextStep "
                                f"needs multiples of {8 * patch}: encode it with NextStep VAE Encode, which crops it")
        tokens = latent.shape[-2] * latent.shape[-1] // patch**2
        if tokens > LARGE_INPUT_FACTOR * TRAINED_IMAGE_TOKENS:
            log.warning("NextStep Text Encode: the input image is %d tokens (%dx%d pixels), over %.1fx the %d "
                        "tokens NextStep was trained with; scale it down first, e.g. ImageScaleToTotalPixels to "
                        "about 0.26 megapixels", tokens, latent.shape[-1] * 8, latent.shape[-2] * 8,
                        LARGE_INPUT_FACTOR, TRAINED_IMAGE_TOKENS)
    return NextStepConditioning(_place_tags(text, len(images)), tuple(images))


def negative_text(negative: NextStepConditioning | None) -> str | None:
    """The negative prompt's text; it cannot carry images (the editing negatives are built from the positive's)."""
    if negative is None:
        return None
    if negative.images or IMAGE_TAG in negative.text:
        raise NextStepError("the negative prompt carries an input image; connect the image to the positive "
                            "NextStep Text Encode only (image guidance builds its negative from it, see cfg_img)")
    return negative.text


class NextStepTextEncode:
    """Encodes a prompt for NextStep Sampler (positive or negative), like CLIPTextEncode."""

    CATEGORY = CATEGORY
    DESCRIPTION = ("A NextStep prompt. Use one for the positive and one for the negative prompt. Connect an image "
                   "(NextStep VAE Encode) to the positive prompt to edit that image.")
    RETURN_TYPES = (CONDITIONING,)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("The prompt, for the positive or negative input of NextStep Sampler.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": (MODEL, {"tooltip": "The NextStep model the prompt is for."}),
                "text": ("STRING", {"multiline": True, "dynamicPrompts": True, "tooltip":
                         "The prompt. For editing, write <image> where the input image belongs (at the start "
                         "if you leave it out), e.g. \"<image>Add a pirate hat to the dog's head.\""}),
            },
            "optional": {
                "image": ("LATENT", {"tooltip": "Editing only: the input image from NextStep VAE Encode. Makes "
                                                "this an editing prompt (NextStep-1-Large-Edit)."}),
            },
        }

    def encode(self, model: NextStepModelHandle, text: str, image: dict | None = None) -> tuple[NextStepConditioning]:
        return (encode_prompt(model, text, image),)
