"""`python -m nextstep_runtime doctor` as a user runs it on this CPU machine (in a subprocess, timed): every field
true for this machine, the self-check passed; then installs broken as users have them (no C++ compiler, a
flash-attn built for another torch), reported, not raised; and the route's report, with ComfyUI's model folders.
tests/test_comfyui_e2e.py asks the same route through a real ComfyUI, tests/test_browser.py shows its warnings on
the Model Loader.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from broken_installs import FLASH_ATTN_FAILURES, broken_flash_attn
from goldens import TINY_MODEL
from model_folders import copy_model, rewrite_weights, write_hf_cache
from nodes_pack import MODEL_NAME, install_fixture_models, load_pack

from nextstep_runtime.devices import DeviceTraits, host_memory
from nextstep_runtime.doctor import environment, render_text
from nextstep_runtime.doctor.environment import kernels_report
from nextstep_runtime.doctor.warnings import setting_warnings

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
CACHED_REPO = "stepfun-ai/NextStep-tiny"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
WALL_LIMIT_S = 60
CPU_ONLY = "flash-attn runs on CUDA GPUs only, not on the CPU"
routes = importlib.import_module(f"{load_pack().__name__}.nodes.routes")


def run_doctor(*args: str, path: tuple[Path, ...] = (), **env: str | None) -> tuple[subprocess.CompletedProcess, float]:
    """`doctor` in a subprocess as a user runs it (compiling allowed, unlike in the tests' own process), with `path`
    first on its import path and `env` set (None: unset); returns the result and its wall time."""
    python_path = os.pathsep.join(filter(None, [*map(str, path), os.environ.get("PYTHONPATH")]))
    changed = {**os.environ, "PYTHONPATH": python_path, "TORCH_COMPILE_DISABLE": None, **env}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "nextstep_runtime", "doctor", *args], cwd=REPO,
                            capture_output=True, text=True, timeout=300,
                            env={name: value for name, value in changed.items() if value is not None})
    return result, time.perf_counter() - start


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory) -> Path:
    """A Hugging Face cache holding one NextStep repo."""
    cache = tmp_path_factory.mktemp("hf-cache")
    write_hf_cache(cache, CACHED_REPO, TINY_MODEL, COMMIT)
    return cache


@pytest.fixture(scope="module")
def doctor_json(hf_cache: Path) -> tuple[dict, float]:
    """The report of `doctor --json` on this machine, and how long the command took."""
    result, seconds = run_doctor("--json", HF_HUB_CACHE=str(hf_cache))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout), seconds


def test_doctor_finishes_in_under_a_minute(doctor_json) -> None:
    report, seconds = doctor_json
    assert seconds < WALL_LIMIT_S, f"doctor took {seconds:.1f} s"
    assert report["seconds"] < seconds


def test_versions_and_devices_are_this_machines(doctor_json) -> None:
    report, _ = doctor_json
    versions = report["versions"]
    assert versions["torch"] == torch.__version__ and versions["python"] == ".".join(map(str, sys.version_info[:3]))
    assert versions["cuda"] == torch.version.cuda and versions["cuda_available"] is False and versions["mps_available"] is False
    assert [device["device"] for device in report["devices"]] == ["cpu"]
    cpu = report["devices"][0]
    assert cpu == report["run_device"]
    assert cpu["memory_total_bytes"] == host_memory()[1] and 0 < cpu["memory_free_bytes"] <= cpu["memory_total_bytes"]
    assert cpu["auto_dtype"] == "float32" and cpu["bf16_native"] is True and cpu["capability"] is None
    assert cpu["fp8"] == {"works": True, "problem": None,
                          "kernel": "dequantised to the compute dtype per layer (saves memory, not time)"}
    assert cpu["int4"] == {"works": True, "problem": None}  # torch 2.6+ has the CPU int4 kernel


def test_flash_attn_absent_with_the_reason_and_compile_working(doctor_json) -> None:
    report, _ = doctor_json
    assert importlib.util.find_spec("flash_attn") is None, "this machine has flash-attn: the report below is not true"
    # no GPU here: the device is the reason, not advice to install a GPU kernel
    assert report["attention"]["flash_attn"] == {"works": False, "problem": CPU_ONLY, "max_difference": None}
    assert {name: choice["runs"] for name, choice in report["attention"]["backends"].items()} == {
        "auto": "sdpa", "sdpa": "sdpa", "flash_attn": "sdpa"}
    compiling = report["compile"]
    assert compiling["device"] == "cpu" and compiling["works"] is True and compiling["problem"] is None
    assert compiling["turned_off"] is False
    assert 0 < compiling["seconds"] < WALL_LIMIT_S
    # the only setting with a warning here: flash-attn asked for (auto stays quiet when it is simply absent)
    assert report["warnings"] == [{"setting": "attention:flash_attn",
                                   "text": f"flash-attn unavailable: {CPU_ONLY}; using PyTorch SDPA"}]


def test_hugging_face_cache_and_its_nextstep_repos(doctor_json, hf_cache: Path) -> None:
    report, _ = doctor_json
    assert report["hf_cache"]["path"] == str(hf_cache)
    assert list(report["hf_cache"]["nextstep_repos"]) == [CACHED_REPO]
    assert report["model_folders"] is None  # outside ComfyUI


def test_self_check_passes_each_way_this_cpu_computes(doctor_json) -> None:
    report, _ = doctor_json
    check = report["self_check"]
    assert check["device"] == "cpu" and check["passed"] is True
    verdicts = {entry["name"]: (entry["precision"], entry["verdict"]) for entry in check["checks"]}
    assert verdicts == {"eager": ("float32", "pass"), "compiled": ("float32", "pass"),
                        "cuda graph": ("float32", "skipped"), "fp8": ("fp8", "pass"), "int4": ("int4", "pass")}
    differences = {entry["name"]: entry.get("max_difference") for entry in check["checks"]}
    assert differences["eager"] == 0  # the run device is the reference's: the same computation
    assert 0 < differences["compiled"] <= 1e-4  # fused kernels sum in another order
    assert 0 < differences["fp8"] < differences["int4"]  # 4-bit rounds more than float8
    assert check["checks"][2]["note"] == "CUDA graphs need a CUDA GPU"


def test_text_report_says_the_same(doctor_json) -> None:
    text = render_text(doctor_json[0])
    cuda = (f"CUDA {torch.version.cuda}, available: no (no NVIDIA GPU or working driver found)" if torch.version.cuda
            else "CUDA none (a CPU-only torch), available: no")
    assert cuda in text
    assert "torch.compile on cpu: yes (a tiny compile took" in text
    assert f"flash-attn: no: {CPU_ONLY}" in text and "pip install" not in text
    assert f"{CACHED_REPO}: " in text
    assert "self-check on cpu against the CPU float32 reference" in text and ": passed" in text


@pytest.mark.parametrize("compiler,flash_attn", [("CXX nowhere", "linux-symbol"), ("PATH nowhere", "windows-dll")])
def test_broken_compiler_and_flash_attn_are_reported_not_raised(compiler: str, flash_attn: str, tmp_path: Path) -> None:
    """No C++ compiler (CXX, or PATH without g++, pointing nowhere) and a flash-attn wheel built for another torch:
    doctor exits 0 and says why compile and flash-attn do not work, which loader settings that concerns, and skips
    the compiled check."""
    site = broken_flash_attn(tmp_path / "site", flash_attn)
    nowhere = tmp_path / "nowhere"
    nowhere.mkdir()
    env = {"CXX": str(nowhere / "g++")} if compiler == "CXX nowhere" else {"CXX": None, "PATH": str(nowhere)}
    result, _ = run_doctor(path=(site,), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"), **env)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "torch.compile on cpu: no: no C++ compiler that torch.compile can use was found" in out
    error = FLASH_ATTN_FAILURES[flash_attn][0]
    assert f"flash-attn: no: flash-attn is installed but does not import ({error}: " in out
    assert "  compile: compile unavailable: no C++ compiler" in out and "; running uncompiled" in out
    for choice in ("auto", "flash_attn"):  # installed but broken: auto warns too
        assert f"  attention:{choice}: flash-attn unavailable: flash-attn is installed but does not import" in out
    assert "compiled   float32   skipped    - compile unavailable: no C++ compiler" in out
    assert ": passed" in out


TURING, ADA = DeviceTraits("cuda", (7, 5)), DeviceTraits("cuda", (8, 9))
MACOS_13 = DeviceTraits("mps", macos=(13, 6), torch_version=(2, 4))


@pytest.mark.parametrize("traits,warnings", [
    (TURING, {"memory:int4": "int4 unavailable: 4-bit weights on CUDA need a GPU of compute capability 8.0+ (Ampere "
                             "or newer); this is a CUDA GPU of compute capability 7.5",
              "dtype:bfloat16": "bfloat16 is emulated (slow) on a CUDA GPU of compute capability 7.5; use dtype auto "
                                "(float16)"}),
    (ADA, {}),
    (MACOS_13, {"memory:fp8": "fp8 unavailable: fp8 weights do not run on Apple GPUs (MPS has no float8 type); use "
                              "memory int4 or full",
                "fp8": "fp8 unavailable: fp8 weights do not run on Apple GPUs (MPS has no float8 type); use memory "
                       "int4 or full",
                "memory:int4": "int4 unavailable: 4-bit weights on an Apple GPU (MPS) need torch 2.5 or newer (this "
                               "is torch 2.4); upgrade torch, or load the model in full or fp8",
                "dtype:bfloat16": "bfloat16 is emulated (slow) on an Apple GPU (MPS); use dtype auto (float16)"}),
])
def test_loader_warnings_on_devices_this_machine_is_not(traits: DeviceTraits, warnings: dict) -> None:
    """The device rules' verdicts on GPUs and Macs this machine lacks, as the loader's warnings (compiling and
    attention fine there)."""
    environment = {"run_device": kernels_report(traits),
                   "compile": {"works": True, "problem": None, "seconds": 1.0, "turned_off": False},
                   "attention": {"backends": {"auto": {"runs": "sdpa", "warning": None}}}}
    assert {warning["setting"]: warning["text"] for warning in setting_warnings(environment)} == warnings


@pytest.mark.parametrize("traits", [TURING, MACOS_13], ids=["cuda-7.5", "macos-13"])
def test_doctor_says_what_the_pack_does_on_a_float16_device(traits: DeviceTraits, doctor_json) -> None:
    """This machine's doctor report with a float16 GPU or Mac in its device list."""
    kernels = kernels_report(traits)
    assert kernels["auto_dtype"] == "float16"
    assert kernels["float16"].startswith("float16 matmuls, with the decoder's residual stream and norm inputs in "
                                         "float32") and "the VAE in float32" in kernels["float16"]
    device = {"device": "cuda:0", "name": "a GPU", "memory_free_bytes": None, "memory_total_bytes": None, **kernels}
    text = render_text({**doctor_json[0], "devices": [device]})
    assert f"    float16: {kernels['float16']}" in text.splitlines()
    assert "float16:" not in render_text(doctor_json[0])  # this machine's CPU computes in float32
    assert kernels_report(ADA)["float16"] is None


def test_fp8_kernel_by_gpu() -> None:
    assert kernels_report(ADA)["fp8"]["kernel"] == "fused fp8 matmul"  # Ada's fp8 tensor cores
    assert kernels_report(TURING)["fp8"] == {"works": True, "problem": None, "kernel": "dequantised to the compute "
                                             "dtype per layer (saves memory, not time)"}


# --- the route, as ComfyUI's server calls it --------------------------------------------------------------------

@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    """The fixture models as a ComfyUI models folder, plus a model one folder too deep and a stray weights file."""
    models = install_fixture_models(tmp_path_factory.mktemp("models"))
    (models / "nextstep" / "downloads" / "NextStep-1.1").mkdir(parents=True)
    (models / "nextstep" / "downloads" / "NextStep-1.1" / "config.json").write_text("{}")
    (models / "nextstep" / "model.safetensors").write_bytes(b"")
    return models


def test_route_reports_the_model_folders_and_what_they_hold(models_dir: Path) -> None:
    status, report = routes.doctor_response({})
    assert status == 200 and report["self_check"] is None
    root = next(root for root in report["model_folders"] if root["path"] == str(models_dir / "nextstep"))
    entries = {entry["name"]: entry for entry in root["entries"]}
    assert set(entries) == {"downloads", "model.safetensors", MODEL_NAME}
    assert entries[MODEL_NAME]["weights"] == "float32" and entries[MODEL_NAME]["vae"] is True  # what it stores
    assert entries["downloads"]["problem"] == ("holds no config.json; the model folder inside, "
                                               "downloads/NextStep-1.1, belongs directly in this folder")
    assert entries["model.safetensors"]["problem"].startswith("a file; NextStep models are whole repo folders")
    assert report["run_device"]["device"] == "cpu"
    # the tests' process runs with compiling off: said so, and no loader setting is warned about it
    assert report["compile"]["problem"] == "torch.compile is turned off in this process (TORCH_COMPILE_DISABLE=1)"
    assert report["compile"]["turned_off"] is True and [warning["setting"] for warning in report["warnings"]] == [
        "attention:flash_attn"]
    assert json.loads(json.dumps(report)) == report


def test_route_reports_on_the_loaders_device() -> None:
    """The loader's `device` text, read as loading reads it: of a split, the last device (attention, the flow head
    and compiling run there); one this machine lacks is refused as the loader refuses it."""
    for device in ("default", "cpu", "cpu,cpu"):
        status, report = routes.doctor_response({"device": device})
        assert status == 200 and report["run_device"]["device"] == "cpu", device
    status, answer = routes.doctor_response({"device": "cuda:0"})
    assert status == 400 and "no CUDA GPU is available" in answer["error"]


def test_route_warnings_only_are_the_whole_reports_warnings() -> None:
    """What the Model Loader's panel asks for: the warnings alone, the same as the whole report's."""
    for device in ("default", "cpu,cpu"):
        status, report = routes.doctor_response({"device": device})
        assert routes.doctor_response({"device": device, "warnings_only": "1"}) == (200, {"warnings": report["warnings"]})


def test_the_panels_warnings_measure_the_device_once_per_process(monkeypatch) -> None:
    """The Model Loader's panel asks at every page load: the run device is measured (flash-attn's kernel run, the
    GPU's memory read) at the first ask only, and the answer reused."""
    monkeypatch.setattr(environment, "_measured_run_devices", {})
    measured = []
    real = environment.run_device_report
    monkeypatch.setattr(environment, "run_device_report", lambda device: measured.append(device) or real(device))
    answers = [routes.doctor_response({"device": "cpu", "warnings_only": "1"}) for _ in range(2)]
    assert answers[0] == answers[1] and answers[0][0] == 200
    assert measured == [torch.device("cpu")]


@pytest.mark.parametrize("query,message", [
    ({"self_check": "maybe"}, "doctor parameter self_check='maybe' is not true or false"),
    ({"warnings_only": "yes"}, "doctor parameter warnings_only='yes' is not true or false"),
    ({"path": "/tmp"}, "unknown doctor parameter 'path'; known: self_check, warnings_only, device"),
])
def test_route_refuses_unknown_parameters(query: dict, message: str) -> None:
    assert routes.doctor_response(query) == (400, {"error": message})


def test_a_cache_path_that_is_a_file_is_reported_not_raised(tmp_path: Path) -> None:
    """Issue 29, item 3: `HF_HUB_CACHE` naming a file ended doctor in "please report this as a bug"."""
    (tmp_path / "cache-file").write_text("")
    result, _ = run_doctor(HF_HUB_CACHE=str(tmp_path / "cache-file"))
    assert result.returncode == 0, result.stderr
    assert (f"    {tmp_path / 'cache-file'}: skipped: the Hugging Face cache path (HF_HUB_CACHE or HF_HOME) is not a "
            f"folder") in result.stdout.splitlines()
    assert "please report" not in result.stdout + result.stderr


def test_route_reports_broken_cached_repos_and_model_folders_beside_the_good_ones(models_dir: Path, tmp_path: Path,
                                                                                   monkeypatch) -> None:
    """Issues 29, items 5 and 6: one broken cached repo hid the good ones; a FIFO index blocked the route."""
    cache = tmp_path / "hub"
    write_hf_cache(cache, CACHED_REPO, TINY_MODEL, COMMIT)
    dangling = write_hf_cache(cache, "someone/NextStep-gone", TINY_MODEL, COMMIT)
    shutil.rmtree(dangling)
    dangling.symlink_to("../../models--nobody--here/snapshots/" + COMMIT)
    fifo = copy_model(tmp_path / "fifo-index")
    rewrite_weights(fifo, shards=3)
    (fifo / "model.safetensors.index.json").unlink()
    os.mkfifo(fifo / "model.safetensors.index.json")
    (models_dir / "nextstep" / "fifo-index").symlink_to(fifo)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    try:
        status, report = routes.doctor_response({})
    finally:
        (models_dir / "nextstep" / "fifo-index").unlink()
    assert status == 200
    assert list(report["hf_cache"]["nextstep_repos"]) == [CACHED_REPO]
    assert list(report["hf_cache"]["problems"]) == ["someone/NextStep-gone"]
    root = next(root for root in report["model_folders"] if root["path"] == str(models_dir / "nextstep"))
    entries = {entry["name"]: entry for entry in root["entries"]}
    index = models_dir / "nextstep" / "fifo-index" / "model.safetensors.index.json"
    assert entries["fifo-index"]["problem"].startswith(f"{index} is a FIFO (named pipe)")
    assert "weights" in entries[MODEL_NAME]
    text = render_text({**report, "warnings": [], "self_check": None, "seconds": 0.0})
    assert f"    someone/NextStep-gone: skipped: its snapshot {dangling} is not a folder" in text
