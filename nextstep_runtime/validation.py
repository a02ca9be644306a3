"""The limits of one generation call and the one check of its settings, shared by every entry point.

The CLI, the Python API (`GenerationSettings.validate`) and the nodes' `VALIDATE_INPUTS` all run these
checks, so a value is refused the same way wherever it comes from, before any work: wrong types (a string
from an API prompt, a float where a count is meant), NaN or infinite scales (which would otherwise give an
all-black image reported as success) and values outside the ranges below. ComfyUI's widget limits are
these same constants.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any, Callable

import torch

from .errors import NextStepError
from .sampling.prompt import PROFILES
from .sampling.solvers import CFG_SCHEDULES, SAMPLERS

SIZE_MULTIPLE = 16
"""One image token is 16x16 pixels."""
MAX_SIZE = 2048
"""Largest width or height (16384 tokens at 2048x2048); NextStep was trained around 512x512."""
MAX_BATCH = 64
MAX_STEPS = 200
MIN_CFG, MAX_CFG = 1.0, 30.0
MIN_SHIFT, MAX_SHIFT = 0.01, 20.0
MAX_SEED = 2**64 - 1
"""Seeds are whatever a torch CPU generator accepts: 0 .. 2^64-1."""


def _nearest_sizes(value: int) -> str:
    """The closest valid size, or both neighbours when the value sits exactly between them."""
    lower = max(SIZE_MULTIPLE, value // SIZE_MULTIPLE * SIZE_MULTIPLE)
    upper = lower + SIZE_MULTIPLE if value > lower else lower
    if value - lower == upper - value and lower != upper:
        return f"{lower} or {upper}"
    return str(lower if value - lower < upper - value else upper)


def check_integer(name: str, value: Any, low: int, high: int) -> int:
    """A whole number (not a bool, float or string) within low..high."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise NextStepError(f"{name} {value!r} is not a whole number; use one from {low} to {high}")
    if not low <= value <= high:
        raise NextStepError(f"{name} {value} is outside the allowed range {low} to {high}")
    return int(value)


def check_number(name: str, value: Any, low: float, high: float, hint: str = "") -> float:
    """A finite real number (int or float, not a bool or string) within low..high."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise NextStepError(f"{name} {value!r} is not a number; use one from {low} to {high}{hint}")
    if not math.isfinite(value):
        raise NextStepError(f"{name} {value} is not a finite number; use one from {low} to {high}{hint}")
    if not low <= value <= high:
        raise NextStepError(f"{name} {value} is outside the allowed range {low} to {high}{hint}")
    return float(value)


def check_size_value(name: str, value: Any) -> int:
    """A width or height: a multiple of 16 from 16 to MAX_SIZE."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise NextStepError(f"{name} {value!r} is not a whole number; use a multiple of {SIZE_MULTIPLE} from "
                            f"{SIZE_MULTIPLE} to {MAX_SIZE}")
    if value > MAX_SIZE:
        raise NextStepError(f"{name} {value} is larger than {MAX_SIZE}, the largest size allowed")
    if value <= 0 or value % SIZE_MULTIPLE:
        raise NextStepError(f"{name} {value} is not a positive multiple of {SIZE_MULTIPLE}; "
                            f"try {name} {_nearest_sizes(value)}")
    return int(value)


def check_size(width: Any, height: Any) -> None:
    """Width and height: positive multiples of 16 (one token is 16x16 pixels), at most MAX_SIZE."""
    check_size_value("width", width)
    check_size_value("height", height)


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise NextStepError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")
    return value


def check_flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise NextStepError(f"{name} {value!r} is not a boolean; use true or false (True or False in Python)")
    return value


def check_text(name: str, value: Any, optional: bool = False) -> None:
    """Prompts are strings; the negative and positive additions may also be None (omitted)."""
    if value is None and optional:
        return
    if not isinstance(value, str):
        kind = "a string or None" if optional else "a string"
        raise NextStepError(f"{name} must be {kind}, got {type(value).__name__} {value!r}")


def check_finite(tensor: torch.Tensor, what: str) -> torch.Tensor:
    """Refuse a latent, mask or image holding NaN or infinite values, naming the input: one NaN spreads through
    attention to every token generated after it (a black image reported as success), and a NaN mask value would
    read as "keep". Every tensor a user hands in passes here first."""
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        bad = int(finite.numel() - finite.sum())
        raise NextStepError(f"{what} holds {bad} NaN or infinite value{'s' * (bad != 1)} (of {finite.numel()}); it "
                            f"comes from a broken file or node: make it again from a good image")
    return tensor


def check_context_length(prompt_tokens: int, image_tokens: int, max_positions: int) -> None:
    """The prompt (text, input-image placeholders, size suffix) and the image tokens generated after it must fit
    the model's context (`max_position_embeddings`): positions beyond it were never trained, and the KV cache and
    the prompt's attention grow with them."""
    if prompt_tokens + image_tokens > max_positions:
        raise NextStepError(f"the prompt is {prompt_tokens} tokens and the image {image_tokens} tokens, "
                            f"{prompt_tokens + image_tokens} positions in all, more than the model's context of "
                            f"{max_positions} (max_position_embeddings); shorten the prompt or make the image "
                            f"smaller")


SETTING_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "width": check_size_value,
    "height": check_size_value,
    "batch": lambda label, v: check_integer(label, v, 1, MAX_BATCH),
    "steps": lambda label, v: check_integer(label, v, 1, MAX_STEPS),
    "cfg": lambda label, v: check_number(label, v, MIN_CFG, MAX_CFG, " (1.0 turns guidance off)"),
    "cfg_img": lambda label, v: check_number(label, v, MIN_CFG, MAX_CFG, " (1.0 turns image guidance off)"),
    "cfg_schedule": lambda label, v: check_choice(label, v, CFG_SCHEDULES),
    "timesteps_shift": lambda label, v: check_number(label, v, MIN_SHIFT, MAX_SHIFT),
    "sampler": lambda label, v: check_choice(label, v, SAMPLERS),
    "profile": lambda label, v: check_choice(label, v, PROFILES),
    "use_norm": check_flag,
    "seed": lambda label, v: check_integer(label, v, 0, MAX_SEED),
}
"""One check per GenerationSettings field, called with (the name to show, the value), usable alone: a node
validates the inputs it was given, under its own input names."""


def check_setting(name: str, value: Any, label: str | None = None) -> None:
    """Raise a NextStepError naming the setting (as `label`, default its field name), the value and the
    allowed values, if `value` is not valid for the GenerationSettings field `name`."""
    SETTING_CHECKS[name](label or name, value)
