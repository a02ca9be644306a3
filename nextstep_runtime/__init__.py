"""NextStep inference in plain PyTorch, independent of ComfyUI (see pipeline.NextStepPipeline)."""

from .errors import NextStepError
from .pipeline import GenerationResult, GenerationSettings, NextStepPipeline, images_to_unit

__all__ = ["GenerationResult", "GenerationSettings", "NextStepError", "NextStepPipeline", "images_to_unit"]
