"""Write a model and VAE in the official NextStep folder layout, so the official pipeline can load the very
weights the runtime benchmarks (config.json + model.safetensors + tokenizer files + vae/config.json +
vae/checkpoint.pt, as in tests/fixtures/tiny-nextstep)."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from nextstep_runtime import NextStepVAE
from nextstep_runtime.model.network import NextStepModel

TEMPLATE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "tiny-nextstep"
TOKENIZER_FILES = ("merges.txt", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vocab.json")


def save_official_layout(model: NextStepModel, vae: NextStepVAE, folder: Path) -> Path:
    """The official layout of `model` and `vae` in `folder` (float32). The tiny fixture's config supplies the
    fields the official code reads and the runtime does not model; the sizes are the model's own. The official
    model also holds `lm_head` and `gen_pos_embed`, which image generation does not read: saved as zeros."""
    c = model.config
    config = json.loads((TEMPLATE / "config.json").read_text())
    config.update(hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
                  num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
                  head_dim=c.head_dim, intermediate_size=c.intermediate_size, vocab_size=c.vocab_size,
                  fm_head_dim=c.head_width, fm_head_layers=c.head_depth, rms_norm_eps=c.rms_norm_eps,
                  rope_theta=c.rope_theta, attention_bias=c.attention_bias, o_attention_bias=c.o_attention_bias,
                  mlp_bias=c.mlp_bias, boi=c.boi, eoi=c.eoi, image_placeholder_id=c.image_placeholder_id,
                  vae_name_or_path="vae/")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tensors = {name: tensor.float().contiguous() for name, tensor in model.state_dict().items()}
    tensors["lm_head.weight"] = torch.zeros((c.vocab_size, c.hidden_size))
    tensors["gen_pos_embed"] = torch.zeros((1, 1024, c.hidden_size))
    save_file(tensors, folder / "model.safetensors")
    for name in TOKENIZER_FILES:
        shutil.copy(TEMPLATE / name, folder / name)
    (folder / "vae").mkdir(exist_ok=True)
    vae_config = json.loads((TEMPLATE / "vae" / "config.json").read_text())
    vae_config.update({key: list(value) if isinstance(value, tuple) else value
                       for key, value in asdict(vae.config).items() if key in vae_config})
    (folder / "vae" / "config.json").write_text(json.dumps(vae_config, indent=2))
    torch.save({name: tensor.float() for name, tensor in vae.state_dict().items()}, folder / "vae" / "checkpoint.pt")
    return folder
