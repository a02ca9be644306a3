"""One model folder, one memory policy: every reader of a folder sees the same VAE and normalisation, and every
mode that `auto` or the planner's advice names is one that loading accepts."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from goldens import FIXTURES, TINY_MODEL, TINY_VAE_FILE
from model_folders import copy_model, load_on
from nodes_pack import load_pack
from planning import gpus
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nextstep_runtime import (
    GB,
    DeviceTraits,
    GenerationSettings,
    Job,
    ModelFolder,
    ModelFootprint,
    NextStepError,
    NextStepPipeline,
    WeightMode,
    device_run_bytes,
    images_to_unit,
    load_rgb,
    plan_load,
    plan_mode,
)
from nextstep_runtime.sampling.decode_state import DecodeState
from nextstep_runtime.weights.checkpoint import read_header
from nextstep_runtime.weights.repack import convert_folder
from nextstep_runtime.weights.vae_files import VAE_CONFIG_METADATA_KEY

REPO = Path(__file__).resolve().parents[1]
SCALE, SHIFT = 0.6, 0.25
SETTINGS = GenerationSettings(width=32, height=48, steps=3, cfg=7.5, seed=5)


@pytest.fixture(scope="module")
def safetensors_vae_model(tmp_path_factory) -> Path:
    """The tiny model with a vae/ that holds only one .safetensors file, its config (with a latent scale and shift
    that are not the released 1.0/0.0) in the file's metadata."""
    folder = copy_model(tmp_path_factory.mktemp("models") / "tiny-safetensors-vae")
    for name in ("checkpoint.pt", "config.json"):
        (folder / "vae" / name).unlink()
    with safe_open(str(TINY_VAE_FILE), "pt") as handle:
        config = json.loads(handle.metadata()[VAE_CONFIG_METADATA_KEY])
    config.update(scaling_factor=SCALE, shift_factor=SHIFT)
    save_file(load_file(TINY_VAE_FILE), folder / "vae" / "tokenizer.safetensors",
              metadata={VAE_CONFIG_METADATA_KEY: json.dumps(config)})
    return folder


def test_a_vae_folder_holding_one_safetensors_has_its_metadata_normalisation(safetensors_vae_model: Path) -> None:
    vae = ModelFolder.open(safetensors_vae_model).vae
    assert vae.weights == safetensors_vae_model / "vae" / "tokenizer.safetensors"
    assert (vae.normalization.scale, vae.normalization.shift) == (SCALE, SHIFT)
    assert (vae.config.scaling_factor, vae.config.shift_factor) == (SCALE, SHIFT)


def test_nodes_and_python_api_agree_on_a_safetensors_vae_folder(safetensors_vae_model: Path) -> None:
    """The sampler node's latents and the decoded images equal the Python API's (they differed by up to 14 when the
    nodes took the released normalisation for this layout)."""
    api = NextStepPipeline.from_pretrained(safetensors_vae_model, device="cpu", dtype="float32").generate(
        "a red cube", SETTINGS)
    pack = load_pack()
    host = pack.nodes.host
    host.add_model_folder(host.MODEL_FOLDER_KEY, str(safetensors_vae_model.parent))
    nodes = pack.NODE_CLASS_MAPPINGS
    name = safetensors_vae_model.name
    model = nodes["NextStepModelLoader"]().load(name, "float32", "sdpa")[0]
    vae = nodes["NextStepVAELoader"]().load(f"{name}/vae")[0]
    positive = nodes["NextStepTextEncode"]().encode(model, "a red cube")[0]
    latent = nodes["NextStepSampler"]().sample(
        model, positive, SETTINGS.width, SETTINGS.height, SETTINGS.batch, SETTINGS.seed, SETTINGS.steps, SETTINGS.cfg,
        SETTINGS.cfg_img, SETTINGS.cfg_schedule, SETTINGS.timesteps_shift, SETTINGS.sampler, SETTINGS.profile,
        SETTINGS.use_norm)[0]
    images = nodes["NextStepVAEDecode"]().decode(vae, latent)[0]
    torch.testing.assert_close(latent["samples"], api.latents, atol=1e-5, rtol=0)
    torch.testing.assert_close(images, images_to_unit(api.images).movedim(1, -1), atol=1e-5, rtol=0)


CUDA_WITH_INT4 = DeviceTraits("cuda", (8, 9))
CUDA_WITHOUT_INT4 = DeviceTraits("cuda", (7, 5))
DEVICES = {"cuda-8.9": CUDA_WITH_INT4, "cuda-7.5": CUDA_WITHOUT_INT4, "cpu": DeviceTraits("cpu")}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """The tiny model as released (float weights) and repacked to fp8 and int4."""
    root = tmp_path_factory.mktemp("repacked")
    repacked = {stored: root / stored for stored in ("fp8", "int4")}
    for stored, folder in repacked.items():
        convert_folder(TINY_MODEL, folder, stored)
    return {"float": TINY_MODEL, **repacked}


def on(device: DeviceTraits, free: float | None = None):
    """One GPU (or the CPU) of these traits with `free` GB, computing in bfloat16."""
    return gpus(free, traits=device, dtype="bfloat16", devices="cpu" if device.type == "cpu" else "cuda:0")


def _budgets(footprint: ModelFootprint, job: Job) -> list[float]:
    """Free-memory sizes (GB) on both sides of every mode's peak: each boundary where the advice can change."""
    targets = on(DeviceTraits("cuda"))
    modes = [replace(loadable, gpu_layers=layers) for loadable in targets.loadable(footprint)
             for layers in (None, *range(footprint.config.num_hidden_layers))]
    peaks = {plan_mode(footprint, mode, job, targets).devices[0].peak_bytes for mode in modes}
    return sorted({(peak + delta) / GB for peak in peaks for delta in (-1, 0)} | {0.01})


@pytest.mark.parametrize("device", DEVICES.values(), ids=DEVICES.keys())
@pytest.mark.parametrize("stored", ["float", "fp8", "int4"])
def test_advice_and_auto_only_name_modes_that_load(folders, stored: str, device: DeviceTraits, monkeypatch) -> None:
    """For every free-memory boundary, the mode `auto` picks and the mode the plan's advice suggests both load on
    that device (loading asks the device's traits, here those of the emulated device; the weights load on the
    CPU). A folder that loads in no mode there is refused by auto, with the reason."""
    folder = folders[stored]
    footprint = ModelFootprint.from_folder(folder)
    job = Job(GenerationSettings(width=32, height=32))
    monkeypatch.setattr(DeviceTraits, "of", classmethod(lambda cls, where: device))
    own = WeightMode("full" if stored == "float" else stored)
    if stored == "int4" and device is CUDA_WITHOUT_INT4:
        with pytest.raises(NextStepError, match="compute capability 8.0"):
            plan_load(footprint, "auto", None, job, on(device, 1))
        with pytest.raises(NextStepError, match="compute capability 8.0"):
            load_on(folder, torch.bfloat16, "int4")
        return
    named = set()
    for free in _budgets(footprint, job):
        named.add(plan_load(footprint, "auto", None, job, on(device, free))[0].mode)
        named |= {plan_mode(footprint, own, job, on(device, free)).suggested_mode} - {None}
    assert {mode.storage for mode in named} >= {own.storage}
    if stored == "float":  # the advice reaches beyond the asked mode where the device has the kernels
        assert ("int4" in {mode.storage for mode in named}) == (device is not CUDA_WITHOUT_INT4)
    for mode in named:
        load_on(folder, torch.bfloat16, mode.storage, mode.gpu_layers)


@pytest.mark.parametrize("stored,asked", [("fp8", WeightMode()), ("fp8", WeightMode("int4")),
                                          ("int4", WeightMode()), ("int4", WeightMode("fp8"))])
def test_planning_a_mode_that_loading_refuses_is_refused(folders, stored: str, asked: WeightMode) -> None:
    footprint = ModelFootprint.from_folder(folders[stored])
    with pytest.raises(NextStepError, match=f"holds {stored} weights"):
        plan_mode(footprint, asked, Job(), gpus(80))
    with pytest.raises(NextStepError, match=f"holds {stored} weights"):
        load_on(folders[stored], torch.bfloat16, asked.storage)


def test_a_folder_is_read_once(tmp_path: Path) -> None:
    """Config, stored format, weight files and headers come from one read; the folder may change afterwards."""
    folder = ModelFolder.open(copy_model(tmp_path / "tiny"))
    headers = folder.tensors
    (folder.path / "config.json").write_text("{}")
    assert ModelFolder.open(folder) is folder
    assert folder.tensors is headers and folder.config.num_hidden_layers == 2
    loaded = load_on(folder).state_dict().values()
    assert folder.parameter_count() == sum(tensor.numel() for tensor in loaded)


@pytest.mark.parametrize("edit", [False, True])
def test_the_memory_check_counts_the_prompt_as_the_loop_allocates_it(tiny_pipeline, edit: bool) -> None:
    """The memory check accepts a budget of exactly what the token loop holds and refuses one byte less: the
    prompt's text positions and each input image's placeholders are counted once, as DecodeState allocates them."""
    settings = GenerationSettings(width=48, height=32, batch=2, cfg=7.5, cfg_img=2.0)
    latents = [tiny_pipeline.encode_image(load_rgb(FIXTURES / "edit_input_64.png"))] if edit else []
    caption = "<image>make it blue" if edit else "a red cube"
    inputs = tiny_pipeline.prepare(caption, settings, "blurry", None, latents)
    tokens = inputs.grid[0] * inputs.grid[1]
    allocated_positions = DecodeState(tiny_pipeline.model, inputs.rows, tokens, (None,)).cache.keys[0].shape[3]
    placeholders = int((inputs.rows.input_ids[0] == tiny_pipeline.model.config.image_placeholder_id).sum())
    assert placeholders == (16 if edit else 0)
    text = allocated_positions - placeholders - tokens + 1
    job = Job.with_latents(settings, latents, text)
    [(_, exact)] = device_run_bytes(tiny_pipeline.model.config, tiny_pipeline.model.placement, job).values()
    for budget in (exact, exact - 1):
        sampler_only = NextStepPipeline(tiny_pipeline.model, tiny_pipeline.tokenizer, tiny_pipeline.normalization,
                                        free_memory=lambda device, budget=budget: budget)
        if budget == exact:
            sampler_only.prepare(caption, settings, "blurry", None, latents)
        else:
            with pytest.raises(NextStepError, match="this run needs about"):
                sampler_only.prepare(caption, settings, "blurry", None, latents)


def _write_header_only(path: Path, header: dict, data_bytes: int) -> None:
    """A safetensors file with this header and `data_bytes` of (sparse) tensor data after it."""
    text = json.dumps(header).encode()
    with open(path, "wb") as handle:
        handle.write(len(text).to_bytes(8, "little") + text)
    os.truncate(path, 8 + len(text) + data_bytes)


def test_headers_of_a_file_larger_than_memory_are_read_without_mapping_it(tmp_path: Path) -> None:
    """A 64 GB file (sparse on disk) under an 8 GB address-space cap: mapping it would fail, reading its header
    does not."""
    path = tmp_path / "huge.safetensors"
    size = 64 * 2**30
    _write_header_only(path, {"__metadata__": {"format": "pt"},
                              "layers.0.mlp.up_proj.weight": {"dtype": "F32", "shape": [size // 4 // 8192, 8192],
                                                              "data_offsets": [0, size]}}, size)
    code = (f"import resource; resource.setrlimit(resource.RLIMIT_AS, ({8 * 2**30}, {8 * 2**30}))\n"
            f"from nextstep_runtime.weights.checkpoint import read_header\n"
            f"tensors, metadata = read_header(__import__('pathlib').Path({str(path)!r}))\n"
            f"print(tensors[0].shape, tensors[0].dtype, metadata)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"({size // 4 // 8192}, 8192) F32 {{'format': 'pt'}}"


@pytest.mark.parametrize("header,data_bytes,reason", [
    ({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}, 32, "tensors need {need} bytes but the file "
                                                                            "has {need_less_32}"),
    ({"w": {"dtype": "F32", "shape": [4, 4]}}, 64, "entry of tensor 'w' in its header is malformed"),
    ({"w": {"dtype": "F32", "shape": [-4, 4], "data_offsets": [0, 64]}}, 64, "tensor 'w' has shape [-4, 4]"),
])
def test_a_truncated_or_malformed_header_is_named(tmp_path: Path, header: dict, data_bytes: int, reason: str) -> None:
    path = tmp_path / "model.safetensors"
    _write_header_only(path, header, data_bytes)
    need = 8 + len(json.dumps(header)) + 64
    reason = reason.format(need=need, need_less_32=need - 32)
    with pytest.raises(NextStepError, match=f"{path} is not a readable safetensors file .*{re.escape(reason)}"):
        read_header(path)


def test_a_header_nested_too_deep_is_a_clean_error(tmp_path: Path) -> None:
    path = tmp_path / "deep.safetensors"
    text = b"[" * 200_000 + b"]" * 200_000
    path.write_bytes(len(text).to_bytes(8, "little") + text)
    with pytest.raises(NextStepError, match="its header is not valid JSON: RecursionError"):
        read_header(path)
