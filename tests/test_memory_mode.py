"""The `memory` setting: `auto` picks the fastest mode the planner says fits (checked against the planner's own
figures for the 14B model on common card sizes), explicit settings and the older `fp8` switch keep their meaning."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from goldens import TINY_MODEL
from model_configs import NEXTSTEP_14B

from nextstep_runtime import (
    GB,
    DeviceTraits,
    GenerationSettings,
    Job,
    ModelFootprint,
    NextStepError,
    WeightMode,
    plan_memory,
    resolve_weight_mode,
)
from nextstep_runtime.memory.choice import choose_mode
from nextstep_runtime.weights.repack import convert_folder

FOOTPRINT = ModelFootprint.from_config(NEXTSTEP_14B)
GPU = DeviceTraits("cuda", (8, 9))
PRE_AMPERE = DeviceTraits("cuda", (7, 5))
BF16 = WeightMode(torch.bfloat16)
FP8 = WeightMode(torch.bfloat16, fp8=True)
INT4 = WeightMode(torch.bfloat16, int4=True)


def fits(mode: WeightMode, free: float) -> bool:
    return plan_memory(FOOTPRINT, mode, Job(), gpu_free=int(free)).fits


@pytest.mark.parametrize("card_gb,expected", [(80, BF16), (40, BF16), (24, FP8), (16, INT4)])
def test_auto_picks_the_fastest_whole_model_mode_that_fits(card_gb: int, expected: WeightMode) -> None:
    free = card_gb * GB * 0.96  # the driver and desktop keep a little
    mode, plan = choose_mode(FOOTPRINT, Job(), int(free), GPU)
    assert mode == expected and plan.fits and plan.mode == expected
    faster = [BF16, FP8, INT4][:[BF16, FP8, INT4].index(expected)]
    assert not any(fits(candidate, free) for candidate in faster)


def test_auto_streams_the_most_layers_that_fit_when_no_whole_model_does() -> None:
    free = 8 * GB
    mode, plan = choose_mode(FOOTPRINT, Job(), free, GPU)
    assert mode.int4 and 0 < mode.gpu_layers < 48 and plan.fits
    assert not fits(replace(mode, gpu_layers=mode.gpu_layers + 1), free)
    without_int4, _ = choose_mode(FOOTPRINT, Job(), free, PRE_AMPERE)
    assert without_int4.fp8 and not without_int4.int4 and without_int4.gpu_layers < mode.gpu_layers
    hopeless, plan = choose_mode(FOOTPRINT, Job(), GB, GPU)
    assert hopeless.gpu_layers == 0 and plan.fits is False


def test_auto_keeps_a_repacked_folder_in_its_own_format() -> None:
    fp8_folder, int4_folder = (replace(FOOTPRINT, stored_format=stored) for stored in ("fp8", "int4"))
    assert choose_mode(fp8_folder, Job(), 80 * GB, GPU)[0] == FP8
    assert choose_mode(int4_folder, Job(), 80 * GB, GPU)[0] == INT4
    streamed, _ = choose_mode(fp8_folder, Job(), 12 * GB, GPU)
    assert streamed.fp8 and streamed.gpu_layers is not None
    with pytest.raises(NextStepError, match="compute capability 8.0"):  # no int4 kernels: refused, not offered
        choose_mode(int4_folder, Job(), 80 * GB, PRE_AMPERE)


def test_a_larger_job_moves_auto_to_a_smaller_mode() -> None:
    free = int(40 * GB * 0.96)
    assert choose_mode(FOOTPRINT, Job(), free, GPU)[0] == BF16
    assert choose_mode(FOOTPRINT, Job(GenerationSettings(width=1024, height=1024, batch=8)), free, GPU)[0] == FP8


CPU = torch.device("cpu")


def test_explicit_settings_and_the_fp8_switch_keep_their_meaning() -> None:
    def resolve(memory="auto", fp8=False, gpu_layers=None):
        return resolve_weight_mode(TINY_MODEL, memory, CPU, torch.float32, fp8, gpu_layers)[0]

    assert resolve() == WeightMode(torch.float32)  # auto on the CPU: the plain dtype
    assert resolve(fp8=True) == WeightMode(torch.float32, fp8=True)
    assert resolve(gpu_layers=1) == WeightMode(torch.float32, gpu_layers=1)
    assert resolve("int4", gpu_layers=1) == WeightMode(torch.float32, int4=True, gpu_layers=1)
    assert resolve("full") == WeightMode(torch.float32)
    with pytest.raises(NextStepError, match="fp8 is on but memory is 'int4'; turn fp8 off or set memory to fp8"):
        resolve("int4", fp8=True)
    with pytest.raises(NextStepError, match="unknown memory setting 'half'"):
        resolve("half")


def test_auto_loads_a_repacked_folder_in_its_format(tmp_path: Path) -> None:
    convert_folder(TINY_MODEL, tmp_path / "int4", "int4")
    mode, choice = resolve_weight_mode(tmp_path / "int4", "auto", CPU, torch.bfloat16)
    assert mode == WeightMode(torch.bfloat16, int4=True) and choice is None
    assert ModelFootprint.from_folder(tmp_path / "int4").tensor_shapes == \
        ModelFootprint.from_folder(TINY_MODEL).tensor_shapes  # planned as the weights they stand for
