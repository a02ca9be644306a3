"""One sampling call as the memory estimate sees it: its settings, the sizes of its editing input images and, once
the prompt is tokenized, the prompt's length."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..model.tokens import image_size_of
from ..settings import GenerationSettings
from ..validation import check_size

PROMPT_ALLOWANCE = 512
"""Text positions per guidance row assumed when the prompt is not tokenized yet (a long caption, the size
suffix and boi); input images' placeholder tokens come on top."""


@dataclass(frozen=True)
class Job:
    """One sampling call."""

    settings: GenerationSettings = field(default_factory=GenerationSettings)
    input_images: tuple[tuple[int, int], ...] = ()
    """(height, width) in pixels of each editing input image."""
    prompt_tokens: int | None = None
    """Positions of the longest guidance row besides input-image placeholders (text, size suffix, boi);
    None: PROMPT_ALLOWANCE."""

    @classmethod
    def with_latents(cls, settings: GenerationSettings, edit_latents: Sequence[torch.Tensor] = (),
                     prompt_tokens: int | None = None) -> "Job":
        """The job of a call whose editing inputs are these VAE-space latents [1, C, h, w]."""
        return cls(settings, tuple(image_size_of(latent) for latent in edit_latents), prompt_tokens)

    @property
    def text_positions(self) -> int:
        return PROMPT_ALLOWANCE if self.prompt_tokens is None else self.prompt_tokens

    def validate(self) -> None:
        """The settings' own check (the sampler's), and the input images' sizes."""
        self.settings.validate()
        for height, width in self.input_images:
            check_size(width, height)
