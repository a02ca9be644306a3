"""Loaded NextStep models and VAEs as the nodes pass them around, loaded once and shared.

A model or VAE stays loaded as long as any node output holds it (ComfyUI's output cache, a second loader
node naming the same file); the weak caches here hand that same object to every loader asking for the same
files and precision, so nothing is read from disk twice.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nextstep_runtime import (
    FlashAttention,
    ModelFolder,
    NextStepPipeline,
    NextStepVAE,
    Plan,
    load_model,
    load_tokenizer,
    load_vae,
)

from . import host
from .preview import LatentToRGB, channel_view, fit_latent_to_rgb


@dataclass(eq=False)
class LoadedModel:
    """A model folder's network, tokenizer and latent normalisation (no VAE), registered with the host."""

    folder: ModelFolder
    pipeline: NextStepPipeline
    registration: Any
    _to_rgb: LatentToRGB | None = field(default=None, repr=False)

    def preview_colours(self) -> LatentToRGB:
        """Latent -> RGB map for live previews, fitted once on the model folder's own VAE (see preview.py);
        a plain channel view when the folder has no readable VAE. Fitted where VAEs run: well under a second
        on a GPU, a few seconds on a small CPU."""
        if self._to_rgb is None:
            try:
                vae = load_vae(self.folder.vae, torch.float32, host.vae_devices()[0])
                self._to_rgb = fit_latent_to_rgb(vae)
            except Exception as exc:  # a preview must never fail the run (no VAE, out of memory, ...)
                log.warning("NextStep: preview colours unavailable (%s); showing latent channels instead", exc)
                self._to_rgb = channel_view(self.pipeline.model.config.latent_channels)
        return self._to_rgb


@dataclass(frozen=True, eq=False)
class NextStepModelHandle:
    """What a NEXTSTEP_MODEL socket carries: shared weights plus this loader's choices: each range's attention kernel
    (resolved for the placement's devices when loaded) and compile."""

    loaded: LoadedModel
    attention: tuple[FlashAttention | None, ...]
    compile: bool = True


@dataclass(eq=False)
class LoadedVAE:
    """What a NEXTSTEP_VAE socket carries."""

    path: Path
    vae: NextStepVAE
    device: torch.device
    """Where ComfyUI runs it (the VAE waits elsewhere between runs)."""
    registration: Any


log = logging.getLogger("NextStep")

_models: "weakref.WeakValueDictionary[tuple, LoadedModel]" = weakref.WeakValueDictionary()
_vaes: "weakref.WeakValueDictionary[tuple, LoadedVAE]" = weakref.WeakValueDictionary()


def load_nextstep_model(folder: ModelFolder, plan: Plan) -> LoadedModel:
    """The model in `folder` loaded as `plan` says (its weight mode and placement: memory/planner.py), straight onto its
    devices after ComfyUI made room there for the planned weights, reusing a copy that is still loaded."""
    key = (str(folder.path.resolve()), plan.mode, plan.placement)
    loaded = _models.get(key)
    if loaded is None:
        host.make_room({torch.device(share.device): share.weights_bytes for share in plan.devices})
        model = load_model(folder, plan.mode, plan.placement, pin=host.host_memory_pinning())
        model.float32_fits = plan.float32_fits
        pipeline = NextStepPipeline(model, load_tokenizer(folder), folder.vae.normalization,
                                    free_memory=host.free_memory)
        registration = host.register_model(model.parts_by_device(), host.offload_device(), folder.path.name,
                                           in_place=True, on_unload=lambda: host.release_streaming_slots_of(model))
        loaded = _models[key] = LoadedModel(folder, pipeline, registration)
    return loaded


def load_nextstep_vae(path: Path) -> LoadedVAE:
    """The VAE at `path` in the host's VAE precision, reusing a copy that is still loaded."""
    run_device, wait_device = host.vae_devices()
    dtype = host.vae_dtype(run_device)
    key = (str(path.resolve()), dtype)
    loaded = _vaes.get(key)
    if loaded is None:
        vae = load_vae(path, dtype, wait_device)
        registration = host.register_model([(run_device, [vae])], wait_device, f"{path.name} VAE", in_place=False)
        loaded = _vaes[key] = LoadedVAE(path, vae, run_device, registration)
    return loaded
