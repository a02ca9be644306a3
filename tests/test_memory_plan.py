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
from model_folders import deepen, edit_config

from nextstep_runtime import (
    GB,
    DeviceTraits,
    GenerationSettings,
    Job,
    ModelConfig,
    ModelFolder,
    ModelFootprint,
    NextStepError,
    WeightMode,
    device_memory,
    load_model,
    load_rgb,
    load_vae,
    plan_memory,
)
from nextstep_runtime.cli.plan import format_plan
from nextstep_runtime.devices import PLANNED_GPU
from nextstep_runtime.memory.choice import choose_mode
from nextstep_runtime.memory.estimate import kv_cache_bytes
from nextstep_runtime.memory.footprint import weight_bytes
from nextstep_runtime.memory.plan import gb
from nextstep_runtime.sampling.token_loop import DecodeState
from nextstep_runtime.weights.offload import PACK_ALIGNMENT, streamers

REPO = Path(__file__).resolve().parents[1]




def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


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


@pytest.mark.parametrize("dtype,fp8,int4", [(torch.float32, False, False), (torch.bfloat16, False, False),
                                            (torch.float32, True, False), (torch.bfloat16, True, False),
                                            (torch.float32, False, True), (torch.bfloat16, False, True)])
def test_resident_weights_equal_the_loaded_model(dtype: torch.dtype, fp8: bool, int4: bool) -> None:
    model = load_model(TINY_MODEL, dtype, "cpu", fp8=fp8, int4=int4)
    plan = plan_memory(ModelFootprint.from_folder(TINY_MODEL), WeightMode(dtype, fp8, int4=int4), Job(),
                       device=DeviceTraits("cpu"))
    assert plan.weights_gpu_bytes == tensor_bytes(model.state_dict().values())
    assert plan.weights_host_bytes == 0
    vae = load_vae(ModelFolder.open(TINY_MODEL).vae, dtype, "cpu")
    assert plan.vae_bytes == tensor_bytes(vae.state_dict().values())


@pytest.mark.parametrize("weights,resident", [("bf16", 0), ("bf16", 1), ("fp8", 1), ("bf16", 2), ("fp8", 3),
                                              ("int4", 2), ("bf16", 4), ("int4", 4)])
def test_streamed_weights_equal_the_loaded_model(model_copy, weights: str, resident: int) -> None:
    """Device side: every registered tensor plus the streamer's slot buffers (one when a single layer is streamed,
    else two); host side: the buffers the streamed layers are packed in, which is what gets page-locked on a GPU
    machine, and every tensor of a streamed layer lies in its layer's buffer."""
    deepen(model_copy, 5)
    fp8, int4 = weights == "fp8", weights == "int4"
    model = load_model(model_copy, torch.bfloat16, "cpu", fp8=fp8, int4=int4, resident_layers=resident)
    found = streamers(model)
    assert len(found) == 1
    streamer = found[0]
    assert len(streamer.slots) == len(streamer.slot_buffers) == min(2, 5 - resident)
    slots = tensor_bytes(streamer.slot_buffers)
    host = tensor_bytes(streamer.host_buffers)
    bytes_ = weight_bytes(ModelFootprint.from_folder(model_copy), WeightMode(torch.bfloat16, fp8, resident, int4))
    assert bytes_.gpu == tensor_bytes(model.state_dict().values()) + slots
    assert bytes_.host == host > 0
    assert slots == streamer.slot_bytes == len(streamer.slots) * streamer.host_buffers[0].nbytes
    for layer, buffer in zip(streamer.host_layers, streamer.host_buffers):
        start, end = buffer.data_ptr(), buffer.data_ptr() + buffer.nbytes
        tensors = list(layer.state_dict().values())
        assert all(start <= t.data_ptr() and t.data_ptr() + t.nbytes <= end for t in tensors)
        assert tensor_bytes(tensors) <= buffer.nbytes < tensor_bytes(tensors) + len(tensors) * PACK_ALIGNMENT


def _allocated_cache(pipe, caption: str, settings: GenerationSettings, negative: str | None, edit_latents):
    inputs = pipe.prepare(caption, settings, negative, None, edit_latents)
    tokens = inputs.grid[0] * inputs.grid[1]
    state = DecodeState(pipe.model, inputs.rows, tokens)
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
    bf16 = plan_memory(footprint, WeightMode(torch.bfloat16), Job())
    assert bf16.weights_gpu_bytes == 2 * (backbone + head)
    assert 27.5 * GB < bf16.weights_gpu_bytes < 29 * GB  # "about 28 GB"

    decoder_linears = c.num_hidden_layers * (
        c.hidden_size * (2 * c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
        + 3 * c.hidden_size * c.intermediate_size)
    # one float32 scale per output channel: q, k, v, o, gate, up, down
    out_channels = c.num_hidden_layers * (c.num_attention_heads * c.head_dim + 2 * c.num_key_value_heads * c.head_dim
                                          + 2 * c.hidden_size + 2 * c.intermediate_size)
    fp8 = plan_memory(footprint, WeightMode(torch.bfloat16, fp8=True), Job())
    assert fp8.weights_gpu_bytes == bf16.weights_gpu_bytes - decoder_linears + 4 * out_channels
    assert 14 * GB < fp8.weights_gpu_bytes < 16 * GB  # "about 15 GB"

    job = Job(GenerationSettings(width=512, height=512, cfg=7.5), prompt_tokens=100)  # 2 rows, 100 + 1024 - 1 positions
    assert kv_cache_bytes(c, torch.bfloat16, job) == 2 * 48 * 2 * 8 * 1123 * 128 * 2
    assert 0.4 * GB < kv_cache_bytes(c, torch.bfloat16, job) < 0.5 * GB  # "about 0.45 GB"


def test_advice_is_the_cheapest_mode_that_fits() -> None:
    footprint = ModelFootprint.from_config(NEXTSTEP_14B)
    bf16 = WeightMode(torch.bfloat16)
    assert plan_memory(footprint, bf16, Job()).fits is None
    roomy = plan_memory(footprint, bf16, Job(), gpu_total=80 * GB)
    assert roomy.fits is True and roomy.advice.startswith("fits") and roomy.suggested_mode is None

    tight = plan_memory(footprint, bf16, Job(), gpu_total=24 * GB, gpu_free=23.6 * GB)
    assert tight.fits is False
    assert tight.advice == f"needs {tight.peak_gpu_bytes / GB:.1f} GB, 23.6 GB free: set memory to fp8"
    assert tight.suggested_mode == WeightMode(torch.bfloat16, fp8=True)

    card_16gb = plan_memory(footprint, bf16, Job(), gpu_total=16 * GB, gpu_free=15.5 * GB)
    assert card_16gb.advice.endswith(": set memory to int4")
    assert card_16gb.suggested_mode == WeightMode(torch.bfloat16, int4=True)

    small = plan_memory(footprint, bf16, Job(), gpu_total=8 * GB)
    layers = small.suggested_mode.gpu_layers
    assert small.suggested_mode.int4 and 0 < layers < 48 and f"gpu_layers {layers}" in small.advice
    assert plan_memory(footprint, small.suggested_mode, Job(), gpu_total=8 * GB).fits
    assert not plan_memory(footprint, WeightMode(torch.bfloat16, False, layers + 1, True), Job(),
                           gpu_total=8 * GB).fits

    hopeless = plan_memory(footprint, bf16, Job(), gpu_total=GB)
    assert hopeless.suggested_mode is None and "does not fit even with every decoder layer streamed" in hopeless.advice


def test_documented_example_is_the_planners_output() -> None:
    """docs/memory-and-speed.md shows `plan --gpu-memory 24` for the 14B model: it must be what the planner says."""
    page = (REPO / "docs" / "memory-and-speed.md").read_text(encoding="utf-8")
    shown = page.split("```\nmode: ", 1)[1].split("```", 1)[0]
    plan = plan_memory(ModelFootprint.from_config(NEXTSTEP_14B), WeightMode(torch.bfloat16), Job(), 24 * GB)
    assert "mode: " + shown == format_plan(plan) + "\n"


EDIT_512 = Job(GenerationSettings(cfg_img=2.0), ((512, 512),))
"""Editing one 512x512 input with image guidance, as the documentation's tables plan it."""


def table_rows(path: Path, section: str) -> dict[str, list[str]]:
    """The first markdown table after heading `section` of a file: first cell -> the other cells."""
    text = path.read_text(encoding="utf-8").split(f"\n{section}\n", 1)[1].split("\n#", 1)[0]
    rows = [line.strip().strip("|").split("|") for line in text.splitlines() if line.startswith("|")]
    return {cells[0].strip(): [cell.strip() for cell in cells[1:]] for cells in rows[2:]}


def mode_cell(mode: WeightMode, plan) -> str:
    """How the documentation writes a chosen mode and its planned peak: `int4`, `gpu_layers 45`, 12.0 GB."""
    parts = ["`full`" if mode.storage == "bf16" else f"`{mode.storage}`"]
    if mode.gpu_layers is not None:
        parts.append(f"`gpu_layers {mode.gpu_layers}`")
    return ", ".join(parts + [gb(plan.peak_gpu_bytes)])


def test_readme_low_vram_table_is_the_planners_choice() -> None:
    """README's Low VRAM table: for each GPU size, the mode `auto` takes (the planner's cheapest fitting mode) for
    text to image and for editing, with its planned peak."""
    footprint = ModelFootprint.from_config(NEXTSTEP_14B)
    rows = table_rows(REPO / "README.md", "## Low VRAM")
    assert list(rows) == ["24 GB", "16 GB", "12 GB", "8 GB"]
    for size, cells in rows.items():
        free = int(size.removesuffix(" GB")) * GB
        expected = [mode_cell(*choose_mode(footprint, job, free, PLANNED_GPU)) for job in (Job(), EDIT_512)]
        assert cells == expected, size


def test_memory_page_table_is_the_planners_figures() -> None:
    """docs/memory-and-speed.md's table of what the 14B models need: weights and peaks per mode, and where each
    fits among 8, 12, 16, 24 and 32 GB."""
    footprint = ModelFootprint.from_config(NEXTSTEP_14B)
    rows = table_rows(REPO / "docs" / "memory-and-speed.md", "## What the 14B models need")
    modes = {"`full` (bfloat16)": WeightMode(), "`fp8`": WeightMode(fp8=True), "`int4`": WeightMode(int4=True),
             "`int4`, `gpu_layers 29`": WeightMode(int4=True, gpu_layers=29)}
    assert list(rows) == list(modes)
    for name, mode in modes.items():
        text, edit = plan_memory(footprint, mode, Job()), plan_memory(footprint, mode, EDIT_512)
        weights, peak_text, peak_edit, fits = rows[name]
        assert weights.startswith(gb(text.weights_gpu_bytes)) and peak_text == gb(text.peak_gpu_bytes), name
        assert peak_edit in ("", gb(edit.peak_gpu_bytes)), name
        smallest = [size for size in (8, 12, 16, 24, 32) if text.peak_gpu_bytes <= size * GB][0]
        assert fits.startswith(f"{smallest} GB"), name
        if peak_edit and edit.peak_gpu_bytes > smallest * GB:
            edit_fits = [size for size in (8, 12, 16, 24, 32) if edit.peak_gpu_bytes <= size * GB][0]
            assert f"{edit_fits} GB for editing" in fits, name
    streamed = plan_memory(footprint, modes["`int4`, `gpu_layers 29`"], Job())
    assert f"({gb(streamed.weights_host_bytes)} streamed from RAM)" in rows["`int4`, `gpu_layers 29`"][0]


def test_streaming_moves_weights_to_the_host() -> None:
    footprint = ModelFootprint.from_config(NEXTSTEP_14B)
    whole = weight_bytes(footprint, WeightMode(torch.bfloat16))
    streamed = weight_bytes(footprint, WeightMode(torch.bfloat16, gpu_layers=40))
    layer = (whole.gpu - weight_bytes(footprint, WeightMode(torch.bfloat16, gpu_layers=0)).gpu) // 46
    assert streamed.host == 8 * layer and streamed.gpu == whole.gpu - 6 * layer  # 2 of the 8 come back as slots


def test_bad_plans_are_clear_errors() -> None:
    footprint = ModelFootprint.from_folder(TINY_MODEL)
    with pytest.raises(NextStepError, match=r"gpu_layers must be between 0 and 2 \(got 3\)"):
        plan_memory(footprint, WeightMode(gpu_layers=3), Job())
    with pytest.raises(NextStepError, match="width 100 is not a positive multiple of 16"):
        plan_memory(footprint, WeightMode(), Job(GenerationSettings(width=100)))
    with pytest.raises(NextStepError, match="has no config.json"):
        ModelFootprint.from_folder(FIXTURES)


@pytest.mark.parametrize("changes,message", [
    ({"num_hidden_layers": 3}, r"says num_hidden_layers=3 but the weights hold 2 decoder layers"),
    ({"num_hidden_layers": 1000}, r"says num_hidden_layers=1000 but the weights hold 2 decoder layers"),
    ({"fm_head_layers": 700}, r"says the flow head has 700 blocks \(genloss_depth/fm_head_layers\) but the weights"),
    ({"intermediate_size": 256}, r"do not match its config.json \(first difference: layers\.0\.mlp"),
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
    result = run_plan(str(TINY_MODEL), "--dtype", "float32", "--gpu-memory", "0.002", "--width", "64", "--height",
                      "64", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    model = load_model(TINY_MODEL, torch.float32, "cpu")
    assert data["weights_gpu_bytes"] == tensor_bytes(model.state_dict().values())
    assert data["weights_host_bytes"] == 0 and data["gpu_total_bytes"] == 2_000_000
    assert data["fits"] is (data["peak_gpu_bytes"] <= 2_000_000)
    assert {"kv_cache_bytes", "vae_bytes", "peak_gpu_bytes", "advice"} <= set(data)

    table = run_plan(str(TINY_MODEL), "--fp8", "--gpu-layers", "1", "--batch", "2")
    assert table.returncode == 0, table.stderr
    assert "mode: bfloat16, fp8, gpu_layers 1" in table.stdout and "peak on the GPU" in table.stdout
    assert "advice: " in table.stdout
    if not torch.cuda.is_available():
        assert "GPU size unknown" in table.stdout
        assert json.loads(run_plan(str(TINY_MODEL), "--json").stdout)["fits"] is None


def test_cli_plan_bad_input_is_one_error_line(tmp_path) -> None:
    result = run_plan(str(tmp_path), "--gpu-memory", "24")
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "has no config.json" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
