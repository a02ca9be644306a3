"""The memory planner against what the runtime really allocates (fixture model) and against the arithmetic of
the real NextStep-14B config; its CLI through a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from goldens import FIXTURES, TINY_MODEL, TINY_VAE_FILE
from model_configs import NEXTSTEP_14B
from model_folders import deepen, edit_config, load_on
from planning import gpus

from nextstep_runtime import (
    GB,
    DeviceList,
    GenerationSettings,
    Job,
    ModelConfig,
    ModelFolder,
    ModelFootprint,
    NextStepError,
    Plan,
    Targets,
    WeightMode,
    device_memory,
    load_rgb,
    load_vae,
    plan_load,
    plan_mode,
)
from nextstep_runtime.cli.plan import format_plan
from nextstep_runtime.memory.estimate import kv_cache_bytes
from nextstep_runtime.memory.footprint import placed_weight_bytes
from nextstep_runtime.memory.planner import gb
from nextstep_runtime.model.placement import Placement
from nextstep_runtime.sampling.decode_state import DecodeState
from nextstep_runtime.weights.offload import PACK_ALIGNMENT, streamers

REPO = Path(__file__).resolve().parents[1]




def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def on_cpu(dtype: torch.dtype) -> Targets:
    """The CPU in `dtype`, its free memory unknown (the bytes are what these tests compare)."""
    return Targets.on(DeviceList.parse("cpu"), str(dtype).removeprefix("torch."), lambda device: None,
                      vae_on_run_device=True)


def planned_14b(mode: WeightMode, job: Job = Job(), free_gb: float | None = None) -> Plan:
    """NextStep-14B planned on one GPU of `free_gb` free (None: unknown), in bfloat16."""
    return plan_mode(ModelFootprint.from_config(NEXTSTEP_14B), mode, job, gpus(free_gb))


def test_folder_footprint_equals_the_config_footprint() -> None:
    """The headers hold exactly the tensors the config implies (lm_head and gen_pos_embed left out, as the
    loader leaves them), and the VAE count from its config is the loaded VAE's."""
    footprint = ModelFootprint.from_folder(TINY_MODEL)
    assert footprint == ModelFootprint.from_config(footprint.config, vae_config=footprint.vae_config)
    assert "lm_head.weight" not in footprint.tensor_shapes and "embed_tokens.weight" in footprint.tensor_shapes
    vae = load_vae(ModelFolder.open(TINY_MODEL).vae, torch.float32, "cpu")
    assert footprint.vae_parameters == sum(t.numel() for t in vae.state_dict().values())


def test_single_file_vae_is_counted_from_its_header(model_copy) -> None:
    edit_config(model_copy, vae_name_or_path=str(TINY_VAE_FILE))
    footprint = ModelFootprint.from_folder(model_copy)
    vae = load_vae(TINY_VAE_FILE, torch.float32, "cpu")
    assert footprint.vae_parameters == sum(t.numel() for t in vae.state_dict().values())
    assert footprint.vae_config == vae.config


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("storage", ["full", "fp8", "int4"])
def test_resident_weights_equal_the_loaded_model(dtype: torch.dtype, storage: str) -> None:
    model = load_on(TINY_MODEL, dtype, storage)
    plan = plan_mode(ModelFootprint.from_folder(TINY_MODEL), WeightMode(storage), Job(), on_cpu(dtype))
    [device] = plan.devices
    assert device.weights_bytes == tensor_bytes(model.state_dict().values())
    assert plan.weights_host_bytes == 0
    vae = load_vae(ModelFolder.open(TINY_MODEL).vae, dtype, "cpu")
    assert device.vae_bytes == tensor_bytes(vae.state_dict().values())


@pytest.mark.parametrize("weights,resident", [("bf16", 0), ("bf16", 1), ("fp8", 1), ("bf16", 2), ("fp8", 3),
                                              ("int4", 2), ("bf16", 4), ("int4", 4)])
def test_streamed_weights_equal_the_loaded_model(model_copy, weights: str, resident: int) -> None:
    """Device side: every registered tensor plus the streamer's slot buffers (one when a single layer is streamed,
    else two); host side: the buffers the streamed layers are packed in, which is what gets page-locked on a GPU
    machine, and every tensor of a streamed layer lies in its layer's buffer."""
    deepen(model_copy, 5)
    storage = "full" if weights == "bf16" else weights
    model = load_on(model_copy, torch.bfloat16, storage, resident)
    found = streamers(model)
    assert len(found) == 1
    streamer = found[0]
    assert len(streamer.slots) == len(streamer.slot_buffers) == min(2, 5 - resident)
    slots = tensor_bytes(streamer.slot_buffers)
    host = tensor_bytes(streamer.host_buffers)
    ([on_device], on_host) = placed_weight_bytes(ModelFootprint.from_folder(model_copy), WeightMode(storage, resident),
                                                 Placement.single("cpu", torch.bfloat16, 5))
    assert on_device == tensor_bytes(model.state_dict().values()) + slots
    assert on_host == host > 0
    assert slots == streamer.slot_bytes == len(streamer.slots) * streamer.host_buffers[0].nbytes
    for layer, buffer in zip(streamer.host_layers, streamer.host_buffers):
        start, end = buffer.data_ptr(), buffer.data_ptr() + buffer.nbytes
        tensors = list(layer.state_dict().values())
        assert all(start <= t.data_ptr() and t.data_ptr() + t.nbytes <= end for t in tensors)
        assert tensor_bytes(tensors) <= buffer.nbytes < tensor_bytes(tensors) + len(tensors) * PACK_ALIGNMENT


def _allocated_cache(pipe, caption: str, settings: GenerationSettings, negative: str | None, edit_latents):
    inputs = pipe.prepare(caption, settings, negative, None, edit_latents)
    tokens = inputs.grid[0] * inputs.grid[1]
    state = DecodeState(pipe.model, inputs.rows, tokens, pipe.attention)
    placeholders = int((inputs.rows.input_ids[0] == pipe.model.config.image_placeholder_id).sum())
    return state.cache.nbytes, inputs.rows.input_ids.shape[1] - placeholders


@pytest.mark.parametrize("batch,cfg,cfg_img,edit", [(1, 7.5, 1.0, False), (2, 1.0, 1.0, False),
                                                    (2, 7.5, 2.0, True), (1, 7.5, 1.0, True)])
def test_kv_cache_equals_what_decode_state_allocates(tiny_pipeline, batch, cfg, cfg_img, edit) -> None:
    settings = GenerationSettings(width=48, height=32, batch=batch, cfg=cfg, cfg_img=cfg_img)
    latents = [tiny_pipeline.encode_image(load_rgb(FIXTURES / "edit_input_64.png"))] if edit else []
    caption = "<image>make it blue" if edit else "a red cube"
    allocated, prompt_tokens = _allocated_cache(tiny_pipeline, caption, settings, "blurry", latents)
    job = Job(settings, ((64, 64),) if edit else (), prompt_tokens)
    assert kv_cache_bytes(tiny_pipeline.model.config, torch.float32, job) == allocated


def _backbone_parameters(c: ModelConfig) -> int:
    """NextStep-14B's backbone by hand: embeddings, per layer q/k/v (with bias), o (no bias), SwiGLU MLP and
    two norms, the final norm, and the two image projectors (no lm_head: the runtime does not load it)."""
    kv_width = c.num_key_value_heads * c.head_dim
    q_width = c.num_attention_heads * c.head_dim
    attention = (c.hidden_size + 1) * q_width + 2 * (c.hidden_size + 1) * kv_width + q_width * c.hidden_size
    layer = attention + 3 * c.hidden_size * c.intermediate_size + 2 * c.hidden_size
    projectors = (c.token_dim + 1) * c.hidden_size + (c.hidden_size + 1) * c.hidden_size
    return c.vocab_size * c.hidden_size + c.num_hidden_layers * layer + c.hidden_size + projectors


def test_nextstep_14b_figures() -> None:
    c = NEXTSTEP_14B
    footprint = ModelFootprint.from_config(c)
    backbone = _backbone_parameters(c)
    head = sum(torch.Size(s).numel() for name, s in footprint.tensor_shapes.items() if name.startswith("image_head"))
    assert 156e6 < head < 158e6  # the "157M-parameter flow matching head" of the paper
    bf16 = planned_14b(WeightMode()).devices[0].weights_bytes
    assert bf16 == 2 * (backbone + head)
    assert 27.5 * GB < bf16 < 29 * GB  # "about 28 GB"

    decoder_linears = c.num_hidden_layers * (
        c.hidden_size * (2 * c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
        + 3 * c.hidden_size * c.intermediate_size)
    # one float32 scale per output channel: q, k, v, o, gate, up, down
    out_channels = c.num_hidden_layers * (c.num_attention_heads * c.head_dim + 2 * c.num_key_value_heads * c.head_dim
                                          + 2 * c.hidden_size + 2 * c.intermediate_size)
    fp8 = planned_14b(WeightMode("fp8")).devices[0].weights_bytes
    assert fp8 == bf16 - decoder_linears + 4 * out_channels
    assert 14 * GB < fp8 < 16 * GB  # "about 15 GB"

    job = Job(GenerationSettings(width=512, height=512, cfg=7.5), prompt_tokens=100)  # 2 rows, 100 + 1024 - 1 positions
    assert kv_cache_bytes(c, torch.bfloat16, job) == 2 * 48 * 2 * 8 * 1123 * 128 * 2
    assert 0.4 * GB < kv_cache_bytes(c, torch.bfloat16, job) < 0.5 * GB  # "about 0.45 GB"


def test_advice_is_the_cheapest_mode_that_fits() -> None:
    bf16 = WeightMode()
    assert planned_14b(bf16).fits is None
    roomy = planned_14b(bf16, free_gb=80)
    assert roomy.fits is True and roomy.advice.startswith("fits") and roomy.suggested_mode is None

    tight = planned_14b(bf16, free_gb=23.6)
    assert tight.fits is False
    assert tight.advice == f"needs {tight.devices[0].peak_bytes / GB:.1f} GB, 23.6 GB free: set memory to fp8"
    assert tight.suggested_mode == WeightMode("fp8")

    card_16gb = planned_14b(bf16, free_gb=15.5)
    assert card_16gb.advice.endswith(": set memory to int4") and card_16gb.suggested_mode == WeightMode("int4")

    small = planned_14b(bf16, free_gb=8)
    layers = small.suggested_mode.gpu_layers
    assert small.suggested_mode.storage == "int4" and 0 < layers < 48 and f"gpu_layers {layers}" in small.advice
    assert planned_14b(small.suggested_mode, free_gb=8).fits
    assert not planned_14b(WeightMode("int4", layers + 1), free_gb=8).fits

    hopeless = planned_14b(bf16, free_gb=1)
    assert hopeless.suggested_mode is None
    assert "does not fit in any mode even with every decoder layer streamed" in hopeless.advice


def test_documented_example_is_the_planners_output() -> None:
    """docs/memory-and-speed.md shows `plan --gpu-memory 24` for the 14B model: it must be what the planner says."""
    page = (REPO / "docs" / "memory-and-speed.md").read_text(encoding="utf-8")
    shown = page.split("```\nloads as: ", 1)[1].split("```", 1)[0]
    assert "loads as: " + shown == format_plan(planned_14b(WeightMode(), free_gb=24)) + "\n"


EDIT_512 = Job(GenerationSettings(cfg_img=2.0), ((512, 512),))
"""Editing one 512x512 input with image guidance, as the documentation's tables plan it."""


def table_rows(path: Path, section: str) -> dict[str, list[str]]:
    """The first markdown table after heading `section` of a file: first cell -> the other cells."""
    text = path.read_text(encoding="utf-8").split(f"\n{section}\n", 1)[1].split("\n#", 1)[0]
    rows = [line.strip().strip("|").split("|") for line in text.splitlines() if line.startswith("|")]
    return {cells[0].strip(): [cell.strip() for cell in cells[1:]] for cells in rows[2:]}


def mode_cell(plan: Plan) -> str:
    """How the documentation writes a chosen mode and its planned peak: `int4`, `gpu_layers 45`, 12.0 GB."""
    parts = [f"`{plan.mode.storage}`"]
    if plan.mode.gpu_layers is not None:
        parts.append(f"`gpu_layers {plan.mode.gpu_layers}`")
    return ", ".join(parts + [gb(plan.devices[0].peak_bytes)])


def test_readme_low_vram_table_is_the_planners_choice() -> None:
    """README's Low VRAM table: for each GPU size, the mode `auto` takes (the planner's cheapest fitting mode) for
    text to image and for editing, with its planned peak."""
    footprint = ModelFootprint.from_config(NEXTSTEP_14B)
    rows = table_rows(REPO / "README.md", "## Low VRAM")
    assert list(rows) == ["24 GB", "16 GB", "12 GB", "8 GB"]
    for size, cells in rows.items():
        free = gpus(int(size.removesuffix(" GB")))
        expected = [mode_cell(plan_load(footprint, "auto", None, job, free)[0]) for job in (Job(), EDIT_512)]
        assert cells == expected, size


def test_memory_page_table_is_the_planners_figures() -> None:
    """docs/memory-and-speed.md's table of what the 14B models need: weights and peaks per mode, and where each
    fits among 8, 12, 16, 24 and 32 GB."""
    rows = table_rows(REPO / "docs" / "memory-and-speed.md", "## What the 14B models need")
    modes = {"`full` (bfloat16)": WeightMode(), "`fp8`": WeightMode("fp8"), "`int4`": WeightMode("int4"),
             "`int4`, `gpu_layers 29`": WeightMode("int4", gpu_layers=29)}
    assert list(rows) == list(modes)
    for name, mode in modes.items():
        [text], [edit] = planned_14b(mode).devices, planned_14b(mode, EDIT_512).devices
        weights, peak_text, peak_edit, fits = rows[name]
        assert weights.startswith(gb(text.weights_bytes)) and peak_text == gb(text.peak_bytes), name
        assert peak_edit in ("", gb(edit.peak_bytes)), name
        smallest = [size for size in (8, 12, 16, 24, 32) if text.peak_bytes <= size * GB][0]
        assert fits.startswith(f"{smallest} GB"), name
        if peak_edit and edit.peak_bytes > smallest * GB:
            edit_fits = [size for size in (8, 12, 16, 24, 32) if edit.peak_bytes <= size * GB][0]
            assert f"{edit_fits} GB for editing" in fits, name
    streamed = planned_14b(modes["`int4`, `gpu_layers 29`"])
    assert f"({gb(streamed.weights_host_bytes)} streamed from RAM)" in rows["`int4`, `gpu_layers 29`"][0]


def test_streaming_moves_weights_to_the_host() -> None:
    footprint = ModelFootprint.from_config(NEXTSTEP_14B)
    placement = Placement.single("cuda:0", torch.bfloat16, 48)
    ([whole], _), ([none], _) = (placed_weight_bytes(footprint, WeightMode(gpu_layers=layers), placement)
                                 for layers in (None, 0))
    [streamed], host = placed_weight_bytes(footprint, WeightMode(gpu_layers=40), placement)
    layer = (whole - none) // 46
    assert host == 8 * layer and streamed == whole - 6 * layer  # 2 of the 8 come back as slots


def test_bad_plans_are_clear_errors() -> None:
    footprint = ModelFootprint.from_folder(TINY_MODEL)
    with pytest.raises(NextStepError, match=r"gpu_layers must be between 0 and 2 \(got 3\)"):
        plan_mode(footprint, WeightMode(gpu_layers=3), Job(), gpus(24))
    with pytest.raises(NextStepError, match="width 100 is not a positive multiple of 16"):
        plan_mode(footprint, WeightMode(), Job(GenerationSettings(width=100)), gpus(24))
    with pytest.raises(NextStepError, match="has no config.json"):
        ModelFootprint.from_folder(FIXTURES)


@pytest.mark.parametrize("changes,message", [
    ({"num_hidden_layers": 3}, r"says num_hidden_layers=3 but the weights hold 2 decoder layers"),
    ({"num_hidden_layers": 1000}, r"says num_hidden_layers=1000 but the weights hold 2 decoder layers"),
    ({"fm_head_layers": 700}, r"says the flow head has 700 blocks \(genloss_depth/fm_head_layers\) but the weights"),
    ({"intermediate_size": 256}, r"tensor .layers\.0\.mlp\.\w+\.weight. has shape \[\d+, \d+\] but .*config.json implies"),
])
def test_weights_that_disagree_with_the_config_are_refused(model_copy, changes, message) -> None:
    """Layer counts are compared from the tensor names before a network of the config's size is built."""
    edit_config(model_copy, **changes)
    with pytest.raises(NextStepError, match=message):
        ModelFootprint.from_folder(model_copy)


def test_host_memory_is_read_from_meminfo() -> None:
    free, total = device_memory(torch.device("cpu"))
    assert 0 < free <= total
    assert device_memory(torch.device("meta")) is None


def run_plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nextstep_runtime", "plan", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_cli_plan_json_and_table() -> None:
    result = run_plan(str(TINY_MODEL), "--dtype", "float32", "--memory", "full", "--gpu-memory", "0.002", "--width",
                      "64", "--height", "64", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    [device] = data["devices"]
    assert device["weights_bytes"] == tensor_bytes(load_on(TINY_MODEL).state_dict().values())
    assert data["weights_host_bytes"] == 0 and device["free_bytes"] == 2_000_000
    assert data["fits"] is (device["peak_bytes"] <= 2_000_000) and data["loads_as"] == "float32"
    assert {"kv_cache_bytes", "vae_bytes", "peak_bytes"} <= set(device) and data["advice"]
    assert data["memory_choice"] is None
    auto = json.loads(run_plan(str(TINY_MODEL), "--dtype", "float32", "--gpu-memory", "0.002", "--json").stdout)
    assert auto["memory_choice"].startswith(f"memory auto: {auto['loads_as']} (")  # what generate's auto loads
    assert auto["mode"] == {"storage": "fp8", "gpu_layers": 0}  # the smallest on a 2 MB GPU (no CUDA int4 in float32)

    table = run_plan(str(TINY_MODEL), "--fp8", "--gpu-layers", "1", "--batch", "2")
    assert table.returncode == 0, table.stderr
    assert "loads as: bfloat16, fp8, gpu_layers 1" in table.stdout and "peak" in table.stdout
    assert "advice: " in table.stdout
    if not torch.cuda.is_available():
        assert "free memory unknown" in table.stdout
        assert json.loads(run_plan(str(TINY_MODEL), "--json").stdout)["fits"] is None


def test_cli_plan_bad_input_is_one_error_line(tmp_path) -> None:
    result = run_plan(str(tmp_path), "--gpu-memory", "24")
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "has no config.json" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
