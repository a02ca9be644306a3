"""Derive model-folder variants from the tiny fixture: shards, dtypes on disk, key prefixes, config naming."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from goldens import TINY_MODEL
from safetensors.torch import load_file, save_file

from nextstep_runtime import ModelConfig, ModelFolder, NextStepModel, Placement, WeightMode, load_model

MEMORY_PROBE = Path(__file__).parent / "load_memory_probe.py"
"""The subprocess that loads or repacks a folder and reports its peak host memory."""

NAMING_1_0_TO_1_1 = {
    "latent_channels": "num_channels",
    "latent_patch_size": "patch_size",
    "latent_size": "image_size",
    "fm_head_dim": "genloss_width",
    "fm_head_layers": "genloss_depth",
}


def copy_model(target: Path) -> Path:
    """A writable copy of the tiny model folder (tokenizer, config, weights, vae/) at `target`."""
    shutil.copytree(TINY_MODEL, target)
    for path in target.rglob("*"):
        path.chmod(0o644 if path.is_file() else 0o755)
    return target


def rewrite_weights(folder: Path, shards: int = 1, dtype: torch.dtype | None = None, prefix: str = "") -> None:
    """Re-save model.safetensors as `shards` files (+ index when > 1), cast to `dtype`, keys with `prefix`."""
    source = folder / "model.safetensors"
    tensors = load_file(source)
    source.unlink()
    names = sorted(tensors)
    if shards == 1:
        save_file({prefix + k: _cast(tensors[k], dtype) for k in names}, folder / "model.safetensors",
                  metadata={"format": "pt"})
        return
    weight_map = {}
    for index in range(shards):
        part = names[index::shards]
        file = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        save_file({prefix + k: _cast(tensors[k], dtype) for k in part}, folder / file, metadata={"format": "pt"})
        weight_map.update({prefix + k: file for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.contiguous() if dtype is None else tensor.to(dtype).contiguous()


def edit_config(folder: Path, **changes) -> None:
    """Change config.json keys (None deletes a key)."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config, indent=2))


def use_1_1_naming(folder: Path) -> None:
    """Rename the 1.0 config keys to the NextStep-1.1 scheme."""
    config = json.loads((folder / "config.json").read_text())
    renamed = {NAMING_1_0_TO_1_1.get(key, key): value for key, value in config.items()}
    (folder / "config.json").write_text(json.dumps(renamed, indent=2))


def deepen(folder: Path, layers: int) -> None:
    """Give the model `layers` decoder layers by repeating its existing ones (a valid, deeper model)."""
    tensors = load_file(folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    original = config["num_hidden_layers"]
    for index in range(original, layers):
        prefix = f"layers.{index % original}."
        tensors.update({f"layers.{index}." + k[len(prefix):]: v.clone() for k, v in list(tensors.items())
                        if k.startswith(prefix)})
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    edit_config(folder, num_hidden_layers=layers)


def use_slow_tokenizer_files(folder: Path) -> None:
    """Drop tokenizer.json and keep the slow files as some Hugging Face repos ship them: vocab.json, merges.txt,
    tokenizer_config.json naming a remote-code tokenizer class (auto_map), added_tokens.json and
    special_tokens_map.json. The remote code is a file that would fail loudly if it were ever executed."""
    (folder / "tokenizer.json").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    added = config.pop("added_tokens_decoder")
    (folder / "added_tokens.json").write_text(json.dumps({entry["content"]: int(i) for i, entry in added.items()}))
    config["tokenizer_class"] = "NextStepTokenizer"
    config["auto_map"] = {"AutoTokenizer": ["models.tokenization_nextstep.NextStepTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "models").mkdir(exist_ok=True)
    (folder / "models" / "tokenization_nextstep.py").write_text(
        'raise RuntimeError("code from the model folder was executed")\n')


def add_tensors(folder: Path, extra: dict[str, torch.Tensor]) -> None:
    """Add tensors to model.safetensors (tensors an export holds beyond what NextStep reads)."""
    tensors = load_file(folder / "model.safetensors")
    tensors.update(extra)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def edit_vae_config(folder: Path, **changes) -> None:
    """Change keys of vae/config.json (None stores null)."""
    path = folder / "vae" / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config, indent=2))


def write_hf_cache(cache: Path, repo_id: str, folder: Path, commit: str, ref: str = "main") -> Path:
    """Lay `folder` out as huggingface_hub's cache holds a downloaded repo: models--org--name/ with the file
    contents in blobs/ (named by hash), snapshots/<commit>/ of relative symlinks into blobs/, and refs/<ref>
    holding the commit. Returns the snapshot folder."""
    import hashlib
    import os

    storage = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = storage / "snapshots" / commit
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    for source in sorted(path for path in folder.rglob("*") if path.is_file()):
        data = source.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        pointer = snapshot / source.relative_to(folder)
        pointer.parent.mkdir(parents=True, exist_ok=True)
        pointer.symlink_to(os.path.relpath(blob, pointer.parent))
    (storage / "refs").mkdir(exist_ok=True)
    (storage / "refs" / ref).write_text(commit)
    return snapshot


def write_sharded_fp32_model(folder: Path, shards: int) -> int:
    """A few-hundred-MB random fp32 model in `shards` files; returns the largest shard's size in bytes."""
    config = json.loads((TINY_MODEL / "config.json").read_text())
    config.update(hidden_size=1024, num_hidden_layers=6, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
                  intermediate_size=2816, vocab_size=32000, fm_head_dim=512, fm_head_layers=4)
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    with torch.device("meta"):
        names = list(NextStepModel(ModelConfig.from_dict(config)).state_dict().items())
    generator = torch.Generator().manual_seed(0)
    weight_map, largest = {}, 0
    for index in range(shards):
        part = {name: torch.randn(tensor.shape, generator=generator) * 0.02 for name, tensor in names[index::shards]}
        file = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, folder / file)
        weight_map.update({name: file for name in part})
        largest = max(largest, (folder / file).stat().st_size)
        del part
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return largest


def load_on(source: Path | str | ModelFolder, dtype: torch.dtype = torch.float32, storage: str = "full",
            gpu_layers: int | None = None, device: str = "cpu") -> NextStepModel:
    """The runtime's load_model of `source` with every decoder layer on one device, in `dtype`, the decoder's linears
    held as `storage` and only `gpu_layers` of them resident (None: all)."""
    folder = ModelFolder.open(source)
    return load_model(folder, WeightMode(storage, gpu_layers),
                      Placement.single(device, dtype, folder.config.num_hidden_layers))
