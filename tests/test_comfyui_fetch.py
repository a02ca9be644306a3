"""In a real ComfyUI, a released model not on disk is listed, and the template's run fetches it from a loopback
stand-in for the Hugging Face Hub (the tiny model as NextStep-1.1: float32, several shards) into models/nextstep/
NextStep-1.1/; a Cancel midway keeps what arrived and the next run fetches only the rest, then generates the golden.

The server comes from comfyui_server.py: skipped locally unless COMFYUI_DIR names a ComfyUI checkout, failed under
CI when it does not."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import torch
from browser_page import launched_chromium, open_page
from comfyui_server import running_comfyui
from fixture_workflows import workflow
from goldens import TINY_MODEL, golden_cases
from hub_server import HubRepo, HubServer
from model_folders import add_tensors, rewrite_weights

from nextstep_runtime import images_to_unit, to_uint8
from nextstep_runtime.weights.fetch import DOWNLOAD_RECORDS

NAME = "NextStep-1.1"
REPO = "stepfun-ai/NextStep-1.1"
COMMIT = "fedcba9876543210fedcba9876543210fedcba98"
CASE = next(case for case in golden_cases() if case.name == "official_t2i_sde")
WAIT_S = 120


def served(tmp_path: Path) -> HubRepo:
    """The tiny model in three float32 shards, one of them 25 MB (an unused tensor) sent slowly enough to cancel."""
    folder = tmp_path / "served"
    shutil.copytree(TINY_MODEL, folder)
    add_tensors(folder, {"padding": torch.zeros(25 * 1024 * 1024 // 4)})
    rewrite_weights(folder, shards=3)
    repo = HubRepo.from_folder(REPO, COMMIT, folder, {"README.md": b"# tiny\n"})
    repo.paced.add(max(repo.files, key=lambda name: len(repo.files[name])))
    return repo


def template_run(prefix: str) -> dict:
    """The NextStep-1.1 template with its own model names (as shipped), the golden case's settings."""
    prompt = workflow("nextstep_1.1_text_to_image", CASE.params, prefix)
    for node in prompt.values():
        if node["class_type"] == "NextStepModelLoader":
            node["inputs"].update(model_name=NAME, dtype="float32")
        if node["class_type"] == "NextStepVAELoader":
            node["inputs"]["vae_name"] = f"{NAME}/vae"
    return prompt


def test_a_run_fetches_the_absent_model_and_a_cancel_keeps_what_arrived(tmp_path: Path) -> None:
    repo = served(tmp_path)
    big = next(iter(repo.paced))
    (tmp_path / "comfyui").mkdir()
    with HubServer(repo) as endpoint:
        env = {"HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_XET": "1",
               "HF_HUB_OFFLINE": None, "HF_HUB_CACHE": None, "HF_TOKEN": None}
        base = tmp_path / "base"  # ComfyUI's own models folder is base/models (its --base-directory)
        (base / "custom_nodes").mkdir(parents=True)
        with running_comfyui(tmp_path / "comfyui", env=env, args=("--base-directory", str(base))) as comfy:
            assert (base / "models" / "nextstep").is_dir()  # made by the pack, so users see where models go
            target = comfy.models / NAME  # the first nextstep folder (extra_model_paths.yaml's)
            _, info = comfy.request("/object_info/NextStepModelLoader")
            assert NAME in info["NextStepModelLoader"]["input"]["required"]["model_name"][0]
            assert not target.exists()

            prompt_id = comfy.submit(template_run("fetch/cancelled"))
            deadline = time.monotonic() + WAIT_S
            partial = target / DOWNLOAD_RECORDS
            while not any(path.stat().st_size for path in partial.glob(f"{big}.*.incomplete")):
                assert time.monotonic() < deadline, comfy.log_tail()
                time.sleep(0.05)
            assert comfy.request("/interrupt", {})[0] == 200
            entry = comfy.wait(prompt_id)
            assert "execution_interrupted" in dict(entry["status"]["messages"]), entry["status"]
            (kept,) = partial.glob(f"{big}.*.incomplete")
            arrived = kept.stat().st_size
            assert 0 < arrived < len(repo.files[big]) and not (target / "config.json").exists()
            complete = {path.relative_to(target).as_posix() for path in target.rglob("*")
                        if path.is_file() and ".cache" not in path.parts}
            assert complete and big not in complete

            repo.requests.clear()
            repo.paced.clear()
            saved = comfy.run(template_run("fetch/complete"))
            assert not complete & repo.fetched()  # what had arrived is not fetched again
            assert complete | repo.fetched() == set(repo.files) - {"README.md"}
            (continued,) = [rng for method, name, rng in repo.requests if method == "GET" and name == big]
            assert continued == f"bytes={arrived}-"
            assert (target / big).read_bytes() == repo.files[big]
            log = comfy.log.read_text()
            assert "NextStep: fetching stepfun-ai/NextStep-1.1" in log
            assert f"Requested to load {NAME}" in log and "_Managed" not in log  # the console names the model
    expected = to_uint8(images_to_unit(CASE.expected["images"]))[0].movedim(0, -1).numpy()
    assert np.abs(saved.astype(int) - expected.astype(int)).max() <= 1


def test_the_loader_panel_states_what_a_run_will_fetch_and_where(tmp_path: Path) -> None:
    """In a real browser: picking the absent NextStep-1.1 in the loader shows the repo, the bytes to fetch, the
    folder and the disk's free space (GET /nextstep/plan's `fetch`), before anything is fetched."""
    repo = served(tmp_path)
    runtime = sum(len(data) for name, data in repo.files.items() if name != "README.md")
    (tmp_path / "comfyui").mkdir()
    with HubServer(repo) as endpoint:
        env = {"HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_XET": "1",
               "HF_HUB_OFFLINE": None, "HF_HUB_CACHE": None, "HF_TOKEN": None}
        with running_comfyui(tmp_path / "comfyui", env=env) as comfy, launched_chromium() as browser:
            page = open_page(browser, comfy, "canvas")
            (loader,) = page.new_graph(["NextStepModelLoader"])
            page.pick(loader, "model_name", NAME)
            page.page.wait_for_function("id => app.graph.getNodeById(id).widgets.find(w => w.name === "
                                        "'nextstep_plan').element.innerText.includes('not on disk')", arg=loader)
            page.screenshot("fetch-panel", whole_graph=True)
            lines = page.panel(loader, "nextstep_plan").splitlines()
            assert lines[0] == f"not on disk: Run fetches {runtime / 1e6:.1f} MB"
            assert lines[1].startswith(f"{REPO} · ") and lines[1].endswith(" GB free")
            assert lines[2] == f"into {comfy.models / NAME}"
            assert not repo.fetched() and not (comfy.models / NAME).exists()
