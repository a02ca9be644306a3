"""The flow head through torch.compile: goldens in float32, compiled vs eager in bfloat16, and the fallback
when no C++ compiler works (the rest of the suite runs eagerly, see conftest.py)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from goldens import TINY_MODEL, GoldenCase, assert_matches_golden, golden_cases, settings_for
from safetensors.torch import load_file

from nextstep_runtime import NextStepPipeline, images_to_unit, load_rgb, to_uint8
from nextstep_runtime.model.flow_head import FlowNet
from nextstep_runtime.sampling import compiled_step

REPO = Path(__file__).resolve().parents[1]
FALLBACK_WARNING = "the flow head runs without torch.compile"
BF16_ERROR_RATIO = 1.5
"""In bfloat16, compiled and eager tokens differ after a whole image (0.24 max on the tiny model: inductor keeps
fused intermediates in float32 where eager rounds each op, and each token conditions the next), so the stated
tolerance is relative: the compiled head's mean distance to the float32 tokens is at most 1.5x eager's."""


@pytest.fixture(scope="module", autouse=True)
def compiling_allowed():
    with torch._dynamo.config.patch(disable=False):
        yield


@pytest.fixture(scope="module")
def compiled_pipeline(compiling_allowed) -> NextStepPipeline:
    return NextStepPipeline.from_pretrained(TINY_MODEL, device="cpu", dtype="float32", compile=True)


def _generate(pipe: NextStepPipeline, case: GoldenCase, **kwargs):
    p = case.params
    edit_images = [load_rgb(case.image_path)] if case.image_path else []
    return pipe.generate(p["caption"], settings_for(case), negative=p["negative_prompt"],
                         positive=p["positive_prompt"], edit_images=edit_images, **kwargs)


@pytest.mark.parametrize("case", golden_cases(), ids=lambda case: case.name)
def test_compiled_api_reproduces_golden(case: GoldenCase, compiled_pipeline) -> None:
    """Every golden in float32 within 1e-3 with the compiled head (each shape compiled once per process)."""
    result = _generate(compiled_pipeline, case)
    assert compiled_step.SolverSteps(True, torch.device("cpu")).active, "compiling failed here, so this ran eagerly"
    assert_matches_golden(case, {"tokens": result.tokens, "latents": result.latents, "images": result.images,
                                 "images_uint8": to_uint8(images_to_unit(result.images))})


def test_compiled_equals_eager_in_bfloat16(tiny_pipeline) -> None:
    case = next(case for case in golden_cases() if case.name == "official_t2i_sde")
    reference = _generate(tiny_pipeline, case, compile=False).tokens
    pipe = NextStepPipeline.from_pretrained(TINY_MODEL, device="cpu", dtype="bfloat16")
    eager = _generate(pipe, case, compile=False).tokens
    compiled = _generate(pipe, case, compile=True).tokens
    assert any(torch.bfloat16 in key for key in compiled_step._shared().shapes), "the bf16 head was not compiled"
    eager_error = (eager - reference).abs().mean().item()
    compiled_error = (compiled - reference).abs().mean().item()
    assert compiled_error <= BF16_ERROR_RATIO * eager_error, (compiled_error, eager_error)


def test_without_a_compiler_the_run_falls_back_to_eager_with_one_warning(tmp_path: Path, tiny_pipeline) -> None:
    """A CLI run with --compile where the C++ compiler inductor would call does not exist."""
    case = next(case for case in golden_cases() if case.name == "official_t2i_cps_nocfg")
    env = {**os.environ, "TORCH_COMPILE_DISABLE": "0", "CXX": str(tmp_path / "no-such-compiler"),
           "CC": str(tmp_path / "no-such-cc"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor-cache")}
    tensors = tmp_path / "out.safetensors"
    result = subprocess.run([sys.executable, "-m", "nextstep_runtime", "generate", "--model", str(TINY_MODEL),
                             "--device", "cpu", "--dtype", "float32", "--compile", "--out", str(tmp_path / "out.png"),
                             "--save-tensors", str(tensors), *case.cli_args()],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count(FALLBACK_WARNING) == 1, result.stderr
    assert "no C++ compiler that torch.compile can use was found" in result.stderr  # known before compiling
    eager = _generate(tiny_pipeline, case, compile=False)
    assert torch.equal(load_file(tensors)["tokens"], eager.tokens)


def test_compiled_head_with_many_rows_equals_eager(compiled_pipeline, tiny_pipeline) -> None:
    """Batch 5 with cfg is 10 head rows, a shape the goldens (1-4 rows) do not compile."""
    case = next(case for case in golden_cases() if case.name == "official_t2i_cps_nocfg")
    settings = replace(settings_for(case), batch=5, cfg=3.0, width=32, height=32)
    p = case.params
    eager = tiny_pipeline.generate(p["caption"], settings, negative=p["negative_prompt"], compile=False)
    compiled = compiled_pipeline.generate(p["caption"], settings, negative=p["negative_prompt"])
    assert any(key[0] == "step" and key[2] == 5 for key in compiled_step._shared().shapes)
    torch.testing.assert_close(compiled.tokens, eager.tokens, rtol=0, atol=1e-3)


def test_a_failing_recompile_of_a_compiled_key_falls_back_with_one_warning(monkeypatch, caplog) -> None:
    """Two flow heads of the same depth but another width share a shape key: the second makes dynamo recompile
    the modulations. That recompile hits the recompile limit (lowered to 1 here, as a host or a long session may
    have it) and, the graph being fullgraph, fails: the call falls back to eager with one warning, and so do later
    ones, with the same results."""
    monkeypatch.setattr(compiled_step, "_compiled", None)
    torch.manual_seed(0)
    condition = torch.randn(2, 64)
    heads = {width: FlowNet(16, 64, width, 2).eval() for width in (48, 32)}
    times = {width: torch.randn(4, width) for width in heads}
    steps = compiled_step.SolverSteps(True, torch.device("cpu"))
    keys = []
    with torch.inference_mode(), caplog.at_level(logging.WARNING):
        first = steps.modulations(heads[48], times[48], condition)
        keys.append(set(compiled_step._shared().shapes))
        with torch._dynamo.config.patch(recompile_limit=1):
            for _ in range(2):
                second = steps.modulations(heads[32], times[32], condition)
    assert len(keys[0]) == 1 and compiled_step._shared().shapes == keys[0]  # the same key: a recompile, not a shape
    assert "FailOnRecompileLimitHit" in compiled_step.compile_failure() and not steps.active
    assert caplog.text.count(FALLBACK_WARNING) == 1
    for got, width in ((first, 48), (second, 32)):
        expected = FlowNet.modulations(heads[width], times[width], condition)
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, expected))
