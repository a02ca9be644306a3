"""Random-weight NextStep models of named sizes, built in-process for benchmarking (no files)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from nextstep_runtime import ModelConfig, NextStepVAE, Placement, VAEConfig, WeightMode
from nextstep_runtime.model.backbone import RMSNorm
from nextstep_runtime.model.network import NextStepModel
from nextstep_runtime.weights.checkpoint import expected_shapes, load_weights
from nextstep_runtime.weights.loading import weight_converter
from nextstep_runtime.weights.modes import FLOAT_WEIGHTS

_BASE = dict(rms_norm_eps=1e-6, rope_theta=1e6, attention_bias=True, o_attention_bias=False, mlp_bias=False,
             boi=517, eoi=518, image_placeholder_id=519)

PRESETS: dict[str, ModelConfig] = {
    # the fixture's dims (tests/fixtures/tiny-nextstep)
    "tiny": ModelConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                        intermediate_size=128, vocab_size=524, head_width=48, head_depth=2, **_BASE),
    "small": ModelConfig(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                         head_dim=64, intermediate_size=1376, vocab_size=524, head_width=512, head_depth=6, **_BASE),
    # NextStep-14B (Qwen2.5-14B backbone, 157M flow head)
    "full": ModelConfig(hidden_size=5120, num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8,
                        head_dim=128, intermediate_size=13824, vocab_size=152064, head_width=1536, head_depth=12, **_BASE),
}

VAE_PRESETS: dict[str, VAEConfig] = {
    "tiny": VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1),
    "small": VAEConfig(),
    "full": VAEConfig(),
}


@torch.no_grad()
def random_model(preset: str, dtype: torch.dtype, device: torch.device, storage: str = "full",
                 seed: int = 0) -> NextStepModel:
    """Weights ~ N(0, 0.02), norms at 1: activations of realistic scale at any size, on one device. Filled through
    the loader's own per-tensor conversion, so fp8 and int4 weights are quantised as a checkpoint's would be."""
    torch.manual_seed(seed)
    config = PRESETS[preset]
    with torch.device("meta"):
        model = NextStepModel(config)
    plain_shapes = expected_shapes(model)
    norms = {f"{name}.{attr}" for name, module in model.named_modules() if isinstance(module, (nn.LayerNorm, RMSNorm))
             for attr, _ in module.named_parameters(recurse=False)}
    placement = Placement.single(device, dtype, config.num_hidden_layers)
    convert = weight_converter(model, WeightMode(storage), FLOAT_WEIGHTS, placement)

    def tensors():
        for name, shape in plain_shapes.items():
            if name in norms:
                yield Path(preset), name, lambda shape=shape: torch.ones(shape, device=device)
            else:
                yield Path(preset), name, lambda shape=shape: torch.randn(shape, device=device) * 0.02
    load_weights(model, tensors(), dtype, device, f"preset {preset}", convert=convert)
    model.placement = placement
    return model.eval().requires_grad_(False)


@torch.no_grad()
def random_vae(preset: str, dtype: torch.dtype, device: torch.device, seed: int = 0) -> NextStepVAE:
    torch.manual_seed(seed)
    vae = NextStepVAE(VAE_PRESETS[preset])
    return vae.to(device=device, dtype=dtype).eval().requires_grad_(False)
