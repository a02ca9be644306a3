"""ComfyUI-Distributed (robertvoy/ComfyUI-Distributed), the extension users install to run one workflow on
several ComfyUI servers with different seeds: its nodes as the examples use them, how a workflow is made
distributed, and servers that load it, for test_distributed.py and the example-workflow tests.

COMFYUI_DISTRIBUTED_DIR names the extracted extension (`.ci/setup_comfyui.sh` prepares it); without it the
servers skip locally and fail under CI, like COMFYUI_DIR (comfyui_server.missing).
"""

from __future__ import annotations

import contextlib
import copy
import os
import uuid
from pathlib import Path
from typing import Iterator

from comfyui_server import ComfyUI, missing, running_comfyui

PACK_NAME = "ComfyUI-Distributed"  # the folder name: the whitelist and its web files go by it
DISTRIBUTED_DIR = os.environ.get("COMFYUI_DISTRIBUTED_DIR")
# Its two nodes a distributed NextStep workflow uses, as the front-end lays them out (front_end_layout.py), for
# the example-workflow tests without the extension: (socket inputs, widgets in saved order, output types).
# test_distributed.py checks them against the running extension's /object_info.
NODE_DEFINITIONS = {
    "DistributedSeed": ([], ["seed", "seed:control"], ["INT"]),
    "DistributedCollector": (["images", "audio"], ["load_balance"], ["IMAGE", "AUDIO"]),
}


def distributed(prompt: dict) -> dict:
    """An API workflow made distributed as the extension's own examples do it: a DistributedSeed (worker k
    adds k to its seed) feeding the sampler's seed, and a DistributedCollector (the master gathers every
    participant's images) between the decoded images and SaveImage. New nodes take the next free ids."""
    prompt = copy.deepcopy(prompt)
    seed_id, collector_id = (str(max(map(int, prompt)) + offset) for offset in (1, 2))
    (sampler,) = [node["inputs"] for node in prompt.values() if node["class_type"] == "NextStepSampler"]
    (save,) = [node["inputs"] for node in prompt.values() if node["class_type"] == "SaveImage"]
    prompt[seed_id] = {"class_type": "DistributedSeed", "inputs": {"seed": sampler["seed"]},
                       "_meta": {"title": "Distributed Seed"}}
    prompt[collector_id] = {"class_type": "DistributedCollector",
                            "inputs": {"load_balance": False, "images": save["images"]},
                            "_meta": {"title": "Distributed Collector"}}
    sampler["seed"], save["images"] = [seed_id, 0], [collector_id, 0]
    return prompt


@contextlib.contextmanager
def running_distributed(root: Path) -> Iterator[ComfyUI]:
    """A ComfyUI server (comfyui_server.running_comfyui) with its own copy of ComfyUI-Distributed loaded."""
    if not DISTRIBUTED_DIR:
        missing("set COMFYUI_DISTRIBUTED_DIR to the extracted ComfyUI-Distributed (.ci/setup_comfyui.sh)")
    with running_comfyui(root, packs={PACK_NAME: Path(DISTRIBUTED_DIR)}) as server:
        # /object_info/<type> answers {} for an unknown type: a pack that failed to import shows only here
        status, info = server.request("/object_info/DistributedCollector")
        assert status == 200 and "DistributedCollector" in info, f"{PACK_NAME} did not load\n{server.log_tail()}"
        yield server


def set_workers(master: ComfyUI, workers: dict[str, int]) -> None:
    """Make `workers` (id -> loopback port) the master's whole worker list, as its settings panel does.

    They are remote workers: the master sends them its input images (`local` ones share its disk instead)."""
    config = {"workers": [{"id": worker_id, "name": f"worker {worker_id}", "host": "127.0.0.1", "port": port,
                           "enabled": True, "type": "remote"} for worker_id, port in workers.items()],
              "debug": True}  # logs each participant's seed and every collected image
    status, answer = master.request("/distributed/config", config)
    assert status == 200, f"{answer}\n{master.log_tail()}"


def queue(master: ComfyUI, prompt: dict, worker_ids: list[str]) -> tuple[str, int]:
    """Queue `prompt` on the master and the workers `worker_ids`, as the extension's Queue button does;
    (the master's prompt id, how many workers it was sent to)."""
    status, answer = master.request("/distributed/queue", {"prompt": prompt, "client_id": uuid.uuid4().hex,
                                                           "enabled_worker_ids": worker_ids})
    assert status == 200 and not answer.get("node_errors"), f"{answer}\n{master.log_tail()}"
    return answer["prompt_id"], answer["worker_count"]
