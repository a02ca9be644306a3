"""Peak host memory while converting a sharded float32 checkpoint to bfloat16 stays within
loaded model + largest shard + 10% (the bound that lets a 56 GB fp32 release load on a 32-64 GB machine)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from goldens import TINY_MODEL
from safetensors.torch import save_file

from nextstep_runtime.config import ModelConfig
from nextstep_runtime.model.network import NextStepModel

PROBE = Path(__file__).parent / "load_memory_probe.py"


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


def test_peak_rss_loading_fp32_shards_into_bf16(tmp_path: Path) -> None:
    folder = tmp_path / "fp32-sharded"
    largest_shard = write_sharded_fp32_model(folder, shards=4)
    total_on_disk = sum(path.stat().st_size for path in folder.glob("*.safetensors"))
    assert total_on_disk > 300 * 2**20
    result = subprocess.run([sys.executable, str(PROBE), str(folder), "bfloat16"], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    growth_mb = report["peak_mb"] - report["rss_before_mb"]
    bound_mb = 1.1 * (report["loaded_mb"] + largest_shard / 2**20)
    assert report["loaded_mb"] < total_on_disk / 2**20 / 1.9  # really converted to 2 bytes per value
    assert growth_mb <= bound_mb, f"loading grew RSS by {growth_mb:.0f} MB, bound {bound_mb:.0f} MB ({report})"
    shutil.rmtree(folder)
