"""The CUDA paths, where a CUDA GPU is present (skipped otherwise; benchmarks/gpu_check.sh runs them):
every golden through the captured CUDA graph in float32, fp8 (fused fp8 matmul on sm_89+) and int4 (PyTorch's
int4 kernel) near bfloat16, layer streaming with its copy stream equal to resident layers, and `auto` memory."""

from __future__ import annotations

import pytest
import torch

from goldens import TINY_MODEL, GoldenCase, assert_matches_golden, golden_cases
from model_folders import deepen
from test_goldens import settings_for

from nextstep_runtime import NextStepPipeline
from nextstep_runtime.generate import TokenStep
from nextstep_runtime.images import load_rgb

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def exact_float32():
    """No TF32 in matmuls or convolutions, so float32 on the GPU is comparable with the CPU goldens."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def generate(pipe: NextStepPipeline, case: GoldenCase):
    p = case.params
    images = [load_rgb(case.image_path)] if case.image_path else []
    return pipe.generate(p["caption"], settings_for(case), p["negative_prompt"], p["positive_prompt"], images)


@pytest.mark.parametrize("case", golden_cases(), ids=lambda case: case.name)
def test_goldens_through_the_cuda_graph(case: GoldenCase, monkeypatch) -> None:
    captured = []
    original = TokenStep._capture
    monkeypatch.setattr(TokenStep, "_capture", lambda self, device: (original(self, device), captured.append(self.graph)))
    pipe = NextStepPipeline.from_pretrained(TINY_MODEL, device="cuda", dtype="float32")
    result = generate(pipe, case)
    assert captured and captured[0] is not None, "the token step was not captured as a CUDA graph"
    assert_matches_golden(case, {"tokens": result.tokens.cpu(), "latents": result.latents.cpu(),
                                 "images": result.images.cpu()})


def test_fp8_and_streaming_on_cuda(model_copy) -> None:
    case = next(c for c in golden_cases() if c.name == "official_t2i_cps_nocfg")
    deepen(model_copy, 5)
    bf16 = generate(NextStepPipeline.from_pretrained(model_copy, device="cuda", dtype="bfloat16"), case)
    fp8 = generate(NextStepPipeline.from_pretrained(model_copy, device="cuda", dtype="bfloat16", fp8=True), case)
    assert (fp8.images - bf16.images).abs().mean() < 0.05
    for resident in (1, 2):  # 4 and 3 streamed layers through the two slots
        streamed = generate(NextStepPipeline.from_pretrained(model_copy, device="cuda", dtype="bfloat16", fp8=True,
                                                             resident_layers=resident), case)
        assert torch.equal(streamed.tokens, fp8.tokens), resident


def test_bfloat16_graph_equals_bfloat16_eager(monkeypatch) -> None:
    """The captured graph replays exactly the eager computation in the production dtype."""
    import nextstep_runtime.generate as generate_module

    case = next(c for c in golden_cases() if c.name == "official_t2i_sde")
    pipe = NextStepPipeline.from_pretrained(TINY_MODEL, device="cuda", dtype="bfloat16")
    graphed = generate(pipe, case)
    monkeypatch.setattr(generate_module, "cuda_graph_possible", lambda model: False)
    eager = generate(pipe, case)
    assert torch.equal(graphed.tokens, eager.tokens)


def test_int4_kernel_packing_and_model_on_cuda(model_copy, tmp_path) -> None:
    """The CUDA int4 kernel reads our packing as (q - 8) * scale + zero; the model stays as close to bf16 as on
    the CPU (test_weight_modes' tolerances), streams exactly, and a repacked folder gives the same tokens."""
    from test_weight_modes import dequantize_grouped

    from nextstep_runtime.int4 import pack_for_device, quantize_grouped
    from nextstep_runtime.repack import convert_folder

    weight = torch.randn(96, 256) * 0.02
    nibbles, scales_and_zeros = quantize_grouped(weight)
    x = torch.randn(5, 256, dtype=torch.bfloat16, device="cuda")
    out = torch.ops.aten._weight_int4pack_mm(x, pack_for_device(nibbles, torch.device("cuda")), 128,
                                             scales_and_zeros.cuda())
    reference = x.float() @ dequantize_grouped(nibbles, scales_and_zeros).cuda().t()
    torch.testing.assert_close(out.float(), reference, rtol=2e-2, atol=2e-2)

    case = next(c for c in golden_cases() if c.name == "official_t2i_cps_nocfg")
    deepen(model_copy, 5)
    bf16 = generate(NextStepPipeline.from_pretrained(model_copy, device="cuda", dtype="bfloat16"), case)
    int4 = generate(NextStepPipeline.from_pretrained(model_copy, device="cuda", dtype="bfloat16", int4=True), case)
    assert (int4.tokens - bf16.tokens).abs().max() < 0.35
    assert (int4.images - bf16.images).abs().mean() < 0.05
    for resident in (1, 2):
        streamed = generate(NextStepPipeline.from_pretrained(model_copy, device="cuda", dtype="bfloat16", int4=True,
                                                             resident_layers=resident), case)
        assert torch.equal(streamed.tokens, int4.tokens), resident
    convert_folder(model_copy, tmp_path / "int4", "int4")
    repacked = generate(NextStepPipeline.from_pretrained(tmp_path / "int4", device="cuda", dtype="bfloat16",
                                                         int4=True), case)
    assert torch.equal(repacked.tokens, int4.tokens)


def test_auto_memory_on_cuda_keeps_a_small_model_whole() -> None:
    from nextstep_runtime.memory_mode import resolve_weight_mode
    from nextstep_runtime.memory_plan import WeightMode, device_memory

    free = device_memory(torch.device("cuda"))[0]
    mode, choice = resolve_weight_mode(TINY_MODEL, "auto", torch.device("cuda"), torch.bfloat16, gpu_free=free)
    assert mode == WeightMode(torch.bfloat16) and choice.startswith("memory auto: bfloat16 (needs ")
