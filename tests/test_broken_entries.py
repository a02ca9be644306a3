"""Broken entries among good ones (issue 29, items 3 to 7): a Hugging Face cache path that is a file, snapshots that
are dangling or looping links, folders this user may not read, a FIFO where a config, index or weights file
belongs, links that loop under the VAE folders. Each broken entry is skipped or refused at once, naming it; the
good models around it are still listed and load.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import threading
from pathlib import Path
from typing import Callable

import huggingface_hub.constants
import pytest
from cli_runs import command_error
from goldens import TINY_MODEL, TINY_VAE_FILE
from model_folders import copy_model, rewrite_weights, write_hf_cache
from nodes_pack import load_pack
from permissions import run_unprivileged, unreadable

from nextstep_runtime import ModelFolder, NextStepError, NextStepPipeline, cached_nextstep_repos
from nextstep_runtime.weights.hub import scan_model_cache
from nextstep_runtime.weights.released import RELEASED_MODELS

host = importlib.import_module(f"{load_pack().__name__}.nodes.host")
catalog = importlib.import_module(f"{load_pack().__name__}.nodes.catalog")
COMMITS = {name: f"{index:x}" * 40 for index, name in enumerate(("good", "dangling", "loop", "parent", "other"), 1)}
ANSWER_WITHIN_S = 10


def broken_snapshot(cache: Path, repo: str, commit: str, target: str) -> Path:
    """A cached repo whose snapshot folder is a link to `target` (relative to the snapshots folder)."""
    snapshot = write_hf_cache(cache, repo, TINY_MODEL, commit)
    shutil.rmtree(snapshot)
    snapshot.symlink_to(target)
    return snapshot


def at_once(call: Callable[[], object]) -> BaseException | None:
    """Run `call`, which must finish within ANSWER_WITHIN_S (a FIFO opened for reading would block it for ever);
    what it raised, or None."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(ANSWER_WITHIN_S)
    assert outcome, f"still blocked after {ANSWER_WITHIN_S} s"
    return outcome[0]


# --- the Hugging Face cache ---------------------------------------------------------------------------------------

def test_broken_cached_repos_are_skipped_and_reported_the_good_ones_listed(hf_cache: Path) -> None:
    good = write_hf_cache(hf_cache, "someone/NextStep-good", TINY_MODEL, COMMITS["good"])
    broken = {"someone/dangling": broken_snapshot(hf_cache, "someone/dangling", COMMITS["dangling"], "gone"),
              "someone/loop": broken_snapshot(hf_cache, "someone/loop", COMMITS["loop"], COMMITS["loop"]),
              "someone/parent": broken_snapshot(hf_cache, "someone/parent", COMMITS["parent"], "../snapshots/x/y")}
    (hf_cache / "models--someone--empty" / "snapshots").mkdir(parents=True)  # a download that never started
    scan = scan_model_cache()
    assert cached_nextstep_repos() == {"someone/NextStep-good": good}
    assert set(scan.problems) == set(broken)
    for repo, snapshot in broken.items():
        assert str(snapshot) in scan.problems[repo] and "download the repo again" in scan.problems[repo]
    assert ModelFolder.open("someone/NextStep-good").path == good


@pytest.mark.parametrize("cache", ["a-file", "a-file/hub"])
def test_a_cache_path_that_is_a_file_or_under_one_lists_nothing_and_says_so(tmp_path: Path, monkeypatch,
                                                                            cache: str) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / cache))
    assert cached_nextstep_repos() == {}
    problems = scan_model_cache().problems
    assert problems == ({str(tmp_path / cache): "the Hugging Face cache path (HF_HUB_CACHE or HF_HOME) is not a "
                                                "folder"} if cache == "a-file" else {})
    with pytest.raises(NextStepError, match="is not in the Hugging Face cache"):
        ModelFolder.open("someone/NextStep-good")


def test_an_unreadable_cached_repo_hides_none_of_the_others(hf_cache: Path) -> None:
    write_hf_cache(hf_cache, "a/NextStep-first", TINY_MODEL, COMMITS["good"])
    write_hf_cache(hf_cache, "m/NextStep-locked", TINY_MODEL, COMMITS["other"])
    write_hf_cache(hf_cache, "z/NextStep-last", TINY_MODEL, COMMITS["good"])
    code = ("import json\nfrom nextstep_runtime import cached_nextstep_repos\n"
            "from nextstep_runtime.weights.hub import scan_model_cache\n"
            "print(json.dumps([sorted(cached_nextstep_repos()), scan_model_cache().problems]))")
    with unreadable(hf_cache / "models--m--NextStep-locked"):
        result = run_unprivileged(code, {"HF_HUB_CACHE": str(hf_cache)})
    assert result.returncode == 0, result.stderr
    listed, problems = json.loads(result.stdout)
    assert listed == ["a/NextStep-first", "z/NextStep-last"]
    assert list(problems) == ["m/NextStep-locked"] and "Permission denied" in problems["m/NextStep-locked"]


# --- the loaders' lists -------------------------------------------------------------------------------------------

@pytest.fixture
def search_folders(tmp_path: Path, monkeypatch, hf_cache: Path) -> dict[str, Path]:
    """Empty `nextstep` and `vae` search folders of the pack's own (as outside ComfyUI)."""
    folders = {key: tmp_path / key for key in (host.MODEL_FOLDER_KEY, host.VAE_FOLDER_KEY)}
    for key, folder in folders.items():
        folder.mkdir()
        monkeypatch.setitem(host._fallback_folders, key, [str(folder)])
    return folders


def test_links_that_loop_under_the_vae_folder_are_walked_once(search_folders: dict[str, Path]) -> None:
    vae = search_folders[host.VAE_FOLDER_KEY]
    (vae / "sd").mkdir()
    shutil.copy(TINY_VAE_FILE, vae / "sd" / "mine.safetensors")
    (vae / "itself").symlink_to(".")
    (vae / "sd" / "up").symlink_to("..")
    (vae / "sd" / "deeper").mkdir()
    (vae / "sd" / "deeper" / "again").symlink_to("../../sd")
    names = []
    assert at_once(lambda: names.extend(catalog.vae_names())) is None
    assert [name for name in names if name.split("/")[0] not in RELEASED_MODELS] == ["sd/mine.safetensors"]


def test_an_unreadable_model_folder_hides_none_of_the_others(search_folders: dict[str, Path]) -> None:
    models = search_folders[host.MODEL_FOLDER_KEY]
    for name in ("alpha", "locked", "omega"):
        copy_model(models / name)
    (models / "closed-root").mkdir()
    code = ("import importlib, json, sys\nfrom nodes_pack import load_pack\n"
            "host = importlib.import_module(load_pack().__name__ + '.nodes.host')\n"
            "catalog = importlib.import_module(load_pack().__name__ + '.nodes.catalog')\n"
            f"host._fallback_folders[host.MODEL_FOLDER_KEY] = [sys.argv[-1], {str(models)!r}]\n"
            "print(json.dumps([catalog.model_names(), catalog.model_folder('omega').config.num_hidden_layers]))")
    with unreadable(models / "locked", models / "closed-root"):
        result = run_unprivileged(code.replace("sys.argv[-1]", repr(str(models / "closed-root"))),
                                  {"HF_HUB_CACHE": str(search_folders[host.MODEL_FOLDER_KEY].parent / "hf-cache")})
    assert result.returncode == 0, result.stderr
    names, layers = json.loads(result.stdout)
    assert ([name for name in names if name not in RELEASED_MODELS], layers) == (["alpha", "omega"], 2)


# --- files that are not regular -----------------------------------------------------------------------------------

FIFO_PLACES = {"index": "model.safetensors.index.json", "weights": "model.safetensors", "config": "config.json",
               "tokenizer": "tokenizer.json", "tokenizer-config": "tokenizer_config.json", "vae": "vae/checkpoint.pt"}


def fifo_folder(tmp_path: Path, place: str) -> Path:
    folder = copy_model(tmp_path / f"fifo-{place}")
    if place == "index":
        rewrite_weights(folder, shards=2)
    (folder / FIFO_PLACES[place]).unlink()
    os.mkfifo(folder / FIFO_PLACES[place])
    return folder


@pytest.mark.parametrize("place", FIFO_PLACES)
def test_a_fifo_in_a_model_folder_is_refused_at_once_naming_it(tmp_path: Path, place: str) -> None:
    """Issue 29, item 6: a FIFO as the shard index blocked each plan and doctor request (and the CLI) for ever."""
    folder = fifo_folder(tmp_path, place)
    failure = at_once(lambda: NextStepPipeline.from_pretrained(folder, device="cpu", dtype="float32"))
    fifo = folder / FIFO_PLACES[place]
    expected = (f"{folder} has no config.json" if place == "config" else
                f"{fifo} is a FIFO (named pipe), not a regular file")
    assert isinstance(failure, NextStepError) and expected in str(failure), failure


@pytest.mark.parametrize("place", ["index", "weights"])
def test_cli_plan_of_a_folder_with_a_fifo_is_one_error_line(tmp_path: Path, capsys, place: str) -> None:
    folder = fifo_folder(tmp_path, place)
    lines = []
    assert at_once(lambda: lines.append(command_error(capsys, "plan", str(folder)))) is None
    assert lines[0] == (f"error: {folder / FIFO_PLACES[place]} is a FIFO (named pipe), not a regular file; a model's "
                    f"config, index and weights must be plain files: put the real file there")


def test_a_fifo_vae_file_is_refused_at_once(search_folders: dict[str, Path]) -> None:
    vae = search_folders[host.VAE_FOLDER_KEY]
    os.mkfifo(vae / "pipe.safetensors")
    failure = at_once(lambda: load_pack().NODE_CLASS_MAPPINGS["NextStepVAELoader"]().load("pipe.safetensors"))
    assert isinstance(failure, NextStepError) and "is a FIFO (named pipe)" in str(failure), failure
