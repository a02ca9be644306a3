"""End to end in a real ComfyUI: the pack loaded from custom_nodes, the example API workflows run over HTTP.

The server comes from comfyui_server.py: skipped locally unless COMFYUI_DIR names a ComfyUI checkout, failed
under CI when it does not.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from comfyui_server import ComfyUI, example_prompt, running_comfyui
from fixture_workflows import case_settings, with_fixture_models, workflow
from goldens import FIXTURES, UINT8_TOLERANCE, golden_cases
from model_folders import load_on
from nodes_pack import MODEL_NAME, VAE_FILE
from PIL import Image

from nextstep_runtime import GenerationSettings, NextStepPipeline, doctor_report, images_to_unit, load_rgb, to_uint8
from nextstep_runtime.presets import presets_as_json
from nextstep_runtime.weights.released import RELEASED_MODELS

CASES = {case.name: case for case in golden_cases()}
TYPES = {  # node -> (required inputs, optional inputs, output types); combos listed as None
    "NextStepModelLoader": ({"model_name": None, "dtype": None, "attention": None}, {"fp8": "BOOLEAN", "gpu_layers": "INT", "memory": None,
                                                                                      "compile": "BOOLEAN",
                                                                                      "device": "STRING"},
                            ["NEXTSTEP_MODEL"]),
    "NextStepVAELoader": ({"vae_name": None}, {}, ["NEXTSTEP_VAE"]),
    "NextStepTextEncode": ({"model": "NEXTSTEP_MODEL", "text": "STRING"}, {"image": "LATENT"},
                           ["NEXTSTEP_CONDITIONING"]),
    "NextStepSampler": ({"model": "NEXTSTEP_MODEL", "positive": "NEXTSTEP_CONDITIONING", "width": "INT",
                         "height": "INT", "batch_size": "INT", "seed": "INT", "steps": "INT", "cfg": "FLOAT",
                         "cfg_img": "FLOAT", "cfg_schedule": None, "timesteps_shift": "FLOAT", "sampler": None,
                         "profile": None, "use_norm": "BOOLEAN"}, {"negative": "NEXTSTEP_CONDITIONING", "latent_image": "LATENT"},
                        ["LATENT"]),
    "NextStepVAEDecode": ({"vae": "NEXTSTEP_VAE", "samples": "LATENT"}, {}, ["IMAGE"]),
    "NextStepVAEEncode": ({"vae": "NEXTSTEP_VAE", "pixels": "IMAGE"}, {}, ["LATENT"]),
}


@pytest.fixture(scope="module")
def comfy(tmp_path_factory) -> ComfyUI:
    with running_comfyui(tmp_path_factory.mktemp("comfyui")) as server:
        yield server


def golden_pixels(name: str) -> np.ndarray:
    unit = images_to_unit(CASES[name].expected["images"])
    return to_uint8(unit)[0].movedim(0, -1).numpy()


def assert_close_uint8(actual: np.ndarray, expected: np.ndarray, tolerance: int = UINT8_TOLERANCE) -> None:
    assert actual.shape == expected.shape
    assert np.abs(actual.astype(int) - expected.astype(int)).max() <= tolerance


def test_object_info_lists_every_node_with_its_types(comfy):
    status, info = comfy.request("/object_info")
    assert status == 200
    for node_id, (required, optional, outputs) in TYPES.items():
        entry = info[node_id]
        assert entry["category"] == "NextStep" and entry["output"] == outputs
        for expected, actual in ((required, entry["input"]["required"]), (optional, entry["input"].get("optional", {}))):
            assert list(actual) == list(expected), node_id
            for name, input_type in expected.items():
                assert actual[name][0] == input_type if input_type else isinstance(actual[name][0], list), name
                assert actual[name][1]["tooltip"]
    released = list(RELEASED_MODELS)  # listed before they are on disk (a run fetches them: test_comfyui_fetch.py)
    assert info["NextStepModelLoader"]["input"]["required"]["model_name"][0] == [MODEL_NAME, *released]
    assert info["NextStepVAELoader"]["input"]["required"]["vae_name"][0] == [
        f"{MODEL_NAME}/vae", *[f"{name}/vae" for name in released], VAE_FILE]


def test_text_to_image_workflow_reproduces_the_golden(comfy):
    case = CASES["official_t2i_sde"].params
    saved = comfy.run(workflow("nextstep_1.1_text_to_image", case, "e2e/t2i"))
    assert_close_uint8(saved, golden_pixels("official_t2i_sde"))


def test_under_fp16_vae_the_image_equals_the_default_runs(comfy, tmp_path):
    """ComfyUI's --fp16-vae would run this VAE in float16, where it overflows: the pack runs it in a dtype that
    works (float32 on this CPU server, as by default) and says why, once."""
    case = CASES["official_t2i_sde"].params
    default = comfy.run(workflow("nextstep_1.1_text_to_image", case, "e2e/default_vae"))
    with running_comfyui(tmp_path, args=["--fp16-vae"]) as fp16_vae:
        saved = fp16_vae.run(workflow("nextstep_1.1_text_to_image", case, "e2e/fp16_vae"))
        log = fp16_vae.log.read_text()
    assert np.array_equal(saved, default)
    assert log.count("--fp16-vae is set, but the NextStep VAE overflows in float16 (black images); it runs in "
                     "float32 on cpu instead") == 1


def test_edit_workflow_reproduces_the_golden(comfy):
    case = CASES["official_edit_sde"].params
    saved = comfy.run(workflow("nextstep_1_large_edit", case, "e2e/edit"))
    assert_close_uint8(saved, golden_pixels("official_edit_sde"))


def test_upscale_workflow_chains_into_native_nodes(comfy):
    case = CASES["official_t2i_sde"].params
    saved = comfy.run(workflow("nextstep_1.1_text_to_image_upscale", case, "e2e/upscaled"))
    # ComfyUI's lanczos: the image truncated to uint8, resized by PIL; one level more for a flipped truncation.
    unit = images_to_unit(CASES["official_t2i_sde"].expected["images"])[0].movedim(0, -1).numpy()
    truncated = Image.fromarray(np.clip(255.0 * unit, 0, 255).astype(np.uint8))
    expected = np.asarray(truncated.resize((2 * unit.shape[1], 2 * unit.shape[0]), Image.Resampling.LANCZOS))
    assert_close_uint8(saved, expected, UINT8_TOLERANCE + 1)


def test_generate_then_edit_workflow_runs_both_samplers(comfy):
    prompt = with_fixture_models(example_prompt("nextstep_generate_then_edit"), "e2e/generate-edit")
    for node in prompt.values():
        if node["class_type"] == "NextStepSampler":
            node["inputs"].update(width=32, height=48, steps=2, seed=1)
    entry = comfy.wait(comfy.submit(prompt))
    assert entry["status"]["status_str"] == "success", f"{entry['status']}\n{comfy.log_tail()}"
    (generated,) = entry["outputs"]["7"]["images"]  # Preview Image of the generated picture
    (edited,) = entry["outputs"]["15"]["images"]
    assert (generated["type"], edited["type"]) == ("temp", "output")
    saved = np.asarray(Image.open(comfy.output / edited["subfolder"] / edited["filename"]))
    assert saved.shape == (48, 32, 3)


def expected_from_runtime(case: dict, **changes) -> np.ndarray:
    """What the runtime itself makes of a case with changed settings (float32, CPU)."""
    pipeline = NextStepPipeline.from_pretrained(FIXTURES / MODEL_NAME, device="cpu", dtype="float32")
    settings = {**case_settings(case), **changes}
    settings["batch"] = settings.pop("batch_size")
    result = pipeline.generate(case["caption"], GenerationSettings(**settings), negative=case["negative_prompt"],
                               positive=case["positive_prompt"])
    return to_uint8(images_to_unit(result.images))[0].movedim(0, -1).numpy()


def test_interrupt_mid_generation_then_the_next_run_works(comfy):
    case = CASES["official_t2i_sde"].params
    comfy.run(workflow("nextstep_1.1_text_to_image", case, "e2e/warm-up", width=16, height=16, steps=1))
    # Loaders and prompts are now cached, so the long run below starts straight in the sampler, whose 3600
    # tokens of 100 steps (within the fixture model's context of 4096) take far longer than the second we wait.
    long_run = workflow("nextstep_1.1_text_to_image", case, "e2e/interrupted", width=960, height=960, steps=100,
                        seed=1)
    prompt_id = comfy.submit(long_run)
    deadline = time.monotonic() + 60
    while not comfy.request("/queue")[1]["queue_running"]:
        assert time.monotonic() < deadline, comfy.log_tail()
        time.sleep(0.1)
    time.sleep(1)
    assert comfy.request("/interrupt", {})[0] == 200
    entry = comfy.wait(prompt_id)
    events = dict((event, data) for event, data in entry["status"]["messages"])
    assert "execution_interrupted" in events, entry["status"]
    assert events["execution_interrupted"]["node_type"] == "NextStepSampler"
    assert not entry["outputs"]

    assert comfy.request("/free", {"unload_models": True})[0] == 200  # the next run reloads via model management
    saved = comfy.run(workflow("nextstep_1.1_text_to_image", case, "e2e/after-interrupt", seed=2))
    assert_close_uint8(saved, expected_from_runtime(case, seed=2))


def test_unloading_a_streamed_model_frees_its_slots_and_the_next_run_makes_them_again(comfy):
    """gpu_layers 1 of the fixture's 2: the streaming slots are no weights ComfyUI knows of, so "Unload models" frees
    them through the pack's detach callback; the next run (another seed, so the sampler runs) makes them again."""
    case = CASES["official_t2i_sde"].params

    def streamed(prefix: str, **changes) -> dict:
        prompt = workflow("nextstep_1.1_text_to_image", case, prefix, **changes)
        (loader,) = [node["inputs"] for node in prompt.values() if node["class_type"] == "NextStepModelLoader"]
        loader["gpu_layers"] = 1
        return prompt

    assert_close_uint8(comfy.run(streamed("e2e/streamed")), golden_pixels("official_t2i_sde"))
    assert comfy.request("/free", {"unload_models": True})[0] == 200  # done by the prompt worker when idle
    deadline = time.monotonic() + 60
    while "NextStep: freed the streaming slots of the unloaded model" not in comfy.log.read_text(errors="replace"):
        assert time.monotonic() < deadline, comfy.log_tail()
        time.sleep(0.2)
    assert_close_uint8(comfy.run(streamed("e2e/streamed-again", seed=5)), expected_from_runtime(case, seed=5))


def test_a_split_model_is_managed_per_part_unloaded_and_brought_back(comfy):
    """The loader's `device` splitting the fixture's 2 layers over two CPU entries, the last streaming its layer:
    each part is its own model in ComfyUI's model management; "Unload models" detaches them (the last part's
    streaming slots freed), and the next run brings every part back."""
    case = CASES["official_t2i_sde"].params

    def split(prefix: str, **changes) -> dict:
        prompt = workflow("nextstep_1.1_text_to_image", case, prefix, **changes)
        (loader,) = [node["inputs"] for node in prompt.values() if node["class_type"] == "NextStepModelLoader"]
        loader.update(device="cpu,cpu", gpu_layers=1, memory="full")
        return prompt

    assert_close_uint8(comfy.run(split("e2e/split")), golden_pixels("official_t2i_sde"))
    freed = "NextStep: freed the streaming slots of the unloaded model"
    before = comfy.log.read_text(errors="replace").count(freed)
    assert comfy.request("/free", {"unload_models": True})[0] == 200
    deadline = time.monotonic() + 60
    while comfy.log.read_text(errors="replace").count(freed) == before:
        assert time.monotonic() < deadline, comfy.log_tail()
        time.sleep(0.2)
    assert_close_uint8(comfy.run(split("e2e/split-again", seed=6)), expected_from_runtime(case, seed=6))


def test_the_first_run_after_a_load_equals_the_next_at_cfg_1(comfy):
    """Issue 24, fault 5: the sampler chose the attention kernel from where the weights were before ComfyUI moved them,
    so the first run after a load (SDPA) and the next ones (flash-attn, on a GPU) gave two images for one seed at
    cfg 1. The kernels are now each range's, fixed when the model is placed. (On this CPU server every run is SDPA;
    test_device_rules.py checks the per-range choice for GPUs.)"""
    case = CASES["official_t2i_sde"].params
    assert comfy.request("/free", {"unload_models": True, "free_memory": True})[0] == 200
    first = comfy.run(workflow("nextstep_1.1_text_to_image", case, "e2e/cfg1-first", cfg=1.0, seed=11))
    comfy.run(workflow("nextstep_1.1_text_to_image", case, "e2e/cfg1-other", cfg=1.0, seed=12))
    again = comfy.run(workflow("nextstep_1.1_text_to_image", case, "e2e/cfg1-again", cfg=1.0, seed=11))
    assert np.array_equal(first, again)
    assert_close_uint8(first, expected_from_runtime(case, seed=11, cfg=1.0))


def test_bad_width_is_refused_with_a_readable_message(comfy):
    case = CASES["official_t2i_sde"].params
    prompt = workflow("nextstep_1.1_text_to_image", case, "e2e/bad-width", width=500)
    status, answer = comfy.request("/prompt", {"prompt": prompt})
    assert status == 400
    (sampler_id,) = [key for key, node in prompt.items() if node["class_type"] == "NextStepSampler"]
    details = " ".join(error["details"] for error in answer["node_errors"][sampler_id]["errors"])
    assert "width 500 is not a positive multiple of 16" in details
    assert comfy.process.poll() is None
    assert comfy.request("/object_info/NextStepSampler")[0] == 200


# --- image-conditioned sampling with ComfyUI's own mask nodes -------------------------------------------------

def test_keeping_a_golden_top_through_native_mask_nodes_gives_the_golden_back(comfy):
    """Sampler -> SetLatentNoiseMask (a SolidMask with its top two token rows zeroed by MaskComposite) ->
    Sampler with the same seed: the first run's own tokens kept, the rest regenerated: the golden again."""
    case = CASES["official_t2i_sde"].params
    height, width = case["hw"]
    prompt = workflow("nextstep_1.1_text_to_image", case, "e2e/continued")
    (sampler_key,) = [key for key, node in prompt.items() if node["class_type"] == "NextStepSampler"]
    (decode,) = [node["inputs"] for node in prompt.values() if node["class_type"] == "NextStepVAEDecode"]
    prompt.update({
        "100": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": width, "height": height}},
        "101": {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": width, "height": 32}},
        "102": {"class_type": "MaskComposite", "inputs": {"destination": ["100", 0], "source": ["101", 0], "x": 0,
                                                          "y": 0, "operation": "multiply"}},
        "103": {"class_type": "SetLatentNoiseMask", "inputs": {"samples": [sampler_key, 0], "mask": ["102", 0]}},
        "104": {"class_type": "NextStepSampler",
                "inputs": {**prompt[sampler_key]["inputs"], "latent_image": ["103", 0], "width": 16, "height": 16}},
    })
    decode["samples"] = ["104", 0]
    assert_close_uint8(comfy.run(prompt), golden_pixels("official_t2i_sde"))


def test_outpaint_workflow_matches_the_runtime(comfy):
    """The outpainting example (Load Image -> scale -> pad below -> encode -> noise mask -> sampler) on the
    fixture: the same pixels as the runtime given the same padded image and mask."""
    case = CASES["official_t2i_sde"].params
    prompt = workflow("nextstep_1.1_outpaint", {**case, "image": "edit_input_64.png"}, "e2e/outpaint")
    for node in prompt.values():
        if node["class_type"] == "ImageScale":
            node["inputs"].update(upscale_method="nearest-exact", width=64, height=32, crop="disabled")
        if node["class_type"] == "ImagePadForOutpaint":
            node["inputs"].update(bottom=32, feathering=0)
    saved = comfy.run(prompt)

    scaled = torch.nn.functional.interpolate(load_rgb(FIXTURES / "edit_input_64.png"), size=(32, 64),
                                             mode="nearest-exact")
    padded = torch.cat([scaled, torch.full((1, 3, 32, 64), 0.5)], dim=2)
    mask = torch.cat([torch.zeros((1, 32, 64)), torch.ones((1, 32, 64))], dim=1)
    pipeline = NextStepPipeline.from_pretrained(FIXTURES / MODEL_NAME, device="cpu", dtype="float32")
    settings = {**case_settings(case), "width": 64, "height": 64}
    settings["batch"] = settings.pop("batch_size")
    text = case["caption"] + f" {case['positive_prompt']}"
    result = pipeline.generate(text, GenerationSettings(**settings), negative=case["negative_prompt"],
                               init_image=padded, mask=mask)
    assert_close_uint8(saved, to_uint8(images_to_unit(result.images))[0].movedim(0, -1).numpy())


def test_bad_latent_images_are_clear_errors_and_the_server_keeps_going(comfy):
    case = CASES["official_t2i_sde"].params
    bad = {
        "EmptyLatentImage": ({"width": 64, "height": 64, "batch_size": 1}, "latent of another model family"),
        "EmptySD3LatentImage": ({"width": 64, "height": 64, "batch_size": 3}, "holds 3 images but the batch size is 2"),
    }
    for node_type, (inputs, needle) in bad.items():
        prompt = workflow("nextstep_1.1_text_to_image", case, "e2e/bad-latent", batch_size=2)
        (sampler,) = [node["inputs"] for node in prompt.values() if node["class_type"] == "NextStepSampler"]
        prompt["100"] = {"class_type": node_type, "inputs": inputs}
        sampler["latent_image"] = ["100", 0]
        assert needle in comfy.failure_message(prompt)
        assert comfy.process.poll() is None
    saved = comfy.run(workflow("nextstep_1.1_text_to_image", case, "e2e/after-bad-latent"))
    assert_close_uint8(saved, golden_pixels("official_t2i_sde"))
@pytest.mark.parametrize("changes,expected", [
    ({"cfg": "nan"}, "cfg nan is not a finite number; use one from 1.0 to 30.0"),
    ({"width": "abc"}, "width 'abc' is not a whole number; use a multiple of 16 from 16 to 2048"),
    ({"timesteps_shift": 1e-300}, "timesteps_shift 1e-300 is outside the allowed range 0.01 to 20.0"),
    ({"seed": 2**64}, "seed 18446744073709551616 is outside the allowed range 0 to 18446744073709551615"),
])
def test_bad_api_values_are_refused_naming_the_input(comfy, changes, expected):
    case = CASES["official_t2i_sde"].params
    prompt = workflow("nextstep_1.1_text_to_image", case, "e2e/bad-value", **changes)
    status, answer = comfy.request("/prompt", {"prompt": prompt})
    assert status == 400, answer
    (sampler_id,) = [key for key, node in prompt.items() if node["class_type"] == "NextStepSampler"]
    details = [error["details"] for error in answer["node_errors"][sampler_id]["errors"]]
    # ComfyUI files a failed VALIDATE_INPUTS under each input it was given, as "<input> - <message>"
    assert any(detail.endswith(f" - {expected}") or f" - {expected} " in detail for detail in details), details
    assert comfy.process.poll() is None


def test_after_refused_values_the_next_run_is_identical(comfy):
    case = CASES["official_t2i_sde"].params
    before = comfy.run(workflow("nextstep_1.1_text_to_image", case, "e2e/before-bad", seed=5))
    comfy.run(workflow("nextstep_1.1_text_to_image", case, "e2e/other-seed", seed=6))  # evicts the cached seed 5
    for changes in ({"cfg": "inf"}, {"width": "abc"}, {"batch_size": 65}):
        bad = workflow("nextstep_1.1_text_to_image", case, "e2e/bad", seed=5, **changes)
        assert comfy.request("/prompt", {"prompt": bad})[0] == 400
    prompt = workflow("nextstep_1.1_text_to_image", case, "e2e/after-bad", seed=5)
    (sampler_id,) = [key for key, node in prompt.items() if node["class_type"] == "NextStepSampler"]
    entry = comfy.wait(comfy.submit(prompt))
    cached = [data["nodes"] for event, data in entry["status"]["messages"] if event == "execution_cached"]
    assert cached and sampler_id not in cached[0]  # sampled again, not served from the cache
    assert np.array_equal(before, comfy.saved_image(entry))


def test_routes_serve_presets_and_the_memory_plan(comfy):
    assert comfy.request("/nextstep/presets") == (200, presets_as_json())
    status, plan = comfy.request(f"/api/nextstep/plan?model={MODEL_NAME}&dtype=bfloat16&width=64&height=64")
    assert status == 200, plan
    model = load_on(FIXTURES / MODEL_NAME, torch.bfloat16)
    assert plan["devices"][0]["weights_bytes"] == sum(tensor.nbytes for tensor in model.state_dict().values())
    assert plan["fits"] is True  # a CPU server plans against its host RAM
    status, answer = comfy.request("/nextstep/plan?model=NextStep-2")
    assert status == 404 and "'NextStep-2' is not in NextStep Model Loader's list" in answer["error"]
    status, answer = comfy.request("/nextstep/plan?model=NextStep-1.1")  # released, not on disk: what a run fetches
    assert status == 200 and answer["fetch"]["folder"] == str(comfy.models / "NextStep-1.1"), answer
    status, answer = comfy.request(f"/nextstep/plan?model={MODEL_NAME}&width=500")
    assert status == 400 and "width 500 is not a positive multiple of 16" in answer["error"]


def _shape(value: object) -> object:
    """The keys of a JSON value, nested (lists by their first entry), without the values."""
    if isinstance(value, dict):
        return {key: _shape(item) for key, item in value.items()}
    return [_shape(value[0])] if isinstance(value, list) and value else ""


def test_doctor_route_answers_the_runtimes_report_for_the_servers_folders(comfy):
    status, report = comfy.request("/nextstep/doctor")
    assert status == 200, report
    here = doctor_report(torch.device("cpu"), [comfy.models], check=False)
    assert _shape(report) == _shape(here)  # the same JSON as `doctor --json`, by another Python (ComfyUI's venv)
    for part in ("attention", "compile", "warnings", "hf_cache"):  # the server runs with this test's environment
        assert report[part] == here[part], part
    verdicts = ("device", "auto_dtype", "bf16_native", "fp8", "int4")
    assert {key: report["run_device"][key] for key in verdicts} == {key: here["run_device"][key] for key in verdicts}
    (folder,) = [root for root in report["model_folders"] if root["path"] == str(comfy.models)]
    assert folder == here["model_folders"][0] and folder["entries"][0]["name"] == MODEL_NAME
    assert report["self_check"] is None
    status, checked = comfy.request("/api/nextstep/doctor?self_check=1")
    assert status == 200 and checked["self_check"]["passed"] is True, checked["self_check"]
    assert [entry["name"] for entry in checked["self_check"]["checks"]] == ["eager", "compiled", "cuda graph", "fp8",
                                                                            "int4"]
    status, answer = comfy.request("/nextstep/doctor?self_check=maybe")
    assert status == 400 and "self_check='maybe' is not true or false" in answer["error"]
