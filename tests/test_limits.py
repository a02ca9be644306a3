"""Settings, configs, output paths and checkpoints that must be refused before any work, with one clear message
naming what is wrong, the same way through the Python API, the CLI and the sampler node's validation."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from cli_runs import cli_error, command_error, folder_error
from goldens import TINY_MODEL
from model_folders import edit_config
from nodes_pack import load_pack
from PIL import Image

from nextstep_runtime import GenerationSettings, NextStepError
from nextstep_runtime.cli.main import main
from nextstep_runtime.validation import MAX_BATCH, MAX_SEED, MAX_SIZE

SAMPLER = load_pack().NODE_CLASS_MAPPINGS["NextStepSampler"]
SMALL = dict(width=32, height=32, steps=2)
FIXTURES_IMAGE = TINY_MODEL.parent / "edit_input_64.png"


# --- Python API -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("changes,message", [
    ({"width": "64"}, "width '64' is not a whole number; use a multiple of 16 from 16 to 2048"),
    ({"height": 64.0}, "height 64.0 is not a whole number"),
    ({"width": True}, "width True is not a whole number"),
    ({"width": 2064}, "width 2064 is larger than 2048, the largest size allowed"),
    ({"batch": 1.5}, "batch 1.5 is not a whole number; use one from 1 to 64"),
    ({"batch": MAX_BATCH + 1}, "batch 65 is outside the allowed range 1 to 64"),
    ({"steps": "28"}, "steps '28' is not a whole number; use one from 1 to 200"),
    ({"seed": 2**64}, f"seed {2**64} is outside the allowed range 0 to {MAX_SEED}"),
    ({"seed": -1}, "seed -1 is outside the allowed range 0 to"),
    ({"cfg": math.nan}, "cfg nan is not a finite number; use one from 1.0 to 30.0 (1.0 turns guidance off)"),
    ({"cfg": math.inf}, "cfg inf is not a finite number"),
    ({"cfg": "7.5"}, "cfg '7.5' is not a number"),
    ({"cfg": True}, "cfg True is not a number"),
    ({"cfg_img": math.nan}, "cfg_img nan is not a finite number"),
    ({"timesteps_shift": 1e-300}, "timesteps_shift 1e-300 is outside the allowed range 0.01 to 20.0"),
    ({"timesteps_shift": -math.inf}, "timesteps_shift -inf is not a finite number"),
    ({"use_norm": "yes"}, "use_norm 'yes' is not a boolean"),
    ({"cfg_schedule": "cosine"}, "unknown cfg_schedule 'cosine'; choose one of constant, linear"),
])
def test_api_refuses_bad_settings_before_any_work(tiny_pipeline, changes, message) -> None:
    with pytest.raises(NextStepError) as caught:
        tiny_pipeline.generate("a fox", GenerationSettings(**{**SMALL, **changes}))
    assert message in str(caught.value)


def test_api_accepts_an_integer_where_a_scale_is_meant(tiny_pipeline) -> None:
    settings = GenerationSettings(**SMALL, cfg=3, timesteps_shift=1)
    assert tiny_pipeline.sample("a fox", settings).tokens.isfinite().all()


@pytest.mark.parametrize("kwargs,message", [
    ({"caption": None}, "caption must be a string, got NoneType None"),
    ({"caption": 5}, "caption must be a string, got int 5"),
    ({"caption": "x", "negative": ["a"]}, "negative must be a string or None, got list"),
    ({"caption": "x", "settings": {"width": 32}}, "settings must be a GenerationSettings, got dict"),
])
def test_api_refuses_bad_prompts(tiny_pipeline, kwargs, message) -> None:
    kwargs.setdefault("settings", GenerationSettings(**SMALL))
    with pytest.raises(NextStepError, match=message):
        tiny_pipeline.generate(**kwargs)


def test_prompt_longer_than_the_context_is_refused_naming_the_token_count(tiny_pipeline) -> None:
    assert tiny_pipeline.model.config.max_positions == 4096  # the fixture's max_position_embeddings
    with pytest.raises(NextStepError) as caught:
        tiny_pipeline.sample("a fox " * 3000, GenerationSettings(**SMALL))
    message = str(caught.value)
    assert "the prompt is " in message and " tokens and the image 4 tokens" in message
    assert "more than the model's context of 4096 (max_position_embeddings)" in message
    prompt_tokens = int(message.split("the prompt is ")[1].split()[0])
    assert prompt_tokens > 4096 - 4


def test_image_larger_than_the_context_is_refused(tiny_pipeline) -> None:
    with pytest.raises(NextStepError, match=r"and the image 4096 tokens, \d+ positions in all, more than the "
                                            r"model's context of 4096"):
        tiny_pipeline.sample("a fox", GenerationSettings(width=1024, height=1024, steps=1))


def test_edit_image_beyond_the_size_limit_is_refused(tiny_pipeline) -> None:
    with pytest.raises(NextStepError, match=f"the input image is 16x{MAX_SIZE + 16} pixels; input images may be at "
                                            f"most {MAX_SIZE} pixels per side"):
        tiny_pipeline.encode_image(torch.zeros(1, 3, MAX_SIZE + 16, 16))
    with pytest.raises(NextStepError, match=r"the input image must be an RGB tensor \[B, 3, H, W\]"):
        tiny_pipeline.encode_image(torch.zeros(3, 16, 16))


def test_api_decodes_and_encodes_one_image_at_a_time_with_the_same_result(tiny_pipeline) -> None:
    result = tiny_pipeline.sample("a fox", GenerationSettings(**SMALL, batch=3, seed=4))
    together = tiny_pipeline.decode(result.latents)
    assert together.shape == (3, 3, 32, 32)
    for index in range(3):
        assert torch.equal(together[index : index + 1], tiny_pipeline.decode(result.latents[index : index + 1]))
    pixels = (together / 2 + 0.5).clamp(0, 1)
    encoded = tiny_pipeline.encode_image(pixels)
    assert torch.equal(encoded[1:2], tiny_pipeline.encode_image(pixels[1:2]))


# --- CLI ------------------------------------------------------------------------------------------------------

def test_cli_out_under_a_file(capsys, tmp_path) -> None:
    (tmp_path / "file.txt").write_text("x")
    message = cli_error(capsys, tmp_path, "--prompt", "x", "--out", str(tmp_path / "file.txt" / "out.png"))
    assert message == f"error: --out {tmp_path}/file.txt/out.png: {tmp_path}/file.txt is a file, not a folder"


def test_cli_out_in_an_unwritable_folder(capsys, tmp_path) -> None:
    message = cli_error(capsys, tmp_path, "--prompt", "x", "--out", "/sys/nextstep/out.png")
    assert message.startswith("error: --out /sys/nextstep/out.png: cannot write in /sys (")


def test_cli_out_without_an_image_extension(capsys, tmp_path) -> None:
    message = cli_error(capsys, tmp_path, "--prompt", "x", "--out", str(tmp_path / "out.txt"))
    assert f"--out {tmp_path}/out.txt does not end in an image extension; use one of .png, .jpg" in message


def test_cli_out_is_a_folder(capsys, tmp_path) -> None:
    (tmp_path / "folder.png").mkdir()
    message = cli_error(capsys, tmp_path, "--prompt", "x", "--out", str(tmp_path / "folder.png"))
    assert message == f"error: --out {tmp_path}/folder.png is a folder; give a file name inside it"


def test_cli_save_tensors_checked_before_the_image_is_written(capsys, tmp_path) -> None:
    message = cli_error(capsys, tmp_path, "--prompt", "x", "--save-tensors", str(tmp_path / "t.pt"))
    assert message == f"error: --save-tensors {tmp_path}/t.pt must end in .safetensors"
    message = cli_error(capsys, tmp_path, "--prompt", "x", "--save-tensors", "/sys/nextstep/t.safetensors")
    assert message.startswith("error: --save-tensors /sys/nextstep/t.safetensors: cannot write in /sys (")


def test_cli_out_in_a_missing_folder_is_created(tmp_path) -> None:
    from nextstep_runtime.cli.main import main

    out = tmp_path / "new" / "deeper" / "out.png"
    code = main(["generate", "--model", str(TINY_MODEL), "--device", "cpu", "--dtype", "float32", "--prompt", "x",
                 "--width", "16", "--height", "16", "--steps", "1", "--out", str(out)])
    assert code == 0 and out.is_file()


def test_cli_edit_image_beyond_the_size_limit(capsys, tmp_path) -> None:
    image = tmp_path / "wide.png"
    Image.new("RGB", (MAX_SIZE + 32, 16)).save(image)
    message = cli_error(capsys, tmp_path, "--prompt", "<image>x", "--image", str(image))
    assert f"input image {image} is {MAX_SIZE + 32}x16 pixels; input images may be at most {MAX_SIZE}" in message


@pytest.mark.parametrize("changes,message", [
    ({"num_attention_heads": 0}, "num_attention_heads is 0, outside the range this runtime accepts (1 to 1024)"),
    ({"num_hidden_layers": 10**400}, "num_hidden_layers is 1000000000000000000000000000000000000000... (401 "
                                     "characters), outside the range this runtime accepts (1 to 1024)"),
    ({"num_hidden_layers": 5000}, "num_hidden_layers is 5000, outside the range this runtime accepts (1 to 1024)"),
    ({"hidden_size": 10**9}, "hidden_size is 1000000000, outside the range this runtime accepts (1 to 65536)"),
    ({"vocab_size": 2**40}, "vocab_size is 1099511627776, outside the range"),
    ({"intermediate_size": -3}, "intermediate_size is -3, outside the range"),
    ({"fm_head_layers": 10**6}, "fm_head_layers is 1000000, outside the range"),
    ({"latent_patch_size": 4096}, "latent_patch_size is 4096, outside the range this runtime accepts (1 to 64)"),
    ({"num_attention_heads": 3, "head_dim": None},
     "hidden_size 64 is not divisible by num_attention_heads 3; fix the head count or give head_dim explicitly"),
    ({"num_key_value_heads": 3}, "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    ({"boi": 524}, "boi is 524 but must be a token id inside the vocabulary (0 to 523, vocab_size 524)"),
    ({"image_placeholder_id": -1}, "image_placeholder_id is -1 but must be a token id inside the vocabulary"),
    ({"hidden_size": "64"}, "hidden_size is '64' but must be a whole number from 1 to 65536"),
    ({"num_hidden_layers": 2.0}, "num_hidden_layers is 2.0 but must be a whole number from 1 to 1024"),
    ({"head_dim": True}, "head_dim is True but must be a whole number"),
    ({"rms_norm_eps": 0}, "rms_norm_eps is 0 but must be a number above 0.0 and at most 1"),
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps is nan but must be a number above 0.0"),
    ({"rope_theta": 1e300}, "rope_theta is 1e+300 but must be a number above 0.0 and at most 1e+12"),
    ({"rope_theta": "1e6"}, "rope_theta is '1e6' but must be a number"),
    ({"max_position_embeddings": 0}, "max_position_embeddings is 0, outside the range"),
    ({"use_gen_pos_embed": "no"}, "use_gen_pos_embed is 'no' but must be true or false (JSON booleans, not strings)"),
    ({"attention_bias": 1}, "attention_bias is 1 but must be true or false"),
    ({"mlp_bias": "false"}, "mlp_bias is 'false' but must be true or false"),
    ({"use_2d_rope": [False]}, "use_2d_rope is [False] but must be true or false"),
    ({"hidden_act": 5}, "hidden_act is 5 but must be a string"),
    ({"vae_name_or_path": ["vae"]}, "vae_name_or_path is ['vae'] but must be a string"),
    ({"nextstep_weights": {"int4": True}}, "nextstep_weights is {'int4': True} but must be a string"),
])
@pytest.mark.parametrize("command", ["generate", "plan"])
def test_model_config_values_are_checked_when_read(capsys, tmp_path, model_copy, changes, message, command) -> None:
    edit_config(model_copy, **changes)
    line = folder_error(capsys, tmp_path, command, model_copy)
    assert line.startswith(f"error: {model_copy / 'config.json'}: {message}")


@pytest.mark.parametrize("key", ["vocab_size", "num_hidden_layers", "boi"])
def test_a_required_config_key_set_to_null_is_named(capsys, tmp_path, model_copy, key) -> None:
    edit_config(model_copy, **{key: None})
    line = folder_error(capsys, tmp_path, "plan", model_copy)
    assert line == f"error: {model_copy / 'config.json'} lacks the required key {key!r}"


def test_an_optional_config_key_set_to_null_takes_its_default(model_copy) -> None:
    from nextstep_runtime.config import ModelConfig

    edit_config(model_copy, rms_norm_eps=None, attention_bias=None, max_position_embeddings=None)
    config = ModelConfig.from_dict(json.loads((model_copy / "config.json").read_text()))
    assert (config.rms_norm_eps, config.attention_bias, config.max_positions) == (1e-6, True, 32768)


@pytest.mark.parametrize("text,message", [
    ("[" * 200_000 + "]" * 200_000, "is nested too deeply to read"),
    ('{"a": ' * 100_000 + "1" + "}" * 100_000, "is nested too deeply to read"),
    ('{"hidden_size": ' + "9" * 5000 + "}", "is not valid JSON (Exceeds the limit"),
    ("\x00\xff\xfe garbage", "is not valid JSON"),
    ("", "is not valid JSON"),
    ("[1, 2]", "must hold a JSON object"),
])
@pytest.mark.parametrize("command", ["generate", "plan", "convert"])
def test_unreadable_config_is_one_error_naming_the_file(capsys, tmp_path, model_copy, text, message,
                                                        command) -> None:
    config = model_copy / "config.json"
    config.write_bytes(text.encode("latin-1"))
    line = folder_error(capsys, tmp_path, command, model_copy)
    assert line.startswith(f"error: {config}") and message in line


@pytest.mark.parametrize("command", ["generate", "plan", "convert"])
def test_a_config_far_larger_than_any_is_refused_unread(capsys, tmp_path, model_copy, command) -> None:
    config = model_copy / "config.json"
    with open(config, "r+b") as handle:  # a sparse file: 65 MB claimed, nothing written
        handle.truncate(65 * 2**20)
    line = folder_error(capsys, tmp_path, command, model_copy)
    assert line == f"error: {config} is 65 MB; a config or shard index is at most 64 MB, so this is not one"


@pytest.mark.parametrize("changes,message", [
    ({"ch_mult": []}, "ch_mult is [] but must be a list of 1 to 8 whole numbers from 1 to 64"),
    ({"ch_mult": [1, 0]}, "ch_mult is [1, 0] but must be a list of 1 to 8"),
    ({"ch_mult": [1, 2, 4, 4, 4, 4, 4, 4, 4]}, "ch_mult is [1, 2, 4, 4, 4, 4, 4, 4, 4] but must be a list"),
    ({"ch_mult": "1244"}, "ch_mult is '1244' but must be a list"),
    ({"z_channels": 0}, "z_channels is 0, outside the range this runtime accepts (1 to 1024)"),
    ({"ch": 10**400}, "ch is 1000000000000000000000000000000000000000... (401 characters), outside the range"),
    ({"num_res_blocks": 1000}, "num_res_blocks is 1000, outside the range this runtime accepts (1 to 64)"),
    ({"psz": 2.5}, "psz is 2.5 but must be a whole number from 1 to 64"),
    ({"scaling_factor": 0}, "scaling_factor is 0; latents are divided by it"),
    ({"shift_factor": "NaN"}, "shift_factor is 'NaN' but must be a finite number"),
    ({"scaling_factor": float("inf")}, "scaling_factor is inf but must be a finite number"),
    ({"encoder_norm": "no"}, "encoder_norm is 'no' but must be true or false"),
])
@pytest.mark.parametrize("command", ["generate", "plan"])
def test_vae_config_values_are_checked_when_read(capsys, tmp_path, model_copy, changes, message, command) -> None:
    path = model_copy / "vae" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    line = folder_error(capsys, tmp_path, command, model_copy)
    assert line.startswith(f"error: {path}: {message}")


def test_vae_folder_without_config_says_so_when_loading_and_planning(capsys, tmp_path, model_copy) -> None:
    (model_copy / "vae" / "config.json").unlink()
    missing = f"{model_copy / 'vae' / 'config.json'} is missing, so the released VAE's config was assumed: ch 128, "
    line = cli_error(capsys, tmp_path, "--prompt", "x", model=model_copy)
    assert missing in line and "implies [128, 3, 3, 3]" in line
    assert main(["plan", str(model_copy), "--json"]) == 0
    assert f"note: {missing}" in capsys.readouterr().err


class _RunsCode:
    """Unpickles by calling a function: exactly what weights_only loading must refuse."""

    def __reduce__(self):
        return (print, ("this ran",))


def test_checkpoint_holding_code_is_refused_in_one_line(capsys, tmp_path, model_copy) -> None:
    checkpoint = model_copy / "vae" / "checkpoint.pt"
    torch.save({"state_dict": {"decoder.conv_in.weight": torch.zeros(1)}, "extra": _RunsCode()}, checkpoint)
    line = cli_error(capsys, tmp_path, "--prompt", "x", model=model_copy)
    assert line == f"error: {checkpoint} holds more than tensors; refused"
    assert "this ran" not in capsys.readouterr().out


# --- the sampler node's validation (what ComfyUI calls before a run) -------------------------------------------

@pytest.mark.parametrize("inputs,message", [
    ({"cfg": math.nan}, "cfg nan is not a finite number; use one from 1.0 to 30.0"),
    ({"cfg_img": math.inf}, "cfg_img inf is not a finite number"),
    ({"width": "abc"}, "width 'abc' is not a whole number; use a multiple of 16 from 16 to 2048"),
    ({"height": 500}, "height 500 is not a positive multiple of 16; try height 496"),
    ({"width": 4096}, "width 4096 is larger than 2048"),
    ({"batch_size": 65}, "batch_size 65 is outside the allowed range 1 to 64"),
    ({"steps": 0}, "steps 0 is outside the allowed range 1 to 200"),
    ({"seed": 2**64}, "seed 18446744073709551616 is outside the allowed range 0 to 18446744073709551615"),
    ({"timesteps_shift": 0.0}, "timesteps_shift 0.0 is outside the allowed range 0.01 to 20.0"),
    ({"timesteps_shift": "1e-300"}, "timesteps_shift '1e-300' is not a number"),
])
def test_sampler_node_validation_names_the_input(inputs, message) -> None:
    answer = SAMPLER.VALIDATE_INPUTS(**inputs)
    assert isinstance(answer, str) and answer.startswith(message)


def test_sampler_node_validation_passes_good_and_linked_inputs() -> None:
    assert SAMPLER.VALIDATE_INPUTS(width=512, height=None, batch_size=64, seed=2**64 - 1, steps=200, cfg=30,
                                   cfg_img=1.0, timesteps_shift=3.2, use_norm=True) is True
    assert SAMPLER.VALIDATE_INPUTS() is True


def test_sampler_node_limits_are_the_runtime_limits() -> None:
    required = SAMPLER.INPUT_TYPES()["required"]
    limits = {name: (spec[1]["min"], spec[1]["max"]) for name, spec in required.items()
              if isinstance(spec[1], dict) and "max" in spec[1]}
    assert limits == {"width": (16, 2048), "height": (16, 2048), "batch_size": (1, 64), "seed": (0, 2**64 - 1),
                      "steps": (1, 200), "cfg": (1.0, 30.0), "cfg_img": (1.0, 30.0), "timesteps_shift": (0.01, 20.0)}
    for name, (low, high) in limits.items():
        assert SAMPLER.VALIDATE_INPUTS(**{name: low}) is True and SAMPLER.VALIDATE_INPUTS(**{name: high}) is True


# --- the planner runs the sampler's checks ---------------------------------------------------------------------

@pytest.mark.parametrize("args,message", [
    (["--cfg", "-5"], "cfg -5.0 is outside the allowed range 1.0 to 30.0"),
    (["--cfg", "0"], "cfg 0.0 is outside the allowed range 1.0 to 30.0"),
    (["--cfg", "1e308"], "cfg 1e+308 is outside the allowed range 1.0 to 30.0"),
    (["--cfg", "nan"], "cfg nan is not a finite number"),
    (["--cfg-img=-inf"], "cfg_img -inf is not a finite number"),
    (["--batch", "65"], "batch 65 is outside the allowed range 1 to 64"),
    (["--batch", "0"], "batch 0 is outside the allowed range 1 to 64"),
    (["--steps", "100000"], "steps 100000 is outside the allowed range 1 to 200"),
    (["--width", "1000"], "width 1000 is not a positive multiple of 16"),
    (["--height", "4096"], "height 4096 is larger than 2048"),
    (["--input-size", "100x64"], "width 100 is not a positive multiple of 16"),
    (["--prompt-tokens", "-100000"], "prompt_tokens -100000 is outside the allowed range 1 to 4194304"),
    (["--prompt-tokens", "0"], "prompt_tokens 0 is outside the allowed range"),
    (["--prompt-tokens", str(10**30)], f"prompt_tokens {10**30} is outside the allowed range"),
    (["--prompt-tokens", "4000"], "the prompt is 4000 tokens and the image 1024 tokens, 5024 positions in all, more "
                                  "than the model's context of 4096"),
    (["--input-size", "1024x1024", "--input-size", "1024x1024"], "the prompt is 8704 tokens and the image 1024 tokens"),
    (["--gpu-memory", "nan"], "--gpu-memory nan is not a finite number; use one from 0.001 to 100000 GB"),
    (["--gpu-memory", "inf"], "--gpu-memory inf is not a finite number"),
    (["--gpu-memory=-inf"], "--gpu-memory -inf is not a finite number"),
    (["--gpu-memory", "1e308"], "--gpu-memory 1e+308 is outside the allowed range 0.001 to 100000"),
    (["--gpu-memory", "0"], "--gpu-memory 0.0 is outside the allowed range"),
    (["--gpu-memory", "-24"], "--gpu-memory -24.0 is outside the allowed range"),
])
def test_plan_refuses_what_the_sampler_refuses(capsys, args, message) -> None:
    line = command_error(capsys, "plan", str(TINY_MODEL), *args)
    assert line.startswith(f"error: {message}"), line


@pytest.mark.parametrize("args", [["--fp8"], ["--fp8", "--dtype", "float16"]])
def test_plan_of_a_repacked_int4_folder_refuses_other_weights_as_loading_does(capsys, tmp_path, args) -> None:
    from nextstep_runtime.weights.repack import convert_folder

    convert_folder(TINY_MODEL, tmp_path / "int4", "int4")
    line = command_error(capsys, "plan", str(tmp_path / "int4"), *args)
    assert "holds int4 weights (repacked); load it with int4 weights" in line
    assert main(["plan", str(tmp_path / "int4"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mode"]["storage"] == "int4"


# --- input images and masks: one size rule, read from the header, never a raw PIL error or warning ---------------

def png_header_claiming(path, width: int, height: int) -> None:
    """A PNG whose header claims width x height (its pixels are never reached: the size check reads the header)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("width,height", [(100_000, 100_000), (20_000, 20_000), (12_000, 12_000), (MAX_SIZE + 16, 16),
                                          (16, 3000)])
@pytest.mark.parametrize("flag", ["--init-image", "--mask", "--image"])
def test_input_images_and_masks_have_one_size_cap(capsys, tmp_path, flag, width, height) -> None:
    huge = tmp_path / "huge.png"
    png_header_claiming(huge, width, height)
    args = {"--init-image": ["--init-image", str(huge)],
            "--mask": ["--init-image", str(FIXTURES_IMAGE), "--mask", str(huge), "--width", "64", "--height", "64"],
            "--image": ["--image", str(huge), "--prompt", "<image>x"]}[flag]
    if flag == "--init-image":
        args += ["--width", str(width), "--height", str(height)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no PIL warning may be printed before the one error line
        line = cli_error(capsys, tmp_path, "--prompt", "x", *args)
    what = "mask" if flag == "--mask" else "input image"
    if width * height > 2 * Image.MAX_IMAGE_PIXELS:
        assert line.startswith(f"error: {what} {huge} is far too large to read (Image size ("), line
    else:
        assert line == (f"error: {what} {huge} is {width}x{height} pixels; input images may be at most {MAX_SIZE} "
                        f"pixels per side (each 16x16 pixels become a prompt token and the VAE encoder's memory grows "
                        f"with the area): scale it down first")


@pytest.mark.parametrize("args,message", [
    (["--width", "128"], "--width 128 differs from the init image's width 64 (its size 64x64"),
    (["--height", "32"], "--height 32 differs from the init image's height 64 (its size 64x64"),
    (["--width", "64", "--height", "48"], "--height 48 differs from the init image's height 64"),
])
def test_init_image_size_flags_that_differ_name_the_flag(capsys, tmp_path, args, message) -> None:
    line = command_error(capsys, "generate", "--model", str(TINY_MODEL), "--prompt", "x", "--init-image",
                         str(FIXTURES_IMAGE), "--out", str(tmp_path / "o.png"), *args)
    assert line.startswith(f"error: {message}"), line


@pytest.mark.parametrize("args,message", [
    (["--gpu-memory", "nan,24"], "--gpu-memory nan is not a finite number"),
    (["--gpu-memory", "24,inf"], "--gpu-memory inf is not a finite number"),
    (["--gpu-memory", "24,1e308"], "--gpu-memory 1e+308 is outside the allowed range 0.001 to 100000"),
    (["--gpu-memory", "24,24", "--cfg", "0"], "cfg 0.0 is outside the allowed range 1.0 to 30.0"),
    (["--gpu-memory", "24,24", "--batch", "65"], "batch 65 is outside the allowed range 1 to 64"),
    (["--gpu-memory", "24,24", "--prompt-tokens", "-5"], "prompt_tokens -5 is outside the allowed range"),
    (["--gpu-memory", "24,24", "--prompt-tokens", "4000"], "the prompt is 4000 tokens and the image 1024 tokens"),
])
def test_plan_of_a_split_refuses_what_the_sampler_refuses(capsys, args, message) -> None:
    line = command_error(capsys, "plan", str(TINY_MODEL), "--devices", "cuda:0,cuda:1", *args)
    assert line.startswith(f"error: {message}"), line


@pytest.mark.parametrize("shape", [(1, 16, 257, 8), (1, 16, 8, 1000), (2, 16, 300, 300)])
def test_saved_tensors_init_image_has_the_same_size_cap(capsys, tmp_path, shape) -> None:
    from safetensors.torch import save_file

    saved = tmp_path / "big.safetensors"
    save_file({"latents": torch.zeros(shape)}, saved)
    line = cli_error(capsys, tmp_path, "--prompt", "x", "--init-image", str(saved))
    assert line.startswith(f"error: init image {saved} is {shape[-1] * 8}x{shape[-2] * 8} pixels; input images may "
                           f"be at most {MAX_SIZE} pixels per side"), line


@pytest.mark.parametrize("tensors,message", [
    ({"tokens": torch.zeros(1, 4, 64)}, "holds no `latents` [batch, channels, height/8, width/8]"),
    ({"latents": torch.zeros(16, 4, 4)}, "holds `latents` of shape [16, 4, 4], not [batch, channels"),
])
def test_saved_tensors_init_image_without_latents_is_refused(capsys, tmp_path, tensors, message) -> None:
    from safetensors.torch import save_file

    saved = tmp_path / "saved.safetensors"
    save_file(tensors, saved)
    line = cli_error(capsys, tmp_path, "--prompt", "x", "--init-image", str(saved))
    assert line.startswith(f"error: init image {saved} {message}"), line
