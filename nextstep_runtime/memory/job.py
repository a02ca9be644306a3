"""One sampling call as the memory estimate sees it: its settings, the sizes of its editing input images and, once
the prompt is tokenized, the prompt's length."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..config import MAX_CONTEXT, ModelConfig
from ..model.tokens import image_size_of, token_grid
from ..settings import GenerationSettings
from ..validation import check_context_length, check_integer, check_size

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

    def validate(self, config: ModelConfig | None = None) -> None:
        """The settings' own check (the sampler's), the input images' sizes and the prompt's length; with the
        model's `config`, that prompt and image fit its context, as the sampler checks once it has tokenized."""
        self.settings.validate()
        for height, width in self.input_images:
            check_size(width, height)
        if self.prompt_tokens is not None:
            check_integer("prompt_tokens", self.prompt_tokens, 1, MAX_CONTEXT)
        if config is not None:
            check_context_length(self.prompt_length(config),
                                 image_tokens(config, self.settings.height, self.settings.width), config.max_positions)

    def prompt_length(self, config: ModelConfig) -> int:
        """Positions of the longest guidance row: its text, then each input image's placeholder tokens once."""
        return self.text_positions + sum(image_tokens(config, h, w) for h, w in self.input_images)


def image_tokens(config: ModelConfig, height: int, width: int) -> int:
    """Tokens of an image of that many pixels."""
    rows, columns = token_grid(config, height, width)
    return rows * columns
