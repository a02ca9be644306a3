"""One model over several devices (docs/multi-gpu.md): the planner's split, exact against what the loader places;
every golden through a split over two CPU device entries, which runs the code that hands the hidden states from
range to range and keeps each layer's KV cache on its range's device; refused setups name the fix."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_runs import run_cli
from goldens import TINY_MODEL, GoldenCase, assert_matches_golden, golden_cases, settings_for
from model_configs import NEXTSTEP_14B
from model_folders import deepen
from safetensors.torch import load_file

from nextstep_runtime import (
    GB,
    GenerationSettings,
    Job,
    ModelFootprint,
    NextStepError,
    NextStepPipeline,
    WeightMode,
    images_to_unit,
    load_model,
    load_rgb,
    to_uint8,
)
from nextstep_runtime.cli.main import main
from nextstep_runtime.memory.estimate import kv_cache_bytes
from nextstep_runtime.memory.footprint import range_weight_bytes, weight_bytes
from nextstep_runtime.memory.split import device_shares, plan_split
from nextstep_runtime.model.placement import DeviceList, Placement
from nextstep_runtime.weights.offload import streamers

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def split_pipeline() -> NextStepPipeline:
    return NextStepPipeline.from_pretrained(TINY_MODEL, devices=["cpu", "cpu"], dtype="float32")


def test_two_cpu_entries_split_the_layers(split_pipeline) -> None:
    model = split_pipeline.model
    assert model.placement.describe() == "cpu:0-0,cpu:1-1" and model.placement.is_split
    cache = model.new_cache(2, 10)
    assert len(cache.keys) == len(cache.values) == 2  # one KV tensor per range, on its range's device
    assert [keys.shape[0] for keys in cache.keys] == [1, 1]


@pytest.mark.parametrize("case", golden_cases(), ids=lambda case: case.name)
def test_api_split_reproduces_golden(case: GoldenCase, split_pipeline) -> None:
    p = case.params
    edit_images = [load_rgb(case.image_path)] if case.image_path else []
    progress = []
    result = split_pipeline.generate(p["caption"], settings_for(case), negative=p["negative_prompt"],
                                     positive=p["positive_prompt"], edit_images=edit_images,
                                     callback=lambda done, total, tokens: progress.append(done))
    assert_matches_golden(case, {"tokens": result.tokens, "latents": result.latents, "images": result.images,
                                 "images_uint8": to_uint8(images_to_unit(result.images))})
    assert progress == list(range(1, result.tokens.shape[1] + 1))


@pytest.mark.parametrize("case", golden_cases(), ids=lambda case: case.name)
def test_cli_split_reproduces_golden(case: GoldenCase, tmp_path: Path) -> None:
    tensors = tmp_path / "out.safetensors"
    result = run_cli("--model", str(TINY_MODEL), "--devices", "cpu,cpu", "--dtype", "float32",
                     "--out", str(tmp_path / "out.png"), "--save-tensors", str(tensors), *case.cli_args())
    assert result.returncode == 0, result.stderr
    assert "split: layers cpu:0-0,cpu:1-1" in result.stderr
    saved = load_file(tensors)
    assert_matches_golden(case, {key: saved[key] for key in ("tokens", "latents", "images", "images_uint8")})


def test_explicit_ranges_with_streaming_and_int4_match_the_single_device_run(model_copy) -> None:
    """A deeper model split 2 + 3 with the last device streaming its last two layers, in int4: the same tokens as
    the same mode on one device (the split only moves where layers run)."""
    deepen(model_copy, 5)
    settings = GenerationSettings(width=32, height=32, steps=3, seed=4)
    single = NextStepPipeline.from_pretrained(model_copy, device="cpu", dtype="float32", int4=True, resident_layers=3)
    split = NextStepPipeline.from_pretrained(model_copy, devices="cpu:0-1,cpu:2-4", dtype="float32", int4=True,
                                             resident_layers=3)
    assert split.model.placement.describe() == "cpu:0-1,cpu:2-4" and len(streamers(split.model)) == 1
    expected = single.sample("a red cube", settings).tokens
    assert torch.equal(split.sample("a red cube", settings).tokens, expected)


@pytest.mark.parametrize("weights,resident", [("bf16", None), ("fp8", None), ("int4", None), ("bf16", 3),
                                              ("fp8", 4)])
def test_split_weights_equal_what_the_loader_places(model_copy, weights: str, resident: int | None) -> None:
    """Per range: the planner's bytes are the loaded tensors of its layers, plus the embedding and image-in projector
    on the first device, and the other parts and the streaming slots on the last."""
    deepen(model_copy, 5)
    placement = Placement.from_counts([torch.device("cpu")] * 2, [2, 3])
    fp8, int4 = weights == "fp8", weights == "int4"
    model = load_model(model_copy, torch.bfloat16, "cpu", fp8=fp8, int4=int4, resident_layers=resident,
                       placement=placement)
    slots = sum(buffer.nbytes for streamer in streamers(model) for buffer in streamer.slot_buffers)
    first = sum(t.nbytes for part in (model.embed_tokens, model.image_in_projector, model.layers[:2])
                for t in part.state_dict().values())
    last = sum(t.nbytes for t in model.state_dict().values()) - first + slots
    mode = WeightMode(torch.bfloat16, fp8, resident, int4)
    footprint = ModelFootprint.from_folder(model_copy)
    on_device, host = range_weight_bytes(footprint, mode, [2, 3])
    assert on_device == [first, last]
    assert host == weight_bytes(footprint, mode).host and sum(on_device) == weight_bytes(footprint, mode).gpu


def _layer_bytes(mode: WeightMode) -> int:
    """One NextStep-14B decoder layer by hand: q/k/v with bias, o, the SwiGLU MLP (fp8: 1 byte per weight and a
    float32 scale per output channel), two norms."""
    c = NEXTSTEP_14B
    kv_width, q_width = c.num_key_value_heads * c.head_dim, c.num_attention_heads * c.head_dim
    linears = c.hidden_size * (q_width + 2 * kv_width) + q_width * c.hidden_size + 3 * c.hidden_size * c.intermediate_size
    out_channels = q_width + 2 * kv_width + 2 * c.hidden_size + 2 * c.intermediate_size
    other = q_width + 2 * kv_width + 2 * c.hidden_size  # biases and norms
    size = mode.dtype.itemsize
    return linears + 4 * out_channels + other * size if mode.fp8 else (linears + other) * size


@pytest.mark.parametrize("gpu_gb,fp8", [(24, False), (16, True), (24, True)])
def test_nextstep_14b_split_figures_are_exact(gpu_gb: int, fp8: bool) -> None:
    c = NEXTSTEP_14B
    footprint = ModelFootprint.from_config(c)
    mode = WeightMode(torch.bfloat16, fp8=fp8)
    job = Job(GenerationSettings(width=512, height=512, cfg=7.5), prompt_tokens=100)
    plan = plan_split(footprint, mode, job, DeviceList.parse("cuda:0,cuda:1"), [gpu_gb * GB] * 2)
    first, last = plan.devices
    assert plan.fits and first.fits and last.fits
    assert (first.first_layer, last.last_layer, first.last_layer + 1) == (0, 47, last.first_layer)
    counts = [first.last_layer + 1, 48 - last.first_layer]
    inputs = 2 * (c.vocab_size * c.hidden_size + (c.token_dim + 1) * c.hidden_size)
    assert first.weights_bytes == inputs + counts[0] * _layer_bytes(mode)
    whole = weight_bytes(footprint, mode).gpu
    assert first.weights_bytes + last.weights_bytes == whole
    assert last.weights_bytes == whole - inputs - 48 * _layer_bytes(mode) + counts[1] * _layer_bytes(mode)
    per_layer_kv = 2 * 2 * 8 * 1123 * 128 * 2  # k and v, 2 rows, 8 kv heads, 100 + 1024 - 1 positions, 128 dims
    assert [first.kv_cache_bytes, last.kv_cache_bytes] == [n * per_layer_kv for n in counts]
    assert first.kv_cache_bytes + last.kv_cache_bytes == kv_cache_bytes(c, torch.bfloat16, job)
    assert first.vae_bytes == 0 and last.vae_bytes == footprint.vae_bytes(torch.bfloat16)
    assert plan.advice == (f"fits: split over cuda:0 and cuda:1: {first.peak_bytes / GB:.1f} GB + "
                           f"{last.peak_bytes / GB:.1f} GB ({plan.placement.describe()})")
    assert abs(first.peak_bytes - last.peak_bytes) < 2 * (_layer_bytes(mode) + per_layer_kv)  # balanced


def test_a_split_that_does_not_fit_advises_the_cheapest_mode() -> None:
    footprint = ModelFootprint.from_config(NEXTSTEP_14B)
    devices = DeviceList.parse("cuda:0,cuda:1")
    bf16 = WeightMode(torch.bfloat16)
    tight = plan_split(footprint, bf16, Job(), devices, [12 * GB, 12 * GB])
    assert tight.fits is False and tight.advice.endswith(": set memory to fp8")
    assert plan_split(footprint, tight.suggested_mode, Job(), devices, [12 * GB, 12 * GB]).fits
    small = plan_split(footprint, bf16, Job(), devices, [4 * GB, 4 * GB])
    layers = small.suggested_mode.gpu_layers
    assert small.suggested_mode.int4 and f"gpu_layers {layers}" in small.advice
    assert plan_split(footprint, small.suggested_mode, Job(), devices, [4 * GB, 4 * GB]).fits
    lopsided = plan_split(footprint, bf16, Job(), DeviceList.parse("cuda:0:0-9,cuda:1:10-47"), [16 * GB, 16 * GB])
    assert lopsided.fits is False and "use the ranges cuda:0:0-23,cuda:1:24-47" in lopsided.advice


@pytest.mark.parametrize("sizes,expected", [((24, 24), WeightMode(torch.bfloat16)),
                                            ((12, 12), WeightMode(torch.bfloat16, fp8=True)),
                                            ((8, 8), WeightMode(torch.bfloat16, int4=True))])
def test_memory_auto_over_two_gpus_is_the_fastest_mode_whose_split_fits(sizes, expected) -> None:
    from nextstep_runtime.devices import PLANNED_GPU
    from nextstep_runtime.memory.split import choose_split_mode

    footprint = ModelFootprint.from_config(NEXTSTEP_14B)
    free = [size * GB for size in sizes]
    mode, plan = choose_split_mode(footprint, Job(), DeviceList.parse("cuda:0,cuda:1"), free, [PLANNED_GPU] * 2,
                                   torch.bfloat16)
    assert mode == expected and plan.fits and plan.mode == mode


def test_plan_shares_follow_explicit_ranges() -> None:
    footprint = ModelFootprint.from_config(NEXTSTEP_14B)
    placement = DeviceList.parse("cuda:0:0-9,cuda:1:10-47").placement
    shares, host = device_shares(footprint, WeightMode(torch.bfloat16), Job(), placement, [None, None])
    assert [(s.first_layer, s.last_layer) for s in shares] == [(0, 9), (10, 47)] and host == 0
    assert shares[0].fits is None


@pytest.mark.parametrize("devices,message", [
    ("cpu,tpu", "unknown device 'tpu' in the device list"),
    ("cpu:0-0", "cover layers 0-0 but the model has 2 decoder layers"),
    ("cpu:0-0,cpu:2-2", "do not cover the decoder layers in order"),
    ("cpu,cpu,cpu", "3 devices for 2 decoder layers: each device needs at least one layer; list at most 2 devices"),
    ("cpu:0-0,cpu", "gives layer ranges for some devices only"),
    ("cpu,,cpu", "has an empty entry"),
])
def test_refused_device_lists_name_the_fix(devices: str, message: str) -> None:
    with pytest.raises(NextStepError, match=message):
        NextStepPipeline.from_pretrained(TINY_MODEL, devices=devices, dtype="float32")


def test_refused_setups_are_one_cli_error_line(capsys, tmp_path: Path) -> None:
    def error(*args: str) -> str:
        code = main(["generate", "--model", str(TINY_MODEL), "--dtype", "float32", "--width", "32", "--height", "32",
                     "--steps", "2", "--prompt", "a cube", "--out", str(tmp_path / "out.png"), *args])
        err = capsys.readouterr().err
        assert code == 2 and not (tmp_path / "out.png").exists(), err
        assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
        return err.strip()

    assert "list at most 2 devices" in error("--devices", "cpu,cpu,cpu")
    assert "give one" in error("--device", "cpu", "--devices", "cpu,cpu")
    assert "only the last device (cpu, layers 1-1) streams" in error("--devices", "cpu,cpu", "--memory", "full",
                                                                      "--gpu-layers", "0")
    assert "devices of one kind" in error("--devices", "cpu:0-0,cuda:1:1-1")


def run_plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nextstep_runtime", "plan", str(TINY_MODEL), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def test_cli_plan_devices_reports_exact_bytes_per_device() -> None:
    result = run_plan("--devices", "cuda:0,cuda:1", "--gpu-memory", "24,16", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    footprint = ModelFootprint.from_folder(TINY_MODEL)
    expected = plan_split(footprint, WeightMode(torch.bfloat16), Job(), DeviceList.parse("cuda:0,cuda:1"),
                          [24 * GB, 16 * GB])
    assert data == json.loads(json.dumps(expected.to_dict()))
    assert [share["free_bytes"] for share in data["devices"]] == [24 * GB, 16 * GB]
    table = run_plan("--devices", "cuda:0:0-0,cuda:1:1-1", "--gpu-memory", "24,24")
    assert table.returncode == 0 and "decoder layers" in table.stdout and "advice: fits: split over cuda:0 and " \
        "cuda:1" in table.stdout
    if not torch.cuda.is_available():
        absent = run_plan("--devices", "cuda:0,cuda:1")
        assert absent.returncode == 2 and absent.stderr.strip().endswith("give their sizes: --gpu-memory 24,24")
    wrong = run_plan("--devices", "cuda:0,cuda:1", "--gpu-memory", "24")
    assert wrong.returncode == 2 and wrong.stderr.strip() == ("error: --gpu-memory gives 1 sizes for 2 devices; give "
                                                              "one size per device, e.g. 24,24")


def test_documented_split_example_is_the_planners_output() -> None:
    """docs/multi-gpu.md shows `plan --devices cuda:0,cuda:1 --gpu-memory 16,16` for the 14B model."""
    from nextstep_runtime.cli.plan import format_split_plan

    page = (REPO / "docs" / "multi-gpu.md").read_text(encoding="utf-8")
    shown = page.split("```\nmode: ", 1)[1].split("```", 1)[0]
    plan = plan_split(ModelFootprint.from_config(NEXTSTEP_14B), WeightMode(torch.bfloat16), Job(),
                      DeviceList.parse("cuda:0,cuda:1"), [16 * GB, 16 * GB])
    assert "mode: " + shown == format_split_plan(plan) + "\n"


class Cancelled(Exception):
    pass


def test_a_cancel_frees_the_kv_cache_on_every_device_and_the_next_run_is_the_golden(split_pipeline) -> None:
    """A callback raising mid-image (what a host's cancel does) leaves no KV cache alive on any device."""
    import gc

    from nextstep_runtime.model.backbone import KVCache

    case = next(c for c in golden_cases() if c.name == "official_t2i_sde")

    def caches() -> list[KVCache]:
        return [o for o in gc.get_objects() if type(o) is KVCache]

    def cancel(done: int, total: int, tokens: torch.Tensor) -> None:
        if done == 2:
            (cache,) = caches()  # the run's, one tensor of keys and one of values per range
            assert len(cache.keys) == len(cache.values) == 2
            raise Cancelled

    def run_and_cancel() -> None:
        try:
            split_pipeline.sample(case.params["caption"], settings_for(case), callback=cancel)
        except Cancelled:
            return
        raise AssertionError("the run was not cancelled")

    run_and_cancel()
    gc.collect()
    assert not caches()
    p = case.params
    result = split_pipeline.generate(p["caption"], settings_for(case), negative=p["negative_prompt"],
                                     positive=p["positive_prompt"])
    assert_matches_golden(case, {"tokens": result.tokens, "images": result.images})
