"""The recommended settings of each released model, in one table.

Everything else (GenerationSettings' defaults, the CLI's `--preset`, the ComfyUI extension through the
server's presets route, the README) reads these values from here instead of restating them, so a
correction lands everywhere at once. Values follow the official inference examples of each release.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any


@dataclass(frozen=True)
class Preset:
    """A model's recommended sampling settings, image size and negative prompt."""

    steps: int
    cfg: float
    cfg_img: float
    timesteps_shift: float
    sampler: str
    profile: str
    use_norm: bool
    width: int
    height: int
    negative: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_TEXT_TO_IMAGE = Preset(steps=28, cfg=7.5, cfg_img=1.0, timesteps_shift=1.0, sampler="sde", profile="official",
                        use_norm=False, width=512, height=512, negative="")

DEFAULT_PRESET = "NextStep-1.1"
"""The model whose settings are the runtime's defaults (GenerationSettings, the CLI, the nodes)."""

PRESETS: dict[str, Preset] = {
    "NextStep-1.1": _TEXT_TO_IMAGE,
    "NextStep-1-Large": replace(_TEXT_TO_IMAGE, use_norm=True),
    "NextStep-1-Large-Edit": replace(_TEXT_TO_IMAGE, cfg_img=2.0, timesteps_shift=3.2, use_norm=True,
                                     negative="Copy original image."),
    "NextStep-1.1-Pretrain-256px": replace(_TEXT_TO_IMAGE, width=256, height=256),
}


def presets_as_json() -> dict[str, dict[str, Any]]:
    """The table as plain JSON values, keyed by model name (what the ComfyUI server route serves)."""
    return {name: preset.to_dict() for name, preset in PRESETS.items()}
