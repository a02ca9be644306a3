"""The CUDA paths, where a CUDA GPU is present (skipped otherwise; benchmarks/gpu_check.sh runs them):
every golden through the captured CUDA graph in float32, fp8 (fused fp8 matmul on sm_89+) and int4 (PyTorch's
int4 kernel) near bfloat16, layer streaming with its copy stream equal to resident layers, and `auto` memory.

And what issue 20 found by reading (CPU emulations in test_platform_emulations.py): grouped-query decoding with
CUDA's SDPA output layout (every test here runs it), out of memory in the fused fp8 matmul and in the capture
explained rather than swallowed, streaming slots freed and made again, the fp8 fallback's float32 scale, the VAE's
attention on a fused kernel within its planned memory, a capture that another thread's mem_get_info does not
break, the auto dtype by compute capability, a broken flash-attn falling back, streamed layers page-locked to the
planner's bytes."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from goldens import TINY_MODEL, GoldenCase, assert_matches_golden, golden_cases, settings_for
from model_folders import deepen, load_on
from safetensors.torch import load_file

from nextstep_runtime import GenerationSettings, NextStepError, NextStepPipeline, load_rgb
from nextstep_runtime.sampling import token_loop

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def exact_float32():
    """No TF32 in matmuls or convolutions, so float32 on the GPU is comparable with the CPU goldens."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def record_captured_graphs(monkeypatch) -> list:
    """The devices of the CUDA graphs the token steps capture (one per range, and the feed-only last stage where
    tokens are kept), in order; a failed capture records nothing."""
    captured = []
    original = token_loop.capture

    def capture(device, work):
        replay = original(device, work)
        captured.append(torch.device(device))
        return replay

    monkeypatch.setattr(token_loop, "capture", capture)
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
    assert captured, "the token step was not captured as a CUDA graph"
    assert_matches_golden(case, {"tokens": result.tokens.cpu(), "latents": result.latents.cpu(),
                                 "images": result.images.cpu()})


def test_fp8_and_streaming_on_cuda(model_copy) -> None:
    case = next(c for c in golden_cases() if c.name == "official_t2i_cps_nocfg")
    deepen(model_copy, 5)
    bf16 = generate(NextStepPipeline.from_pretrained(model_copy, device="cuda", dtype="bfloat16"), case)
    fp8 = generate(NextStepPipeline.from_pretrained(model_copy, device="cuda", dtype="bfloat16", memory="fp8"), case)
    assert (fp8.images - bf16.images).abs().mean() < 0.05
    for resident in (1, 2):  # 4 and 3 streamed layers through the two slots
        streamed = generate(NextStepPipeline.from_pretrained(model_copy, device="cuda", dtype="bfloat16",
                                                             memory="fp8", gpu_layers=resident), case)
        assert torch.equal(streamed.tokens, fp8.tokens), resident


def test_bfloat16_graph_equals_bfloat16_eager(monkeypatch) -> None:
    """The captured graph replays exactly the eager computation in the production dtype."""
    case = next(c for c in golden_cases() if c.name == "official_t2i_sde")
    pipe = NextStepPipeline.from_pretrained(TINY_MODEL, device="cuda", dtype="bfloat16")
    graphed = generate(pipe, case)
    monkeypatch.setattr(token_loop, "cuda_graphs_possible", lambda model: False)
    eager = generate(pipe, case)
    assert torch.equal(graphed.tokens, eager.tokens)


@pytest.mark.parametrize("storage,resident", [("full", None), ("fp8", None), ("fp8", 2)])
def test_memory_plan_weights_are_what_sits_on_the_gpu(model_copy, storage, resident) -> None:
    """Every tensor the loaded model holds (registered ones, the buffers the streaming slots and the streamed host
    layers are packed in), summed by the device it really lives on, against the planner's device and host figures;
    and the GPU's free memory as the planner reads it."""
    from nextstep_runtime import (
        DeviceList,
        Job,
        ModelFootprint,
        Targets,
        WeightMode,
        device_memory,
        free_memory,
        plan_mode,
    )
    from nextstep_runtime.weights.offload import streamers

    deepen(model_copy, 5)
    model = load_on(model_copy, torch.bfloat16, storage, resident, device="cuda")
    tensors = list(model.state_dict().values())
    for streamer in streamers(model):
        tensors += streamer.slot_buffers + streamer.host_buffers
    by_device = {"cuda": 0, "cpu": 0}
    for tensor in tensors:
        by_device[tensor.device.type] += tensor.numel() * tensor.element_size()
    free, total = device_memory(torch.device("cuda"))
    targets = Targets.on(DeviceList.parse("cuda"), "bfloat16", free_memory, vae_on_run_device=True)
    plan = plan_mode(ModelFootprint.from_folder(model_copy), WeightMode(storage, resident), Job(), targets)
    [gpu] = plan.devices
    assert (gpu.weights_bytes, plan.weights_host_bytes) == (by_device["cuda"], by_device["cpu"])
    assert gpu.device == f"cuda:{torch.cuda.current_device()}" and 0 < gpu.free_bytes <= total
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
    tokens = sample_tokens(pipe.model, chunked, pipe.attention)
    assert len(captured) == 2, "step and feed graphs"
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
    assert captured
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
    int4 = generate(NextStepPipeline.from_pretrained(model_copy, device="cuda", dtype="bfloat16", memory="int4"),
                    case)
    assert (int4.tokens - bf16.tokens).abs().max() < 0.35
    assert (int4.images - bf16.images).abs().mean() < 0.05
    for resident in (1, 2):
        streamed = generate(NextStepPipeline.from_pretrained(model_copy, device="cuda", dtype="bfloat16",
                                                             memory="int4", gpu_layers=resident), case)
        assert torch.equal(streamed.tokens, int4.tokens), resident
    convert_folder(model_copy, tmp_path / "int4", "int4")
    repacked = generate(NextStepPipeline.from_pretrained(tmp_path / "int4", device="cuda", dtype="bfloat16",
                                                         memory="int4"), case)
    assert torch.equal(repacked.tokens, int4.tokens)


@pytest.mark.parametrize("name", ["sym-g32", "asym-g32", "sym-g128-padded", "sharded-prefixed-sym-g64"])
def test_community_4bit_folder_on_cuda(name, tmp_path) -> None:
    """An AutoRound folder (tests/fixtures/autoround) on CUDA in bfloat16: each packed layer within bf16 rounding of
    its plain dequantisation, the image near the bf16 model's (closer than a seed change), `auto` choosing int4,
    and the planned bytes what sits on the GPU."""
    from community_folders import community_folder, folder_tensors, reference_weights

    from nextstep_runtime import DeviceList, Job, ModelFootprint, Targets, WeightMode, free_memory, plan_load, plan_mode
    from nextstep_runtime.weights.int4 import Int4Linear

    folder = community_folder(name, tmp_path / name)
    source = {key: value.shape[1] for key, value in load_file(TINY_MODEL / "model.safetensors").items()
              if value.ndim == 2}
    model = load_on(folder, torch.bfloat16, "int4", device="cuda")
    tensors = folder_tensors(folder)
    for linear, weight in reference_weights(folder, {k.removesuffix(".weight"): v for k, v in source.items()}).items():
        layer = model.get_submodule(linear)
        assert isinstance(layer, Int4Linear) and layer.weight.dim() == 4  # packed in the CUDA tiling
        layer.bias = None
        out = layer(torch.eye(layer.in_features, dtype=torch.bfloat16, device="cuda")).float().t().cpu()
        scales = tensors[f"{linear}.scales"].float().abs()
        step = scales.repeat_interleave(tensors[f"{linear}.qweight"].shape[0] * 8 // scales.shape[0], dim=0)
        assert ((out - weight).abs() <= 2**-7 * (weight.abs() + 16 * step[:weight.shape[1]].t())).all(), linear
    targets = Targets.on(DeviceList.parse("cuda"), "bfloat16", free_memory, vae_on_run_device=True)
    footprint = ModelFootprint.from_folder(folder)
    plan = plan_mode(footprint, WeightMode("int4"), Job(), targets)
    assert plan.devices[0].weights_bytes == sum(tensor.nbytes for tensor in model.state_dict().values())
    assert plan_load(footprint, "auto", None, Job(), targets)[0].mode == WeightMode("int4")

    case = next(c for c in golden_cases() if c.name == "official_t2i_cps_nocfg")
    bf16 = NextStepPipeline.from_pretrained(TINY_MODEL, device="cuda", dtype="bfloat16")
    same_seed = generate(bf16, case).images.float()
    settings = settings_for(case)
    next_seed = bf16.generate(case.params["caption"], dataclasses.replace(settings, seed=settings.seed + 1)).images
    next_seed = next_seed.float()
    int4 = generate(NextStepPipeline.from_pretrained(folder, device="cuda", dtype="bfloat16", memory="int4"), case)
    assert (int4.images.float() - same_seed).abs().mean() < (next_seed - same_seed).abs().mean() / 5


def test_auto_memory_on_cuda_keeps_a_small_model_whole() -> None:
    from nextstep_runtime import DeviceList, Job, ModelFootprint, Targets, WeightMode, free_memory, plan_load

    targets = Targets.on(DeviceList.parse("cuda"), "bfloat16", free_memory, vae_on_run_device=True)
    plan, choice = plan_load(ModelFootprint.from_folder(TINY_MODEL), "auto", None, Job(), targets)
    assert plan.mode == WeightMode() and choice.startswith("memory auto: bfloat16 (needs ")


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
    assert captured, "the token step was not captured as a CUDA graph"
    assert_matches_golden(case, {"tokens": result.tokens.cpu(), "latents": result.latents.cpu(),
                                 "images": result.images.cpu()})


# --- issue 20 ---------------------------------------------------------------------------------------------------

def test_out_of_memory_in_the_fused_fp8_matmul_is_explained_and_the_kernel_stays_on(model_copy, monkeypatch) -> None:
    from nextstep_runtime.weights.fp8 import FP8Linear

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("no fused fp8 matmul below compute capability 8.9")
    case = next(c for c in golden_cases() if c.name == "official_t2i_cps_nocfg")
    pipe = NextStepPipeline.from_pretrained(model_copy, device="cuda", dtype="bfloat16", memory="fp8")
    scaled_mm = torch._scaled_mm

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")

    monkeypatch.setattr(torch, "_scaled_mm", out_of_memory)
    with pytest.raises(NextStepError, match=r"^out of memory on cuda(:\d+)? during sampling"):
        generate(pipe, case)
    assert FP8Linear.fused_refused is False
    calls = []
    monkeypatch.setattr(torch, "_scaled_mm", lambda *args, **kwargs: calls.append(1) or scaled_mm(*args, **kwargs))
    generate(pipe, case)
    assert calls and FP8Linear.fused_refused is False, "the next run does not use the fused kernel"


def test_out_of_memory_in_the_capture_is_explained_and_the_next_run_captures(monkeypatch) -> None:
    case = next(c for c in golden_cases() if c.name == "official_t2i_sde")
    pipe = NextStepPipeline.from_pretrained(TINY_MODEL, device="cuda", dtype="float32")
    graph = torch.cuda.graph

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(torch.cuda, "graph", out_of_memory)
    with pytest.raises(NextStepError, match=r"^out of memory on cuda(:\d+)? during sampling"):
        generate(pipe, case)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    captured = record_captured_graphs(monkeypatch)
    result = generate(pipe, case)
    assert captured
    assert_matches_golden(case, {"tokens": result.tokens.cpu()})


def test_streaming_slots_are_freed_and_made_again(model_copy) -> None:
    from nextstep_runtime import release_streaming_slots, released_slot_bytes

    case = next(c for c in golden_cases() if c.name == "official_t2i_cps_nocfg")
    deepen(model_copy, 5)
    pipe = NextStepPipeline.from_pretrained(model_copy, device="cuda", dtype="bfloat16", gpu_layers=2)
    before = generate(pipe, case)
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated()
    freed = release_streaming_slots(pipe.model)
    assert freed > 0 and released_slot_bytes(pipe.model) == freed
    assert torch.cuda.memory_allocated() == allocated - freed
    assert torch.equal(generate(pipe, case).tokens, before.tokens)


def test_streamed_layers_are_page_locked_to_the_planners_bytes(model_copy, monkeypatch) -> None:
    """cudaHostRegister on the packed layers: exactly the planned host bytes locked (torch's pinned allocator
    would round each block up to a power of two); over the cap, layers stream from pageable memory, unchanged."""
    from nextstep_runtime import ModelFootprint, WeightMode
    from nextstep_runtime.memory.footprint import placed_weight_bytes
    from nextstep_runtime.model.placement import Placement
    from nextstep_runtime.weights import offload
    from nextstep_runtime.weights.offload import streamers

    case = next(c for c in golden_cases() if c.name == "official_t2i_cps_nocfg")
    deepen(model_copy, 5)
    pipe = NextStepPipeline.from_pretrained(model_copy, device="cuda", dtype="bfloat16", gpu_layers=1)
    streamer = streamers(pipe.model)[0]
    _, host = placed_weight_bytes(ModelFootprint.from_folder(model_copy), WeightMode(gpu_layers=1),
                                  Placement.single("cuda", torch.bfloat16, 5))
    assert all(buffer.is_pinned() for buffer in streamer.host_buffers)
    assert sum(buffer.nbytes for buffer in streamer.host_buffers) == host
    locked = generate(pipe, case)
    monkeypatch.setattr(offload, "pinned_memory_cap", lambda windows, total: offload._page_locked)
    capped = NextStepPipeline.from_pretrained(model_copy, device="cuda", dtype="bfloat16", gpu_layers=1)
    assert not any(buffer.is_pinned() for buffer in streamers(capped.model)[0].host_buffers)
    assert torch.equal(generate(capped, case).tokens, locked.tokens)


def test_fp8_fallback_applies_the_scale_in_float32_on_cuda() -> None:
    from nextstep_runtime.weights.fp8 import FP8Linear, quantize_per_channel

    layer = FP8Linear(256, 64, bias=False).cuda()
    weight, scale = quantize_per_channel(torch.randn(64, 256, device="cuda") * 0.05)
    layer.weight.data, layer.weight_scale = weight, scale
    eye = torch.eye(256, dtype=torch.bfloat16, device="cuda")
    expected = (weight.float() * scale[:, None]).t().to(torch.bfloat16)
    assert torch.equal(layer.dequantized(eye), expected)


def test_vae_attention_runs_a_fused_kernel_within_the_planned_memory(monkeypatch) -> None:
    """NextStep's VAE (random weights) decoding 1024x1024 in bf16: SDPA chooses a fused kernel for the mid-block
    attention, and the decode's peak stays within the planner's VAE figure."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend

    from nextstep_runtime import NextStepVAE, VAEConfig, vae_decode_bytes

    vae = NextStepVAE(VAEConfig()).to("cuda", torch.bfloat16).eval().requires_grad_(False)
    chosen = []
    native = F.scaled_dot_product_attention

    def recording(q, k, v, *args, **kwargs):
        chosen.append(SDPBackend(torch._fused_sdp_choice(q, k, v)))
        return native(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    latent = torch.randn(1, 16, 128, 128, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.inference_mode():
        vae.decode(latent)
    torch.cuda.synchronize()
    assert chosen and SDPBackend.MATH not in chosen, chosen
    assert torch.cuda.max_memory_allocated() - base <= vae_decode_bytes(128, 128, torch.bfloat16)


def test_capture_survives_another_thread_asking_for_free_memory(monkeypatch) -> None:
    """ComfyUI's plan route may call torch.cuda.mem_get_info while the token step is captured."""
    import threading

    case = next(c for c in golden_cases() if c.name == "official_t2i_sde")
    captured = record_captured_graphs(monkeypatch)
    pipe = NextStepPipeline.from_pretrained(TINY_MODEL, device="cuda", dtype="float32")
    stop = threading.Event()
    refused: list[BaseException] = []

    def ask() -> None:
        while not stop.is_set():
            try:
                torch.cuda.mem_get_info()
            except RuntimeError as exc:  # "operation not permitted when stream is capturing" with a global capture
                refused.append(exc)
                return

    asker = threading.Thread(target=ask)
    asker.start()
    try:
        result = generate(pipe, case)
    finally:
        stop.set()
        asker.join()
    assert not refused and captured and captured[0] is not None
    assert_matches_golden(case, {"tokens": result.tokens.cpu()})


def test_auto_dtype_follows_the_compute_capability() -> None:
    from nextstep_runtime import DeviceTraits, resolve_dtype

    expected = torch.bfloat16 if torch.cuda.get_device_capability() >= (8, 0) else torch.float16
    assert resolve_dtype("auto", DeviceTraits.of(torch.device("cuda"))) == expected
    pipe = NextStepPipeline.from_pretrained(TINY_MODEL, device="cuda")
    assert pipe.model.dtype == expected


def test_a_broken_flash_attn_falls_back_on_the_gpu(tmp_path, monkeypatch, caplog) -> None:
    import logging

    from broken_installs import broken_flash_attn

    from nextstep_runtime.model import attention

    monkeypatch.syspath_prepend(str(broken_flash_attn(tmp_path)))
    monkeypatch.setattr(attention, "_last_warning", None)
    case = next(c for c in golden_cases() if c.name == "official_t2i_sde")
    with caplog.at_level(logging.WARNING):
        pipe = NextStepPipeline.from_pretrained(TINY_MODEL, device="cuda", dtype="bfloat16", attention="auto")
        generate(pipe, case)
    assert len([r for r in caplog.records if "flash-attn is installed but does not import" in r.getMessage()]) == 1
    assert pipe.attention == (None,)


def split_devices() -> list[str]:
    """Two GPUs where the machine has them; else two entries of the one GPU (the split's code, no peer copies)."""
    return ["cuda:0", "cuda:1"] if torch.cuda.device_count() >= 2 else ["cuda:0", "cuda:0"]


@pytest.mark.parametrize("case", golden_cases(), ids=lambda case: case.name)
def test_goldens_through_a_split(case: GoldenCase, monkeypatch) -> None:
    """Every golden with the layers split over two device entries (one per GPU where there are two): each layer's
    weights and KV cache on its range's device, the token step captured as one CUDA graph per range."""
    devices = split_devices()
    captured = record_captured_graphs(monkeypatch)
    pipe = NextStepPipeline.from_pretrained(TINY_MODEL, devices=devices, dtype="float32")
    result = generate(pipe, case)
    model = pipe.model
    assert [str(r.device) for r in model.placement.ranges] == devices
    for layer_range in model.placement.ranges:
        for layer in model.layers[layer_range.start:layer_range.stop]:
            assert all(t.device == layer_range.device for t in layer.state_dict().values())
    assert model.embed_tokens.weight.device == torch.device(devices[0])
    assert model.image_head.net.input_proj.weight.device == torch.device(devices[1])
    cache = model.new_cache(2, 8)
    assert [keys.device for keys in cache.keys] == [torch.device(d) for d in devices]
    assert captured[:2] == [torch.device(d) for d in devices]  # one graph per range, on its GPU
    assert_matches_golden(case, {"tokens": result.tokens.cpu(), "latents": result.latents.cpu(),
                                 "images": result.images.cpu()})


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_split_over_two_gpus_with_fp8_and_streaming_equals_one_gpu(model_copy) -> None:
    """fp8 weights split 2 + 3 over two GPUs, the last streaming its last two layers: the tokens of the same mode on
    one GPU (eager on both: streamed layers are never captured, so both compute the same kernels)."""
    case = next(c for c in golden_cases() if c.name == "official_t2i_cps_nocfg")
    deepen(model_copy, 5)
    one = NextStepPipeline.from_pretrained(model_copy, device="cuda:0", dtype="bfloat16", memory="fp8", gpu_layers=3)
    split = NextStepPipeline.from_pretrained(model_copy, devices="cuda:0:0-1,cuda:1:2-4", dtype="bfloat16",
                                             memory="fp8", gpu_layers=3)
    assert torch.equal(generate(split, case).tokens.cpu(), generate(one, case).tokens.cpu())
    assert torch.cuda.memory_allocated(1) > 0


def test_doctor_on_the_gpu_reports_it_and_its_self_check_passes() -> None:
    """The report's GPU is this one, with the kernels its compute capability has; the self-check runs the eager step,
    the captured CUDA graph, fp8 and int4 (Ampere or newer) on it within their precision (compiling is off in the
    tests' process: skipped, and said why)."""
    from nextstep_runtime import doctor_report

    report = doctor_report(torch.device("cuda"))
    gpu = report["run_device"]
    capability = torch.cuda.get_device_capability()
    assert gpu["capability"] == f"{capability[0]}.{capability[1]}" and gpu["name"] == torch.cuda.get_device_name()
    assert gpu["memory_total_bytes"] == torch.cuda.mem_get_info()[1]
    assert gpu["int4"]["works"] == (capability >= (8, 0))
    check = report["self_check"]
    assert check["passed"], check
    verdicts = {entry["name"]: entry["verdict"] for entry in check["checks"]}
    assert verdicts == {"eager": "pass", "compiled": "skipped", "cuda graph": "pass", "fp8": "pass",
                        "int4": "pass" if capability >= (8, 0) else "skipped"}
