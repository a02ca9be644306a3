"""Model configs the tests plan for without their weights."""

from __future__ import annotations

from nextstep_runtime import ModelConfig

NEXTSTEP_14B = ModelConfig.from_dict({  # the released config.json values (SPEC.md), 1.0 naming
    "hidden_size": 5120, "num_hidden_layers": 48, "num_attention_heads": 40, "num_key_value_heads": 8,
    "head_dim": 128, "intermediate_size": 13824, "vocab_size": 152064, "attention_bias": True,
    "o_attention_bias": False, "mlp_bias": False, "boi": 151667, "eoi": 151668, "image_placeholder_id": 151669,
    "latent_channels": 16, "latent_patch_size": 2, "fm_head_dim": 1536, "fm_head_layers": 12})
