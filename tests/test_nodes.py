"""The NextStep nodes called as ComfyUI calls them, on the fixture model, without ComfyUI."""

from __future__ import annotations

import importlib
import json
import logging
import re

import numpy as np
import pytest
import torch
from broken_installs import FLASH_ATTN_FAILURES, broken_flash_attn
from goldens import FIXTURES, GoldenCase, assert_matches_golden, golden_cases
from nodes_pack import MODEL_NAME, VAE_FILE, install_fixture_models, load_pack
from nodes_pack import run_node as node
from safetensors.torch import save_file

from nextstep_runtime import (
    GenerationSettings,
    NextStepError,
    NextStepVAE,
    VAEConfig,
    images_to_unit,
    load_rgb,
    to_uint8,
)
from nextstep_runtime.model import attention as attention_module
from nextstep_runtime.model.tokens import patchify
from nextstep_runtime.weights.vae_files import VAE_CONFIG_METADATA_KEY

PACK = load_pack()
NODES = PACK.NODE_CLASS_MAPPINGS
preview = importlib.import_module(f"{PACK.__name__}.nodes.preview")
progress = importlib.import_module(f"{PACK.__name__}.nodes.progress")
MODEL_VAE = f"{MODEL_NAME}/vae"
CASES = {case.name: case for case in golden_cases()}
API_CONTRACT = {
    "NextStepModelLoader": ["model_name", "dtype", "attention", "fp8", "gpu_layers", "memory", "compile", "device"],
    "NextStepVAELoader": ["vae_name"],
    "NextStepTextEncode": ["model", "text", "image"],
    "NextStepSampler": ["model", "positive", "width", "height", "batch_size", "seed", "steps", "cfg", "cfg_img",
                        "cfg_schedule", "timesteps_shift", "sampler", "profile", "use_norm", "negative",
                        "latent_image"],
    "NextStepVAEDecode": ["vae", "samples"],
    "NextStepVAEEncode": ["vae", "pixels"],
}


@pytest.fixture(scope="module", autouse=True)
def models_dir(tmp_path_factory):
    return install_fixture_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def model():
    return NODES["NextStepModelLoader"]().load(MODEL_NAME, "float32", "sdpa")[0]


def sampler_settings(case: dict, **changes) -> dict:
    h, w = case["hw"]
    settings = dict(width=w, height=h, batch_size=case["num_images_per_caption"], seed=case["seed"],
                    steps=case["num_sampling_steps"], cfg=case["cfg"], cfg_img=case["cfg_img"],
                    cfg_schedule=case["cfg_schedule"], timesteps_shift=case["timesteps_shift"], sampler=case["sampler"],
                    profile=case["profile"], use_norm=case["use_norm"])
    return {**settings, **changes}


def image_input(path) -> torch.Tensor:
    """An image file as a ComfyUI IMAGE [1, H, W, 3], as LoadImage gives it."""
    return load_rgb(path).movedim(1, -1)


def pixels(image) -> torch.Tensor:
    """A PIL image as an int tensor [H, W, 3]."""
    return torch.from_numpy(np.array(image)).int()


def fixture_vae(name: str = MODEL_VAE):
    return node("NextStepVAELoader", name)[0]


# --- node definitions ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("node_id", sorted(API_CONTRACT))
def test_node_definition_follows_the_api_contract(node_id):
    cls = NODES[node_id]
    inputs = cls.INPUT_TYPES()
    names = list(inputs["required"]) + list(inputs.get("optional", {}))
    assert names == API_CONTRACT[node_id]
    assert cls.CATEGORY == "NextStep"
    assert PACK.NODE_DISPLAY_NAME_MAPPINGS[node_id].startswith("NextStep ")
    for name, spec in {**inputs["required"], **inputs.get("optional", {})}.items():
        assert len(spec[1]["tooltip"]) > 20, f"{node_id}.{name} needs a tooltip"
    assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES)
    assert callable(getattr(cls, cls.FUNCTION))


def test_sampler_defaults_are_the_official_nextstep_1_1_settings():
    required = NODES["NextStepSampler"].INPUT_TYPES()["required"]
    defaults = {name: spec[1]["default"] for name, spec in required.items() if len(spec) > 1 and "default" in spec[1]}
    assert defaults == {"width": 512, "height": 512, "batch_size": 1, "seed": 0, "steps": 28, "cfg": 7.5,
                        "cfg_img": 1.0, "cfg_schedule": "constant", "timesteps_shift": 1.0, "sampler": "sde",
                        "profile": "official", "use_norm": False}
    assert required["width"][1]["step"] == required["height"][1]["step"] == 16
    assert required["width"][1]["min"] == 16
    assert required["seed"][1]["control_after_generate"] is True


def test_loaders_list_model_folders_and_their_vaes():
    assert MODEL_NAME in NODES["NextStepModelLoader"].INPUT_TYPES()["required"]["model_name"][0]
    vaes = NODES["NextStepVAELoader"].INPUT_TYPES()["required"]["vae_name"][0]
    assert vaes.index(MODEL_VAE) < vaes.index(VAE_FILE)  # a model's own VAE first, then files in models/vae
    assert PACK.WEB_DIRECTORY == "./web"


# --- goldens through the graph ------------------------------------------------------------------------------

def encode_prompts(model, case: dict, vae) -> tuple:
    """(VAE Encode ->) Text Encode x2: the positive and negative conditioning of a case."""
    image = node("NextStepVAEEncode", vae, image_input(FIXTURES / case["image"]))[0] if case["image"] else None
    text = case["caption"] + (f" {case['positive_prompt']}" if case["positive_prompt"] else "")
    positive = node("NextStepTextEncode", model, text, image)[0]
    negative = None
    if case["negative_prompt"] is not None:
        negative = node("NextStepTextEncode", model, case["negative_prompt"])[0]
    return positive, negative


def run_graph(model, case: dict, vae_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Loader -> (VAE Encode) -> Text Encode x2 -> Sampler -> VAE Decode, as a workflow wires them."""
    vae = fixture_vae(vae_name)
    positive, negative = encode_prompts(model, case, vae)
    latent = node("NextStepSampler", model, positive, negative=negative, **sampler_settings(case))[0]
    return latent["samples"], node("NextStepVAEDecode", vae, latent)[0]


@pytest.mark.parametrize("case", golden_cases(), ids=lambda case: case.name)
def test_graph_reproduces_golden(model, case: GoldenCase, sdpa_layout: str):
    assert_graph_matches_golden(model, case)


def assert_graph_matches_golden(model, case: GoldenCase) -> None:
    vae_name = VAE_FILE if case.image_path else MODEL_VAE  # both kinds of VAE entry
    latents, images = run_graph(model, case.params, vae_name)

    pipeline = model.loaded.pipeline
    tokens = patchify(pipeline.normalization.to_model_space(latents), pipeline.model.config.latent_patch_size)
    assert_matches_golden(case, {"tokens": tokens, "latents": latents,
                                 "images_uint8": to_uint8(images.movedim(-1, 1))})
    expected = images_to_unit(case.expected["images"]).movedim(1, -1)
    torch.testing.assert_close(images, expected, atol=1e-3, rtol=0)


def test_edit_image_goes_to_the_start_without_a_tag(model):
    case = CASES["official_edit_sde"]
    assert case.params["caption"].startswith("<image>")
    untagged = dict(case.params, caption=case.params["caption"].removeprefix("<image>"))
    latents, _ = run_graph(model, untagged, MODEL_VAE)
    assert_matches_golden(case, {"latents": latents})


def test_latent_and_image_shapes_and_dtypes(model):
    positive = node("NextStepTextEncode", model, "two small boats")[0]
    latent = node("NextStepSampler", model, positive, width=48, height=32, batch_size=2, seed=3, steps=2, cfg=1.0,
                  cfg_img=1.0, cfg_schedule="constant", timesteps_shift=1.0, sampler="ode", profile="official",
                  use_norm=False)[0]
    samples = latent["samples"]
    assert samples.shape == (2, 16, 4, 6) and samples.dtype == torch.float32 and samples.device.type == "cpu"
    images = node("NextStepVAEDecode", fixture_vae(), latent)[0]
    assert images.shape == (2, 32, 48, 3) and images.dtype == torch.float32 and images.device.type == "cpu"
    assert 0 <= images.min() and images.max() <= 1
    assert not torch.equal(images[0], images[1])


def test_vae_encode_centre_crops_to_multiples_of_16():
    pixels = torch.rand(1, 50, 70, 3)
    latent = node("NextStepVAEEncode", fixture_vae(), pixels)[0]["samples"]
    assert latent.shape == (1, 16, 6, 8) and latent.dtype == torch.float32
    same = node("NextStepVAEEncode", fixture_vae(), pixels[:, 1:49, 3:67].contiguous())[0]["samples"]
    torch.testing.assert_close(latent, same)


# --- loaders --------------------------------------------------------------------------------------------------

def test_loaders_reuse_what_is_still_loaded(model):
    again = node("NextStepModelLoader", MODEL_NAME, "float32", "auto")[0]
    assert again.loaded is model.loaded and again.attention == (None,)
    assert fixture_vae() is fixture_vae()
    other_precision = node("NextStepModelLoader", MODEL_NAME, "bfloat16", "sdpa")[0]
    assert other_precision.loaded is not model.loaded
    assert other_precision.loaded.pipeline.model.dtype == torch.bfloat16


def flash_attn_warnings(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if "flash-attn" in record.getMessage()]


@pytest.mark.parametrize("attention,warnings", [("flash_attn", 1), ("auto", 0)])
def test_flash_attn_that_cannot_run_here_falls_back_to_sdpa(attention: str, warnings: int, caplog, monkeypatch):
    """On the CPU flash-attn never runs (missing, or a CUDA-only kernel): asked for, one warning; `auto`, none."""
    monkeypatch.setattr(attention_module, "_last_warning", None)
    with caplog.at_level(logging.WARNING):
        handle = node("NextStepModelLoader", MODEL_NAME, "float32", attention)[0]
        run_graph(handle, CASES["official_t2i_cps_nocfg"].params, MODEL_VAE)
    assert len(flash_attn_warnings(caplog)) == warnings, flash_attn_warnings(caplog)
    assert handle.attention == (None,)  # SDPA for the one range, chosen when the model was placed


@pytest.mark.parametrize("failure", list(FLASH_ATTN_FAILURES))
@pytest.mark.parametrize("attention", ["auto", "flash_attn"])
def test_broken_flash_attn_falls_back_to_sdpa_with_one_warning(attention: str, failure: str, tmp_path, monkeypatch,
                                                               caplog):
    """A flash-attn installed for another torch (found on the path, fails to import): the loader and both sampler
    runs use SDPA with one warning in all, naming the import error, and the workflow still gives the golden."""
    monkeypatch.syspath_prepend(str(broken_flash_attn(tmp_path, failure)))
    monkeypatch.setattr(attention_module, "_last_warning", None)
    with caplog.at_level(logging.WARNING):
        handle = node("NextStepModelLoader", MODEL_NAME, "float32", attention)[0]
        assert_graph_matches_golden(handle, CASES["official_t2i_sde"])
        assert_graph_matches_golden(handle, CASES["official_t2i_cps_nocfg"])
    warned = flash_attn_warnings(caplog)
    assert len(warned) == 1, warned
    assert "does not import" in warned[0] and FLASH_ATTN_FAILURES[failure][1][:40] in warned[0]


# --- errors ---------------------------------------------------------------------------------------------------

def test_width_not_multiple_of_16_is_rejected(model):
    message = NODES["NextStepSampler"].VALIDATE_INPUTS(width=500, height=512)
    assert "width 500" in message and "multiple of 16" in message and "496" in message
    assert NODES["NextStepSampler"].VALIDATE_INPUTS(width=512, height=None) is True
    assert "larger than" in NODES["NextStepSampler"].VALIDATE_INPUTS(width=512, height=4096)
    positive = node("NextStepTextEncode", model, "a cat")[0]
    case = CASES["official_t2i_sde"].params
    with pytest.raises(NextStepError, match="height 40 is not a positive multiple of 16"):
        node("NextStepSampler", model, positive, **sampler_settings(case, height=40))


def test_missing_model_folder_names_where_it_looked(models_dir):
    """A name that is neither on disk nor a released model (those are fetched: test_fetch.py)."""
    with pytest.raises(NextStepError) as error:
        node("NextStepModelLoader", "NextStep-2", "auto", "auto")
    assert "NextStep-2" in str(error.value) and str(models_dir / "nextstep") in str(error.value)
    assert "stepfun-ai/NextStep-1.1" in str(error.value)
    with pytest.raises(NextStepError, match="NextStep-2/vae"):
        node("NextStepVAELoader", "NextStep-2/vae")


def test_model_folder_without_weights_names_the_file(models_dir):
    broken = models_dir / "nextstep" / "no-weights"
    broken.mkdir()
    (broken / "config.json").write_text((FIXTURES / MODEL_NAME / "config.json").read_text())
    with pytest.raises(NextStepError, match="no weights in .*no-weights"):
        node("NextStepModelLoader", "no-weights", "float32", "auto")


@pytest.fixture(scope="module")
def four_channel_vae(models_dir):
    """A VAE whose latent space does not fit NextStep's 16-channel tokens (random weights)."""
    config = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4)
    vae = NextStepVAE(config)
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, models_dir / "vae" / "four-channel.safetensors",
              metadata={VAE_CONFIG_METADATA_KEY: json.dumps({**config.__dict__, "ch_mult": list(config.ch_mult)})})
    return fixture_vae("four-channel.safetensors")


def test_vae_that_does_not_match_the_model_is_refused(model, four_channel_vae):
    positive = node("NextStepTextEncode", model, "a cat")[0]
    latent = node("NextStepSampler", model, positive, width=32, height=32, batch_size=1, seed=0, steps=1, cfg=1.0,
                  cfg_img=1.0, cfg_schedule="constant", timesteps_shift=1.0, sampler="ode", profile="official",
                  use_norm=False)[0]
    with pytest.raises(NextStepError, match=r"got a LATENT of 16 channels .*; NextStep takes \[batch, 4, height/8"):
        node("NextStepVAEDecode", four_channel_vae, latent)
    edit_latent = node("NextStepVAEEncode", four_channel_vae, torch.rand(1, 32, 32, 3))[0]
    with pytest.raises(NextStepError, match=r"4 channels .*; NextStep takes \[batch, 16, height/8, width/8\]"):
        node("NextStepTextEncode", model, "<image>make it blue", edit_latent)


FOREIGN_LATENTS = {  # the kinds of another model's LATENT the pack can tell apart: (LATENT, what the refusal says)
    "SD 1.x/SDXL (4 channels)": ({"samples": torch.zeros(1, 4, 8, 8)},
                                 r"a LATENT of 4 channels \[1, 4, 8, 8\] \(SD 1.x, SD 2.x and SDXL latents have 4\)"),
    "other channel count (Flux.2's 128)": ({"samples": torch.zeros(1, 128, 4, 4)},
                                           r"a LATENT of 128 channels \[1, 128, 4, 4\]: a latent"),
    "video (frames axis)": ({"samples": torch.zeros(1, 16, 3, 8, 8)},
                            r"a video LATENT \[1, 16, 3, 8, 8\] \[batch, channels, frames, height, width\]"),
    "audio (type key)": ({"samples": torch.zeros(1, 64, 50), "type": "audio"},
                         r"a LATENT of type 'audio' \[1, 64, 50\], not an image latent"),
    "tagged 16 channels": ({"samples": torch.zeros(1, 16, 8, 8), "type": "audio"}, r"a LATENT of type 'audio'"),
    "wrong rank": ({"samples": torch.zeros(16, 8, 8)}, r"a LATENT of 3 dimensions \[16, 8, 8\]"),
}
IMAGE_ROUTE = ("To bring another model's output in, decode it to an IMAGE with its own model's VAE Decode, then "
               "encode that with NextStep VAE Encode")


@pytest.mark.parametrize("kind", FOREIGN_LATENTS)
@pytest.mark.parametrize("where", ["NextStep VAE Decode", "NextStep Sampler's latent_image",
                                   "NextStep Text Encode's image"])
def test_a_foreign_latent_is_refused_naming_the_image_route(model, where, kind):
    latent, says = FOREIGN_LATENTS[kind]
    with pytest.raises(NextStepError) as refused:
        if where == "NextStep VAE Decode":
            node("NextStepVAEDecode", fixture_vae(), latent)
        elif where == "NextStep Sampler's latent_image":
            continue_in_graph(model, CASES["official_t2i_sde"].params, latent)
        else:
            node("NextStepTextEncode", model, "<image>make it blue", latent)
    message = str(refused.value)
    assert message.startswith(f"{where} got ") and re.search(says, message), message
    assert "latents of its own VAE" in message and IMAGE_ROUTE in message


def test_an_untagged_16_channel_latent_passes_as_the_docs_say(model):
    """SD3's and Flux's latents have NextStep's shape and carry nothing else: they cannot be told apart."""
    latent = {"samples": torch.zeros(1, 16, 4, 4), "batch_index": [0]}
    assert node("NextStepVAEDecode", fixture_vae(), latent)[0].shape == (1, 32, 32, 3)


def test_editing_conditioning_misuse_is_refused(model):
    vae = fixture_vae()
    image = node("NextStepVAEEncode", vae, image_input(FIXTURES / "edit_input_64.png"))[0]
    with pytest.raises(NextStepError, match="contains <image> but no image is connected"):
        node("NextStepTextEncode", model, "<image>Add a hat.")
    with pytest.raises(NextStepError, match="prompt has 2 <image> tag"):
        node("NextStepTextEncode", model, "<image> and <image>", image)
    two_images = {"samples": torch.cat([image["samples"]] * 2)}
    with pytest.raises(NextStepError, match="holds 2 images but the prompt has 0"):
        node("NextStepTextEncode", model, "Add a hat.", two_images)
    odd = {"samples": image["samples"][..., :7]}
    with pytest.raises(NextStepError, match="needs multiples of 16"):
        node("NextStepTextEncode", model, "Add a hat.", odd)
    positive = node("NextStepTextEncode", model, "Add a hat.")[0]
    image_negative = node("NextStepTextEncode", model, "Copy original image.", image)[0]
    case = CASES["official_edit_sde"].params
    with pytest.raises(NextStepError, match="negative prompt carries an input image"):
        node("NextStepSampler", model, positive, negative=image_negative, **sampler_settings(case))


# --- progress and preview -------------------------------------------------------------------------------------

def test_progress_reports_every_token_and_previews_rows_so_far(model):
    case = CASES["official_t2i_sde"].params
    golden = CASES["official_t2i_sde"].expected
    pipeline = model.loaded.pipeline
    to_rgb = model.loaded.preview_colours()
    rows, cols = case["hw"][0] // 16, case["hw"][1] // 16
    drawer = preview.TokenPreview(to_rgb, pipeline.normalization, (rows, cols), 2)
    reports = []
    callback = progress.TokenProgress(lambda done, total, image: reports.append((done, total, image)), drawer)
    settings = sampler_settings(case)
    settings["batch"] = settings.pop("batch_size")
    pipeline.sample(case["caption"], GenerationSettings(**settings), negative=case["negative_prompt"],
                    positive=case["positive_prompt"], callback=callback)

    assert [(done, total) for done, total, _ in reports] == [(n, rows * cols) for n in range(1, rows * cols + 1)]
    first, last = reports[0][2], reports[-1][2]
    assert first is not None and last is not None
    assert first.size == last.size == (cols * 2, rows * 2)
    expected = (to_rgb(golden["latents"][0]) * 255).round()
    assert (pixels(last) - expected).abs().max() <= 1
    grey = round(preview.UNFILLED_GREY * 255)
    first_pixels = pixels(first)
    assert (first_pixels[2:] == grey).all() and (first_pixels[:2, 2:] == grey).all()


def test_preview_colours_come_from_the_model_vae_or_a_channel_view(model, models_dir):
    fitted = model.loaded.preview_colours()
    assert fitted.weight.shape == (16, 3) and not torch.equal(fitted.weight, preview.channel_view(16).weight)
    assert model.loaded.preview_colours() is fitted  # fitted once per model
    no_vae = models_dir / "nextstep" / "no-vae"
    no_vae.mkdir()
    for item in (FIXTURES / MODEL_NAME).iterdir():
        if item.name != "vae":
            (no_vae / item.name).symlink_to(item)
    handle = node("NextStepModelLoader", "no-vae", "float32", "sdpa")[0]
    assert torch.equal(handle.loaded.preview_colours().weight, preview.channel_view(16).weight)


def test_loader_fp8_and_streamed_layers_stay_close_to_bfloat16():
    """The loader's memory options run through the whole graph; tolerances as in test_weight_modes."""
    case = CASES["official_t2i_cps_nocfg"].params
    results = []
    for options in ({}, {"fp8": True}, {"fp8": True, "gpu_layers": 1}):
        handle = node("NextStepModelLoader", MODEL_NAME, "bfloat16", "sdpa", **options)[0]
        positive = node("NextStepTextEncode", handle, case["caption"])[0]
        results.append(node("NextStepSampler", handle, positive, **sampler_settings(case))[0]["samples"])
    bf16, fp8, streamed = results
    assert (fp8 - bf16).abs().max() > 0  # really a different weight format
    assert (fp8 - bf16).abs().mean() < 0.05
    assert torch.equal(streamed, fp8)


def test_loader_memory_setting_int4_and_the_older_fp8_switch():
    """memory int4 packs the decoder; auto on the CPU is the plain dtype; a saved `fp8: true` still means fp8
    (and contradicting it is an error); a repacked folder loads as it is."""
    from nextstep_runtime.weights.fp8 import FP8Linear
    from nextstep_runtime.weights.int4 import Int4Linear

    def linears(handle, kind):
        return sum(isinstance(m, kind) for m in handle.loaded.pipeline.model.layers.modules())

    int4 = node("NextStepModelLoader", MODEL_NAME, "bfloat16", "sdpa", memory="int4")[0]
    assert linears(int4, Int4Linear) == 14
    auto = node("NextStepModelLoader", MODEL_NAME, "bfloat16", "sdpa")[0]
    assert linears(auto, Int4Linear) == linears(auto, FP8Linear) == 0
    legacy = node("NextStepModelLoader", MODEL_NAME, "bfloat16", "sdpa", True, -1)[0]  # old widgets_values
    assert linears(legacy, FP8Linear) == 14
    with pytest.raises(NextStepError, match="fp8 is on but memory is 'int4'"):
        node("NextStepModelLoader", MODEL_NAME, "bfloat16", "sdpa", fp8=True, memory="int4")
    case = CASES["official_t2i_cps_nocfg"].params
    positive = node("NextStepTextEncode", int4, case["caption"])[0]
    latents = node("NextStepSampler", int4, positive, **sampler_settings(case))[0]["samples"]
    assert torch.isfinite(latents).all()


def test_loader_accepts_a_repacked_folder(models_dir):
    from nextstep_runtime.weights.repack import convert_folder

    convert_folder(FIXTURES / MODEL_NAME, models_dir / "nextstep" / "tiny-int4", "int4")
    handle = node("NextStepModelLoader", "tiny-int4", "bfloat16", "sdpa")[0]  # memory auto: its own format
    reference = node("NextStepModelLoader", MODEL_NAME, "bfloat16", "sdpa", memory="int4")[0]
    case = CASES["official_t2i_cps_nocfg"].params
    results = [node("NextStepSampler", h, node("NextStepTextEncode", h, case["caption"])[0],
                    **sampler_settings(case))[0]["samples"] for h in (handle, reference)]
    assert torch.equal(*results)
    with pytest.raises(NextStepError, match="holds int4 weights"):
        node("NextStepModelLoader", "tiny-int4", "bfloat16", "sdpa", memory="full")


def test_loader_rejects_more_gpu_layers_than_the_model_has():
    with pytest.raises(NextStepError, match=r"gpu_layers must be between 0 and 2 \(got 5\)"):
        node("NextStepModelLoader", MODEL_NAME, "float32", "sdpa", gpu_layers=5)


@pytest.fixture(scope="module")
def split_model():
    return node("NextStepModelLoader", MODEL_NAME, "float32", "sdpa", device="cpu,cpu")[0]


@pytest.mark.parametrize("case", golden_cases(), ids=lambda case: case.name)
def test_graph_through_a_split_model_reproduces_golden(split_model, case: GoldenCase):
    """The loader's `device` splitting the layers over two CPU entries (docs/multi-gpu.md): every golden."""
    assert split_model.loaded.pipeline.model.placement.describe() == "cpu:0-0,cpu:1-1"
    assert_graph_matches_golden(split_model, case)


def test_loader_device_chooses_one_device_or_refuses_with_the_fix():
    chosen = node("NextStepModelLoader", MODEL_NAME, "float32", "sdpa", device="cpu")[0]
    assert chosen.loaded.pipeline.model.placement.describe() == "cpu:0-1"
    auto = node("NextStepModelLoader", MODEL_NAME, "float32", "sdpa", device="auto")[0]  # no two GPUs: one device
    assert auto.loaded.pipeline.model.placement.describe() == "cpu:0-1"
    with pytest.raises(NextStepError, match="list at most 2 devices"):
        node("NextStepModelLoader", MODEL_NAME, "float32", "sdpa", device="cpu,cpu,cpu")
    with pytest.raises(NextStepError, match="unknown device 'gpu0' in the device list"):
        node("NextStepModelLoader", MODEL_NAME, "float32", "sdpa", device="gpu0,cpu")


# --- image-conditioned sampling (latent_image with a noise mask) -----------------------------------------------

def continue_in_graph(model, case: dict, latent_image: dict, **changes) -> torch.Tensor:
    """Text Encode(s) -> Sampler with latent_image, as an inpainting/outpainting workflow wires it."""
    positive, negative = encode_prompts(model, case, fixture_vae())
    settings = sampler_settings(case, **changes)
    return node("NextStepSampler", model, positive, negative=negative, latent_image=latent_image, **settings)[0]["samples"]


def noise_masked(latent: torch.Tensor, mask: torch.Tensor) -> dict:
    """What SetLatentNoiseMask makes of a LATENT and a MASK."""
    return {"samples": latent, "noise_mask": mask.reshape((-1, 1, mask.shape[-2], mask.shape[-1]))}


@pytest.mark.parametrize("name", ["official_t2i_sde", "official_edit_sde"])
def test_sampler_keeps_the_masked_out_tokens_of_latent_image(model, name):
    """The golden's own latent with its top half kept (the mask's 0) and width/height left wrong: the golden."""
    case = CASES[name]
    height, width = case.params["hw"]
    mask = torch.ones((height, width))
    mask[:32] = 0
    latents = continue_in_graph(model, case.params, noise_masked(case.expected["latents"], mask), width=16, height=16)
    assert_matches_golden(case, {"latents": latents})
    assert torch.allclose(latents[..., :4, :], case.expected["latents"][..., :4, :], atol=1e-6, rtol=0)


def test_sampler_latent_image_without_mask_only_gives_the_size(model):
    case = CASES["official_t2i_cps_nocfg"]
    latents = continue_in_graph(model, case.params, {"samples": torch.zeros_like(case.expected["latents"])},
                                width=512, height=512)
    assert_matches_golden(case, {"latents": latents})


def test_sampler_latent_image_misuse_is_refused_and_the_next_run_is_fine(model):
    case = CASES["official_t2i_ode_linear_batch2"]
    golden = case.expected["latents"]
    height, width = case.params["hw"]
    bad = {
        "another model family": ({"samples": torch.zeros(1, 4, 8, 8)}, "latent of another model family"),
        "a batch mismatch": ({"samples": golden[:1].repeat(3, 1, 1, 1)}, "holds 3 images but the batch size is 2"),
        "a mask batch mismatch": (noise_masked(golden, torch.ones((3, height, width))), "mask holds 3 images"),
        "an odd size": ({"samples": torch.zeros(1, 16, 5, 8)}, "height 40 is not a positive multiple of 16"),
    }
    for label, (latent_image, needle) in bad.items():
        with pytest.raises(NextStepError, match=needle):
            continue_in_graph(model, case.params, latent_image)
    # a mask of another size (here the latent's) is stretched to the image like KSampler: the top row kept
    small_mask = torch.ones((1, height // 8, width // 8))
    small_mask[:, :2] = 0
    latents = continue_in_graph(model, case.params, noise_masked(golden, small_mask))
    assert_matches_golden(case, {"latents": latents})
    assert torch.allclose(latents[..., :2, :], golden[..., :2, :], atol=1e-6, rtol=0)


def test_text_encode_warns_about_inputs_far_over_the_trained_size(model, caplog):
    big = {"samples": torch.zeros(1, 16, 96, 96)}   # 768x768 pixels: 2304 tokens
    with caplog.at_level(logging.WARNING, logger="NextStep"):
        node("NextStepTextEncode", model, "<image>make it blue", big)
    assert "2304 tokens" in caplog.text and "ImageScaleToTotalPixels" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="NextStep"):
        node("NextStepTextEncode", model, "<image>make it blue", {"samples": torch.zeros(1, 16, 64, 64)})
    assert "tokens" not in caplog.text
