"""Peak host memory while converting a sharded float32 checkpoint to bfloat16 stays within
loaded model + largest shard + 10% (the bound that lets a 56 GB fp32 release load on a 32-64 GB machine)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from model_folders import MEMORY_PROBE, write_sharded_fp32_model


def test_peak_rss_loading_fp32_shards_into_bf16(tmp_path: Path) -> None:
    folder = tmp_path / "fp32-sharded"
    largest_shard = write_sharded_fp32_model(folder, shards=4)
    total_on_disk = sum(path.stat().st_size for path in folder.glob("*.safetensors"))
    assert total_on_disk > 300 * 2**20
    result = subprocess.run([sys.executable, str(MEMORY_PROBE), str(folder), "bfloat16"], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    growth_mb = report["peak_mb"] - report["rss_before_mb"]
    bound_mb = 1.1 * (report["loaded_mb"] + largest_shard / 2**20)
    assert report["loaded_mb"] < total_on_disk / 2**20 / 1.9  # really converted to 2 bytes per value
    assert growth_mb <= bound_mb, f"loading grew RSS by {growth_mb:.0f} MB, bound {bound_mb:.0f} MB ({report})"
    shutil.rmtree(folder)
