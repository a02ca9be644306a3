"""The pack's HTTP route handlers (nodes/routes.py) called as ComfyUI's server calls them, on the fixture model.

The handlers are plain functions of the query parameters; tests/test_comfyui_e2e.py asks the same routes
through a real ComfyUI server.
"""

from __future__ import annotations

import importlib
import json
import shutil
import time

import pytest
import torch
from goldens import TINY_MODEL
from model_folders import load_on
from nodes_pack import MODEL_NAME, install_fixture_models, load_pack

from nextstep_runtime import (
    DeviceTraits,
    Job,
    ModelFolder,
    ModelFootprint,
    NextStepError,
    WeightMode,
    device_memory,
    plan_mode,
)
from nextstep_runtime.presets import presets_as_json

routes = importlib.import_module(f"{load_pack().__name__}.nodes.routes")


@pytest.fixture(scope="module", autouse=True)
def models_dir(tmp_path_factory):
    return install_fixture_models(tmp_path_factory.mktemp("models"))


def kept_weight_bytes(dtype: torch.dtype) -> int:
    """Bytes of every tensor the runtime keeps of the fixture model loaded in `dtype`."""
    model = load_on(TINY_MODEL, dtype)
    return sum(tensor.numel() * tensor.element_size() for tensor in model.state_dict().values())


def test_presets_route_serves_the_table():
    assert routes.presets_response({}) == (200, presets_as_json())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_plan_route_weights_are_the_fixture_model_in_that_dtype(dtype):
    status, plan = routes.plan_response({"model": MODEL_NAME, "dtype": dtype, "width": "64", "height": "64"})
    assert status == 200, plan
    [device] = plan["devices"]
    assert device["device"] == "cpu" and device["weights_bytes"] == kept_weight_bytes(getattr(torch, dtype))
    assert plan["weights_host_bytes"] == 0
    free, total = device_memory(torch.device("cpu"))
    assert 0 < device["free_bytes"] <= total and plan["fits"] is True and plan["advice"].startswith("fits")


def test_plan_route_streams_layers_and_turns_on_fp8_as_asked():
    status, plan = routes.plan_response({"model": MODEL_NAME, "dtype": "bfloat16", "fp8": "true", "gpu_layers": "1"})
    assert status == 200, plan
    assert plan["mode"] == {"storage": "fp8", "gpu_layers": 1} and plan["loads_as"] == "bfloat16, fp8, gpu_layers 1"
    assert plan["weights_host_bytes"] > 0


@pytest.mark.parametrize("memory,storage", [("fp8", "fp8"), ("int4", "int4"), ("auto", "full"), ("full", "full")])
def test_plan_route_plans_the_mode_the_loader_would_load(memory, storage):
    # the loader's memory widget, resolved as loading resolves it: on this CPU server auto loads the full dtype
    status, plan = routes.plan_response({"model": MODEL_NAME, "dtype": "bfloat16", "memory": memory})
    assert status == 200, plan
    assert plan["mode"] == {"storage": storage, "gpu_layers": None}
    assert plan["loads_as"] == ", ".join(["bfloat16"] + [memory] * (memory in ("fp8", "int4")))
    assert plan["memory_choice"] is None
    full = routes.plan_response({"model": MODEL_NAME, "dtype": "bfloat16", "memory": "full"})[1]
    weights = plan["devices"][0]["weights_bytes"]
    assert (weights < full["devices"][0]["weights_bytes"]) == (memory in ("fp8", "int4"))


def test_plan_route_refuses_widget_values_the_loader_refuses():
    status, answer = routes.plan_response({"model": MODEL_NAME, "memory": "int4", "fp8": "true"})
    assert status == 400 and "fp8 is on but memory is 'int4'" in answer["error"]


def test_plan_route_answers_404_for_a_model_not_in_the_loader_list():
    for name in ("NextStep-2", f"../nextstep/{MODEL_NAME}", "/etc"):
        status, answer = routes.plan_response({"model": name})
        assert status == 404 and repr(name) in answer["error"] and "Model Loader" in answer["error"]


@pytest.mark.parametrize("query,message", [
    ({"model": MODEL_NAME, "width": "abc"}, "width='abc' is not a whole number"),
    ({"model": MODEL_NAME, "cfg": "nan"}, "cfg='nan' is not a number"),
    ({"model": MODEL_NAME, "fp8": "maybe"}, "fp8='maybe' is not true or false"),
    ({"model": MODEL_NAME, "width": "500"}, "width 500 is not a positive multiple of 16"),
    ({"model": MODEL_NAME, "batch": "0"}, "batch 0 is outside the allowed range 1 to 64"),
    ({"model": MODEL_NAME, "dtype": "int8"}, "dtype='int8' is not one of auto"),
    ({"model": MODEL_NAME, "memory": "int8"}, "memory='int8' is not one of auto, full, fp8, int4"),
    ({"model": MODEL_NAME, "gpu_layers": "-2"}, "gpu_layers=-2 is below -1"),
    ({"model": MODEL_NAME, "path": "/tmp"}, "unknown plan parameter 'path'"),
    ({}, "the plan needs model=NAME"),
])
def test_plan_route_answers_400_with_a_message_for_bad_parameters(query, message):
    status, answer = routes.plan_response(query)
    assert status == 400 and message in answer["error"]


def test_plan_route_plans_the_loaders_split():
    """A `device` list splits the plan as the loader splits the model: the bytes on each device."""
    status, plan = routes.plan_response({"model": MODEL_NAME, "dtype": "float32", "device": "cpu,cpu"})
    assert status == 200, plan
    assert plan["placement"] == "cpu:0-0,cpu:1-1" and [d["device"] for d in plan["devices"]] == ["cpu"]
    [device] = plan["devices"]  # both ranges on the one CPU: its bytes are theirs together, its memory counted once
    assert device["layers"] == "0-0,1-1" and device["weights_bytes"] == kept_weight_bytes(torch.float32)
    assert plan["loads_as"] == "float32"
    status, error = routes.plan_response({"model": MODEL_NAME, "device": "cpu:0-0,cpu:2-2"})
    assert status == 400 and "do not cover the model's 2 decoder layers (0-1) in order" in error["error"]


@pytest.mark.parametrize("query,message", [
    ({"cfg": "-5"}, "cfg -5.0 is outside the allowed range 1.0 to 30.0"),
    ({"cfg": "0"}, "cfg 0.0 is outside the allowed range"),
    ({"cfg": "1e308"}, "cfg 1e+308 is outside the allowed range"),
    ({"cfg_img": "inf"}, "plan parameter cfg_img='inf' is not a number"),
    ({"batch": "65"}, "batch 65 is outside the allowed range 1 to 64"),
    ({"steps": "100000"}, "steps 100000 is outside the allowed range 1 to 200"),
    ({"height": "99999999999999999999"}, "height 99999999999999999999 is larger than 2048"),
])
def test_plan_route_refuses_what_the_sampler_refuses(query, message):
    status, answer = routes.plan_response({"model": MODEL_NAME, **query})
    assert status == 400 and answer["error"].startswith(message), answer


@pytest.fixture(scope="module")
def int4_folder(models_dir):
    from nextstep_runtime.weights.repack import convert_folder

    convert_folder(TINY_MODEL, models_dir / "nextstep" / "tiny-int4", "int4")
    return "tiny-int4"


@pytest.mark.parametrize("query", [{"memory": "full"}, {"memory": "fp8"}, {"fp8": "true"},
                                   {"memory": "full", "dtype": "float16"}])
def test_plan_route_of_a_repacked_int4_folder_refuses_what_loading_refuses(int4_folder, query):
    status, answer = routes.plan_response({"model": int4_folder, **query})
    assert status == 400 and "holds int4 weights (repacked); load it with int4 weights" in answer["error"], answer
    for memory in ("int4", "auto"):
        status, plan = routes.plan_response({"model": int4_folder, "memory": memory})
        assert status == 200 and plan["mode"]["storage"] == "int4", plan


@pytest.mark.parametrize("changes,message", [
    ({"num_hidden_layers": 10**400}, "num_hidden_layers is 1000000000000000000000000000000000000000..."),
    ({"hidden_size": 2**30}, "hidden_size is 1073741824, outside the range this runtime accepts"),
    ({"use_gen_pos_embed": "no"}, "use_gen_pos_embed is 'no' but must be true or false"),
])
def test_plan_route_answers_a_bad_config_at_once_naming_the_key(models_dir, changes, message):
    name = f"bad-{next(iter(changes))}"
    folder = models_dir / "nextstep" / name
    shutil.copytree(TINY_MODEL, folder)
    config = folder / "config.json"
    config.chmod(0o644)
    config.write_text(json.dumps({**json.loads(config.read_text()), **changes}))
    start = time.monotonic()
    status, answer = routes.plan_response({"model": name})
    assert status == 422 and answer["error"].startswith(f"{config}: {message}"), answer
    assert time.monotonic() - start < 5


def test_a_parameter_given_twice_is_refused_naming_it():
    host = importlib.import_module(f"{load_pack().__name__}.nodes.host")
    assert host.query_parameters([("model", MODEL_NAME), ("width", "64")]) == {"model": MODEL_NAME, "width": "64"}
    for pairs, message in (([("width", "512"), ("width", "abc")], "parameter 'width' is given 2 times; give it once"),
                           ([("cfg", "2")] * 3 + [("model", "a")], "parameter 'cfg' is given 3 times"),
                           ([("model", "a"), ("batch", "1"), ("model", "a")], "parameter 'model' is given 2 times")):
        with pytest.raises(NextStepError, match=message):
            host.query_parameters(pairs)


def test_plan_route_says_when_the_vae_config_was_assumed(models_dir):
    folder = models_dir / "nextstep" / "no-vae-config"
    shutil.copytree(TINY_MODEL, folder)
    (folder / "vae" / "config.json").unlink()
    status, plan = routes.plan_response({"model": "no-vae-config"})
    assert status == 200, plan
    assert plan["vae_config_assumed"].startswith(f"{folder / 'vae' / 'config.json'} is missing, so the released VAE's "
                                                 f"config was assumed: ch 128, ch_mult [1, 2, 4, 4]")
    assert routes.plan_response({"model": MODEL_NAME})[1]["vae_config_assumed"] is None


def test_the_panel_plans_what_the_loader_loads_for_the_same_free_memory(monkeypatch):
    """Issue 24, fault 6: the plan route checked one device against its raw free memory while the loader's `auto`
    planned against ComfyUI's budget, so the panel's advice could contradict its own "loads as" line. Both ask the
    host's one budget now: on an emulated Ampere GPU, for budgets on each side of every mode's peak, the panel shows
    the mode, placement and verdict the loader chooses."""
    loaders = importlib.import_module(f"{load_pack().__name__}.nodes.loaders")
    host = routes.host
    gpu = torch.device("cuda:0")
    monkeypatch.setattr(host, "load_device", lambda: gpu)
    monkeypatch.setattr(host, "vae_devices", lambda: (gpu, torch.device("cpu")))
    monkeypatch.setattr(DeviceTraits, "of", classmethod(lambda cls, device: DeviceTraits("cuda", (8, 6))))
    folder = ModelFolder.open(TINY_MODEL)
    targets = loaders.loader_targets("default", "auto")
    peaks = sorted(plan_mode(ModelFootprint.from_folder(folder), WeightMode(storage), Job(), targets).devices[0]
                   .peak_bytes for storage in ("full", "fp8", "int4"))
    chosen = set()
    for budget in (peaks[0] - 1, peaks[0], peaks[1], peaks[2] - 1, peaks[2] + 1):
        monkeypatch.setattr(host, "memory_budget", lambda device, budget=budget: budget)
        status, panel = routes.plan_response({"model": MODEL_NAME})
        plan, choice = loaders.loader_plan(folder, "auto", "auto", False, -1)
        assert status == 200 and panel["memory_choice"] == choice, (budget, panel)
        assert (panel["loads_as"], panel["placement"], panel["fits"]) == (plan.loads_as, plan.placement.describe(),
                                                                         plan.fits)
        assert panel["advice"].startswith("fits") == bool(plan.fits)
        chosen.add(plan.loads_as)
    assert len(chosen) >= 3  # the budgets reach several modes
