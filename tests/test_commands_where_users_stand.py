"""`download` and `doctor` run from any folder with the pack inside a ComfyUI (custom_nodes/ComfyUI-NextStep): they
find that ComfyUI by the pack's own place and use its model folders (extra_model_paths.yaml's first), report the
dtype each folder stores, the 14B models' fit on this machine from the planner, and no GPU-only advice on a CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from goldens import TINY_MODEL
from hub_server import HubRepo, HubServer
from model_folders import copy_model, rewrite_weights

from nextstep_runtime.doctor import render_text
from nextstep_runtime.weights.comfyui_folders import enclosing_comfyui

ROOT = Path(__file__).resolve().parents[1]
REPO = "stepfun-ai/NextStep-tiny"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def comfyui(tmp_path: Path) -> Path:
    """A ComfyUI root (its folder_paths.py) with this pack linked into custom_nodes, and an extra_model_paths.yaml
    whose `nextstep` folder (relative to its base_path) comes before models/nextstep."""
    root = tmp_path / "ComfyUI"
    (root / "custom_nodes").mkdir(parents=True)
    (root / "folder_paths.py").write_text("# ComfyUI's model folder registry\n")
    (root / "custom_nodes" / "ComfyUI-NextStep").symlink_to(ROOT)
    (root / "extra_model_paths.yaml").write_text("shared:\n  base_path: ../shared-models\n  nextstep: |\n"
                                                 "    nextstep\n    more-nextstep\n  vae: vae\n"
                                                 "other:\n  base_path: /elsewhere\n  checkpoints: ckpt\n")
    return root


def run_command(args: list[str], comfyui: Path, cwd: Path, endpoint: str = "http://nextstep-no-such-host.invalid",
                ) -> subprocess.CompletedProcess:
    """`python -m nextstep_runtime ...` from `cwd`, the runtime imported from the pack inside `comfyui`."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}
    env.update(PYTHONPATH=str(comfyui / "custom_nodes" / "ComfyUI-NextStep"), HF_ENDPOINT=endpoint,
               HF_HOME=str(cwd / "hf-home"), HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1")
    return subprocess.run([sys.executable, "-m", "nextstep_runtime", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_the_enclosing_comfyui_and_its_model_folders_in_search_order(comfyui: Path, tmp_path: Path) -> None:
    pack = comfyui / "custom_nodes" / "ComfyUI-NextStep"
    install = enclosing_comfyui(pack)
    assert install.root == comfyui
    shared = comfyui.parent / "shared-models"
    assert install.model_folders == (shared / "nextstep", shared / "more-nextstep", comfyui / "models" / "nextstep")
    (comfyui / "extra_model_paths.yaml").write_text("a:\n  base_path: /a\n  nextstep: n\n"
                                                    "b:\n  base_path: /b\n  is_default: true\n  nextstep: n\n")
    assert enclosing_comfyui(pack).model_folders == (Path("/b/n"), Path("/a/n"), comfyui / "models" / "nextstep")
    (comfyui / "extra_model_paths.yaml").unlink()
    assert enclosing_comfyui(pack).model_folders == (comfyui / "models" / "nextstep",)
    assert enclosing_comfyui(ROOT) is None  # a checkout of its own
    (comfyui / "folder_paths.py").unlink()
    assert enclosing_comfyui(pack) is None  # custom_nodes of something that is not a ComfyUI


def test_download_from_any_folder_goes_to_the_comfyui_models_folder(comfyui: Path, tmp_path: Path) -> None:
    repo = HubRepo.from_folder(REPO, COMMIT, TINY_MODEL, {"README.md": b"# tiny\n"})
    elsewhere = tmp_path / "home"
    elsewhere.mkdir()
    with HubServer(repo) as endpoint:
        result = run_command(["download", REPO], comfyui, elsewhere, endpoint)
    assert result.returncode == 0, result.stderr
    target = (comfyui.parent / "shared-models" / "nextstep" / "NextStep-tiny")
    assert Path(result.stdout.strip()) == target and f"into {target}" in result.stderr
    files = {path.relative_to(target).as_posix() for path in target.rglob("*")
             if path.is_file() and ".cache" not in path.parts}
    assert files == {path.relative_to(TINY_MODEL).as_posix() for path in TINY_MODEL.rglob("*") if path.is_file()}
    assert not (elsewhere / "models").exists() and not list((elsewhere / "hf-home").rglob("blobs/*"))  # no cache copy


def test_doctor_from_any_folder_reports_the_comfyui_folders_true_dtypes_and_the_14b_fit(comfyui: Path,
                                                                                       tmp_path: Path) -> None:
    shared = comfyui.parent / "shared-models" / "nextstep"
    shared.mkdir(parents=True)
    copy_model(shared / "tiny-float32")
    rewrite_weights(copy_model(shared / "tiny-bf16"), dtype=torch.bfloat16)
    elsewhere = tmp_path / "home"
    elsewhere.mkdir()
    result = run_command(["doctor", "--json", "--device", "cpu"], comfyui, elsewhere)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["comfyui"] == str(comfyui)
    folders = {Path(root["path"]): root for root in report["model_folders"]}
    assert list(folders) == [shared, shared.parent / "more-nextstep", comfyui / "models" / "nextstep"]
    weights = {entry["name"]: entry["weights"] for entry in folders[shared]["entries"]}
    assert weights == {"tiny-bf16": "bfloat16", "tiny-float32": "float32"}
    capacity = report["nextstep_14b"]
    assert capacity["device"] == "cpu" and capacity["loads_as"] == "float32"
    assert capacity["fits"] == (capacity["needs_bytes"] <= capacity["free_bytes"])
    text = render_text(report)
    assert f"  ComfyUI {comfyui}\n" in text
    assert "    tiny-float32: 0.00B parameters, float32 weights" in text.replace("0.01B", "0.00B")
    assert "14B models (NextStep-1.1, NextStep-1-Large, NextStep-1-Large-Edit) on cpu\n" in text
    assert "pip install flash-attn" not in result.stdout + text  # no GPU here: no advice to install a GPU kernel
    assert "flash-attn runs on CUDA GPUs only" in report["attention"]["flash_attn"]["problem"]
