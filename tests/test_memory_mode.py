"""The `memory` setting: `auto` picks the fastest mode the planner says fits (checked against the planner's own
figures for the 14B model on common card sizes), explicit settings and the older `fp8` switch keep their meaning."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from goldens import TINY_MODEL
from model_configs import NEXTSTEP_14B
from planning import gpus

from nextstep_runtime import (
    DeviceList,
    DeviceTraits,
    GenerationSettings,
    Job,
    ModelFootprint,
    NextStepError,
    Targets,
    WeightMode,
    free_memory,
    memory_setting,
    plan_load,
    plan_mode,
)
from nextstep_runtime.weights.repack import convert_folder

FOOTPRINT = ModelFootprint.from_config(NEXTSTEP_14B)
GPU = DeviceTraits("cuda", (8, 9))
PRE_AMPERE = DeviceTraits("cuda", (7, 5))
BF16, FP8, INT4 = WeightMode(), WeightMode("fp8"), WeightMode("int4")


def fits(mode: WeightMode, free_gb: float) -> bool:
    return plan_mode(FOOTPRINT, mode, Job(), gpus(free_gb)).fits


def auto(footprint: ModelFootprint, free_gb: float, traits: DeviceTraits = GPU, job: Job = Job()) -> WeightMode:
    plan, _ = plan_load(footprint, "auto", None, job, gpus(free_gb, traits=traits))
    return plan.mode


@pytest.mark.parametrize("card_gb,expected", [(80, BF16), (40, BF16), (24, FP8), (16, INT4)])
def test_auto_picks_the_fastest_whole_model_mode_that_fits(card_gb: int, expected: WeightMode) -> None:
    free = card_gb * 0.96  # the driver and desktop keep a little
    plan, choice = plan_load(FOOTPRINT, "auto", None, Job(), gpus(free, traits=GPU))
    assert plan.mode == expected and plan.fits
    assert choice == f"memory auto: {plan.loads_as} (needs {plan.advice.split('needs ')[1].split(',')[0]} of " \
                     f"{free:.1f} GB free for 512x512)"
    faster = [BF16, FP8, INT4][:[BF16, FP8, INT4].index(expected)]
    assert not any(fits(candidate, free) for candidate in faster)


def test_auto_streams_the_most_layers_that_fit_when_no_whole_model_does() -> None:
    mode = auto(FOOTPRINT, 8)
    assert mode.storage == "int4" and 0 < mode.gpu_layers < 48 and fits(mode, 8)
    assert not fits(replace(mode, gpu_layers=mode.gpu_layers + 1), 8)
    without_int4 = auto(FOOTPRINT, 8, PRE_AMPERE)
    assert without_int4.storage == "fp8" and without_int4.gpu_layers < mode.gpu_layers
    plan, choice = plan_load(FOOTPRINT, "auto", None, Job(), gpus(1, traits=GPU))
    assert plan.mode.gpu_layers == 0 and plan.fits is False
    assert "does not fit even fully streamed, trying anyway:" in choice


def test_auto_keeps_a_repacked_folder_in_its_own_format() -> None:
    fp8_folder, int4_folder = (replace(FOOTPRINT, stored_format=stored) for stored in ("fp8", "int4"))
    assert auto(fp8_folder, 80) == FP8 and auto(int4_folder, 80) == INT4
    streamed = auto(fp8_folder, 12)
    assert streamed.storage == "fp8" and streamed.gpu_layers is not None
    with pytest.raises(NextStepError, match="compute capability 8.0"):  # no int4 kernels: refused, not offered
        auto(int4_folder, 80, PRE_AMPERE)


def test_a_larger_job_moves_auto_to_a_smaller_mode() -> None:
    assert auto(FOOTPRINT, 40 * 0.96) == BF16
    assert auto(FOOTPRINT, 40 * 0.96, job=Job(GenerationSettings(width=1024, height=1024, batch=8))) == FP8


CPU = Targets.on(DeviceList.parse("cpu"), "float32", free_memory, vae_on_run_device=True)


def test_explicit_settings_and_the_fp8_switch_keep_their_meaning() -> None:
    footprint = ModelFootprint.from_folder(TINY_MODEL)

    def resolve(memory="auto", fp8=False, gpu_layers=None):
        return plan_load(footprint, memory_setting(memory, fp8), gpu_layers, Job(), CPU)[0].mode

    assert resolve() == BF16  # auto on the CPU: the full model
    assert resolve(fp8=True) == FP8
    assert resolve(gpu_layers=1) == WeightMode(gpu_layers=1)
    assert resolve("int4", gpu_layers=1) == WeightMode("int4", gpu_layers=1)
    assert resolve("full") == BF16
    with pytest.raises(NextStepError, match="fp8 is on but memory is 'int4'; turn fp8 off or set memory to fp8"):
        resolve("int4", fp8=True)
    with pytest.raises(NextStepError, match="unknown memory setting 'half'"):
        resolve("half")


def test_auto_loads_a_repacked_folder_in_its_format(tmp_path: Path) -> None:
    convert_folder(TINY_MODEL, tmp_path / "int4", "int4")
    plan, choice = plan_load(ModelFootprint.from_folder(tmp_path / "int4"), "auto", None, Job(), CPU)
    assert plan.mode == INT4 and choice is None
    assert ModelFootprint.from_folder(tmp_path / "int4").tensor_shapes == \
        ModelFootprint.from_folder(TINY_MODEL).tensor_shapes  # planned as the weights they stand for
