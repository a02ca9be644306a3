"""A real ComfyUI server with this pack and the fixture models, for the end-to-end and browser tests.

COMFYUI_DIR names a ComfyUI checkout and COMFYUI_PYTHON the interpreter of its environment (default: this
one); `.ci/setup_comfyui.sh` prepares both. Without them the tests skip locally, but fail under CI (CI set),
so a broken CI setup cannot pass by skipping. Each server runs headless on the CPU on a free loopback port,
with its own custom_nodes (this pack, and copies of any other packs a test gives it), models (an
extra_model_paths.yaml pointing at the fixture models), input, output and user folders.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import pytest
from goldens import FIXTURES
from nodes_pack import MODEL_NAME, ROOT, VAE_FILE
from PIL import Image

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
COMFYUI_PYTHON = os.environ.get("COMFYUI_PYTHON", sys.executable)
IN_CI = os.environ.get("CI", "").lower() not in ("", "0", "false")
PACK_DIR_NAME = "ComfyUI-NextStep"
START_TIMEOUT_S = 180
RUN_TIMEOUT_S = 600
API_WORKFLOWS = ROOT / "example_workflows" / "api"
NO_HUB = {"HF_HUB_OFFLINE": "1"}
"""Test servers never reach the Hugging Face Hub (the loader's panel asks it about released models not on disk);
a test that fetches points its server at the loopback Hub (hub_server.py) and unsets this."""


def missing(reason: str) -> None:
    """Skip the test for want of `reason`, or fail it under CI, where everything must be there."""
    if IN_CI:
        pytest.fail(f"CI must provide this (see .ci/setup_comfyui.sh): {reason}", pytrace=False)
    pytest.skip(reason)


def require_comfyui() -> None:
    """Skip (or under CI fail) a test that needs ComfyUI where COMFYUI_DIR names none."""
    if not COMFYUI_DIR:
        missing("set COMFYUI_DIR to a ComfyUI checkout (and COMFYUI_PYTHON to its interpreter)")


class ComfyUI:
    """A running ComfyUI server and the folders it was given."""

    def __init__(self, url: str, folders: dict[str, Path], log: Path, process: subprocess.Popen) -> None:
        self.url, self.log, self.process = url, log, process
        self.input, self.output, self.models = folders["input"], folders["output"], folders["nextstep"]

    def request(self, path: str, body: dict | None = None) -> tuple[int, object]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                status, text = response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            status, text = error.code, error.read().decode()
        return status, json.loads(text) if text else None

    def failure_message(self, prompt: dict) -> str:
        """Run a workflow that must fail while executing; its error message."""
        entry = self.wait(self.submit(prompt))
        assert entry["status"]["status_str"] == "error", entry["status"]
        (error,) = [data for event, data in entry["status"]["messages"] if event == "execution_error"]
        return error["exception_message"]

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def submit(self, prompt: dict) -> str:
        status, answer = self.request("/prompt", {"prompt": prompt})
        assert status == 200 and not answer["node_errors"], f"{answer}\n{self.log_tail()}"
        return answer["prompt_id"]

    def wait(self, prompt_id: str) -> dict:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while time.monotonic() < deadline:
            _, history = self.request(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id]["status"].get("completed") is not None:
                return history[prompt_id]
            time.sleep(0.2)
        raise AssertionError(f"prompt {prompt_id} did not finish in {RUN_TIMEOUT_S} s\n{self.log_tail()}")

    def run(self, prompt: dict) -> np.ndarray:
        """Run a workflow with one SaveImage and return the saved image as uint8 [H, W, 3]."""
        return self.saved_image(self.wait(self.submit(prompt)))

    def saved_image(self, entry: dict) -> np.ndarray:
        """The one image a finished run saved, as uint8 [H, W, 3]."""
        (image,) = self.saved_images(entry)
        return image

    def saved_images(self, entry: dict) -> list[np.ndarray]:
        """Every image a finished run saved, in the order its history lists them, as uint8 [H, W, 3]."""
        assert entry["status"]["status_str"] == "success", f"{entry['status']}\n{self.log_tail()}"
        saved = [image for output in entry["outputs"].values() for image in output.get("images", [])
                 if image["type"] == "output"]  # previews are "temp"
        return [np.asarray(Image.open(self.output / image["subfolder"] / image["filename"]).convert("RGB"))
                for image in saved]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def running_comfyui(root: Path, settings: dict | None = None, packs: Mapping[str, Path] | None = None,
                    models: Mapping[str, Path] | None = None,
                    env: Mapping[str, str | None] | None = None, args: Sequence[str] = (),
                    comfy_models: Mapping[str, Path] | None = None,
                    preexec: Callable[[], None] | None = None) -> Iterator[ComfyUI]:
    """Start ComfyUI in folders under `root` (user settings `settings`) and stop it afterwards; `models` names more
    model folders for the Model Loader's list, beside the fixture model; `env` changes its environment variables
    (None: unset), as a user's shell may have them (HF_HUB_OFFLINE is set unless `env` unsets it: NO_HUB); `args`:
    more of ComfyUI's command-line options; `comfy_models` maps ComfyUI's own model folders ("checkpoints",
    "controlnet") to a file to list there; `preexec` runs in the server's process before ComfyUI does
    (permissions.py's, to run it as an ordinary user).

    `packs` maps custom-node folder names to other packs (such as ComfyUI-Distributed) to load beside this one:
    each is copied in, not linked, because such packs write their state (ComfyUI-Distributed's gpu_config.json)
    beside their code, and each server must keep its own."""
    require_comfyui()
    folders = {name: root / name for name in ("custom_nodes", "nextstep", "vae", "checkpoints", "controlnet", "input",
                                              "output", "temp", "user")}
    for folder in folders.values():
        folder.mkdir()
    (folders["custom_nodes"] / PACK_DIR_NAME).symlink_to(ROOT)
    for name, source in (packs or {}).items():
        shutil.copytree(source, folders["custom_nodes"] / name, symlinks=True)
    for name, folder in {MODEL_NAME: FIXTURES / MODEL_NAME, **(models or {})}.items():
        (folders["nextstep"] / name).symlink_to(folder)
    (folders["vae"] / VAE_FILE).symlink_to(FIXTURES / VAE_FILE)
    for folder, file in (comfy_models or {}).items():
        (folders[folder] / file.name).symlink_to(file)
    shutil.copy(FIXTURES / "edit_input_64.png", folders["input"])
    (folders["user"] / "default").mkdir()
    # A new user gets the template browser over the canvas; mark the tutorial as done.
    (folders["user"] / "default" / "comfy.settings.json").write_text(
        json.dumps({"Comfy.TutorialCompleted": True, **(settings or {})}))
    extra_paths = root / "extra_model_paths.yaml"
    extra_paths.write_text(f"nextstep_e2e:\n  base_path: {root}\n  nextstep: nextstep\n  vae: vae\n"
                           f"  checkpoints: checkpoints\n  controlnet: controlnet\n  custom_nodes: custom_nodes\n")
    port = free_port()
    log = root / "comfyui.log"
    # --log-stdout: ComfyUI's log lines share stdout with what packs print() (ComfyUI-Distributed logs so), and
    # each log line flushes it, so printed lines reach the log file in order, not only when the server exits
    command = [COMFYUI_PYTHON, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--log-stdout",
               "--disable-auto-launch", "--extra-model-paths-config", str(extra_paths),
               "--input-directory", str(folders["input"]), "--output-directory", str(folders["output"]),
               "--temp-directory", str(folders["temp"]), "--user-directory", str(folders["user"]),
               "--database-url", "sqlite:///:memory:", "--disable-api-nodes", "--disable-all-custom-nodes",
               "--whitelist-custom-nodes", PACK_DIR_NAME, *(packs or {}), "--preview-method", "latent2rgb", *args]
    with open(log, "w") as log_file:
        changed = {**os.environ, **NO_HUB, **(env or {})}
        process = subprocess.Popen(command, cwd=COMFYUI_DIR, stdout=log_file, stderr=subprocess.STDOUT,
                                   env={name: value for name, value in changed.items() if value is not None},
                                   preexec_fn=preexec)
    server = ComfyUI(f"http://127.0.0.1:{port}", folders, log, process)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert process.poll() is None, f"ComfyUI exited with {process.returncode}\n{server.log_tail()}"
            assert time.monotonic() < deadline, f"ComfyUI did not answer in {START_TIMEOUT_S} s\n{server.log_tail()}"
            try:
                if server.request("/object_info/NextStepSampler")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


def example_prompt(name: str) -> dict:
    """An example workflow in API format."""
    return json.loads((API_WORKFLOWS / f"{name}.json").read_text())
