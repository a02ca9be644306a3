"""The CUDA paths, where a CUDA GPU is present (skipped otherwise; benchmarks/gpu_check.sh runs them):
every golden through the captured CUDA graph in float32, fp8 (fused fp8 matmul on sm_89+) near bfloat16,
and layer streaming with its copy stream equal to resident layers."""

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


@pytest.mark.parametrize("fp8,resident", [(False, None), (True, None), (True, 2)])
def test_memory_plan_weights_are_what_sits_on_the_gpu(model_copy, fp8, resident) -> None:
    """Every tensor the loaded model holds (registered ones, streaming slots, streamed host layers), summed by
    the device it really lives on, against the planner's device and host figures; and the GPU's size as the
    planner reads it."""
    from nextstep_runtime.loading import load_model
    from nextstep_runtime.memory_plan import Job, ModelFootprint, WeightMode, device_memory, plan_memory
    from nextstep_runtime.offload import StreamedLayer

    deepen(model_copy, 5)
    model = load_model(model_copy, torch.bfloat16, "cuda", fp8=fp8, resident_layers=resident)
    tensors = list(model.state_dict().values())
    streamers = {id(layer._streamer[0]): layer._streamer[0] for layer in model.layers if isinstance(layer, StreamedLayer)}
    for streamer in streamers.values():
        for layer in streamer.slots + streamer.host_layers:
            tensors += list(layer.state_dict().values())
    by_device = {"cuda": 0, "cpu": 0}
    for tensor in tensors:
        by_device[tensor.device.type] += tensor.numel() * tensor.element_size()
    free, total = device_memory(torch.device("cuda"))
    plan = plan_memory(ModelFootprint.from_folder(model_copy), WeightMode(torch.bfloat16, fp8, resident), Job(),
                       gpu_total=total, gpu_free=free)
    assert (plan.weights_gpu_bytes, plan.weights_host_bytes) == (by_device["cuda"], by_device["cpu"])
    assert 0 < free <= total == torch.cuda.mem_get_info()[1]
    assert plan.fits is True
