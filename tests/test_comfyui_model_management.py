"""The pack's registration with ComfyUI's own model management (comfy/model_management.py of ComfyUI 0.8.0, run in
its environment): which device a NextStep model is registered on, and how much memory each GPU is asked to free.
No GPU is here: ComfyUI runs with --cpu and --disable-smart-memory (so it asks no driver for free memory), and a
model's parts are registered on GPU devices without their weights moving, as a loaded model's are; ComfyUI's
free_memory and the pack's prepare_model then run as they would on a GPU machine, up to the weights' move (the
recorded calls of load_models_gpu)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import torch
from comfyui_server import COMFYUI_DIR, COMFYUI_PYTHON, require_comfyui
from model_configs import NEXTSTEP_14B
from nodes_pack import load_pack

from nextstep_runtime import (
    GB,
    DeviceList,
    GenerationSettings,
    Job,
    ModelFootprint,
    NextStepModel,
    Placement,
    Targets,
    WeightMode,
    device_run_bytes,
    plan_mode,
)
from nextstep_runtime.devices import PLANNED_GPU

ROOT = Path(__file__).resolve().parents[1]

PRELUDE = f"""
import importlib.util, json, sys, weakref
sys.path.insert(0, ".")
sys.argv = [sys.argv[0], "--cpu", "--disable-smart-memory"]
import comfy.options
comfy.options.enable_args_parsing()
import utils.extra_config  # as ComfyUI's main.py starts: its own `utils` package first
import comfy.model_management as mm
import folder_paths  # the pack's host adapter now runs "inside ComfyUI"
import asyncio, server
import torch
server.PromptServer(asyncio.new_event_loop())  # ComfyUI's server, as main.py makes it (not started), for the routes
spec = importlib.util.spec_from_file_location("pack", {str(ROOT / "__init__.py")!r},
                                              submodule_search_locations=[{str(ROOT)!r}])
pack = importlib.util.module_from_spec(spec)
sys.modules["pack"] = pack
spec.loader.exec_module(pack)
host = pack.nodes.host
from nextstep_runtime import parse_device


def registered(device, name="NextStep-1.1"):
    # a model part registered on `device` by the pack, entered in ComfyUI's list of loaded models as load_models_gpu
    # enters one (without moving its weights: there is no GPU here)
    detached = []
    [handle] = host.register_model([(device, [torch.nn.Linear(4, 4)])], torch.device("cpu"), name, in_place=False,
                                   on_unload=lambda: detached.append(True))
    loaded = mm.LoadedModel(handle)
    loaded.real_model = weakref.ref(handle.model)
    loaded.model_finalizer = weakref.finalize(handle.model, lambda: None)
    mm.current_loaded_models.insert(0, loaded)
    return handle, detached
"""


def run_in_comfyui(script: str) -> dict:
    """Run `script` after PRELUDE in ComfyUI's environment and folder; it prints one JSON object."""
    require_comfyui()
    result = subprocess.run([COMFYUI_PYTHON, "-c", PRELUDE + script], cwd=COMFYUI_DIR, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_comfyui_unloads_nextstep_registered_from_the_loaders_cuda_for_another_model() -> None:
    """Issue 24, fault 2: the loader's device `cuda` stayed unindexed and was registered as torch.device("cuda");
    ComfyUI compares devices with ==, and cuda != cuda:0, so ComfyUI never unloaded NextStep for a model on its GPU
    (cuda:0). The device is indexed where it is parsed: ComfyUI's free_memory on cuda:0 now unloads it (its detach
    callback runs), as it does not for a model registered on the unindexed device."""
    answer = run_in_comfyui("""
parsed, detached = registered(parse_device("cuda"))
unindexed, kept = registered(torch.device("cuda"))
unloaded = mm.free_memory(10**15, torch.device("cuda:0"))
print(json.dumps({"device": str(parsed.load_device), "unloaded": [type(u.model.model).__name__ for u in unloaded],
                  "detached": detached, "kept": kept, "comfyui_device": str(host.load_device())}))
""")
    assert answer["device"] == "cuda:0" and answer["comfyui_device"] == "cpu"  # --cpu: ComfyUI's own device
    assert answer["unloaded"] == ["NextStep-1.1"] and answer["detached"] == [True]
    assert answer["kept"] == []  # what the unindexed registration got: never unloaded


def test_each_gpu_is_asked_to_free_its_own_share() -> None:
    """Issue 24, fault 4: the sampler asked every device of a split to free the whole run's bytes. prepare_model asks
    ComfyUI's load_models_gpu once per device, with that device's bytes (recorded here: the GPUs are not there)."""
    answer = run_in_comfyui("""
first, _ = registered(parse_device("cuda:0"), "part-0")
second, _ = registered(parse_device("cuda:1"), "part-1")
calls = []
mm.load_models_gpu = lambda models, memory_required=0, **kwargs: calls.append(
    [[str(m.load_device) for m in models], memory_required])
host.prepare_model([first, second], {torch.device("cuda:0"): 3_000_000_000, torch.device("cuda:1"): 1_000_000_000})
print(json.dumps({"calls": calls}))
""")
    assert answer["calls"] == [[["cuda:0"], 3_000_000_000], [["cuda:1"], 1_000_000_000]]


def test_the_sampler_asks_each_device_for_the_planners_share_of_it() -> None:
    """The numbers the sampler passes to prepare_model for a model split over two GPUs: each device's share of the
    run as the planner estimates it (its layers' KV cache and work; the loop's buffers on the last), not the whole
    run on each."""
    sampler = load_pack().nodes.sampler
    with torch.device("meta"):
        model = NextStepModel(NEXTSTEP_14B)
    model.placement = Placement.from_counts([(torch.device("cuda:0"), torch.bfloat16),
                                             (torch.device("cuda:1"), torch.bfloat16)], [30, 18])
    job = Job(GenerationSettings(width=512, height=512, batch=2))
    needs = sampler.sampling_needs(model, job)
    expected = {device: run for device, (_, run) in device_run_bytes(model.config, model.placement, job).items()}
    assert needs == expected and list(needs) == [torch.device("cuda:0"), torch.device("cuda:1")]
    one_device = Placement.single("cuda:0", torch.bfloat16, 48)
    [(_, whole)] = device_run_bytes(model.config, one_device, job).values()
    assert needs[torch.device("cuda:0")] < whole and needs[torch.device("cuda:1")] < whole


def test_the_vae_is_planned_on_the_device_it_runs_on() -> None:
    """Issue 24, fault 4: the planner reserved the VAE on the split's last device while ComfyUI runs it on its VAE
    device. With the VAE on cuda:0 and the model on cuda:1, cuda:0's share holds the VAE's weights and its decode, and
    cuda:1's does not."""
    targets = Targets.on(DeviceList.parse("cuda:1"), "auto", lambda device: 24 * GB, (torch.device("cuda:0"),
                         torch.bfloat16), traits=lambda device: PLANNED_GPU)
    plan = plan_mode(ModelFootprint.from_config(NEXTSTEP_14B), WeightMode("fp8"), Job(), targets)
    model, vae = plan.devices
    assert (model.device, vae.device) == ("cuda:1", "cuda:0")
    assert model.vae_bytes == 0 and vae.vae_bytes > 0 and vae.weights_bytes == 0 and vae.layers == ""
    assert vae.job_bytes > 10**9  # decoding one 512x512 image
    assert plan.placement.describe() == "cuda:1:0-47" and vae.free_bytes == 24 * GB and plan.fits


def test_comfyuis_partial_unload_releases_a_streamed_models_slots() -> None:
    """ComfyUI frees memory for another model by unloading part of a loaded one where that suffices (model_unload
    with memory_to_free, as free_memory calls it with smart memory on): no detach event comes, so the streamed
    model's slots (memory ComfyUI does not see) stayed. They are released on that path too, and counted as freed;
    the model stays registered (partly unloaded), and its next run makes them again."""
    answer = run_in_comfyui(f"""
sys.path.insert(0, {str(ROOT / "tests")!r})
from model_folders import load_on
from nextstep_runtime import GenerationSettings, NextStepPipeline, load_tokenizer, released_slot_bytes
from nextstep_runtime.weights.model_folder import ModelFolder
folder = ModelFolder.open({str(ROOT / "tests" / "fixtures" / "tiny-nextstep")!r})
model = load_on(folder, gpu_layers=1)
pipe = NextStepPipeline(model, load_tokenizer(folder), folder.vae.normalization)
settings = GenerationSettings(width=32, height=32, steps=2, cfg=1.0)
pipe.sample("a fox", settings)
slots_before = released_slot_bytes(model)
detached = []
[handle] = host.register_model(model.parts_by_device(), torch.device("cpu"), "NextStep-1.1", in_place=True,
                               on_unload=lambda: detached.append(True) or host.release_streaming_slots_of(model))
loaded = next(entry for entry in mm.current_loaded_models if entry.model is handle)
weights = loaded.model.loaded_size()
whole = loaded.model_unload(memory_to_free=1)
slots_after = released_slot_bytes(model)
pipe.sample("a fox", settings)
print(json.dumps({{"before": slots_before, "after": slots_after, "again": released_slot_bytes(model),
                  "whole": whole, "detached": len(detached), "weights": weights,
                  "still_loaded": loaded in mm.current_loaded_models}}))
""")
    assert answer["before"] == 0 and answer["weights"] > 0  # slots in place before the unload
    assert answer["after"] > 0  # released by the partial unload
    assert answer["whole"] is False and answer["still_loaded"] and answer["detached"] == 1
    assert answer["again"] == 0  # the next run made them again
