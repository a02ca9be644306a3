"""Fetching a released model from the graph: listed before it is on disk, fetched by the loaders into
models/nextstep/<name>/ from a loopback stand-in for the Hub (the tiny model in the real layout: float32, several
shards), resumed byte by byte after a cancel, refused before any byte on a disk too small, a user's file kept."""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from goldens import TINY_MODEL, assert_matches_golden, golden_cases, settings_for
from hub_server import HubRepo, HubServer
from model_folders import add_tensors, rewrite_weights
from nodes_pack import load_pack

from nextstep_runtime import NextStepError, NextStepPipeline
from nextstep_runtime.weights.fetch import DOWNLOAD_RECORDS, fetch_model, list_runtime_files, plan_fetch

REPO = "stepfun-ai/NextStep-1.1"
NAME = "NextStep-1.1"
COMMIT = "89abcdef0123456789abcdef0123456789abcdef"
CASE = next(case for case in golden_cases() if case.name == "official_t2i_cps_nocfg")
PACK = load_pack()
NODES = PACK.NODE_CLASS_MAPPINGS
host = importlib.import_module(f"{PACK.__name__}.nodes.host")
catalog = importlib.import_module(f"{PACK.__name__}.nodes.catalog")
fetching = importlib.import_module(f"{PACK.__name__}.nodes.fetching")
routes = importlib.import_module(f"{PACK.__name__}.nodes.routes")
SHARDS = 3


class Cancelled(Exception):
    """What ComfyUI's Cancel raises from a progress callback, as far as the fetch can tell."""


@pytest.fixture(scope="module")
def served_folder(tmp_path_factory) -> Path:
    """The tiny model, float32, in three shards with an index (as the released repos are laid out); one shard holds
    12 MB of an unused tensor, so it arrives in more than one chunk and a cancel can stop it half-way."""
    folder = tmp_path_factory.mktemp("served") / "tiny"
    shutil.copytree(TINY_MODEL, folder)
    add_tensors(folder, {"padding": torch.zeros(3 * 1024 * 1024)})
    rewrite_weights(folder, shards=SHARDS)
    return folder


@pytest.fixture
def hub(served_folder: Path, monkeypatch):
    """The served model as the Hub repo stepfun-ai/NextStep-1.1 (with the code and readme real repos carry),
    huggingface_hub pointed at it."""
    code = b'raise RuntimeError("downloaded code was executed")\n'
    repo = HubRepo.from_folder(REPO, COMMIT, served_folder, {"nextstep_pipeline.py": code, "README.md": b"# tiny\n"})
    with HubServer(repo) as endpoint:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
        monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        yield repo


@pytest.fixture
def models(tmp_path: Path, monkeypatch) -> Path:
    """An empty models/nextstep folder, the only one the pack's loaders search."""
    folder = tmp_path / "models" / host.MODEL_FOLDER_KEY
    folder.mkdir(parents=True)
    monkeypatch.setattr(host, "_fallback_folders", {host.MODEL_FOLDER_KEY: [str(folder)], host.VAE_FOLDER_KEY: []})
    return folder


def runtime_files(repo: HubRepo) -> set[str]:
    return {name for name in repo.files if not name.endswith((".py", ".md"))}


def folder_files(folder: Path) -> set[str]:
    return {path.relative_to(folder).as_posix() for path in folder.rglob("*")
            if path.is_file() and ".cache" not in path.parts}


def generate(folder: Path) -> dict[str, torch.Tensor]:
    pipe = NextStepPipeline.from_pretrained(folder, device="cpu", dtype="float32")
    result = pipe.generate(CASE.params["caption"], settings_for(CASE))
    return {"tokens": result.tokens, "latents": result.latents, "images": result.images}


def test_released_models_are_listed_before_they_are_on_disk(models: Path) -> None:
    names = NODES["NextStepModelLoader"].INPUT_TYPES()["required"]["model_name"][0]
    assert names[-4:] == ["NextStep-1.1", "NextStep-1-Large", "NextStep-1-Large-Edit", "NextStep-1.1-W4A16-AutoRound"]
    vaes = NODES["NextStepVAELoader"].INPUT_TYPES()["required"]["vae_name"][0]
    assert {"NextStep-1.1/vae", "NextStep-1-Large-Edit/vae"} <= set(vaes)
    assert not any(models.iterdir())  # listing fetches nothing


def test_a_run_of_an_absent_model_fetches_it_and_generates(hub: HubRepo, models: Path) -> None:
    (models / NAME).mkdir()
    (models / NAME / "my notes.txt").write_text("mine")  # a user's file in the target folder
    vae = NODES["NextStepVAELoader"]().load(f"{NAME}/vae")[0]  # the VAE loader fetches the model its VAE is in
    assert vae.path == models / NAME / "vae"
    assert folder_files(models / NAME) == runtime_files(hub) | {"my notes.txt"}
    assert (models / NAME / "my notes.txt").read_text() == "mine"
    assert hub.fetched() == runtime_files(hub)  # never the code or the readme
    assert len([name for name in hub.fetched() if name.startswith("model-")]) == SHARDS
    assert NAME not in catalog.absent_released_models() and catalog.model_names()[0] == NAME
    before = len(hub.requests)
    NODES["NextStepModelLoader"]().load(NAME, "float32", "sdpa")  # complete: nothing fetched again
    assert len(hub.requests) == before
    assert_matches_golden(CASE, generate(models / NAME))


def test_a_cancel_keeps_what_arrived_and_the_next_run_continues(hub: HubRepo, models: Path) -> None:
    files = list_runtime_files(REPO)
    big = max(files.sizes, key=files.sizes.get)
    seen: list[tuple[int, int]] = []

    def cancel_mid_file(done: int, total: int) -> None:
        seen.append((done, total))
        if any(path.stat().st_size for path in (models / NAME / DOWNLOAD_RECORDS).glob(f"{big}.*.incomplete")):
            raise Cancelled

    with pytest.raises(Cancelled):
        fetch_model(REPO, models / NAME, cancel_mid_file, announce=lambda line: None)
    assert all(total == files.total for _, total in seen) and seen[-1][0] > seen[0][0]
    assert NAME in catalog.absent_released_models()  # incomplete: config.json comes last
    assert "config.json" not in folder_files(models / NAME)
    plan = plan_fetch(files, models / NAME)
    assert 0 < plan.arrived < files.sizes[big] and big in plan.missing
    kept = set(folder_files(models / NAME))

    hub.requests.clear()
    lines: list[str] = []
    fetch_model(REPO, models / NAME, lambda done, total: seen.append((done, total)), announce=lines.append)
    (line,) = lines
    assert f"{len(plan.missing)} of {len(files.sizes)} files" in line and str(models / NAME) in line
    assert hub.fetched() == set(plan.missing)  # only what was missing, nothing that had arrived
    assert not kept & hub.fetched()
    (continued,) = [rng for method, name, rng in hub.requests if method == "GET" and name == big]
    assert continued == f"bytes={plan.arrived}-"
    assert seen[-1] == (files.total, files.total)
    assert (models / NAME / big).read_bytes() == hub.files[big]
    assert not list((models / NAME / DOWNLOAD_RECORDS).rglob("*.incomplete"))
    assert_matches_golden(CASE, generate(models / NAME))


def test_a_disk_too_small_is_refused_before_any_byte(hub: HubRepo, models: Path, monkeypatch) -> None:
    total = list_runtime_files(REPO).total
    real_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda path: real_usage(path)._replace(free=total - 1))  # one byte short
    hub.requests.clear()
    with pytest.raises(NextStepError) as refused:
        NODES["NextStepModelLoader"]().load(NAME, "float32", "sdpa")
    assert str(refused.value) == (
        f"fetching {REPO} into {models / NAME} needs {total / 1e6:.1f} MB of free disk space, but {models} has "
        f"{(total - 1) / 1e6:.1f} MB free; free some space (or put the model folders on a larger disk with "
        f"extra_model_paths.yaml), then run again")
    assert not hub.fetched() and not (models / NAME).exists()


def test_a_users_file_the_fetch_would_overwrite_is_refused_and_kept(hub: HubRepo, models: Path) -> None:
    (models / NAME / "vae").mkdir(parents=True)
    (models / NAME / "vae" / "config.json").write_text("{}")
    hub.requests.clear()
    with pytest.raises(NextStepError, match=r"already holds vae/config.json, not written by a download there; "
                                             r"downloading would overwrite or mix with them"):
        NODES["NextStepModelLoader"]().load(NAME, "float32", "sdpa")
    assert (models / NAME / "vae" / "config.json").read_text() == "{}" and not hub.fetched()


def test_the_hub_unreachable_is_one_line_naming_the_retry(models: Path, monkeypatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://nextstep-no-such-host.invalid")
    with pytest.raises(NextStepError, match=rf"^downloading {REPO} failed \(.*\); run again to continue where it "
                                            r"stopped$"):
        fetching.fetch_if_absent(NAME)


def test_the_plan_route_states_what_a_run_will_fetch_and_where(hub: HubRepo, models: Path) -> None:
    files = list_runtime_files(REPO)
    status, answer = routes.plan_response({"model": NAME})
    assert status == 200
    fetch = answer["fetch"]
    assert {key: fetch[key] for key in ("repo", "folder", "total_bytes", "to_fetch_bytes", "problem")} == {
        "repo": REPO, "folder": str(models / NAME), "total_bytes": files.total, "to_fetch_bytes": files.total,
        "problem": None}
    assert abs(fetch["free_bytes"] - shutil.disk_usage(models).free) < 1e8  # the disk's, give or take other writers
    assert not hub.fetched() and not (models / NAME).exists()  # stating it transfers nothing

    def cancel_after_the_first_chunk(done: int, total: int) -> None:
        if any(path.stat().st_size for path in (models / NAME / DOWNLOAD_RECORDS).rglob("*.incomplete")):
            raise Cancelled

    with pytest.raises(Cancelled):
        fetch_model(REPO, models / NAME, cancel_after_the_first_chunk, announce=lambda line: None)
    arrived = plan_fetch(files, models / NAME)
    assert routes.plan_response({"model": NAME})[1]["fetch"]["to_fetch_bytes"] == arrived.to_fetch < files.total


def test_the_plan_route_names_what_stops_a_fetch(models: Path, monkeypatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://nextstep-no-such-host.invalid")
    status, answer = routes.plan_response({"model": NAME})
    assert status == 200 and answer["fetch"]["total_bytes"] is None
    assert answer["fetch"]["problem"].startswith(f"listing {REPO} failed (")
    assert answer["fetch"]["problem"].endswith("; its size is unknown until the Hub answers")
