"""Hugging Face repo ids: resolved from a real cache layout (API, CLI, ComfyUI loader), and `download` against a
loopback stand-in for the Hub (no internet): only the runtime's files, resumed transfers, a loadable result."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_runs import command_error
from community_folders import community_folder
from goldens import TINY_MODEL, assert_matches_golden, golden_cases, settings_for
from hub_server import HubRepo, HubServer
from model_folders import add_tensors, copy_model, rewrite_weights, write_hf_cache
from nodes_pack import load_pack
from safetensors.torch import load_file

from nextstep_runtime import NextStepError, NextStepPipeline, cached_nextstep_repos, to_uint8
from nextstep_runtime.cli.main import main

REPO = "stepfun-ai/NextStep-tiny"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
CASE = next(case for case in golden_cases() if case.name == "official_t2i_cps_nocfg")
ROOT = Path(__file__).resolve().parents[1]
RUNTIME_FILES = {path.relative_to(TINY_MODEL).as_posix() for path in TINY_MODEL.rglob("*") if path.is_file()}
PACK = load_pack()
NODES = PACK.NODE_CLASS_MAPPINGS
catalog = importlib.import_module(f"{PACK.__name__}.nodes.catalog")


def generate(pipe: NextStepPipeline) -> dict[str, torch.Tensor]:
    result = pipe.generate(CASE.params["caption"], settings_for(CASE))
    return {"tokens": result.tokens, "latents": result.latents, "images": result.images}


def cli_args(model: str, out: Path) -> list[str]:
    return ["generate", "--model", model, "--device", "cpu", "--dtype", "float32", "--out", str(out / "o.png"),
            "--save-tensors", str(out / "o.safetensors"), *CASE.cli_args()]


# --- the cache ----------------------------------------------------------------------------------------------------

def test_repo_id_loads_from_the_cache_through_the_api(hf_cache: Path) -> None:
    snapshot = write_hf_cache(hf_cache, REPO, TINY_MODEL, COMMIT)
    assert (snapshot / "model.safetensors").is_symlink() and (snapshot / "vae" / "checkpoint.pt").is_symlink()
    assert_matches_golden(CASE, generate(NextStepPipeline.from_pretrained(REPO, device="cpu", dtype="float32")))


def test_repo_id_through_the_memory_planner(hf_cache: Path) -> None:
    from nextstep_runtime import ModelFootprint

    write_hf_cache(hf_cache, REPO, TINY_MODEL, COMMIT)
    assert ModelFootprint.from_folder(REPO) == ModelFootprint.from_folder(TINY_MODEL)


def test_repo_id_with_a_revision(hf_cache: Path) -> None:
    write_hf_cache(hf_cache, REPO, TINY_MODEL, COMMIT, ref="v1")
    for name in (f"{REPO}@v1", f"{REPO}@{COMMIT}"):
        assert NextStepPipeline.from_pretrained(name, device="cpu", dtype="float32").model.config.boi == 517
    with pytest.raises(NextStepError, match="not in the Hugging Face cache"):
        NextStepPipeline.from_pretrained(REPO, device="cpu", dtype="float32")  # no main ref


def test_repo_id_through_the_cli(hf_cache: Path, tmp_path: Path) -> None:
    write_hf_cache(hf_cache, REPO, TINY_MODEL, COMMIT)
    assert main(cli_args(REPO, tmp_path)) == 0
    saved = load_file(tmp_path / "o.safetensors")
    assert_matches_golden(CASE, {key: saved[key] for key in ("tokens", "latents", "images", "images_uint8")})


def test_repo_missing_from_the_cache_names_the_download_command(hf_cache: Path, tmp_path: Path, capsys) -> None:
    assert main(cli_args("stepfun-ai/NextStep-1.1", tmp_path)) == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("error: model folder stepfun-ai/NextStep-1.1 does not exist")
    assert "not in the Hugging Face cache" in message and str(hf_cache) in message
    assert "`python -m nextstep_runtime download stepfun-ai/NextStep-1.1`" in message


def test_loaders_list_cached_nextstep_repos_and_load_them(hf_cache: Path) -> None:
    write_hf_cache(hf_cache, REPO, TINY_MODEL, COMMIT)
    other = hf_cache.parent / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    write_hf_cache(hf_cache, "someone/bert-tiny", other, COMMIT)
    assert set(cached_nextstep_repos()) == {REPO}
    assert REPO in NODES["NextStepModelLoader"].INPUT_TYPES()["required"]["model_name"][0]
    assert "someone/bert-tiny" not in catalog.model_names()
    assert f"{REPO}/vae" in NODES["NextStepVAELoader"].INPUT_TYPES()["required"]["vae_name"][0]

    model = NODES["NextStepModelLoader"]().load(REPO, "float32", "sdpa")[0]
    positive = NODES["NextStepTextEncode"]().encode(model, CASE.params["caption"])[0]
    h, w = CASE.params["hw"]
    latent = NODES["NextStepSampler"]().sample(
        model, positive, width=w, height=h, batch_size=1, seed=CASE.params["seed"], steps=CASE.params["num_sampling_steps"],
        cfg=CASE.params["cfg"], cfg_img=1.0, cfg_schedule="constant", timesteps_shift=1.0, sampler=CASE.params["sampler"],
        profile="official", use_norm=CASE.params["use_norm"])[0]
    images = NODES["NextStepVAEDecode"]().decode(NODES["NextStepVAELoader"]().load(f"{REPO}/vae")[0], latent)[0]
    assert_matches_golden(CASE, {"latents": latent["samples"], "images_uint8": to_uint8(images.movedim(-1, 1))})


def test_listing_reads_configs_not_weights(hf_cache: Path) -> None:
    snapshot = write_hf_cache(hf_cache, REPO, TINY_MODEL, COMMIT)
    (snapshot / "model.safetensors").resolve().write_bytes(b"not weights")  # unreadable as safetensors
    assert cached_nextstep_repos() == {REPO: snapshot}


# --- download -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served_folder(tmp_path_factory) -> Path:
    """The tiny model with weights big enough (12 MB of an unused tensor) that huggingface_hub streams them in
    more than one chunk, so a dropped connection leaves a partial transfer to continue."""
    folder = tmp_path_factory.mktemp("served") / "tiny"
    shutil.copytree(TINY_MODEL, folder)
    add_tensors(folder, {"padding": torch.zeros(3 * 1024 * 1024)})
    return folder


def served_repo(folder: Path) -> HubRepo:
    """The model as a Hub repo, with the Python code and readme real repos also carry."""
    code = b'raise RuntimeError("downloaded code was executed")\n'
    return HubRepo.from_folder(REPO, COMMIT, folder, {"models/foo.py": code, "nextstep_pipeline.py": code,
                                                      "README.md": b"# tiny\n"})


def run_cli(args: list[str], endpoint: str, home: Path, offline: bool = False) -> subprocess.CompletedProcess:
    """The CLI as a user runs it, with huggingface_hub pointed at the loopback Hub and a private cache."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(home), HF_HUB_CACHE=str(home / "hub"), HF_HUB_DISABLE_XET="1",
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_OFFLINE="1" if offline else "0")
    return subprocess.run([sys.executable, "-m", "nextstep_runtime", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def test_download_fetches_only_runtime_files_resumes_and_loads(tmp_path: Path, served_folder: Path) -> None:
    repo = served_repo(served_folder)
    repo.cut_once.add("model.safetensors")  # the connection drops half-way through the weights
    with HubServer(repo) as endpoint:
        result = run_cli(["download", REPO], endpoint, tmp_path)
        assert result.returncode == 0, result.stderr
        total = sum(len(repo.files[name]) for name in RUNTIME_FILES)
        assert f"fetching {len(RUNTIME_FILES)} files, {total / 1e6:.1f} MB in all" in result.stderr
        assert repo.fetched() == RUNTIME_FILES  # never *.py or the readme
        ranges = [rng for method, name, rng in repo.requests if method == "GET" and name == "model.safetensors"]
        assert len(ranges) == 2 and ranges[0] is None  # the second GET continues where the first stopped
        resumed_at = int(ranges[1].removeprefix("bytes=").removesuffix("-"))
        assert 0 < resumed_at < len(repo.files["model.safetensors"])
        snapshot = Path(result.stdout.strip())
        assert snapshot == tmp_path / "hub" / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT
        on_disk = {path.relative_to(snapshot).as_posix() for path in snapshot.rglob("*") if path.is_file()}
        assert on_disk == RUNTIME_FILES
        assert (snapshot / "model.safetensors").read_bytes() == repo.files["model.safetensors"]

        before = len(repo.requests)
        generated = run_cli(cli_args(REPO, tmp_path), endpoint, tmp_path, offline=True)
        assert generated.returncode == 0, generated.stderr
        assert len(repo.requests) == before  # loading from the cache touches no network
    saved = load_file(tmp_path / "o.safetensors")
    assert_matches_golden(CASE, {key: saved[key] for key in ("tokens", "latents", "images", "images_uint8")})


def test_interrupted_download_continues_with_the_missing_files(tmp_path: Path) -> None:
    repo = served_repo(TINY_MODEL)
    repo.failing.add("vae/checkpoint.pt")
    with HubServer(repo) as endpoint:
        failed = run_cli(["download", REPO], endpoint, tmp_path)
        assert failed.returncode == 2
        assert failed.stderr.strip().splitlines()[-1].startswith(f"error: downloading {REPO} failed")
        assert "run the same command again" in failed.stderr
        first = repo.fetched()
        repo.failing.clear()
        repo.requests.clear()
        again = run_cli(["download", REPO], endpoint, tmp_path)
        assert again.returncode == 0, again.stderr
    assert "vae/checkpoint.pt" in repo.fetched()
    assert "config.json" in first and "config.json" not in repo.fetched()  # finished files are not fetched again


def test_download_to_a_folder(tmp_path: Path) -> None:
    repo = served_repo(TINY_MODEL)
    target = tmp_path / "NextStep-tiny"
    with HubServer(repo) as endpoint:
        result = run_cli(["download", REPO, "--to", str(target), "--revision", COMMIT], endpoint, tmp_path)
    assert result.returncode == 0, result.stderr
    files = {path.relative_to(target).as_posix() for path in target.rglob("*")
             if path.is_file() and ".cache" not in path.parts}
    assert files == RUNTIME_FILES
    assert_matches_golden(CASE, generate(NextStepPipeline.from_pretrained(target, device="cpu", dtype="float32")))


def test_download_to_a_file_is_refused_before_the_hub_is_asked(tmp_path: Path) -> None:
    """Issue 29, item 15: the Hub was asked first, then the user was told to run the same command again."""
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    repo = served_repo(TINY_MODEL)
    with HubServer(repo) as endpoint:
        result = run_cli(["download", REPO, "--to", str(target)], endpoint, tmp_path)
    assert result.returncode == 2 and repo.requests == []
    assert result.stderr.strip().splitlines() == [
        f"error: --to {target} is a file; give a folder to write the model into (new or empty)"]
    assert target.read_text() == "mine"


@pytest.mark.parametrize("own_files", [{"config.json": "{}"}, {"tokenizer_config.json": "{}", "vae/config.json": "{}"},
                                       {"model-00001-of-00003.safetensors": "x"}])
def test_download_to_a_folder_never_overwrites_a_users_files(tmp_path: Path, own_files: dict[str, str]) -> None:
    """Issue 29, item 2: a user's own same-named files were replaced; any model file not put there by a download is
    now refused, named, before the Hub is asked; a readme of the user's is no obstacle."""
    target = tmp_path / "mine"
    for name, text in {**own_files, "README.md": "my notes"}.items():
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        (target / name).write_text(text)
    repo = served_repo(TINY_MODEL)
    with HubServer(repo) as endpoint:
        refused = run_cli(["download", REPO, "--to", str(target)], endpoint, tmp_path)
        assert refused.returncode == 2 and repo.requests == []
        (line,) = refused.stderr.strip().splitlines()
        assert f"error: {target} already holds {', '.join(sorted(own_files))}, not written by a download" in line
        assert all((target / name).read_text() == text for name, text in own_files.items())
        for name in own_files:
            (target / name).unlink()
        fetched = run_cli(["download", REPO, "--to", str(target)], endpoint, tmp_path)
    assert fetched.returncode == 0, fetched.stderr
    assert (target / "README.md").read_text() == "my notes"


def test_download_to_a_folder_never_mixes_two_models(tmp_path: Path) -> None:
    """Issue 29, item 2: a single-file model fetched into a folder holding an older sharded one (here three shards,
    and the other way round) loaded the old shards with the new config. Refused, naming the old model's files; the
    same download again continues as before."""
    sharded = copy_model(tmp_path / "sharded")
    rewrite_weights(sharded, shards=3)
    old, new = HubRepo.from_folder(REPO, COMMIT, sharded, {}), served_repo(TINY_MODEL)
    new.commit = "fedcba9876543210fedcba9876543210fedcba98"
    for first, second in ((old, new), (new, old)):
        target = tmp_path / f"into-{first.commit[:4]}"
        with HubServer(first) as endpoint:
            assert run_cli(["download", REPO, "--to", str(target)], endpoint, tmp_path).returncode == 0
            again = run_cli(["download", REPO, "--to", str(target)], endpoint, tmp_path)
        assert again.returncode == 0, again.stderr
        before = {path: path.read_bytes() for path in target.rglob("*") if ".cache" not in path.parts and path.is_file()}
        second.requests.clear()
        with HubServer(second) as endpoint:
            mixed = run_cli(["download", REPO, "--to", str(target)], endpoint, tmp_path)
        assert mixed.returncode == 2
        (line,) = mixed.stderr.strip().splitlines()
        expected = ("model-00001-of-00003.safetensors" if first is old else "model.safetensors")
        assert f"error: {target} holds " in line and expected in line and "from another download" in line
        assert f"{REPO} ({second.commit[:12]}) would be mixed with" in line
        assert second.fetched() == set()
        assert before == {path: path.read_bytes() for path in before}


def test_download_of_a_community_4bit_repo_fetches_what_the_runtime_reads(tmp_path: Path) -> None:
    """An AutoRound repo laid out as INCModel/NextStep-1.1-W4A16-AutoRound is (its remote code, compiled
    __pycache__ files beside the VAE, quantization_config.json): only config, weights, tokenizer and VAE come, and
    the result generates offline in its own int4 format as the folder does."""
    folder = community_folder("gptq-sym-g32", tmp_path / "community")
    code = b'raise RuntimeError("downloaded code was executed")\n'
    extra = {"vae/__pycache__/nextstep_ae.cpython-312.pyc": b"\x00" * 64, "vae/nextstep_ae.py": code,
             "models/__pycache__/heads.cpython-312.pyc": b"\x00" * 64, "generation_config.json": b"{}",
             "README.md": b"# 4-bit\n"}
    repo = HubRepo.from_folder(REPO, COMMIT, folder, extra)
    with HubServer(repo) as endpoint:
        result = run_cli(["download", REPO], endpoint, tmp_path)
        assert result.returncode == 0, result.stderr
        generated = run_cli(cli_args(REPO, tmp_path), endpoint, tmp_path, offline=True)
        assert generated.returncode == 0, generated.stderr
    tokenizer = {"merges.txt", "vocab.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"}
    assert repo.fetched() == {"config.json", "model.safetensors", "vae/config.json", "vae/checkpoint.pt"} | tokenizer
    saved = load_file(tmp_path / "o.safetensors")
    local = generate(NextStepPipeline.from_pretrained(folder, device="cpu", dtype="float32", memory="int4"))
    assert torch.equal(saved["tokens"], local["tokens"]) and torch.equal(saved["images"], local["images"])


def test_download_of_an_unknown_repo_is_one_error_line(tmp_path: Path) -> None:
    with HubServer(served_repo(TINY_MODEL)) as endpoint:
        result = run_cli(["download", "stepfun-ai/NoSuchModel"], endpoint, tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: stepfun-ai/NoSuchModel was not found on the Hugging Face Hub (RepositoryNotFoundError); check the "
        "repo id and revision"]


INVALID_REPO_IDS = {
    "ab--cd/x": "Cannot have -- or .. in repo_id",
    "stepfun-ai/Next..Step": "Cannot have -- or .. in repo_id",
    "org/" + "a" * 97: "the maximum length is 96",
    "trailing-/x": "cannot start or end with '-' or '.'",
    "stepfun-ai/NextStep.": "cannot start or end with '-' or '.'",
    "a/b/c": "Repo id must be in the form 'repo_name' or 'namespace/repo_name'",
    "org/name!": "Repo id must use alphanumeric chars",
}


@pytest.mark.parametrize("repo", INVALID_REPO_IDS)
def test_invalid_repo_ids_are_one_error_line_never_suggesting_them(hf_cache: Path, tmp_path: Path, capsys,
                                                                   repo: str) -> None:
    line = command_error(capsys, "download", repo)
    assert line.startswith(f"error: {repo!r} is not a Hugging Face repo id like stepfun-ai/NextStep-1.1 (")
    assert INVALID_REPO_IDS[repo] in line
    line = command_error(capsys, *cli_args(repo, tmp_path))
    assert line.startswith(f"error: model folder {repo} does not exist")
    assert "download" not in line and "not in the Hugging Face cache" not in line
    if repo.count("/") == 1:  # written like a repo id: say why it is not one
        assert "it is not a valid Hugging Face repo id (" in line and INVALID_REPO_IDS[repo] in line


def test_download_with_a_revision_after_the_id_points_to_the_flag(capsys) -> None:
    line = command_error(capsys, "download", "stepfun-ai/NextStep-1.1@main")
    assert "(give a revision with --revision, not after @)" in line


def test_download_without_a_network_is_one_error_line(tmp_path: Path) -> None:
    """An endpoint that cannot be reached (no such host): the network library's own error, in one line."""
    result = run_cli(["download", "stepfun-ai/NextStep-1.1"], "http://nextstep-no-such-host.invalid", tmp_path)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: downloading stepfun-ai/NextStep-1.1 failed (") and "please report" not in line
