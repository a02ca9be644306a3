"""fp8 and 4-bit weight storage and layer streaming: they run, use the storage they promise, and stay close
to bf16.

Tolerances were measured on the tiny model with the guidance-free golden settings (cfg 1, where errors
are not amplified by the guidance scale): fp8 vs bf16 differed by at most 0.05 on tokens and 0.011 on
average on images (bf16 vs fp32: 0.02 and 0.007); int4 (group size 64 at the tiny model's widths) by at
most 0.23 on tokens and 0.032 on average on images.
"""

from __future__ import annotations

import pytest
import torch
from goldens import TINY_MODEL, golden_cases, settings_for
from model_folders import deepen, load_on
from reference_quantization import dequantize_grouped

from nextstep_runtime import NextStepPipeline, WeightMode, release_streaming_slots, released_slot_bytes
from nextstep_runtime.weights.fp8 import FP8_DTYPE, FP8Linear, quantize_per_channel
from nextstep_runtime.weights.int4 import Int4Linear, pack_for_device, quantize_grouped
from nextstep_runtime.weights.offload import StreamedLayer, streamers

CASE = next(case for case in golden_cases() if case.name == "official_t2i_cps_nocfg")


def generate(pipe: NextStepPipeline):
    return pipe.generate(CASE.params["caption"], settings_for(CASE))


@pytest.fixture(scope="module")
def bf16_result():
    return generate(NextStepPipeline.from_pretrained(TINY_MODEL, device="cpu", dtype="bfloat16"))


def test_quantize_per_channel_round_trip() -> None:
    weight = torch.randn(32, 64) * torch.logspace(-3, 1, 32)[:, None]
    quantized, scale = quantize_per_channel(weight)
    assert quantized.dtype == FP8_DTYPE and scale.shape == (32,)
    relative = ((quantized.float() * scale[:, None] - weight).abs() / weight.abs().amax(1, keepdim=True)).max()
    assert relative < 2 ** -4  # e4m3 keeps 3 mantissa bits: half an ulp at the top of the range


def test_fp8_model_stores_decoder_linears_in_fp8_and_stays_close_to_bf16(bf16_result) -> None:
    pipe = NextStepPipeline.from_pretrained(TINY_MODEL, device="cpu", dtype="bfloat16", memory="fp8")
    fp8_layers = [m for m in pipe.model.layers.modules() if isinstance(m, FP8Linear)]
    assert len(fp8_layers) == 7 * pipe.model.config.num_hidden_layers
    assert all(m.weight.dtype == FP8_DTYPE for m in fp8_layers)
    assert pipe.model.image_head.net.input_proj.weight.dtype == torch.bfloat16  # the head is not quantised
    result = generate(pipe)
    assert torch.isfinite(result.images).all()
    assert (result.tokens - bf16_result.tokens).abs().max() < 0.1
    assert (result.images - bf16_result.images).abs().mean() < 0.03





def test_quantize_grouped_round_trip_and_cpu_kernel() -> None:
    weight = torch.randn(48, 256) * torch.logspace(-3, 1, 48)[:, None]
    nibbles, scales_and_zeros = quantize_grouped(weight)
    assert nibbles.dtype == torch.uint8 and nibbles.shape == (48, 128)
    assert scales_and_zeros.shape == (2, 48, 2)  # group size 128
    restored = dequantize_grouped(nibbles, scales_and_zeros)
    step = scales_and_zeros[..., 0].float().t().repeat_interleave(128, dim=1)
    assert ((restored - weight).abs() <= step * 0.51 + 1e-6).all()  # within half a quantisation step
    x = torch.randn(5, 256)
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(x, pack_for_device(nibbles, torch.device("cpu")), 128,
                                                     scales_and_zeros.float())
    torch.testing.assert_close(out, x @ restored.t(), rtol=1e-4, atol=1e-4)


def test_int4_model_packs_decoder_linears_and_stays_close_to_bf16(bf16_result) -> None:
    pipe = NextStepPipeline.from_pretrained(TINY_MODEL, device="cpu", dtype="bfloat16", memory="int4")
    int4_layers = [m for m in pipe.model.layers.modules() if isinstance(m, Int4Linear)]
    assert len(int4_layers) == 7 * pipe.model.config.num_hidden_layers
    assert all(m.weight.dtype == torch.uint8 and m.weight.numel() * 2 == m.in_features * m.out_features
               for m in int4_layers)
    assert pipe.model.image_head.net.input_proj.weight.dtype == torch.bfloat16  # the head is not quantised
    result = generate(pipe)
    assert torch.isfinite(result.images).all()
    assert (result.tokens - bf16_result.tokens).abs().max() < 0.35
    assert (result.images - bf16_result.images).abs().mean() < 0.05


def test_int4_in_float32_on_cpu_matches_bf16_int4() -> None:
    """The CPU kernel also runs in float32 (the CPU default dtype); same weights, so close to the bf16 run."""
    bf16 = generate(NextStepPipeline.from_pretrained(TINY_MODEL, device="cpu", dtype="bfloat16", memory="int4"))
    fp32 = generate(NextStepPipeline.from_pretrained(TINY_MODEL, device="cpu", dtype="float32", memory="int4"))
    assert (fp32.tokens - bf16.tokens).abs().max() < 0.1


def test_an_unknown_storage_is_refused() -> None:
    from nextstep_runtime import NextStepError

    with pytest.raises(NextStepError, match="unknown weight storage 'int8'; choose full, fp8, int4"):
        WeightMode("int8")


@pytest.mark.parametrize("weights,resident", [("bf16", 1), ("fp8", 1), ("bf16", 2), ("fp8", 4), ("int4", 1),
                                              ("int4", 2)])
def test_streamed_layers_give_the_same_tokens_as_resident_ones(weights: str, resident: int, model_copy) -> None:
    deepen(model_copy, 5)  # 4, 3 or 1 streamed layers rotating through the 2 slots (odd counts wrap onto slot 0)
    memory = "full" if weights == "bf16" else weights
    resident_model = NextStepPipeline.from_pretrained(model_copy, device="cpu", dtype="bfloat16", memory=memory)
    streamed = NextStepPipeline.from_pretrained(model_copy, device="cpu", dtype="bfloat16", memory=memory,
                                                gpu_layers=resident)
    assert not any(isinstance(layer, StreamedLayer) for layer in streamed.model.layers[:resident])
    assert all(isinstance(layer, StreamedLayer) for layer in streamed.model.layers[resident:])
    a, b = generate(resident_model), generate(streamed)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.images, b.images)
    # a host unloading the model frees the slots (registered nowhere it can see); the next run makes them again
    streamer = streamers(streamed.model)[0]
    assert released_slot_bytes(streamed.model) == 0
    assert release_streaming_slots(streamed.model) == streamer.slot_bytes > 0 and not streamer.slots
    assert released_slot_bytes(streamed.model) == streamer.slot_bytes
    assert torch.equal(generate(streamed).tokens, a.tokens)
    assert released_slot_bytes(streamed.model) == 0


def test_resident_layers_out_of_range() -> None:
    from nextstep_runtime import NextStepError

    with pytest.raises(NextStepError, match=r"gpu_layers must be between 0 and 2 \(got 3\)"):
        load_on(TINY_MODEL, gpu_layers=3)
