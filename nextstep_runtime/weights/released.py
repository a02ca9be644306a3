"""The models a ComfyUI user can pick before they are on disk, by the folder names the templates use, and the Hub
repos they are fetched from (into models/nextstep/<name>/)."""

from __future__ import annotations

RELEASED_MODELS = {
    "NextStep-1.1": "stepfun-ai/NextStep-1.1",
    "NextStep-1-Large": "stepfun-ai/NextStep-1-Large",
    "NextStep-1-Large-Edit": "stepfun-ai/NextStep-1-Large-Edit",
    "NextStep-1.1-W4A16-AutoRound": "INCModel/NextStep-1.1-W4A16-AutoRound",
}
"""Folder name -> Hugging Face repo id: StepFun's releases, and the community 4-bit NextStep-1.1 (docs/community-4bit.md)."""

NEXTSTEP_14B_CONFIG = {
    "hidden_size": 5120, "num_hidden_layers": 48, "num_attention_heads": 40, "num_key_value_heads": 8,
    "head_dim": 128, "intermediate_size": 13824, "vocab_size": 152064, "attention_bias": True,
    "o_attention_bias": False, "mlp_bias": False, "boi": 151667, "eoi": 151668, "image_placeholder_id": 151669,
    "latent_channels": 16, "latent_patch_size": 2, "fm_head_dim": 1536, "fm_head_layers": 12}
"""The released 14B models' config.json values (SPEC.md, 1.0 naming): what `doctor` plans for before any is on disk."""
