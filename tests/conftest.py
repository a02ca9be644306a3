"""Shared fixtures: the tiny model loaded once in float32, and helpers to derive model folders."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest

# Tests run the flow head eagerly unless they ask for compiling (tests/test_compile.py): compiling costs a minute
# per shape on a small CPU. Set before torch is imported; subprocesses (CLI, ComfyUI) inherit it.
os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")

import torch.nn.functional as F  # noqa: E402
from goldens import TINY_MODEL  # noqa: E402
from model_folders import copy_model  # noqa: E402
from sdpa_layouts import LAYOUTS, sdpa_with_cuda_layout  # noqa: E402

from nextstep_runtime import NextStepPipeline  # noqa: E402


@pytest.fixture(autouse=True)
def no_emulated_package_outlives_its_test():
    """A test that puts an emulated flash-attn on the path (broken_installs.py) imports it: forget it afterwards, so
    the next test sees this machine's own install."""
    before = set(sys.modules)
    yield
    for name in [name for name in sys.modules if name.partition(".")[0] == "flash_attn" and name not in before]:
        del sys.modules[name]


@pytest.fixture(scope="session")
def tiny_pipeline() -> NextStepPipeline:
    return NextStepPipeline.from_pretrained(TINY_MODEL, device="cpu", dtype="float32")


@pytest.fixture
def model_copy(tmp_path: Path) -> Path:
    """A writable copy of the tiny model folder (tokenizer, config, weights, vae/)."""
    return copy_model(tmp_path / "tiny-nextstep")


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch) -> Path:
    """An empty Hugging Face cache, made huggingface_hub's own (what HF_HUB_CACHE sets at its import)."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture(params=LAYOUTS, ids=lambda layout: f"sdpa-{layout}-layout")
def sdpa_layout(request, monkeypatch) -> str:
    """SDPA's output as the CPU returns it, or with the strides CUDA's kernels give it (sdpa_layouts.py), so the
    goldens also run as an NVIDIA GPU lays out attention outputs."""
    if request.param == "cuda":
        monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa_with_cuda_layout)
    return request.param
