"""NaN and infinite values in what a user hands in (latents, masks, images) are refused with an error naming the
input, at every entry: the Python API, the nodes as a graph wires them, and the CLI. One NaN would otherwise spread
through attention to every token generated after it and come back as a black image reported as success."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from cli_runs import cli_error, folder_error
from community_folders import community_folder
from goldens import TINY_MODEL, TINY_VAE_FILE
from nodes_pack import MODEL_NAME, install_fixture_models, load_pack
from nodes_pack import run_node as node
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nextstep_runtime import GenerationSettings, NextStepError, NextStepPipeline
from nextstep_runtime.weights.repack import convert_folder

NODES = load_pack().NODE_CLASS_MAPPINGS
BAD_VALUES = [float("nan"), float("inf"), float("-inf")]
SMALL = GenerationSettings(width=32, height=32, steps=2, cfg=1.0)


def spoiled(tensor: torch.Tensor, value: float, index: int = -1) -> torch.Tensor:
    """`tensor` with one value (the last, or at flat `index`) replaced by `value`."""
    tensor = tensor.clone()
    tensor.view(-1)[index] = value
    return tensor


@pytest.fixture(scope="module", autouse=True)
def models_dir(tmp_path_factory):
    return install_fixture_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def model():
    """The fixture model as NextStep Model Loader gives it, in float32."""
    return node("NextStepModelLoader", MODEL_NAME, "float32", "sdpa")[0]


# --- the Python API --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", BAD_VALUES)
@pytest.mark.parametrize("index", [0, 37, -1])
def test_api_refuses_non_finite_init_latents_and_masks(tiny_pipeline, value, index):
    latents = torch.zeros(1, 16, 4, 4)
    with pytest.raises(NextStepError, match=r"the init image's latents holds 1 NaN or infinite value \(of 256\)"):
        tiny_pipeline.sample("x", SMALL, init_latents=spoiled(latents, value, index), mask=torch.ones(32, 32))
    with pytest.raises(NextStepError, match=r"the mask holds 1 NaN or infinite value \(of 1024\)"):
        tiny_pipeline.sample("x", SMALL, init_latents=latents, mask=spoiled(torch.ones(32, 32), value, index))
    with pytest.raises(NextStepError, match="editing input image 1's latent holds 1 NaN"):
        tiny_pipeline.sample("<image>x", SMALL, edit_latents=[spoiled(latents, value, index)])


@pytest.mark.parametrize("value", BAD_VALUES)
def test_api_refuses_non_finite_images_and_latents_to_decode(tiny_pipeline, value):
    with pytest.raises(NextStepError, match="the input image holds 1 NaN or infinite value"):
        tiny_pipeline.encode_image(spoiled(torch.zeros(1, 3, 32, 32), value))
    with pytest.raises(NextStepError, match="the init image's latents|the input image holds 1 NaN"):
        tiny_pipeline.generate("x", SMALL, init_image=spoiled(torch.zeros(1, 3, 32, 32), value, 5))
    with pytest.raises(NextStepError, match="the latents to decode holds 2 NaN or infinite values"):
        tiny_pipeline.decode(spoiled(spoiled(torch.zeros(2, 16, 4, 4), value, 0), value))


# --- the nodes, as a graph wires them (Load Latent / Set Latent Noise Mask -> Sampler; VAE nodes) -------------

def sampler(model, latent_image: dict) -> torch.Tensor:
    positive = node("NextStepTextEncode", model, "a boat")[0]
    return node("NextStepSampler", model, positive, width=32, height=32, batch_size=1, seed=0, steps=2, cfg=1.0,
                cfg_img=1.0, cfg_schedule="constant", timesteps_shift=1.0, sampler="ode", profile="official",
                use_norm=False, latent_image=latent_image)[0]["samples"]


@pytest.mark.parametrize("value", BAD_VALUES)
def test_sampler_refuses_a_non_finite_latent_image_or_noise_mask(model, value):
    latent = torch.zeros(1, 16, 4, 4)
    mask = torch.ones(1, 1, 32, 32)
    with pytest.raises(NextStepError, match="latent_image holds 1 NaN or infinite value"):
        sampler(model, {"samples": spoiled(latent, value, 3), "noise_mask": mask})
    with pytest.raises(NextStepError, match="latent_image holds 1 NaN"):
        sampler(model, {"samples": spoiled(latent, value)})
    with pytest.raises(NextStepError, match="the noise_mask of latent_image holds 1 NaN or infinite value"):
        sampler(model, {"samples": latent, "noise_mask": spoiled(mask, value, 100)})
    # the next run on the same model is fine and finite
    assert torch.isfinite(sampler(model, {"samples": latent, "noise_mask": mask})).all()


@pytest.mark.parametrize("value", BAD_VALUES)
def test_vae_nodes_refuse_non_finite_inputs(value):
    vae = node("NextStepVAELoader", f"{MODEL_NAME}/vae")[0]
    with pytest.raises(NextStepError, match="the image to encode holds 1 NaN or infinite value"):
        node("NextStepVAEEncode", vae, spoiled(torch.zeros(1, 32, 32, 3), value, 7))
    with pytest.raises(NextStepError, match="the latents to decode holds 1 NaN or infinite value"):
        node("NextStepVAEDecode", vae, {"samples": spoiled(torch.zeros(1, 16, 4, 4), value, 7)})


@pytest.mark.parametrize("shape", [(0, 16, 4, 4), (1, 16, 0, 4), (2, 16, 4, 0), (1, 16, 0, 0)])
def test_vae_decode_refuses_an_empty_latent_with_its_shape(shape):
    vae = node("NextStepVAELoader", f"{MODEL_NAME}/vae")[0]
    with pytest.raises(NextStepError, match=rf"the latents to decode are \[{', '.join(map(str, shape))}\] "
                                            r"\[batch, channels, height/8, width/8\]: no image to decode"):
        node("NextStepVAEDecode", vae, {"samples": torch.zeros(shape)})


def test_vae_encode_refuses_an_empty_batch():
    vae = node("NextStepVAELoader", f"{MODEL_NAME}/vae")[0]
    with pytest.raises(NextStepError, match=r"is \[0, 3, 32, 32\] \[B, 3, H, W\]: a batch of 0 images"):
        node("NextStepVAEEncode", vae, torch.zeros(0, 32, 32, 3))


# --- the CLI ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", BAD_VALUES)
@pytest.mark.parametrize("index", [0, -1])
def test_cli_refuses_a_saved_tensors_init_image_with_non_finite_latents(capsys, tmp_path, value, index):
    saved = tmp_path / "saved.safetensors"
    save_file({"latents": spoiled(torch.zeros(1, 16, 4, 4), value, index)}, saved)
    line = cli_error(capsys, tmp_path, "--prompt", "x", "--init-image", str(saved), "--width", "32")
    assert line == (f"error: init image {saved} (its `latents`) holds 1 NaN or infinite value (of 256); it comes "
                    f"from a broken file or node: make it again from a good image")


@pytest.mark.parametrize("shape", [(0, 16, 4, 4), (1, 16, 0, 4)])
def test_text_encode_refuses_an_empty_image_latent(model, shape):
    with pytest.raises(NextStepError, match=rf"the `image` LATENT is \[{', '.join(map(str, shape))}\] .*: no image"):
        node("NextStepTextEncode", model, "<image>make it blue", {"samples": torch.zeros(shape)})


# --- the weights (issue 29, item 12) ------------------------------------------------------------------------------

def spoil_weights(file, key: str, value: float, index: int) -> None:
    """One value of tensor `key` in safetensors `file` replaced by `value`, the file's metadata kept."""
    with safe_open(str(file), "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(file)
    tensors[key] = spoiled(tensors[key], value, index)
    save_file(tensors, file, metadata=metadata)


@pytest.mark.parametrize("key,value,index", [("layers.1.self_attn.o_proj.weight", float("inf"), 5),
                                             ("image_head.net.res_blocks.0.mlp.0.weight", float("nan"), 0),
                                             ("embed_tokens.weight", float("-inf"), -1)])
def test_non_finite_weights_are_refused_while_loading_naming_file_and_tensor(model_copy, tmp_path, capsys, key,
                                                                             value, index):
    spoil_weights(model_copy / "model.safetensors", key, value, index)
    message = f"{model_copy / 'model.safetensors'}: tensor '{key}' holds NaN or infinite values"
    with pytest.raises(NextStepError, match=re.escape(message)):
        NextStepPipeline.from_pretrained(model_copy, device="cpu", dtype="bfloat16", memory="int4")
    assert folder_error(capsys, tmp_path, "convert", model_copy).startswith(f"error: {message}")


def test_non_finite_values_in_a_repacked_fp8_folder_and_a_vae_are_named(tmp_path):
    convert_folder(TINY_MODEL, tmp_path / "fp8", "fp8")
    key = "layers.0.mlp.up_proj.weight"
    tensors = load_file(tmp_path / "fp8" / "model.safetensors")
    tensors[key] = spoiled(tensors[key].float(), float("nan"), 11).to(torch.float8_e4m3fn)
    save_file(tensors, tmp_path / "fp8" / "model.safetensors")
    with pytest.raises(NextStepError, match=re.escape(f"tensor '{key}' holds NaN or infinite values")):
        NextStepPipeline.from_pretrained(tmp_path / "fp8", device="cpu", dtype="bfloat16", memory="fp8")
    vae = tmp_path / "vae.safetensors"
    shutil.copy(TINY_VAE_FILE, vae)
    first = next(name for name in load_file(vae) if name.startswith("decoder.") and name.endswith(".weight"))
    spoil_weights(vae, first, float("inf"), 2)
    with pytest.raises(NextStepError, match=re.escape(f"{vae}: tensor '{first}' holds NaN or infinite values")):
        NextStepPipeline.from_pretrained(TINY_MODEL, vae=vae, device="cpu", dtype="float32")


def test_a_non_finite_4bit_scale_is_named(tmp_path):
    folder = community_folder("asym-g32", tmp_path / "scales")
    key = "layers.1.mlp.down_proj.scales"
    spoil_weights(folder / "model.safetensors", key, float("nan"), 3)
    with pytest.raises(NextStepError, match=re.escape(f"{folder / 'model.safetensors'}: tensor '{key}' holds NaN")):
        NextStepPipeline.from_pretrained(folder, device="cpu", dtype="float32", memory="int4")


def test_the_sampler_names_the_model_when_its_output_is_not_finite():
    """A model whose weights turn non-finite after loading (as float16 overflow does): the Sampler fails naming the
    model, before VAE Decode is reached; the API's sample likewise."""
    spoilt = node("NextStepModelLoader", MODEL_NAME, "bfloat16", "sdpa")[0]  # not the module's float32 model
    pipeline = spoilt.loaded.pipeline
    weight = pipeline.model.image_head.net.final_layer.linear.weight
    kept = weight.data[0, 0].item()
    weight.data[0, 0] = float("nan")
    source = Path(pipeline.model.source)  # the first models folder registered with it (other modules add theirs)
    assert source.parts[-2:] == ("nextstep", MODEL_NAME)
    message = f"the image tokens of {source} came out NaN or infinite"
    try:
        with pytest.raises(NextStepError, match=re.escape(message)):
            sampler(spoilt, {"samples": torch.zeros(1, 16, 4, 4)})
        with pytest.raises(NextStepError, match=re.escape(message)):
            pipeline.sample("a boat", SMALL)
    finally:
        weight.data[0, 0] = kept
