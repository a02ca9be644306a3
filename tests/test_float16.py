"""float16 devices (NVIDIA GPUs before Ampere, Macs before macOS 14): the decoder keeps its residual stream in float32
between float16 matmuls (devices.residual_dtype), and a prefill that still overflows stops at once, naming the fix.

Emulated on the CPU with the tiny model whose attention writes a "massive activation" into one channel of the residual
stream, as Qwen2-class models do: each layer adds about 40000 there (each matmul's output fits float16, largest
65504), so the sum after two layers overflows a float16 residual stream but not a float32 one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from model_folders import copy_model
from safetensors.torch import load_file, save_file

from nextstep_runtime import GenerationSettings, NextStepPipeline
from nextstep_runtime.errors import NonFiniteResult
from nextstep_runtime.model.backbone import prefix_attention_mask, rotary_tables
from nextstep_runtime.sampling.prompt import build_rows

FLOAT16_MAX = torch.finfo(torch.float16).max
SETTINGS = GenerationSettings(width=32, height=32, steps=2, cfg=3.0, seed=3)
PROMPT = "a red fox in the snow"


def massive_activation_model(folder: Path, per_layer: float) -> Path:
    """The tiny model with every layer's attention adding about `per_layer` to channel 0 of the residual stream: the
    values (V) get a bias of 100 in every channel, so attention's output (a convex mix of them) is about 100 anywhere,
    and the output projection's row 0 sums those into `per_layer`."""
    copy_model(folder)
    path = folder / "model.safetensors"
    tensors = load_file(path)
    layers = sorted({name.split(".")[1] for name in tensors if name.startswith("layers.")})
    for index in layers:
        tensors[f"layers.{index}.self_attn.v_proj.bias"] = torch.full_like(
            tensors[f"layers.{index}.self_attn.v_proj.bias"], 100.0)
        o_proj = tensors[f"layers.{index}.self_attn.o_proj.weight"]
        o_proj[0] = per_layer / (100.0 * o_proj.shape[1])
    save_file(tensors, path, metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def overflowing_model(tmp_path_factory) -> Path:
    """Each layer adds 40000: fits float16 per matmul, overflows a float16 residual stream after two layers."""
    return massive_activation_model(tmp_path_factory.mktemp("f16") / "model", 40000.0)


def prefill_hidden(pipe: NextStepPipeline, residual: torch.dtype) -> torch.Tensor:
    """The prompt's hidden states after every decoder layer, the layers called one by one with a residual stream in
    `residual` and the matmuls in the model's dtype: float16 is how a plain float16 model runs."""
    model = pipe.model
    rows = build_rows(pipe.tokenizer, PROMPT, None, None, [], (2, 2), 1, SETTINGS.cfg, 1.0, "official",
                      model.config.boi)
    cache = model.new_cache(rows.input_ids.shape[0], rows.input_ids.shape[1])
    positions = torch.arange(rows.input_ids.shape[1]).expand(rows.input_ids.shape[0], -1)
    cos, sin = rotary_tables(positions, model.config.head_dim, model.config.rope_theta, model.dtype)
    mask = prefix_attention_mask(rows.attention_mask.bool())
    x = model.embed_prompt(rows.input_ids, None).to(residual)
    with torch.inference_mode():
        for layer in model.layers:
            x = layer(x, cos, sin, cache, None, mask)
    return x


@pytest.fixture(scope="module")
def float16_pipe(overflowing_model) -> NextStepPipeline:
    return NextStepPipeline.from_pretrained(overflowing_model, device="cpu", dtype="float16", compile=False)


def test_the_fixture_overflows_a_plain_float16_run_and_not_float32(float16_pipe, overflowing_model):
    plain = prefill_hidden(float16_pipe, torch.float16)
    assert not torch.isfinite(plain).all()
    wide = prefill_hidden(float16_pipe, torch.float32)
    assert torch.isfinite(wide).all()
    assert wide[..., 0].abs().max() > FLOAT16_MAX  # the massive activation really passes float16's range


def test_float16_runs_finite_and_close_to_float32(float16_pipe, overflowing_model):
    reference = NextStepPipeline.from_pretrained(overflowing_model, device="cpu", dtype="float32", compile=False)
    expected = reference.sample(PROMPT, SETTINGS).tokens
    tokens = float16_pipe.sample(PROMPT, SETTINGS).tokens
    assert torch.isfinite(tokens).all()
    assert (tokens - expected).abs().max() < 0.05 * expected.abs().max()


def test_a_prefill_that_still_overflows_stops_before_the_first_token(tmp_path):
    """A single matmul past float16's range (the float32 residual stream cannot help): refused after the prompt's
    prefill, before any image token, naming float32 and bfloat16 devices."""
    folder = massive_activation_model(tmp_path / "model", 2 * FLOAT16_MAX)
    pipe = NextStepPipeline.from_pretrained(folder, device="cpu", dtype="float16", compile=False)
    tokens_seen = []
    with pytest.raises(NonFiniteResult, match=r"overflowed to NaN or inf in the prompt's prefill \(computing in "
                                              r"float16\).*dtype float32.*bfloat16 \(an NVIDIA GPU of the Ampere"):
        pipe.sample(PROMPT, SETTINGS, callback=lambda done, total, tokens: tokens_seen.append(done))
    assert tokens_seen == []
