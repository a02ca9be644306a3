"""The CUDA paths, where a CUDA GPU is present (skipped otherwise; benchmarks/gpu_check.sh runs them):
every golden through the captured CUDA graph in float32, fp8 (fused fp8 matmul on sm_89+) and int4 (PyTorch's
int4 kernel) near bfloat16, layer streaming with its copy stream equal to resident layers, and `auto` memory."""

from __future__ import annotations

import pytest
import torch
from goldens import TINY_MODEL, GoldenCase, assert_matches_golden, golden_cases, settings_for
from model_folders import deepen

from nextstep_runtime import GenerationSettings, NextStepError, NextStepPipeline, load_rgb
from nextstep_runtime.sampling.token_loop import TokenStep

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def exact_float32():
    """No TF32 in matmuls or convolutions, so float32 on the GPU is comparable with the CPU goldens."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def record_captured_graphs(monkeypatch) -> list:
    """The CUDA graphs TokenStep captures (None where capture failed), in order."""
    captured = []
    original = TokenStep._capture

    def capture(self, device, work):
        graph, output = original(self, device, work)
        captured.append(graph)
        return graph, output

    monkeypatch.setattr(TokenStep, "_capture", capture)
    return captured


def generate(pipe: NextStepPipeline, case: GoldenCase):
    p = case.params
    images = [load_rgb(case.image_path)] if case.image_path else []
    return pipe.generate(p["caption"], settings_for(case), p["negative_prompt"], p["positive_prompt"], images)


@pytest.mark.parametrize("case", golden_cases(), ids=lambda case: case.name)
def test_goldens_through_the_cuda_graph(case: GoldenCase, monkeypatch) -> None:
    captured = record_captured_graphs(monkeypatch)
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
    import nextstep_runtime.sampling.token_loop as generate_module

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
    from nextstep_runtime import Job, ModelFootprint, WeightMode, device_memory, load_model, plan_memory
    from nextstep_runtime.weights.offload import StreamedLayer

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


def test_kept_tokens_and_noise_chunks_through_the_cuda_graphs(monkeypatch) -> None:
    """The feed-only graph (kept tokens) and the noise buffers refilled in place between chunks, replayed:
    keeping the golden's first two rows (and a middle token) gives the golden back."""
    import dataclasses

    from nextstep_runtime.sampling.token_loop import sample_tokens

    captured = record_captured_graphs(monkeypatch)
    case = next(c for c in golden_cases() if c.name == "official_t2i_sde")
    p = case.params
    height, width = p["hw"]
    mask = torch.ones((1, height, width))
    mask[:, :32] = 0
    mask[:, 48:, 48:64] = 0
    pipe = NextStepPipeline.from_pretrained(TINY_MODEL, device="cuda", dtype="float32")
    inputs = pipe.prepare(p["caption"], settings_for(case), p["negative_prompt"], p["positive_prompt"],
                          init_latents=case.expected["latents"], mask=mask)
    chunked = dataclasses.replace(inputs, noise=dataclasses.replace(inputs.noise, chunk_tokens=5))
    tokens = sample_tokens(pipe.model, chunked)
    assert len(captured) == 2 and all(graph is not None for graph in captured), "step and feed graphs"
    assert_matches_golden(case, {"tokens": tokens.cpu()})


def test_cuda_out_of_memory_is_a_clear_error_and_the_model_stays_usable() -> None:
    loaded = NextStepPipeline.from_pretrained(TINY_MODEL, device="cuda", dtype="float32")
    # a host that cannot tell its free memory: the memory check is skipped and the allocator has the last word,
    # as when another process takes the memory after the check
    pipe = NextStepPipeline(loaded.model, loaded.tokenizer, loaded.normalization, loaded.vae,
                            free_memory=lambda device: None)
    small = GenerationSettings(width=32, height=32, steps=2, seed=3)
    before = pipe.generate("a fox", small).images
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    allocated = torch.cuda.memory_allocated()
    total = torch.cuda.get_device_properties(pipe.model.device).total_memory
    torch.cuda.set_per_process_memory_fraction((allocated + 64 * 2**20) / total, pipe.model.device)
    try:  # 64 images of 512x512: the KV cache and noise alone are far above the 64 MB left
        with pytest.raises(NextStepError, match=r"^out of memory on cuda(:\d+)? during sampling .*make the batch"):
            pipe.sample("a fox", GenerationSettings(width=512, height=512, batch=64, steps=28))
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, pipe.model.device)
    assert torch.cuda.memory_allocated() <= allocated + 2**20  # the failed run's cache and buffers are gone
    assert torch.equal(pipe.generate("a fox", small).images, before)


def test_gen_pos_embed_through_the_cuda_graph(model_copy, monkeypatch) -> None:
    """The position row is picked on the device from the token index, so the replayed graph adds the right one."""
    from model_folders import edit_config

    case = next(c for c in golden_cases() if c.name == "official_t2i_sde")
    edit_config(model_copy, use_gen_pos_embed=True, base_image_grid_size=5)
    captured = record_captured_graphs(monkeypatch)
    on_gpu = generate(NextStepPipeline.from_pretrained(model_copy, device="cuda", dtype="float32"), case)
    on_cpu = generate(NextStepPipeline.from_pretrained(model_copy, device="cpu", dtype="float32"), case)
    assert captured and captured[0] is not None
    torch.testing.assert_close(on_gpu.tokens.cpu(), on_cpu.tokens, atol=1e-3, rtol=0)


def test_int4_kernel_packing_and_model_on_cuda(model_copy, tmp_path) -> None:
    """The CUDA int4 kernel reads our packing as (q - 8) * scale + zero; the model stays as close to bf16 as on
    the CPU (test_weight_modes' tolerances), streams exactly, and a repacked folder gives the same tokens."""
    from reference_quantization import dequantize_grouped

    from nextstep_runtime.weights.int4 import pack_for_device, quantize_grouped
    from nextstep_runtime.weights.repack import convert_folder

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
    from nextstep_runtime import WeightMode, device_memory, resolve_weight_mode

    free = device_memory(torch.device("cuda"))[0]
    mode, choice = resolve_weight_mode(TINY_MODEL, "auto", torch.device("cuda"), torch.bfloat16, gpu_free=free)
    assert mode == WeightMode(torch.bfloat16) and choice.startswith("memory auto: bfloat16 (needs ")


@pytest.mark.parametrize("name", ["official_t2i_sde", "official_edit_sde"])
def test_compiled_head_goldens_through_the_cuda_graph(name: str, monkeypatch) -> None:
    """The torch.compile'd head (Triton kernels) captured inside the token step's CUDA graph, float32 goldens."""
    from nextstep_runtime.sampling.compiled_step import SolverSteps

    case = next(c for c in golden_cases() if c.name == name)
    captured = record_captured_graphs(monkeypatch)
    with torch._dynamo.config.patch(disable=False):
        pipe = NextStepPipeline.from_pretrained(TINY_MODEL, device="cuda", dtype="float32", compile=True)
        result = generate(pipe, case)
        assert SolverSteps(True, torch.device("cuda")).active, "compiling failed on this GPU machine"
    assert captured and captured[0] is not None, "the token step was not captured as a CUDA graph"
    assert_matches_golden(case, {"tokens": result.tokens.cpu(), "latents": result.latents.cpu(),
                                 "images": result.images.cpu()})
