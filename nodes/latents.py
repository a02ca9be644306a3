"""Which LATENTs are NextStep's. NextStep's LATENT is its own VAE's space (16 channels, 1/8 of the image size); a
LATENT from another model's VAE or sampler wired into a NextStep node is refused where it can be told apart, with
the route that works: through IMAGE.

What can tell them apart: ComfyUI's LATENT dicts carry "samples" and at most "noise_mask" and "batch_index" (image
latents) or "type" (ComfyUI 0.8 marks its audio latents "type": "audio"); none names the model. So the checks are a
"type", the tensor's rank (video latents are [batch, channels, frames, height, width]) and its channel count. SD3,
Flux and other 16-channel image latents have NextStep's shape and no mark: they pass, and the docs and templates show
the IMAGE route. The pack adds no mark to its own LATENTs: Save Latent and Load Latent keep only the tensor, so a
mark could never be required, and another model's KSampler copies it from a NextStep LATENT onto its own output, so
it would prove nothing either.
"""

from __future__ import annotations

import torch

from nextstep_runtime import NextStepError

IMAGE_ROUTE = ("decode it to an IMAGE with its own model's VAE Decode, then encode that with NextStep VAE Encode "
               "(docs/graphs.md)")
CHANNEL_FAMILIES = {4: "SD 1.x, SD 2.x and SDXL latents have 4"}


def nextstep_samples(latent: object, channels: int, where: str) -> torch.Tensor:
    """The samples tensor of `latent`, the LATENT given to `where`; refused, naming the IMAGE route, when it is
    another model's (`channels`: the channels of the NextStep VAE or model it goes to)."""
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor):
        raise NextStepError(f"{where} must be a LATENT (a dict with a 'samples' tensor) from NextStep VAE Encode or "
                            f"NextStep Sampler, got {type(samples if isinstance(latent, dict) else latent).__name__}")
    shape = list(samples.shape)
    if latent.get("type") is not None:
        reason = f"a LATENT of type {latent['type']!r} {shape}, not an image latent"
    elif samples.ndim == 5:
        reason = f"a video LATENT {shape} [batch, channels, frames, height, width]"
    elif samples.ndim != 4:
        reason = f"a LATENT of {samples.ndim} dimensions {shape}"
    elif samples.shape[1] != channels:
        family = CHANNEL_FAMILIES.get(samples.shape[1])
        reason = f"a LATENT of {samples.shape[1]} channels {shape}" + (f" ({family})" if family else "")
    else:
        return samples
    raise NextStepError(f"{where} got {reason}: a latent of another model family, in another VAE's space; NextStep "
                        f"takes [batch, {channels}, height/8, width/8] latents of its own VAE. To bring another "
                        f"model's output in, {IMAGE_ROUTE}")
