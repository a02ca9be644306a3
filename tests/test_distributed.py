"""NextStep workflows made distributed with ComfyUI-Distributed, on a real master and a real worker ComfyUI.

Two CPU servers on loopback, each with this pack, the fixture model and its own copy of the extension
(comfyui_distributed.py); runs are queued through the master's /distributed/queue as the extension's Queue
button does. The worker must return the image a plain run with seed S+1 makes, pixel for pixel; the plain
runs for comparison are queued on the master itself. Skipped locally without COMFYUI_DIR or
COMFYUI_DISTRIBUTED_DIR, failed under CI.
"""

from __future__ import annotations

import shutil
import time

import numpy as np
import pytest
from comfyui_distributed import NODE_DEFINITIONS, distributed, queue, running_distributed, set_workers
from comfyui_server import ComfyUI, free_port
from fixture_workflows import workflow
from front_end_layout import layout
from goldens import FIXTURES, golden_cases

CASES = {case.name: case.params for case in golden_cases()}


@pytest.fixture(scope="module")
def worker(tmp_path_factory) -> ComfyUI:
    with running_distributed(tmp_path_factory.mktemp("worker")) as server:
        yield server


@pytest.fixture(scope="module")
def master(tmp_path_factory, worker) -> ComfyUI:
    with running_distributed(tmp_path_factory.mktemp("master")) as server:
        yield server


def port(server: ComfyUI) -> int:
    return int(server.url.rsplit(":", 1)[1])


def logs(master: ComfyUI, worker: ComfyUI) -> str:
    return f"--- master log ---\n{master.log_tail()}\n--- worker log ---\n{worker.log_tail()}"


def run_distributed(master: ComfyUI, worker: ComfyUI, prompt: dict, worker_ids: list[str]) -> tuple[dict, float]:
    """Queue a distributed prompt with one live worker among `worker_ids`; the master's finished history entry
    and how long the master took to queue it (probing, media sync and dispatch to the workers)."""
    started = time.monotonic()
    prompt_id, worker_count = queue(master, prompt, worker_ids)
    queued_in = time.monotonic() - started
    assert worker_count == 1, f"sent to {worker_count} workers\n{logs(master, worker)}"
    return master.wait(prompt_id), queued_in


def assert_images_are_plain_runs(master: ComfyUI, worker: ComfyUI, entry: dict, name: str, case: dict,
                                 prefix: str) -> None:
    """The master's history holds its own image first, then the worker's: each equal, pixel for pixel, to a
    plain run of `name` with its seed, S and S+1."""
    images = master.saved_images(entry)
    assert len(images) == 2, f"{len(images)} images came back\n{logs(master, worker)}"
    for index, image in enumerate(images):
        seed = case["seed"] + index
        plain = master.run(workflow(name, case, f"{prefix}/plain-{seed}", seed=seed))
        assert np.array_equal(image, plain), f"image {index} is not seed {seed}'s\n{logs(master, worker)}"


def worker_prompt(master: ComfyUI, worker: ComfyUI, entry: dict) -> dict:
    """The prompt the worker ran for the master's run `entry`, found by the collector's job id."""
    def job_id(prompt: dict) -> str:
        (collector,) = [node["inputs"] for node in prompt.values() if node["class_type"] == "DistributedCollector"]
        return collector["multi_job_id"]
    _, history = worker.request("/history")
    ran = [item["prompt"][2] for item in history.values() if item["status"]["status_str"] == "success"]
    matches = [prompt for prompt in ran if job_id(prompt) == job_id(entry["prompt"][2])]
    assert len(matches) == 1, f"the worker ran this job {len(matches)} times\n{logs(master, worker)}"
    return matches[0]


def test_node_definitions_match_the_running_extension(master):
    """The definitions the example-workflow tests check the distributed example against are the extension's."""
    _, info = master.request("/object_info")
    for name, expected in NODE_DEFINITIONS.items():
        inputs = info[name]["input"]
        assert layout({**inputs["required"], **inputs.get("optional", {})}, info[name]["output"]) == expected, name


def test_master_and_worker_images_are_plain_runs_with_seeds_s_and_s_plus_1(master, worker):
    case = CASES["official_t2i_sde"]
    set_workers(master, {"1": port(worker)})
    prompt = distributed(workflow("nextstep_1.1_text_to_image", case, "distributed/t2i"))
    entry, _ = run_distributed(master, worker, prompt, ["1"])
    assert_images_are_plain_runs(master, worker, entry, "nextstep_1.1_text_to_image", case, "distributed/t2i")
    (seed_node,) = [node["inputs"] for node in worker_prompt(master, worker, entry).values()
                    if node["class_type"] == "DistributedSeed"]
    assert seed_node == {"seed": case["seed"], "is_worker": True, "worker_id": "worker_0"}  # it adds 0 + 1


def test_edit_workflow_sends_the_master_input_image_to_the_worker(master, worker):
    """The input image is only in the master's input folder; a remote worker gets it before it runs."""
    case = {**CASES["official_edit_sde"], "image": "distributed_edit_input.png"}
    shutil.copy(FIXTURES / "edit_input_64.png", master.input / case["image"])
    assert not (worker.input / case["image"]).exists()
    set_workers(master, {"1": port(worker)})
    prompt = distributed(workflow("nextstep_1_large_edit", case, "distributed/edit"))
    entry, _ = run_distributed(master, worker, prompt, ["1"])
    assert_images_are_plain_runs(master, worker, entry, "nextstep_1_large_edit", case, "distributed/edit")
    assert (worker.input / case["image"]).read_bytes() == (master.input / case["image"]).read_bytes()


def test_a_worker_that_is_down_is_skipped_without_a_wait(master, worker):
    """A configured worker nobody runs is found offline when queueing (its port refuses at once) and left
    out: the live worker still gets seed S+1, and the master does not wait for the dead one."""
    case = CASES["official_t2i_sde"]
    set_workers(master, {"down": free_port(), "1": port(worker)})
    prompt = distributed(workflow("nextstep_1.1_text_to_image", case, "distributed/down"))
    entry, queued_in = run_distributed(master, worker, prompt, ["down", "1"])
    assert_images_are_plain_runs(master, worker, entry, "nextstep_1.1_text_to_image", case, "distributed/down")
    # read after the plain runs: ComfyUI's stdout holds the extension's print()s until its next logging line
    assert "Worker worker down (down) is offline, skipping." in master.log.read_text()
    assert queued_in < 3.0, f"queueing took {queued_in:.1f} s: did the master wait out a probe timeout?"
