"""Every golden case reproduced through the CLI and through the Python API, in float32 on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_runs import run_cli
from goldens import TINY_MODEL, GoldenCase, assert_matches_golden, golden_cases, settings_for
from safetensors.torch import load_file

from nextstep_runtime import images_to_unit, load_rgb, to_uint8

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent





@pytest.mark.parametrize("case", golden_cases(), ids=lambda case: case.name)
def test_cli_reproduces_golden(case: GoldenCase, tmp_path: Path, sdpa_layout: str) -> None:
    tensors = tmp_path / "out.safetensors"
    result = run_cli("--model", str(TINY_MODEL), "--device", "cpu", "--dtype", "float32",
                     "--out", str(tmp_path / "out.png"), "--save-tensors", str(tensors), *case.cli_args(),
                     sdpa_layout=sdpa_layout)
    assert result.returncode == 0, result.stderr
    saved = load_file(tensors)
    assert_matches_golden(case, {key: saved[key] for key in ("tokens", "latents", "images", "images_uint8")})
    batch = case.params["num_images_per_caption"]
    pngs = [tmp_path / "out.png"] if batch == 1 else [tmp_path / f"out_{i}.png" for i in range(batch)]
    for index, png in enumerate(pngs):
        pixels = to_uint8(load_rgb(png))[0]
        assert (pixels.int() - case.expected["images_uint8"][index].int()).abs().max() <= 1, png.name


@pytest.mark.parametrize("case", golden_cases(), ids=lambda case: case.name)
def test_api_reproduces_golden(case: GoldenCase, tiny_pipeline, sdpa_layout: str) -> None:
    p = case.params
    edit_images = [load_rgb(case.image_path)] if case.image_path else []
    progress = []
    result = tiny_pipeline.generate(p["caption"], settings_for(case), negative=p["negative_prompt"],
                                    positive=p["positive_prompt"], edit_images=edit_images,
                                    callback=lambda done, total, tokens: progress.append((done, total, tokens.shape[1])))
    assert_matches_golden(case, {"tokens": result.tokens, "latents": result.latents, "images": result.images,
                                 "images_uint8": to_uint8(images_to_unit(result.images))})
    total = result.tokens.shape[1]
    assert progress == [(n, total, n) for n in range(1, total + 1)]


@pytest.mark.parametrize("case", golden_cases(), ids=lambda case: case.name)
def test_prompt_rows_match_golden_tokenization(case: GoldenCase, tiny_pipeline) -> None:
    """The text rows before the size suffix are exactly the official tokenization (ids and padding)."""
    from nextstep_runtime.sampling.prompt import build_rows

    p = case.params
    grids = [(load_rgb(case.image_path).shape[-2] // 16, load_rgb(case.image_path).shape[-1] // 16)] if case.image_path else []
    rows = build_rows(tiny_pipeline.tokenizer, p["caption"], p["negative_prompt"], p["positive_prompt"], grids,
                      (p["hw"][0] // 16, p["hw"][1] // 16), p["num_images_per_caption"], p["cfg"], p["cfg_img"],
                      p["profile"], tiny_pipeline.model.config.boi)
    expected = case.expected
    assert rows.input_ids[:, : rows.text_length].tolist() == expected["caption_input_ids"].tolist()
    assert rows.attention_mask[:, : rows.text_length].tolist() == expected["caption_attention_mask"].tolist()


def test_official_profile_with_a_bos_tokenizer_matches_the_official_rows(model_copy) -> None:
    """With a tokenizer that defines BOS (none of the released ones does), the official pipeline prefixes it to
    every row and drops the size suffix's first token; the ids below are the official pipeline's own rows."""
    import json

    from nextstep_runtime import load_tokenizer
    from nextstep_runtime.sampling.prompt import build_rows

    config_path = model_copy / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["bos_token"] = "<|im_start|>"
    config_path.write_text(json.dumps(config))
    tokenizer = load_tokenizer(model_copy)
    official = build_rows(tokenizer, "a fox", "blurry", None, [], (2, 3), 1, 7.5, 1.0, "official", 517)
    first_real = official.attention_mask.argmax(dim=1)
    assert official.input_ids.gather(1, first_real[:, None]).flatten().tolist() == [513, 513]  # BOS on both rows
    assert official.input_ids[0, official.text_length:].tolist() == [17, 9, 18, 517]
    hf = build_rows(tokenizer, "a fox", "blurry", None, [], (2, 3), 1, 7.5, 1.0, "hf", 517)
    assert 513 not in hf.input_ids.tolist()[0]
    assert hf.input_ids[0, hf.text_length:].tolist() == [516, 17, 9, 18, 517]
