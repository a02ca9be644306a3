"""A real ComfyUI whose model folders and Hugging Face cache hold broken entries (issue 29, items 3 to 7): the
loaders still list every good model, every route answers within seconds, and a workflow on a good model runs.

Two servers: one whose cache holds a good NextStep repo beside a dangling snapshot, a looping one and a repo folder
it may not read, and whose `nextstep` folder holds a folder it may not read and folders with a FIFO as shard index
or weights; one whose HF_HUB_CACHE names a file. Both run as an ordinary user (permissions.py), as ComfyUI does.
"""

from __future__ import annotations

import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from comfyui_server import ComfyUI, running_comfyui
from fixture_workflows import workflow
from goldens import TINY_MODEL, golden_cases
from model_folders import copy_model, rewrite_weights, write_hf_cache
from nodes_pack import MODEL_NAME
from permissions import unprivileged, unreadable
from safetensors.torch import load_file, save_file

from nextstep_runtime.weights.released import RELEASED_MODELS

CASE = {case.name: case for case in golden_cases()}["official_t2i_cps_nocfg"].params
CACHED = "someone/NextStep-cached"
COMMIT = "00ff" * 10
ANSWER_WITHIN_S = 5.0
NAN_TENSOR = "layers.0.self_attn.v_proj.weight"
FIFO_REQUESTS = 6
"""More plan and doctor requests on FIFO folders than the route workers (two): none may hold one."""


def fifo_model(root: Path, name: str, place: str) -> Path:
    folder = copy_model(root / name)
    if place == "model.safetensors.index.json":
        rewrite_weights(folder, shards=2)
    (folder / place).unlink()
    os.mkfifo(folder / place)
    return folder


@pytest.fixture(scope="module")
def broken(tmp_path_factory) -> tuple[ComfyUI, Path]:
    """The server with broken entries among good ones, and its `nextstep` folder."""
    root = tmp_path_factory.mktemp("broken-folders")
    cache = root / "hub"
    write_hf_cache(cache, CACHED, TINY_MODEL, COMMIT)
    for repo, target in (("someone/dangling", "../../models--nobody--here/snapshots/1"), ("someone/loop", "loop")):
        snapshot = write_hf_cache(cache, repo, TINY_MODEL, COMMIT)
        shutil.rmtree(snapshot)
        snapshot.symlink_to(target)
    write_hf_cache(cache, "someone/NextStep-locked", TINY_MODEL, COMMIT)
    nan_weights = copy_model(root / "nan-weights")
    tensors = load_file(nan_weights / "model.safetensors")
    tensors[NAN_TENSOR][1, 2] = float("nan")
    save_file(tensors, nan_weights / "model.safetensors", metadata={"format": "pt"})
    models = {"locked": copy_model(root / "locked"), "nan-weights": nan_weights,
              "fifo-index": fifo_model(root, "fifo-index", "model.safetensors.index.json"),
              "fifo-weights": fifo_model(root, "fifo-weights", "model.safetensors")}
    locked = (cache / "models--someone--NextStep-locked", root / "locked")
    with unreadable(*locked), running_comfyui(tmp_path_factory.mktemp("comfyui"), models=models,
                                              env={"HF_HUB_CACHE": str(cache)}, preexec=unprivileged()) as server:
        yield server


@pytest.fixture(scope="module")
def cache_file(tmp_path_factory) -> ComfyUI:
    cache = tmp_path_factory.mktemp("cache-file") / "hub"
    cache.write_text("")
    with running_comfyui(tmp_path_factory.mktemp("comfyui"), env={"HF_HUB_CACHE": str(cache)},
                         preexec=unprivileged()) as server:
        yield server


def answered(comfy: ComfyUI, path: str) -> tuple[int, dict]:
    start = time.monotonic()
    status, body = comfy.request(path)
    assert time.monotonic() - start < ANSWER_WITHIN_S, path
    return status, body


def choices(comfy: ComfyUI, node: str, widget: str) -> list[str]:
    status, info = answered(comfy, f"/object_info/{node}")
    assert status == 200, info
    return info[node]["input"]["required"][widget][0]


def run_on(comfy: ComfyUI, model: str, vae: str, prefix: str) -> None:
    prompt = workflow("nextstep_1.1_text_to_image", CASE, prefix)
    for node in prompt.values():
        if node["class_type"] == "NextStepModelLoader":
            node["inputs"]["model_name"] = model
        if node["class_type"] == "NextStepVAELoader":
            node["inputs"]["vae_name"] = vae
    image = comfy.run(prompt)
    assert image.std() > 0


def test_broken_entries_leave_the_good_models_listed(broken) -> None:
    models = choices(broken, "NextStepModelLoader", "model_name")
    # listed by config.json alone, then the released models, fetched by a run
    assert models == ["fifo-index", "fifo-weights", "nan-weights", MODEL_NAME, CACHED, *RELEASED_MODELS]
    assert f"{CACHED}/vae" in choices(broken, "NextStepVAELoader", "vae_name")


def test_fifo_folders_are_refused_at_once_and_hold_no_worker(broken) -> None:
    """Issue 29, item 6: two requests on a FIFO index held both route workers, and every later one hung."""
    paths = [f"/nextstep/plan?model={name}" for name in ("fifo-index", "fifo-weights")] * (FIFO_REQUESTS // 2)
    with ThreadPoolExecutor(FIFO_REQUESTS + 1) as pool:
        answers = list(pool.map(lambda path: answered(broken, path), paths + ["/nextstep/doctor"]))
    for path, (status, answer) in zip(paths, answers):
        name = path.rpartition("=")[2]
        assert status == 422 and "is a FIFO (named pipe), not a regular file" in answer["error"], answer
        assert name in answer["error"]
    status, report = answers[-1]
    assert status == 200 and list(report["hf_cache"]["nextstep_repos"]) == [CACHED]
    assert set(report["hf_cache"]["problems"]) == {"someone/dangling", "someone/loop", "someone/NextStep-locked"}
    status, plan = answered(broken, f"/nextstep/plan?model={MODEL_NAME}")
    assert status == 200 and plan["fits"] is not False


def test_links_that_loop_under_models_vae_do_not_block_the_vae_list(broken) -> None:
    """Issue 29, item 7 (the pack's own list; ComfyUI's own VAELoader walks such a loop itself)."""
    vae = broken.models.parent / "vae"
    (vae / "itself").symlink_to(".")
    (vae / "sub").mkdir()
    (vae / "sub" / "back").symlink_to("..")
    try:
        names = choices(broken, "NextStepVAELoader", "vae_name")
    finally:
        (vae / "itself").unlink()
        (vae / "sub" / "back").unlink()
    assert [name for name in names if name.endswith(".safetensors")] == ["tiny-nextstep-vae.safetensors"]


def test_non_finite_weights_fail_the_model_loader_naming_file_and_tensor(broken) -> None:
    """Issue 29, item 12: the whole image ran, the Sampler reported success and VAE Decode failed naming neither."""
    prompt = workflow("nextstep_1.1_text_to_image", CASE, "broken/nan")
    for node in prompt.values():
        if node["class_type"] == "NextStepModelLoader":
            node["inputs"]["model_name"] = "nan-weights"
    entry = broken.wait(broken.submit(prompt))
    (error,) = [data for event, data in entry["status"]["messages"] if event == "execution_error"]
    assert error["node_type"] == "NextStepModelLoader", error
    assert f"model.safetensors: tensor '{NAN_TENSOR}' holds NaN or infinite values" in error["exception_message"]
    assert "nan-weights" in error["exception_message"]


def test_a_cached_model_beside_broken_ones_generates(broken) -> None:
    run_on(broken, CACHED, f"{CACHED}/vae", "broken/cached")


def test_a_cache_path_that_is_a_file_hides_no_route_and_no_folder_model(cache_file) -> None:
    """Issue 29, item 3: every route answered 500, the loaders vanished and every prompt failed."""
    assert choices(cache_file, "NextStepModelLoader", "model_name") == [MODEL_NAME, *RELEASED_MODELS]
    assert choices(cache_file, "NextStepVAELoader", "vae_name")
    status, report = answered(cache_file, "/nextstep/doctor")
    assert status == 200 and report["hf_cache"]["nextstep_repos"] == {}
    assert list(report["hf_cache"]["problems"].values()) == [
        "the Hugging Face cache path (HF_HUB_CACHE or HF_HOME) is not a folder"]
    assert answered(cache_file, f"/nextstep/plan?model={MODEL_NAME}")[0] == 200
    run_on(cache_file, MODEL_NAME, f"{MODEL_NAME}/vae", "cache-file/folder")
