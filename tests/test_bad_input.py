"""Every kind of bad input ends in one readable `error:` line and exit code 2, before any output is written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_runs import cli_error, folder_error
from goldens import FIXTURES, TINY_MODEL, TINY_VAE_FILE
from model_folders import edit_config, rewrite_weights
from safetensors.torch import load_file, save_file

from nextstep_runtime import NextStepVAE, VAEConfig
from nextstep_runtime.cli.main import main

EDIT_IMAGE = str(FIXTURES / "edit_input_64.png")





@pytest.mark.parametrize("flag,value,nearest", [
    ("--width", "100", "96"), ("--height", "40", "32 or 48"), ("--height", "60", "64"), ("--width", "0", "16")])
def test_size_not_multiple_of_16(capsys, tmp_path, flag, value, nearest) -> None:
    message = cli_error(capsys, tmp_path, "--prompt", "x", flag, value)
    label = flag.lstrip("-")
    assert f"{label} {value} is not a positive multiple of 16" in message and f"try {label} {nearest}" in message


def test_model_folder_without_config(capsys, tmp_path, model_copy) -> None:
    (model_copy / "config.json").unlink()
    assert "has no config.json" in cli_error(capsys, tmp_path, "--prompt", "x", model=model_copy)


def test_model_folder_without_weights(capsys, tmp_path, model_copy) -> None:
    (model_copy / "model.safetensors").unlink()
    assert "no weights in" in cli_error(capsys, tmp_path, "--prompt", "x", model=model_copy)


def test_missing_model_folder(capsys, tmp_path) -> None:
    assert "does not exist" in cli_error(capsys, tmp_path, "--prompt", "x", model=tmp_path / "nope")


def test_shard_named_by_index_but_missing(capsys, tmp_path, model_copy) -> None:
    rewrite_weights(model_copy, shards=3)
    (model_copy / "model-00002-of-00003.safetensors").unlink()
    message = cli_error(capsys, tmp_path, "--prompt", "x", model=model_copy)
    assert "shard model-00002-of-00003.safetensors named by model.safetensors.index.json is missing" in message


@pytest.mark.parametrize("outside", ["../other/model-00002-of-00003.safetensors", "{other}/model-00002-of-00003.safetensors",
                                     "shards/../../other/model-00002-of-00003.safetensors",
                                     "..\\other\\model-00002-of-00003.safetensors", "C:\\models\\x.safetensors", "", 7])
@pytest.mark.parametrize("command", ["generate", "plan", "convert"])
def test_shard_index_naming_a_file_outside_the_folder_is_refused(capsys, tmp_path, model_copy, outside,
                                                                  command) -> None:
    """A real shard lies there (a copy of the model beside it), so reading it would succeed: it must not be read."""
    rewrite_weights(model_copy, shards=3)
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(model_copy / "model-00002-of-00003.safetensors", other)
    index = model_copy / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    name = outside.format(other=other) if isinstance(outside, str) else outside
    data["weight_map"] = {key: name if file == "model-00002-of-00003.safetensors" else file
                          for key, file in data["weight_map"].items()}
    index.write_text(json.dumps(data))
    message = folder_error(capsys, tmp_path, command, model_copy)
    assert message.startswith(f"error: {index} names ")
    assert ("outside the model folder" if isinstance(outside, str) and outside else "shard names are file names") \
        in message


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_truncated_or_corrupt_safetensors(capsys, tmp_path, model_copy, damage) -> None:
    weights = model_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a safetensors file at all")
    message = cli_error(capsys, tmp_path, "--prompt", "x", model=model_copy)
    assert "model.safetensors" in message and ("truncated or corrupt" in message)


def test_tensor_shape_disagrees_with_config(capsys, tmp_path, model_copy) -> None:
    edit_config(model_copy, fm_head_dim=32)
    message = cli_error(capsys, tmp_path, "--prompt", "x", model=model_copy)
    assert "tensor 'image_head.net." in message and "has shape [48" in message and "implies [32" in message
    assert "head width 32" in message and "config.json and the weights disagree" in message


def test_layer_count_disagrees_with_config(capsys, tmp_path, model_copy) -> None:
    edit_config(model_copy, num_hidden_layers=3)
    message = cli_error(capsys, tmp_path, "--prompt", "x", model=model_copy)
    assert "num_hidden_layers=3" in message and "hold 2 decoder layers" in message


def test_vae_patch_size_disagrees_with_model(capsys, tmp_path) -> None:
    tensors = load_file(TINY_VAE_FILE)
    config = {**VAEConfig().__dict__, "ch": 32, "ch_mult": [1, 2, 2, 2], "num_res_blocks": 1, "psz": 4}
    vae_file = tmp_path / "psz4.safetensors"
    save_file(tensors, vae_file, metadata={"nextstep_vae_config": json.dumps(config)})
    message = cli_error(capsys, tmp_path, "--prompt", "x", "--vae", str(vae_file))
    assert "patch 4" in message and "expects 16 channels and patch 2" in message


def test_vae_latent_channels_disagree_with_model(capsys, tmp_path) -> None:
    config = VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, z_channels=8)
    vae = NextStepVAE(config)
    vae_file = tmp_path / "z8.safetensors"
    save_file(vae.state_dict(), vae_file, metadata={"nextstep_vae_config": json.dumps({**config.__dict__, "ch_mult": [1, 2, 2, 2]})})
    message = cli_error(capsys, tmp_path, "--prompt", "x", "--vae", str(vae_file))
    assert "8 latent channels" in message and "expects 16 channels" in message


def test_image_tag_without_image(capsys, tmp_path) -> None:
    message = cli_error(capsys, tmp_path, "--prompt", "<image>add a hat")
    assert "contains <image> but no input image" in message


def test_image_without_image_tag(capsys, tmp_path) -> None:
    message = cli_error(capsys, tmp_path, "--prompt", "add a hat", "--image", EDIT_IMAGE)
    assert "input image was given but the prompt has 0 <image> tag(s)" in message


@pytest.mark.parametrize("args,expected", [
    (("--cfg", "0.5"), "cfg 0.5 is outside the allowed range 1.0 to 30.0"),
    (("--cfg", "nan"), "cfg nan is not a finite number; use one from 1.0 to 30.0"),
    (("--cfg", "inf"), "cfg inf is not a finite number"),
    (("--cfg", "31"), "cfg 31.0 is outside the allowed range 1.0 to 30.0"),
    (("--cfg-img", "0.9"), "cfg_img 0.9 is outside the allowed range 1.0 to 30.0"),
    (("--cfg-img", "nan"), "cfg_img nan is not a finite number"),
    (("--shift=-inf",), "timesteps_shift -inf is not a finite number; use one from 0.01 to 20.0"),
    (("--shift", "1e-300"), "timesteps_shift 1e-300 is outside the allowed range 0.01 to 20.0"),
    (("--shift", "nan"), "timesteps_shift nan is not a finite number"),
    (("--steps", "0"), "steps 0 is outside the allowed range 1 to 200"),
    (("--steps", "201"), "steps 201 is outside the allowed range 1 to 200"),
    (("--batch", "0"), "batch 0 is outside the allowed range 1 to 64"),
    (("--batch", "65"), "batch 65 is outside the allowed range 1 to 64"),
    (("--batch", "1.5"), "argument --batch: invalid int value: '1.5'"),
    (("--width", "4096"), "width 4096 is larger than 2048, the largest size allowed"),
    (("--width", "abc"), "argument --width: invalid int value: 'abc'"),
    (("--seed", "-1"), "seed -1 is outside the allowed range 0 to 18446744073709551615"),
    (("--seed", str(2**64)), "seed 18446744073709551616 is outside the allowed range 0 to 18446744073709551615"),
    (("--sampler", "euler"), "argument --sampler: invalid choice: 'euler'"),
    (("--profile", "diffusers"), "argument --profile: invalid choice: 'diffusers'"),
    (("--device", "bogus"), "unknown device 'bogus'; use cpu, cuda, cuda:N, mps or auto"),
])
def test_invalid_settings(capsys, tmp_path, args, expected) -> None:
    assert expected in cli_error(capsys, tmp_path, "--prompt", "x", *args)


def test_unknown_sampler_and_profile_in_the_api(tiny_pipeline) -> None:
    from nextstep_runtime import GenerationSettings, NextStepError

    with pytest.raises(NextStepError, match="unknown sampler 'euler'"):
        tiny_pipeline.sample("x", GenerationSettings(width=32, height=32, sampler="euler"))
    with pytest.raises(NextStepError, match="unknown profile 'diffusers'"):
        tiny_pipeline.sample("x", GenerationSettings(width=32, height=32, profile="diffusers"))


def test_empty_prompt_is_allowed(tmp_path) -> None:
    out = tmp_path / "empty.png"
    code = main(["generate", "--model", str(TINY_MODEL), "--device", "cpu", "--dtype", "float32", "--prompt", "",
                 "--width", "32", "--height", "32", "--steps", "2", "--out", str(out)])
    assert code == 0 and out.exists()


def test_cli_process_reports_one_line_without_traceback(tmp_path) -> None:
    result = subprocess.run([sys.executable, "-m", "nextstep_runtime", "generate", "--model", str(tmp_path / "nope"),
                             "--prompt", "x", "--out", str(tmp_path / "o.png")], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: model folder {tmp_path / 'nope'} does not exist"]


def test_typed_image_placeholder_token_is_refused(capsys, tmp_path) -> None:
    message = cli_error(capsys, tmp_path, "--prompt", "a <|image_placeholder|> fox")
    assert "holds 1 image placeholder tokens but 0 input-image tokens" in message and "use <image>" in message
