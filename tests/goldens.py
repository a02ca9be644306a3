"""Discovery and comparison of the golden cases in tests/fixtures/golden (shared by runtime and node tests)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from nextstep_runtime import GenerationSettings

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN_DIR = FIXTURES / "golden"
TINY_MODEL = FIXTURES / "tiny-nextstep"
TINY_VAE_FILE = FIXTURES / "tiny-nextstep-vae.safetensors"
FLOAT_TOLERANCE = 1e-3
UINT8_TOLERANCE = 1


@dataclass(frozen=True)
class GoldenCase:
    name: str
    params: dict[str, Any]

    @property
    def expected(self) -> dict[str, torch.Tensor]:
        return load_file(GOLDEN_DIR / f"{self.name}.safetensors")

    @property
    def image_path(self) -> Path | None:
        return FIXTURES / self.params["image"] if self.params.get("image") else None

    def cli_args(self) -> list[str]:
        """The `generate` arguments that reproduce this case."""
        p = self.params
        args = ["--prompt", p["caption"], "--height", str(p["hw"][0]), "--width", str(p["hw"][1]),
                "--batch", str(p["num_images_per_caption"]), "--steps", str(p["num_sampling_steps"]),
                "--cfg", str(p["cfg"]), "--cfg-img", str(p["cfg_img"]), "--cfg-schedule", p["cfg_schedule"],
                "--shift", str(p["timesteps_shift"]), "--sampler", p["sampler"], "--profile", p["profile"],
                "--seed", str(p["seed"])]
        if p.get("positive_prompt") is not None:
            args += ["--positive", p["positive_prompt"]]
        if p.get("negative_prompt") is not None:
            args += ["--negative", p["negative_prompt"]]
        if p.get("use_norm"):
            args.append("--use-norm")
        if self.image_path:
            args += ["--image", str(self.image_path)]
        return args


def settings_for(case: GoldenCase) -> GenerationSettings:
    """The Python API's settings of a case."""
    p = case.params
    return GenerationSettings(
        width=p["hw"][1], height=p["hw"][0], batch=p["num_images_per_caption"], steps=p["num_sampling_steps"],
        cfg=p["cfg"], cfg_img=p["cfg_img"], cfg_schedule=p["cfg_schedule"], timesteps_shift=p["timesteps_shift"],
        sampler=p["sampler"], profile=p["profile"], use_norm=p["use_norm"], seed=p["seed"])


def golden_cases() -> list[GoldenCase]:
    """Every case in the golden folder; new cases are picked up without code changes."""
    return [GoldenCase(path.stem, json.loads(path.read_text())) for path in sorted(GOLDEN_DIR.glob("*.json"))]


def assert_matches_golden(case: GoldenCase, actual: dict[str, torch.Tensor]) -> None:
    """tokens, latents and images within 1e-3; uint8 images within 1 (whichever keys are given)."""
    expected = case.expected
    for key, value in actual.items():
        want = expected[key]
        assert tuple(value.shape) == tuple(want.shape), f"{case.name}: {key} shape {tuple(value.shape)} != {tuple(want.shape)}"
        if key == "images_uint8":
            diff = (value.to(torch.int16) - want.to(torch.int16)).abs().max().item()
            assert diff <= UINT8_TOLERANCE, f"{case.name}: images_uint8 differ by {diff}"
        else:
            diff = (value.float().cpu() - want.float()).abs().max().item()
            assert diff <= FLOAT_TOLERANCE, f"{case.name}: {key} differ by {diff:.2e}"
