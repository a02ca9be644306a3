"""One VAE on disk: where its weights and its config are, by the one rule that loading, the latent normalisation
and the memory planner all follow.

A VAE is a folder (`checkpoint.pt` with `config.json`, as released; or a folder holding one `.safetensors` file)
or a single `.safetensors` file whose metadata key `nextstep_vae_config` holds its config. Where no config is
found, the released tokenizer's values apply, and every message about the VAE says so.
"""

from __future__ import annotations

import math
import pickle
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator

import torch

from ..config import RELEASED_VAE_CONFIG, VAEConfig, parse_json, read_json
from ..errors import NextStepError
from ..model.tokens import LatentNormalization
from ..model.vae import vae_parameter_count
from ..regular_files import require_regular
from .checkpoint import TensorHeader, TensorSource, iter_safetensors, read_header

VAE_CONFIG_METADATA_KEY = "nextstep_vae_config"
CHECKPOINT_NAME = "checkpoint.pt"
CONFIG_NAME = "config.json"
VAE_PREFIXES = ("encoder.", "decoder.")
"""The tensors a VAE checkpoint holds for the network (training checkpoints may hold more)."""


@dataclass(frozen=True)
class VAEFiles:
    """Where one VAE's weights and config are."""

    location: Path
    """The folder or file as given."""
    weights: Path | None
    """checkpoint.pt or the .safetensors file; None when the VAE is not on disk (yet)."""
    config_path: Path | None
    """config.json beside a checkpoint.pt; None for a .safetensors file (config in its metadata) or no config."""

    @classmethod
    def locate(cls, location: str | Path) -> "VAEFiles":
        location = Path(location)
        if location.is_dir():
            config = location / CONFIG_NAME
            config_path = config if config.is_file() else None
            if (location / CHECKPOINT_NAME).exists():  # read only if a regular file (_load_state_dict)
                return cls(location, location / CHECKPOINT_NAME, config_path)
            safetensors = sorted(location.glob("*.safetensors"))
            if len(safetensors) == 1:
                return cls(location, safetensors[0], None)
            return cls(location, None, config_path)
        if location.exists() and location.suffix == ".safetensors":  # read only if a regular file (read_header)
            return cls(location, location, None)
        if location.exists():
            raise NextStepError(f"VAE {location} must be a folder with {CHECKPOINT_NAME} or a .safetensors file")
        return cls(location, None, None)

    @cached_property
    def _config_and_source(self) -> tuple[VAEConfig, str, bool]:
        """(config, where it comes from, whether the released values were assumed for want of a config)."""
        if self.config_path is not None:
            return VAEConfig.from_dict(read_json(self.config_path), str(self.config_path)), str(self.config_path), False
        is_safetensors = self.weights is not None and self.weights.suffix == ".safetensors"
        raw = self._metadata_config() if is_safetensors else None
        if raw is not None:
            return VAEConfig.from_dict(raw, str(self.weights)), str(self.weights), False
        missing = (f"{self.weights} holds no {VAE_CONFIG_METADATA_KEY!r} metadata" if is_safetensors
                   else f"{self.location / CONFIG_NAME if self.location.is_dir() else self.location} is missing")
        values = ", ".join(f"{key} {value}" for key, value in RELEASED_VAE_CONFIG.items())
        source = f"{missing}, so the released VAE's config was assumed: {values}"
        return VAEConfig.from_dict(dict(RELEASED_VAE_CONFIG), source), source, True

    @property
    def config(self) -> VAEConfig:
        return self._config_and_source[0]

    @property
    def config_source(self) -> str:
        """Where `config` comes from, for messages: a file, or the released defaults and why."""
        return self._config_and_source[1]

    @property
    def assumed_config(self) -> str | None:
        """Where no config was found: which one is missing and the released values assumed instead (for the
        planner's notes); None when the VAE has a config of its own."""
        return self.config_source if self._config_and_source[2] else None

    @property
    def normalization(self) -> LatentNormalization:
        """The latent scale/shift the model was trained with: from this VAE's config."""
        return LatentNormalization(self.config.scaling_factor, self.config.shift_factor)

    @cached_property
    def _header(self) -> tuple[list[TensorHeader], dict[str, str]]:
        """The .safetensors weights' header (tensors, metadata), read once for the config and the parameter count."""
        return read_header(self.weights)

    def _metadata_config(self) -> dict[str, Any] | None:
        raw = self._header[1].get(VAE_CONFIG_METADATA_KEY)
        if not raw:
            return None
        config = parse_json(raw, f"{self.weights}: metadata {VAE_CONFIG_METADATA_KEY!r}")
        if not isinstance(config, dict):
            raise NextStepError(f"{self.weights}: metadata {VAE_CONFIG_METADATA_KEY!r} must hold a JSON object")
        return config

    def require_weights(self) -> Path:
        """The weights file, or an error saying what is missing."""
        if self.weights is not None:
            return self.weights
        if self.location.is_dir():
            raise NextStepError(f"VAE folder {self.location} has no {CHECKPOINT_NAME}")
        raise NextStepError(f"VAE {self.location} not found; download the model's vae/ folder or give the path of a "
                            f"VAE")

    def tensors(self) -> Iterator[TensorSource]:
        """The network's tensors, read one at a time (a .pt checkpoint: restricted unpickling, memory-mapped)."""
        weights = self.require_weights()
        if weights.suffix == ".safetensors":
            items = iter_safetensors([weights])
        else:
            items = _state_dict_tensors(weights)
        return (item for item in items if item[1].startswith(VAE_PREFIXES))

    def parameter_count(self) -> int:
        """Parameters of the network, without reading weights: a .safetensors header is counted; a .pt checkpoint
        has no readable header, so its count comes from the config."""
        if self.weights is not None and self.weights.suffix == ".safetensors":
            return sum(math.prod(header.shape) for header in self._header[0]
                       if header.key.startswith(VAE_PREFIXES))
        return vae_parameter_count(self.config)


def _load_state_dict(checkpoint: Path) -> Any:
    """torch.load restricted to plain tensors (weights_only); memory-mapped when the format allows. A file that needs
    more than that to unpickle (code, arbitrary objects) is refused outright: loading it fully would run whatever
    it holds."""
    require_regular(checkpoint)
    try:
        try:
            return torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            return torch.load(checkpoint, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise NextStepError(f"{checkpoint} holds more than tensors; refused") from None
    except Exception as exc:  # truncated zips and bad headers raise several types
        raise NextStepError(f"cannot read {checkpoint} as a plain state dict ({exc}); it may be corrupt: download "
                            f"it again") from None


def _state_dict_tensors(checkpoint: Path) -> Iterator[TensorSource]:
    state = _load_state_dict(checkpoint)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise NextStepError(f"{checkpoint} does not hold a state dict")
    for key in list(state):
        yield checkpoint, key, (lambda key=key: state.pop(key))
