"""The presets table: the official recommendations, the runtime's defaults, the CLI's --preset and the README."""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path

import pytest
from goldens import TINY_MODEL
from safetensors.torch import load_file

from nextstep_runtime import GenerationSettings
from nextstep_runtime.cli.main import build_parser, main, settings_from_args
from nextstep_runtime.presets import DEFAULT_PRESET, PRESETS, presets_as_json

README = Path(__file__).resolve().parents[1] / "README.md"

OFFICIAL = {
    # the released repos' recommendations, as their inference examples use them
    "NextStep-1.1": dict(steps=28, cfg=7.5, cfg_img=1.0, timesteps_shift=1.0, sampler="sde", profile="official",
                         use_norm=False, width=512, height=512, negative=""),
    "NextStep-1-Large": dict(steps=28, cfg=7.5, cfg_img=1.0, timesteps_shift=1.0, sampler="sde", profile="official",
                             use_norm=True, width=512, height=512, negative=""),
    "NextStep-1-Large-Edit": dict(steps=28, cfg=7.5, cfg_img=2.0, timesteps_shift=3.2, sampler="sde",
                                  profile="official", use_norm=True, width=512, height=512,
                                  negative="Copy original image."),
    "NextStep-1.1-Pretrain-256px": dict(steps=28, cfg=7.5, cfg_img=1.0, timesteps_shift=1.0, sampler="sde",
                                        profile="official", use_norm=False, width=256, height=256, negative=""),
}


def test_table_holds_the_official_recommendations() -> None:
    assert presets_as_json() == OFFICIAL
    assert json.loads(json.dumps(presets_as_json())) == OFFICIAL  # plain JSON values, as the server serves them


def test_generation_defaults_are_the_default_preset() -> None:
    assert DEFAULT_PRESET == "NextStep-1.1"
    assert GenerationSettings() == GenerationSettings.from_preset(PRESETS[DEFAULT_PRESET])
    settings = GenerationSettings.from_preset(PRESETS["NextStep-1-Large-Edit"], steps=3, seed=5)
    assert (settings.steps, settings.seed, settings.timesteps_shift, settings.cfg_img, settings.use_norm) == (
        3, 5, 3.2, 2.0, True)


def test_cli_help_shows_the_default_preset_values(capsys) -> None:
    assert main(["generate", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--steps STEPS solver steps per token (default: 28, or the preset's)" in text
    assert "--cfg CFG text guidance scale (1 = off) (default: 7.5, or the preset's)" in text
    assert "(default: off, or the preset's)" in text  # use_norm
    unwrapped = text.replace(" ", "")
    assert all(name in unwrapped for name in PRESETS)


def _generate_tokens(tmp_path: Path, name: str, *args: str) -> dict:
    tensors = tmp_path / f"{name}.safetensors"
    code = main(["generate", "--model", str(TINY_MODEL), "--device", "cpu", "--dtype", "float32", "--prompt",
                 "a red cube", "--seed", "3", "--out", str(tmp_path / f"{name}.png"), "--save-tensors",
                 str(tensors), *args])
    assert code == 0
    return load_file(tensors)


def _explicit_flags(name: str, **changes) -> list[str]:
    values = {**OFFICIAL[name], **changes}
    flags = ["--steps", str(values["steps"]), "--cfg", str(values["cfg"]), "--cfg-img", str(values["cfg_img"]),
             "--shift", str(values["timesteps_shift"]), "--sampler", values["sampler"], "--profile",
             values["profile"], "--width", str(values["width"]), "--height", str(values["height"]),
             "--negative", values["negative"], "--use-norm" if values["use_norm"] else "--no-use-norm"]
    return flags


def test_preset_equals_its_explicit_flags(tmp_path) -> None:
    """A preset run and a run with the same settings spelled out give the same tokens; the edit preset's
    shift, use_norm and negative prompt all change the result, so a preset that set nothing would fail."""
    small = ["--width", "32", "--height", "32", "--steps", "3"]
    by_preset = _generate_tokens(tmp_path, "preset", "--preset", "NextStep-1-Large-Edit", *small)
    spelled = _generate_tokens(tmp_path, "explicit", *_explicit_flags("NextStep-1-Large-Edit", width=32, height=32,
                                                                       steps=3))
    plain = _generate_tokens(tmp_path, "plain", *small)
    assert by_preset["tokens"].shape == (1, 4, 64)
    assert (by_preset["tokens"] == spelled["tokens"]).all()
    assert not (by_preset["tokens"] == plain["tokens"]).all()


def test_explicit_flags_win_over_the_preset(tmp_path) -> None:
    overridden = _generate_tokens(tmp_path, "overridden", "--preset", "NextStep-1-Large-Edit", "--width", "32",
                                  "--height", "48", "--steps", "2", "--shift", "1.0", "--no-use-norm",
                                  "--negative", "")
    default = _generate_tokens(tmp_path, "default", "--width", "32", "--height", "48", "--steps", "2")
    assert overridden["images"].shape[-2:] == (48, 32)
    # the remaining preset value (cfg_img 2.0) has no effect without an input image
    assert (overridden["tokens"] == default["tokens"]).all()


def _parsed(*args: str):
    return build_parser().parse_args(["generate", "--model", "m", "--prompt", "p", "--out", "o.png", *args])


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_sets_every_value(name: str) -> None:
    settings, negative = settings_from_args(_parsed("--preset", name, "--seed", "9"))
    assert {**asdict(settings), "negative": negative} == {**OFFICIAL[name], "negative": OFFICIAL[name]["negative"],
                                                          "batch": 1, "seed": 9, "cfg_schedule": "constant"}


def test_no_preset_means_the_default_preset() -> None:
    assert settings_from_args(_parsed()) == (GenerationSettings(), "")


def test_unknown_preset_is_one_error_line(capsys) -> None:
    code = main(["generate", "--model", str(TINY_MODEL), "--prompt", "p", "--out", "o.png", "--preset", "SDXL"])
    err = capsys.readouterr().err
    assert code == 2 and "invalid choice: 'SDXL'" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("name", list(PRESETS))
def test_readme_table_matches_the_presets(name: str) -> None:
    """The README's table is the one place the values are written for people; it must agree with the code."""
    section = README.read_text(encoding="utf-8").split("### Recommended settings", 1)[1].split("\n#", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith(f"| {name} |")]
    assert len(rows) == 1, f"README has no (single) recommended-settings row for {name}"
    cells = [cell.strip() for cell in rows[0].strip("|").split("|")]
    p = PRESETS[name]
    assert cells[1].startswith(f"{p.width}x{p.height}")
    assert [float(cells[i]) for i in (3, 4, 5)] == [p.cfg, p.cfg_img, p.timesteps_shift]
    assert int(cells[2]) == p.steps
    assert cells[6] == f"{p.sampler} / {p.profile}"
    assert cells[7] == ("on" if p.use_norm else "off")
    assert re.sub(r"^`|`$", "", cells[8]) == (p.negative or "optional")
