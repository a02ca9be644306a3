"""The rules that differ between NVIDIA GPUs, Macs and the CPU, as pure functions of a device's traits (devices.py),
checked for GPUs and Macs this machine does not have: the `auto` dtype, which weight modes load, what `memory auto`
picks and advises, the memory remedy, whether to compile, whether flash-attn can run, how much host memory may be
page-locked."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from broken_installs import working_flash_attn
from goldens import TINY_MODEL
from model_configs import NEXTSTEP_14B
from model_folders import load_on
from planning import gpus

from nextstep_runtime import (
    DeviceTraits,
    Job,
    LayerRange,
    ModelFootprint,
    NextStepError,
    NextStepPipeline,
    Placement,
    WeightMode,
    attention_kernels,
    load_model,
    memory_setting,
    plan_load,
    plan_mode,
)
from nextstep_runtime.devices import (
    PLANNED_GPU,
    auto_dtype,
    compile_default,
    compile_version_refusal,
    flash_attn_refusal,
    fp8_matmul_fused,
    int4_refusal,
    vae_dtype,
    version_tuple,
)
from nextstep_runtime.memory.out_of_memory import memory_remedy, model_changes
from nextstep_runtime.weights.modes import FLOAT_WEIGHTS, loadable_modes, mode_refusal
from nextstep_runtime.weights.offload import pinned_memory_cap

PASCAL, TURING, AMPERE, ADA = (DeviceTraits("cuda", capability) for capability in ((6, 1), (7, 5), (8, 0), (8, 9)))
OLD_MAC = DeviceTraits("mps", macos=(13, 6), torch_version=(2, 5))
NEW_MAC = DeviceTraits("mps", macos=(14, 5), torch_version=(2, 5))
NEW_MAC_OLD_TORCH = DeviceTraits("mps", macos=(15, 1), torch_version=(2, 4))
ADA_CUDA_11_8 = DeviceTraits("cuda", (8, 9), torch_version=(2, 7), cuda_build=(11, 8))
"""torch 2.7+cu118, still common on Windows: its wheels leave the CUDA int4 kernel out."""
CPU = DeviceTraits("cpu", torch_version=(2, 13))
FOOTPRINT = ModelFootprint.from_config(NEXTSTEP_14B)


def storages(modes: list[WeightMode]) -> list[str]:
    return [mode.storage for mode in modes]


@pytest.mark.parametrize("traits,expected", [
    (PASCAL, torch.float16), (TURING, torch.float16),  # bf16 only emulated there, however is_bf16_supported answers
    (AMPERE, torch.bfloat16), (ADA, torch.bfloat16), (PLANNED_GPU, torch.bfloat16),
    (OLD_MAC, torch.float16), (NEW_MAC, torch.bfloat16), (DeviceTraits("mps"), torch.float16),  # macOS unknown
    (CPU, torch.float32),
], ids=["cuda-6.1", "cuda-7.5", "cuda-8.0", "cuda-8.9", "planned-gpu", "macos-13", "macos-14", "macos-unknown", "cpu"])
def test_auto_dtype_by_device(traits: DeviceTraits, expected: torch.dtype) -> None:
    assert auto_dtype(traits) == expected
    assert vae_dtype(expected) == (torch.float32 if expected == torch.float16 else expected)


def test_a_float16_model_decodes_with_a_float32_vae() -> None:
    """On GPUs without native bfloat16 the model computes in float16, which this VAE family overflows in: the
    pipeline's VAE runs in float32 there (here float16 on the CPU stands for such a GPU)."""
    pipe = NextStepPipeline.from_pretrained(TINY_MODEL, device="cpu", dtype="float16", compile=False)
    assert pipe.model.dtype == torch.float16 and pipe.vae.dtype == torch.float32


@pytest.mark.parametrize("traits,dtype,expected", [
    (PASCAL, torch.float16, ["full", "fp8"]),
    (TURING, torch.float16, ["full", "fp8"]),
    (AMPERE, torch.bfloat16, ["full", "fp8", "int4"]),
    (ADA, torch.bfloat16, ["full", "fp8", "int4"]),
    (OLD_MAC, torch.float16, ["full", "int4"]),
    (NEW_MAC, torch.bfloat16, ["full", "int4"]),
    (NEW_MAC_OLD_TORCH, torch.bfloat16, ["full"]),
    (CPU, torch.float32, ["full", "fp8", "int4"]),
    (DeviceTraits("cpu", torch_version=(2, 5)), torch.float32, ["full", "fp8"]),
    (DeviceTraits("cuda", (8, 9), torch_version=(2, 4)), torch.bfloat16, ["full", "fp8"]),
    (ADA_CUDA_11_8, torch.bfloat16, ["full", "fp8"]),
    (DeviceTraits("cuda", (8, 9), torch_version=(2, 7), cuda_build=(12, 8)), torch.bfloat16, ["full", "fp8", "int4"]),
], ids=["cuda-6.1", "cuda-7.5", "cuda-8.0", "cuda-8.9", "macos-13", "macos-14", "macos-torch-2.4", "cpu",
        "cpu-torch-2.5", "cuda-torch-2.4", "cuda-11.8-build", "cuda-12.8-build"])
def test_weight_modes_by_device(traits: DeviceTraits, dtype: torch.dtype, expected: list[str]) -> None:
    """fp8 nowhere on Macs, int4 where the torch and the device have its kernel; layer streaming only where the GPU
    has memory of its own."""
    assert storages(loadable_modes(FLOAT_WEIGHTS, [(traits, dtype)])) == expected
    streamed = mode_refusal(WeightMode(gpu_layers=0), FLOAT_WEIGHTS, traits, dtype)
    assert (streamed is None) == (traits.type != "mps")


def test_refusals_say_why() -> None:
    assert "MPS has no float8 type" in mode_refusal(WeightMode("fp8"), FLOAT_WEIGHTS, NEW_MAC, torch.bfloat16)
    assert "need torch 2.5 or newer (this is torch 2.4)" in int4_refusal(NEW_MAC_OLD_TORCH, torch.bfloat16)
    assert int4_refusal(DeviceTraits("mps", macos=(14, 5), torch_version=(2, 5)), torch.bfloat16) is None
    cuda_11_8 = int4_refusal(ADA_CUDA_11_8, torch.bfloat16)
    assert "need a torch built for CUDA 12 or newer (this torch 2.7 is built for CUDA 11.8" in cuda_11_8
    assert "memory fp8" in cuda_11_8 and "gpu_layers" in cuda_11_8 and "CUDA 12 build of torch" in cuda_11_8
    old_cpu, old_cuda = DeviceTraits("cpu", torch_version=(2, 5)), DeviceTraits("cuda", (9, 0), torch_version=(2, 4))
    assert "need torch 2.6 or newer (this is torch 2.5)" in int4_refusal(old_cpu, torch.float32)
    assert "need torch 2.5 or newer" in int4_refusal(old_cuda, torch.bfloat16)
    assert "compute capability 8.0+" in int4_refusal(TURING, torch.bfloat16)
    assert "saves nothing on an Apple GPU" in mode_refusal(WeightMode(gpu_layers=10), FLOAT_WEIGHTS, NEW_MAC,
                                                          torch.bfloat16)
    assert "needs torch 2.7 or newer (this is torch 2.6)" in compile_version_refusal((2, 6))
    assert compile_version_refusal((2, 7)) is None and compile_version_refusal((3, 0)) is None


def test_memory_auto_never_picks_int4_on_a_cuda_11_8_torch() -> None:
    """NextStep-14B on a 12 GB Ada GPU: int4 would be the mode that fits; a torch built for CUDA 11.8 has no int4
    kernel, so `auto` streams fp8 layers instead, and `memory int4` is refused naming the fixes."""
    plan, _ = plan_load(FOOTPRINT, "auto", None, Job(), gpus(12))
    assert plan.mode.storage == "int4"
    plan, _ = plan_load(FOOTPRINT, "auto", None, Job(), gpus(12, traits=ADA_CUDA_11_8))
    assert plan.mode.storage == "fp8" and plan.mode.gpu_layers is not None
    with pytest.raises(NextStepError, match="need a torch built for CUDA 12 or newer"):
        plan_load(FOOTPRINT, "int4", None, Job(), gpus(12, traits=ADA_CUDA_11_8))


def test_fp8_on_a_mac_is_refused_before_any_weight_moves() -> None:
    """Loading refuses fp8 on `mps` before building anything; were it to get further it would fail moving the first
    weight to an Apple GPU this machine does not have, with another error."""
    with pytest.raises(NextStepError, match=r"fp8 weights do not run on Apple GPUs \(MPS has no float8 type\)"):
        load_on(TINY_MODEL, torch.bfloat16, "fp8", device="mps")
    footprint = ModelFootprint.from_folder(TINY_MODEL)
    for memory in ("fp8", memory_setting("auto", fp8=True)):
        with pytest.raises(NextStepError, match="fp8 weights do not run on Apple GPUs"):
            plan_load(footprint, memory, None, Job(), gpus(64, traits=NEW_MAC, devices="mps"))


@pytest.mark.parametrize("mac_gb,expected,fits", [(64, "full", True), (32, "int4", True), (16, "int4", True),
                                                      (8, "int4", False)])
def test_memory_auto_on_a_mac_plans_against_its_gpu_share(mac_gb: int, expected: str, fits: bool) -> None:
    """NextStep-14B on Macs: Metal lets the GPU use about three quarters of the memory; the 56 GB float32 load of
    before is gone (bfloat16 from macOS 14), fp8 is never chosen, and nothing is streamed."""
    plan, choice = plan_load(FOOTPRINT, "auto", None, Job(), gpus(0.75 * mac_gb, traits=NEW_MAC, devices="mps"))
    assert (plan.mode.storage, plan.mode.gpu_layers, plan.fits) == (expected, None, fits)
    assert plan.placement.run_dtype == torch.bfloat16 and choice.startswith(f"memory auto: {plan.loads_as} (")
    if not fits:
        assert "streamed" not in plan.advice and "gpu_layers" not in plan.advice and "fp8" not in plan.advice


def test_planner_advice_on_a_mac_names_only_what_loads_there() -> None:
    plan = plan_mode(FOOTPRINT, WeightMode(), Job(), gpus(24, traits=NEW_MAC, devices="mps"))
    assert plan.fits is False and plan.suggested_mode == WeightMode("int4")
    assert plan.advice.endswith("set memory to int4")


@pytest.mark.parametrize("traits,expected", [
    (ADA, "load the model with memory fp8, int4 or auto, or keep fewer decoder layers on the GPU (gpu_layers)"),
    (TURING, "load the model with memory fp8 or auto, or keep fewer decoder layers on the GPU (gpu_layers)"),
    (NEW_MAC, "load the model with memory int4 or auto"),
    (NEW_MAC_OLD_TORCH, "load the model with memory auto"),
], ids=["cuda-8.9", "cuda-7.5", "macos-14", "macos-torch-2.13"])
def test_memory_remedy_names_what_frees_memory_on_each_gpu(traits: DeviceTraits, expected: str) -> None:
    assert model_changes(traits) == expected


def test_memory_remedy_on_a_mac() -> None:
    remedy = memory_remedy("sampling", torch.device("mps"))
    assert remedy.startswith("make the batch or the image smaller") and ", or on an Apple GPU, load the model" in remedy
    assert "fp8" not in remedy and "gpu_layers" not in remedy
    assert "GPU" not in memory_remedy("sampling", torch.device("cpu"))


def test_compile_default_by_device() -> None:
    assert [compile_default(traits) for traits in (TURING, ADA, CPU, OLD_MAC, NEW_MAC)] == [True] * 2 + [False] * 3


def test_flash_attn_runs_on_ampere_and_newer_cuda_gpus_only() -> None:
    assert flash_attn_refusal(AMPERE) is None and flash_attn_refusal(ADA) is None
    assert "compute capability 8.0+" in flash_attn_refusal(TURING)
    assert "CUDA GPUs only" in flash_attn_refusal(NEW_MAC) and "CUDA GPUs only" in flash_attn_refusal(CPU)


def test_fused_fp8_matmul_needs_fp8_tensor_cores() -> None:
    assert [fp8_matmul_fused(traits) for traits in (AMPERE, ADA, DeviceTraits("cuda", (9, 0)), NEW_MAC, CPU)] == \
        [False, True, True, False, False]


def test_pinned_memory_cap_is_comfyuis() -> None:
    assert pinned_memory_cap(True, 64 * 2**30) == int(0.45 * 64 * 2**30)
    assert pinned_memory_cap(False, 64 * 2**30) == int(0.95 * 64 * 2**30)


def test_versions_parse_as_numbers() -> None:
    assert version_tuple("2.13.0+cpu") == (2, 13, 0) and version_tuple("2.6.0a0+gitabc") == (2, 6, 0)
    assert version_tuple("14.2.1") == (14, 2, 1) and version_tuple("") == ()


def test_a_split_over_a_turing_and_an_ampere_gpu_gives_each_range_its_own_rules(tmp_path: Path, monkeypatch) -> None:
    """Issue 24, fault 3: dtype and attention kernel were chosen for the split's last device only, so the Turing
    range ran emulated bfloat16 and called flash-attn, which Turing cards refuse. Each range now gets its own, from
    its device's traits, when the model is placed; int4 (Ampere or newer) is not offered for the pair."""
    monkeypatch.syspath_prepend(str(working_flash_attn(tmp_path)))
    targets = gpus(12, 24, traits=(TURING, AMPERE))
    plan = plan_mode(FOOTPRINT, WeightMode(), Job(), targets)
    assert [(r.device.index, r.dtype) for r in plan.placement.ranges] == [(0, torch.float16), (1, torch.bfloat16)]
    assert plan.loads_as == "float16 on cuda:0, bfloat16 on cuda:1"
    turing, ampere = attention_kernels("auto", [TURING, AMPERE])
    assert turing is None and ampere is not None  # SDPA on the Turing range, flash-attn on the Ampere one
    assert storages(targets.loadable(FOOTPRINT)) == ["full", "fp8"]
    with pytest.raises(NextStepError, match="4-bit weights on CUDA need a GPU of compute capability 8.0"):
        plan_mode(FOOTPRINT, WeightMode("int4"), Job(), targets)
    assert plan_mode(FOOTPRINT, WeightMode(), Job(), gpus(12, 24, traits=(TURING, AMPERE), dtype="bfloat16")) \
        .placement.describe_dtypes() == "bfloat16"  # an explicit dtype is every range's


def test_ranges_computing_in_different_dtypes_run_close_to_float32() -> None:
    """The hand-over between ranges of different dtypes (a Turing + Ampere split) on this CPU: a bfloat16 range, then
    a float32 one, with the KV cache of each in its own dtype, gives tokens close to the float32 model's."""
    from goldens import golden_cases, settings_for

    case = next(case for case in golden_cases() if case.name == "official_t2i_sde")
    mixed = Placement((LayerRange(torch.device("cpu"), 0, 1, torch.bfloat16),
                       LayerRange(torch.device("cpu"), 1, 2, torch.float32)))
    model = load_model(TINY_MODEL, WeightMode(), mixed)
    reference = NextStepPipeline.from_pretrained(TINY_MODEL, device="cpu", dtype="float32", compile=False)
    pipe = NextStepPipeline(model, reference.tokenizer, reference.normalization, compile=False)
    tokens = pipe.sample(case.params["caption"], settings_for(case)).tokens
    expected = reference.sample(case.params["caption"], settings_for(case)).tokens
    assert tokens.dtype == torch.float32 and torch.isfinite(tokens).all()
    assert 0 < (tokens - expected).abs().max() < 0.25 * expected.abs().max()
