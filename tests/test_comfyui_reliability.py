"""What a new user (or a bad file) can send a real ComfyUI: the plan route answers bad configs, bad settings and
repeated parameters with a 4xx at once, slow planning never holds up the other routes, a string where a boolean
is meant is refused, and NaN or empty latents and masks coming from ComfyUI's own nodes end in an error, never in
a black image reported as success.

The server comes from comfyui_server.py (skipped locally without COMFYUI_DIR, failed under CI).
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from comfyui_server import ComfyUI, running_comfyui
from fixture_workflows import workflow
from goldens import TINY_MODEL, golden_cases
from model_folders import copy_model, deepen, edit_config
from nodes_pack import MODEL_NAME
from safetensors.torch import save_file

from nextstep_runtime.weights.repack import convert_folder

CASE = {case.name: case for case in golden_cases()}["official_t2i_sde"].params
DEEP_LAYERS = 1024
"""Decoder layers of the slow-but-valid folder: planning it builds that many layers on the meta device (seconds)."""
SLOW_REQUESTS = 12
ANSWER_WITHIN_S = 5.0


def bad_config_folders(root: Path) -> dict[str, Path]:
    """Model folders whose config.json the plan route must refuse at once, by name."""
    folders = {}
    for name, changes in {"layers-10e400": {"num_hidden_layers": 10**400}, "hidden-2e31": {"hidden_size": 2**31},
                          "heads-text": {"num_attention_heads": "4"}, "gen-pos-no": {"use_gen_pos_embed": "no"}}.items():
        folders[name] = copy_model(root / name)
        edit_config(folders[name], **changes)
    for name, text in {"nested-list": "[" * 200_000 + "]" * 200_000,
                       "nested-object": '{"a": ' * 150_000 + "0" + "}" * 150_000}.items():
        folders[name] = copy_model(root / name)
        (folders[name] / "config.json").write_text(text)
    return folders


@pytest.fixture(scope="module")
def comfy(tmp_path_factory) -> ComfyUI:
    folders = tmp_path_factory.mktemp("folders")
    models = bad_config_folders(folders)
    models["deep"] = copy_model(folders / "deep")
    deepen(models["deep"], DEEP_LAYERS)
    convert_folder(TINY_MODEL, folders / "int4", "int4")
    models["int4"] = folders / "int4"
    with running_comfyui(tmp_path_factory.mktemp("comfyui"), models=models) as server:
        yield server


def timed(comfy: ComfyUI, path: str) -> tuple[int, dict, float]:
    start = time.monotonic()
    status, body = comfy.request(path)
    return status, body, time.monotonic() - start


# --- the plan route --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,message", [
    ("layers-10e400", "num_hidden_layers is 1000000000000000000000000000000000000000... (401 characters), outside"),
    ("hidden-2e31", "hidden_size is 2147483648, outside the range this runtime accepts (1 to 65536)"),
    ("heads-text", "num_attention_heads is '4' but must be a whole number"),
    ("gen-pos-no", "use_gen_pos_embed is 'no' but must be true or false"),
    ("nested-list", "is nested too deeply to read"),
    ("nested-object", "is nested too deeply to read"),
])
def test_plan_route_refuses_a_bad_config_at_once(comfy, name, message):
    status, answer, seconds = timed(comfy, f"/nextstep/plan?model={name}")
    assert status == 422 and "config.json" in answer["error"] and message in answer["error"], answer
    assert seconds < ANSWER_WITHIN_S
    assert comfy.process.poll() is None


@pytest.mark.parametrize("query,message", [
    ("cfg=-5", "cfg -5.0 is outside the allowed range 1.0 to 30.0"),
    ("cfg=0.5", "cfg 0.5 is outside the allowed range"),
    ("cfg=1e308", "cfg 1e+308 is outside the allowed range"),
    ("cfg_img=nan", "plan parameter cfg_img='nan' is not a number"),
    ("batch=65", "batch 65 is outside the allowed range 1 to 64"),
    ("steps=100000", "steps 100000 is outside the allowed range 1 to 200"),
    ("steps=0", "steps 0 is outside the allowed range 1 to 200"),
    ("width=512&width=abc", "parameter 'width' is given 2 times; give it once"),
    ("cfg=2&cfg=2&cfg=3", "parameter 'cfg' is given 3 times; give it once"),
    (f"model={MODEL_NAME}", "parameter 'model' is given 2 times"),
])
def test_plan_route_refuses_what_the_sampler_refuses(comfy, query, message):
    status, answer, seconds = timed(comfy, f"/nextstep/plan?model={MODEL_NAME}&{query}")
    assert status == 400 and answer["error"].startswith(message), answer
    assert seconds < ANSWER_WITHIN_S


@pytest.mark.parametrize("query", ["memory=full", "memory=fp8", "fp8=true", "memory=full&dtype=float16"])
def test_plan_route_of_a_repacked_int4_folder_refuses_what_loading_refuses(comfy, query):
    status, answer = comfy.request(f"/nextstep/plan?model=int4&{query}")
    assert status == 400 and "holds int4 weights (repacked); load it with int4 weights" in answer["error"], answer
    status, plan = comfy.request("/nextstep/plan?model=int4&memory=int4")
    assert status == 200 and plan["mode"]["storage"] == "int4"


def test_slow_planning_does_not_hold_up_the_other_routes(comfy):
    """Twelve plans of a deep (valid) model at once: the presets route and ComfyUI's own routes still answer at
    once, and every plan is answered."""
    timed(comfy, "/nextstep/plan?model=deep")  # the folder's headers read once, as the panel reads them
    status, _, one_plan = timed(comfy, "/nextstep/plan?model=deep")
    assert status == 200
    with ThreadPoolExecutor(SLOW_REQUESTS) as pool:
        plans = [pool.submit(comfy.request, "/nextstep/plan?model=deep") for _ in range(SLOW_REQUESTS)]
        time.sleep(min(one_plan / 2, 2.0))  # every plan request is in the server now, the first ones running
        waits = {path: timed(comfy, path) for path in ("/nextstep/presets", "/system_stats", "/object_info/SaveImage")}
        busy = sum(not plan.done() for plan in plans)
        answers = [plan.result() for plan in plans]
    assert busy > 0, "the plans ended before the other routes were asked: make the folder deeper"
    for path, (status, _, seconds) in waits.items():
        assert status == 200 and seconds < max(1.0, one_plan / 2), (path, seconds, one_plan)
    assert all(status == 200 for status, _ in answers), answers


# --- API prompts ------------------------------------------------------------------------------------------------

def node_errors(comfy: ComfyUI, prompt: dict) -> str:
    status, answer = comfy.request("/prompt", {"prompt": prompt})
    assert status == 400, answer
    return json.dumps(answer["node_errors"])


@pytest.mark.parametrize("node_type,name,value", [
    ("NextStepSampler", "use_norm", "false"), ("NextStepSampler", "use_norm", "true"),
    ("NextStepSampler", "use_norm", 0), ("NextStepModelLoader", "fp8", "false"),
    ("NextStepModelLoader", "compile", "false"), ("NextStepModelLoader", "compile", 1),
    ("NextStepModelLoader", "fp8", None), ("NextStepSampler", "use_norm", {"__value__": "no"}),
])
def test_a_string_or_number_where_a_boolean_is_meant_is_refused(comfy, node_type, name, value):
    prompt = workflow("nextstep_1.1_text_to_image", CASE, "rel/bool")
    (inputs,) = [node["inputs"] for node in prompt.values() if node["class_type"] == node_type]
    inputs[name] = value
    given = value["__value__"] if isinstance(value, dict) else value
    assert f"{name} {given!r} is not a boolean; use true or false" in node_errors(comfy, prompt)


def masked_sampling(prefix: str, latent: dict, mask_value: float = 1.0, mask_size: int = 64) -> dict:
    """Text to image with latent_image from `latent` (nodes giving a LATENT) through Set Latent Noise Mask with a
    square SolidMask of `mask_value`."""
    prompt = workflow("nextstep_1.1_text_to_image", CASE, prefix)
    (sampler,) = [key for key, node in prompt.items() if node["class_type"] == "NextStepSampler"]
    prompt.update(latent)
    prompt["101"] = {"class_type": "SolidMask", "inputs": {"value": mask_value, "width": mask_size,
                                                                "height": mask_size}}
    prompt["102"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["100", 0], "mask": ["101", 0]}}
    prompt[sampler]["inputs"]["latent_image"] = ["102", 0]
    return prompt


def load_latent(comfy: ComfyUI, name: str, samples: torch.Tensor) -> dict:
    """A .latent file in ComfyUI's input folder, and the Load Latent node reading it."""
    save_file({"latent_tensor": samples.contiguous(), "latent_format_version_0": torch.tensor([])},
              comfy.input / f"{name}.latent")
    return {"100": {"class_type": "LoadLatent", "inputs": {"latent": f"{name}.latent"}}}


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("index", [0, 255])
def test_a_non_finite_latent_through_native_nodes_is_an_error(comfy, value, index):
    samples = torch.zeros(1, 16, 8, 8)
    samples.view(-1)[index] = value
    prompt = masked_sampling("rel/nan-latent", load_latent(comfy, f"bad-{value}-{index}", samples))
    assert "latent_image holds 1 NaN or infinite value (of 1024)" in comfy.failure_message(prompt)


@pytest.mark.parametrize("size", [64, 32])
def test_a_nan_mask_through_native_nodes_is_an_error(comfy, size):
    # JSON NaN passes ComfyUI's min/max check of SolidMask's value (infinity does not)
    prompt = masked_sampling("rel/nan-mask", load_latent(comfy, "good", torch.zeros(1, 16, 8, 8)), float("nan"), size)
    assert f"the noise_mask of latent_image holds {size * size} NaN or infinite values" in comfy.failure_message(prompt)


@pytest.mark.parametrize("shape", [(0, 16, 8, 8), (1, 16, 0, 8), (1, 16, 8, 0)])
def test_vae_decode_of_an_empty_latent_is_an_error_with_its_shape(comfy, shape):
    prompt = workflow("nextstep_1.1_text_to_image", CASE, "rel/empty")
    (decode,) = [node["inputs"] for node in prompt.values() if node["class_type"] == "NextStepVAEDecode"]
    prompt.update(load_latent(comfy, "empty-" + "x".join(map(str, shape)), torch.zeros(shape)))
    decode["samples"] = ["100", 0]
    message = comfy.failure_message(prompt)
    assert f"the latents to decode are {list(shape)} [batch, channels, height/8, width/8]: no image" in message


def test_after_the_refusals_a_good_run_still_works(comfy):
    prompt = masked_sampling("rel/good", load_latent(comfy, "good", torch.zeros(1, 16, 8, 8)), 1.0)
    image = comfy.run(prompt)
    assert image.shape == (64, 64, 3) and image.std() > 0
