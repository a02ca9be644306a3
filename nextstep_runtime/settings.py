"""The settings of one generation call, with their defaults (the official NextStep-1.1 recommendation) and the
one check every entry point runs on them (validation.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .presets import DEFAULT_PRESET, PRESETS, Preset
from .validation import SETTING_CHECKS

_RECOMMENDED = PRESETS[DEFAULT_PRESET]
PRESET_SETTINGS = ("width", "height", "steps", "cfg", "cfg_img", "timesteps_shift", "sampler", "profile", "use_norm")


@dataclass
class GenerationSettings:
    """One call's settings; the defaults are the official NextStep-1.1 recommendation (presets.py)."""

    width: int = _RECOMMENDED.width
    height: int = _RECOMMENDED.height
    batch: int = 1
    steps: int = _RECOMMENDED.steps
    cfg: float = _RECOMMENDED.cfg
    cfg_img: float = _RECOMMENDED.cfg_img
    cfg_schedule: str = "constant"
    timesteps_shift: float = _RECOMMENDED.timesteps_shift
    sampler: str = _RECOMMENDED.sampler
    profile: str = _RECOMMENDED.profile
    use_norm: bool = _RECOMMENDED.use_norm
    seed: int = 0

    @classmethod
    def from_preset(cls, preset: Preset, **overrides: Any) -> "GenerationSettings":
        """A preset's sampling settings (its size included; the negative prompt is not a setting), with
        `overrides` (any field) winning."""
        fields = {name: getattr(preset, name) for name in PRESET_SETTINGS}
        return cls(**{**fields, **overrides})

    def validate(self) -> None:
        """Every setting's type and range (see validation.py), before any work."""
        for name, check in SETTING_CHECKS.items():
            check(name, getattr(self, name))
