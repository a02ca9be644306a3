"""Loading model folders in every layout the releases and re-exports use; each must reproduce a golden
(or, for weights stored in bf16, exactly the bf16-rounded weights)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from goldens import TINY_MODEL, TINY_VAE_FILE, assert_matches_golden, golden_cases, settings_for
from model_folders import load_on, rewrite_weights, use_1_1_naming

from nextstep_runtime import ModelConfig, NextStepPipeline, load_vae

CASE = next(case for case in golden_cases() if case.name == "official_t2i_sde")


def generate_case(pipe: NextStepPipeline) -> dict[str, torch.Tensor]:
    p = CASE.params
    result = pipe.generate(p["caption"], settings_for(CASE), negative=p["negative_prompt"], positive=p["positive_prompt"])
    return {"tokens": result.tokens, "latents": result.latents, "images": result.images}


def test_sharded_checkpoint_reproduces_golden(model_copy: Path) -> None:
    rewrite_weights(model_copy, shards=3)
    assert (model_copy / "model.safetensors.index.json").exists()
    assert_matches_golden(CASE, generate_case(NextStepPipeline.from_pretrained(model_copy, device="cpu", dtype="float32")))


def test_prefixed_keys_and_1_1_naming_reproduce_golden(model_copy: Path) -> None:
    rewrite_weights(model_copy, shards=2, prefix="model.")
    use_1_1_naming(model_copy)
    config = json.loads((model_copy / "config.json").read_text())
    assert "genloss_width" in config and "fm_head_dim" not in config
    assert_matches_golden(CASE, generate_case(NextStepPipeline.from_pretrained(model_copy, device="cpu", dtype="float32")))


def test_both_namings_give_the_same_config(model_copy: Path) -> None:
    before = ModelConfig.from_dict(json.loads((model_copy / "config.json").read_text()))
    use_1_1_naming(model_copy)
    after = ModelConfig.from_dict(json.loads((model_copy / "config.json").read_text()))
    assert before == after
    assert (after.head_width, after.head_depth, after.latent_channels, after.latent_patch_size) == (48, 2, 16, 2)


def test_bf16_on_disk_loads_into_float32_exactly(model_copy: Path) -> None:
    rewrite_weights(model_copy, shards=2, dtype=torch.bfloat16)
    model = load_on(model_copy)
    reference = load_on(TINY_MODEL)
    for (name, loaded), (_, original) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert loaded.dtype == torch.float32
        assert torch.equal(loaded, original.to(torch.bfloat16).float()), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float32_checkpoint_converts_to_half_dtypes(dtype: torch.dtype) -> None:
    model = load_on(TINY_MODEL, dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert not any(p.is_meta for p in model.parameters())


def test_single_file_vae_equals_folder_vae() -> None:
    from_file = load_vae(TINY_VAE_FILE, torch.float32, "cpu")
    from_folder = load_vae(TINY_MODEL / "vae", torch.float32, "cpu")
    assert from_file.config == from_folder.config
    assert from_file.config.scaling_factor == pytest.approx(0.3611)
    for (name, a), (_, b) in zip(from_file.state_dict().items(), from_folder.state_dict().items()):
        assert torch.equal(a, b), name


def test_single_file_vae_reproduces_golden() -> None:
    pipe = NextStepPipeline.from_pretrained(TINY_MODEL, vae=TINY_VAE_FILE, device="cpu", dtype="float32")
    assert_matches_golden(CASE, generate_case(pipe))


def test_vae_path_is_relative_to_the_model_folder(model_copy: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # a relative vae_name_or_path must not depend on the working directory
    pipe = NextStepPipeline.from_pretrained(model_copy, device="cpu", dtype="float32")
    assert pipe.vae is not None and pipe.normalization.scale == pytest.approx(0.3611)


def test_explicit_vae_file_for_a_model_folder_without_vae(model_copy: Path) -> None:
    """The latent scale/shift travel with the VAE: a folder without vae/ plus a single-file VAE still matches."""
    import shutil

    shutil.rmtree(model_copy / "vae")
    pipe = NextStepPipeline.from_pretrained(model_copy, vae=TINY_VAE_FILE, device="cpu", dtype="float32")
    assert_matches_golden(CASE, generate_case(pipe))


def test_model_folder_without_its_vae_names_the_missing_path(model_copy: Path) -> None:
    import shutil

    from nextstep_runtime import NextStepError

    shutil.rmtree(model_copy / "vae")
    with pytest.raises(NextStepError, match="VAE .*vae not found"):
        NextStepPipeline.from_pretrained(model_copy, device="cpu", dtype="float32")


@pytest.mark.parametrize("name", ["stepfun-ai/NextStep-1-f8ch16-Tokenizer", "/elsewhere/vae"])
def test_vae_name_that_is_not_on_disk_falls_back_to_the_bundled_vae(model_copy: Path, name: str) -> None:
    from model_folders import edit_config

    from nextstep_runtime import ModelFolder

    edit_config(model_copy, vae_name_or_path=name)
    assert ModelFolder.open(model_copy).vae.location == model_copy / "vae"
