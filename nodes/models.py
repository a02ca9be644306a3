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

from nextstep_runtime import ModelFolder, NextStepPipeline, NextStepVAE, Placement, load_model, load_tokenizer, load_vae

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
    """What a NEXTSTEP_MODEL socket carries: shared weights plus this loader's attention and compile choices."""

    loaded: LoadedModel
    attention: str
    compile: bool = True


@dataclass(eq=False)
class LoadedVAE:
    """What a NEXTSTEP_VAE socket carries."""

    path: Path
    vae: NextStepVAE
    registration: Any


log = logging.getLogger("NextStep")

_models: "weakref.WeakValueDictionary[tuple, LoadedModel]" = weakref.WeakValueDictionary()
_vaes: "weakref.WeakValueDictionary[tuple, LoadedVAE]" = weakref.WeakValueDictionary()


def load_nextstep_model(folder: ModelFolder, dtype: torch.dtype, fp8: bool = False,
                        resident_layers: int | None = None, int4: bool = False,
                        placement: Placement | None = None) -> LoadedModel:
    """The model in `folder` at `dtype` (decoder linears in fp8 or int4 if asked; only `resident_layers`
    decoder layers on the GPU if given), on ComfyUI's device or as `placement` says (one chosen device, or the
    layers split over several), reusing a copy that is still loaded."""
    key = (str(folder.path.resolve()), dtype, fp8, resident_layers, int4, placement)
    loaded = _models.get(key)
    if loaded is None:
        if placement is not None:  # a chosen device, or a split: loaded straight onto its devices
            device = placement.last
        elif resident_layers is None and not int4:
            device = host.initial_device(folder.parameter_count(), torch.float8_e4m3fn if fp8 else dtype)
        else:  # streaming is set up, and int4 weights are packed, for the run device at load time
            device = host.load_device()
        model = load_model(folder, dtype, device, fp8=fp8, resident_layers=resident_layers, int4=int4,
                           pin=host.host_memory_pinning(), placement=placement)
        pipeline = NextStepPipeline(model, load_tokenizer(folder), folder.vae.normalization,
                                    free_memory=host.free_memory)
        if placement is not None and placement.is_split:
            registration = host.register_split_model(model, host.offload_device())
        else:
            run_device = host.load_device() if placement is None else placement.last
            registration = host.register_model(model, device, run_device, host.offload_device())
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
        loaded = _vaes[key] = LoadedVAE(path, vae, host.register_model(vae, wait_device, run_device, wait_device))
    return loaded
