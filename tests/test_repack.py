"""`convert`: repacked folders load as they are, give exactly the tokens of the same weight mode applied while
loading, stream while converting, and load an fp8 folder within its own size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from goldens import TINY_MODEL, golden_cases, settings_for
from model_folders import MEMORY_PROBE, copy_model, load_on, rewrite_weights, write_sharded_fp32_model
from safetensors import safe_open

from nextstep_runtime import NextStepError, NextStepPipeline
from nextstep_runtime.cli.main import main
from nextstep_runtime.weights.model_folder import WEIGHTS_FORMAT_KEY
from nextstep_runtime.weights.repack import convert_folder

CASE = next(case for case in golden_cases() if case.name == "official_t2i_cps_nocfg")


def run_probe(*args: str) -> dict:
    """Run the memory probe. The test model's tensors are smaller than glibc's adaptive mmap threshold (up to
    32 MB), so freed ones would stay in the heap and be counted again; the 14B model's linear weights are
    larger than that. A fixed 1 MB threshold makes the measurement what the code holds, not allocator caching."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    result = subprocess.run([sys.executable, str(MEMORY_PROBE), *args], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("weights", ["bf16", "fp8", "int4"])
def test_repacked_folder_gives_the_tokens_of_the_mode_applied_while_loading(weights: str, tmp_path: Path) -> None:
    destination = tmp_path / f"tiny-{weights}"
    assert main(["convert", str(TINY_MODEL), str(destination), "--weights", weights]) == 0
    memory = "full" if weights == "bf16" else weights
    on_the_fly = NextStepPipeline.from_pretrained(TINY_MODEL, device="cpu", dtype="bfloat16", memory=memory)
    repacked = NextStepPipeline.from_pretrained(destination, device="cpu", dtype="bfloat16", memory=memory)
    a = on_the_fly.generate(CASE.params["caption"], settings_for(CASE))
    b = repacked.generate(CASE.params["caption"], settings_for(CASE))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.images, b.images)
    config = json.loads((destination / "config.json").read_text())
    assert config.get(WEIGHTS_FORMAT_KEY) == (None if weights == "bf16" else weights)
    with safe_open(str(destination / "model.safetensors"), "pt") as handle:
        stored = {key: handle.get_slice(key).get_dtype() for key in handle.keys()}
    expected = {"bf16": "BF16", "fp8": "F8_E4M3", "int4": "U8"}[weights]
    assert stored["layers.0.mlp.down_proj.weight"] == expected
    assert stored["embed_tokens.weight"] == "BF16" and "lm_head.weight" not in stored


def test_convert_writes_shards_copies_tokenizer_and_vae_but_never_code(model_copy: Path, tmp_path: Path) -> None:
    (model_copy / "modeling_nextstep.py").write_text("raise SystemExit('never run')\n")
    (model_copy / "vae" / "tokenizer_impl.py").write_text("raise SystemExit('never run')\n")
    destination = tmp_path / "sharded"
    convert_folder(model_copy, destination, "int4", max_shard_bytes=60_000)
    shards = sorted(destination.glob("model-*.safetensors"))
    assert len(shards) > 2 and all(path.stat().st_size < 60_000 + 10_000 for path in shards)  # data + header
    index = json.loads((destination / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {path.name for path in shards}
    assert not list(destination.rglob("*.py"))
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "vae/config.json"):
        assert (destination / name).read_bytes() == (model_copy / name).read_bytes(), name
    reference = load_on(TINY_MODEL, torch.bfloat16, "int4").state_dict()
    loaded = load_on(destination, torch.bfloat16, "int4").state_dict()
    assert reference.keys() == loaded.keys() and all(torch.equal(reference[k], loaded[k]) for k in reference)


@pytest.mark.parametrize("umask,max_shard_bytes", [(0o022, 10**9), (0o027, 60_000)])
def test_converted_weights_get_the_mode_of_the_folders_other_files(tmp_path: Path, umask: int,
                                                                   max_shard_bytes: int) -> None:
    """Issue 29, item 15: model.safetensors came out 0600 (safetensors writes privately) beside 0644 config and
    tokenizer files; every written file (copies of 0640 files included) now has the mode the umask gives."""
    source = copy_model(tmp_path / "source")
    (source / "vocab.json").chmod(0o640)
    old = os.umask(umask)
    try:
        convert_folder(source, tmp_path / "converted", "fp8", max_shard_bytes=max_shard_bytes)
    finally:
        os.umask(old)
    modes = {path.name: path.stat().st_mode & 0o777 for path in (tmp_path / "converted").rglob("*") if path.is_file()}
    assert any(name.endswith(".safetensors") for name in modes)
    assert set(modes.values()) == {0o666 & ~umask}, modes


def test_repacked_folder_refuses_another_weight_mode_and_reconversion(tmp_path: Path) -> None:
    destination = tmp_path / "tiny-fp8"
    convert_folder(TINY_MODEL, destination, "fp8")
    with pytest.raises(NextStepError, match=r"holds fp8 weights \(repacked\); load it with fp8 weights"):
        load_on(destination, torch.bfloat16)
    with pytest.raises(NextStepError, match=r"holds fp8 weights \(repacked\); load it with fp8 weights"):
        load_on(destination, torch.bfloat16, "int4")
    with pytest.raises(NextStepError, match=r"already repacked \(fp8\); convert the original"):
        convert_folder(destination, tmp_path / "again", "int4")
    with pytest.raises(NextStepError, match="exists and is not empty"):
        convert_folder(TINY_MODEL, destination, "fp8")


def test_convert_names_what_a_model_folder_lacks(tmp_path: Path) -> None:
    """The same messages as loading: a folder that does not exist, a folder without config.json."""
    with pytest.raises(NextStepError, match="model folder .* does not exist"):
        convert_folder(tmp_path / "absent", tmp_path / "out", "fp8")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NextStepError, match="has no config.json; point at a NextStep model folder"):
        convert_folder(tmp_path / "empty", tmp_path / "out", "fp8")


def test_bf16_shards_convert_like_the_float32_release(model_copy: Path, tmp_path: Path) -> None:
    """A bf16 checkpoint (what many re-uploads ship) repacks to the same int4 tensors as its float32 source
    cast to bf16 would."""
    rewrite_weights(model_copy, shards=2, dtype=torch.bfloat16)
    convert_folder(model_copy, tmp_path / "from-bf16", "int4")
    reference = load_on(model_copy, torch.bfloat16, "int4").state_dict()
    loaded = load_on(tmp_path / "from-bf16", torch.bfloat16, "int4").state_dict()
    assert all(torch.equal(reference[k], loaded[k]) for k in reference)


def test_converting_streams_and_a_repacked_fp8_folder_loads_within_its_size(tmp_path: Path) -> None:
    source = tmp_path / "fp32-sharded"
    largest_source_shard = write_sharded_fp32_model(source, shards=4)
    max_shard = 40 * 2**20
    destination = tmp_path / "fp8"
    converting = run_probe("convert", str(source), str(destination), "fp8", str(max_shard))
    growth_mb = converting["peak_mb"] - converting["rss_before_mb"]
    output_shards = [path.stat().st_size for path in destination.glob("*.safetensors")]
    assert len(output_shards) > 2
    # held at once: the source shard being read (mapped), the output shard being filled, the tensor just
    # converted (the embedding, alone in the largest output shard); never the whole model
    bound_mb = 1.1 * (largest_source_shard + max_shard + max(output_shards)) / 2**20
    assert growth_mb <= bound_mb, f"converting grew RSS by {growth_mb:.0f} MB, bound {bound_mb:.0f} ({converting})"
    assert bound_mb < 0.9 * sum(path.stat().st_size for path in source.glob("*.safetensors")) / 2**20
    folder_mb = sum(output_shards) / 2**20
    loading = run_probe(str(destination), "bfloat16", "fp8")
    growth_mb = loading["peak_mb"] - loading["rss_before_mb"]
    assert loading["loaded_mb"] > 0.9 * folder_mb  # the whole model really is in memory
    # the weights stay mapped from the files, and the finiteness check reads each page once, so the mapped folder
    # becomes resident; beyond it only the loader's temporaries (measured 15-30 MB), never a second copy of a weight
    slack_mb = max(0.1 * folder_mb, 48)
    assert growth_mb < folder_mb + slack_mb, f"loading grew RSS by {growth_mb:.0f} MB for a {folder_mb:.0f} MB folder"
