"""fp8 weight storage and layer streaming: they run, use the storage they promise, and stay close to bf16.

Tolerances were measured on the tiny model with the guidance-free golden settings (cfg 1, where errors
are not amplified by the guidance scale): fp8 vs bf16 differed by at most 0.05 on tokens and 0.011 on
average on images (bf16 vs fp32: 0.02 and 0.007).
"""

from __future__ import annotations

import pytest
import torch

from goldens import TINY_MODEL, golden_cases
from model_folders import deepen
from test_goldens import settings_for

from nextstep_runtime import NextStepPipeline
from nextstep_runtime.fp8 import FP8_DTYPE, FP8Linear, quantize_per_channel
from nextstep_runtime.loading import load_model

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
    pipe = NextStepPipeline.from_pretrained(TINY_MODEL, device="cpu", dtype="bfloat16", fp8=True)
    fp8_layers = [m for m in pipe.model.layers.modules() if isinstance(m, FP8Linear)]
    assert len(fp8_layers) == 7 * pipe.model.config.num_hidden_layers
    assert all(m.weight.dtype == FP8_DTYPE for m in fp8_layers)
    assert pipe.model.image_head.net.input_proj.weight.dtype == torch.bfloat16  # the head is not quantised
    result = generate(pipe)
    assert torch.isfinite(result.images).all()
    assert (result.tokens - bf16_result.tokens).abs().max() < 0.1
    assert (result.images - bf16_result.images).abs().mean() < 0.03


@pytest.mark.parametrize("fp8,resident", [(False, 1), (True, 1), (False, 2), (True, 4)])
def test_streamed_layers_give_the_same_tokens_as_resident_ones(fp8: bool, resident: int, model_copy) -> None:
    deepen(model_copy, 5)  # 4, 3 or 1 streamed layers rotating through the 2 slots (odd counts wrap onto slot 0)
    resident_model = NextStepPipeline.from_pretrained(model_copy, device="cpu", dtype="bfloat16", fp8=fp8)
    streamed = NextStepPipeline.from_pretrained(model_copy, device="cpu", dtype="bfloat16", fp8=fp8,
                                                resident_layers=resident)
    from nextstep_runtime.offload import StreamedLayer

    assert not any(isinstance(layer, StreamedLayer) for layer in streamed.model.layers[:resident])
    assert all(isinstance(layer, StreamedLayer) for layer in streamed.model.layers[resident:])
    a, b = generate(resident_model), generate(streamed)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.images, b.images)


def test_resident_layers_out_of_range() -> None:
    from nextstep_runtime import NextStepError

    with pytest.raises(NextStepError, match=r"layers kept on the GPU must be between 0 and 2 \(got 3\)"):
        load_model(TINY_MODEL, torch.float32, "cpu", resident_layers=3)
