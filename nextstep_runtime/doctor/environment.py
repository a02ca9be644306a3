"""What this install can do, and why not: versions, devices and their kernels, attention, compiling, where models
are found. Every verdict comes from the rule the runtime itself follows (devices.py, modes.py, attention.py,
compiled_step.py), so the report says what a run would do; only the tiny compile and the flash-attn call run
something, to see that it works and not only that it is there.
"""

from __future__ import annotations

import platform
import random
import sys
import time
from pathlib import Path

import torch

from ..config import ModelConfig
from ..devices import (
    DeviceTraits,
    auto_dtype,
    bf16_native,
    fp8_matmul_fused,
    fp8_refusal,
    int4_refusal,
    residual_dtype,
    vae_dtype,
)
from ..errors import NextStepError
from ..memory.device_memory import device_memory, free_memory
from ..memory.footprint import ModelFootprint
from ..memory.job import Job
from ..memory.planner import Targets, plan_load, plan_mode
from ..model.attention import BACKENDS, attention_choice, flash_attn_difference, flash_attn_problem
from ..model.placement import DeviceList
from ..sampling.compiled_step import compile_problem
from ..weights.hub import cache_root, scan_model_cache
from ..weights.model_folder import CONFIG_NAME, ModelFolder, cached_nextstep_repos, holds_model_config
from ..weights.released import NEXTSTEP_14B_CONFIG

FLASH_ATTN_TOLERANCE = 0.05
"""Largest difference from SDPA (bfloat16, unit-variance inputs) a working flash-attn kernel stays within."""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def exception_line(exc: BaseException) -> str:
    """`Type: the first line of its message`, for a report that keeps what failed without its traceback."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else 'no message'}"


def visible_devices() -> list[torch.device]:
    """The CPU, every CUDA GPU and the Apple GPU, as far as this torch sees them."""
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices += [torch.device("cuda", index) for index in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        devices.append(torch.device("mps"))
    return devices


def float16_handling(compute: torch.dtype) -> str | None:
    """What the runtime does where `auto` computes in float16 (devices.residual_dtype, vae_dtype), for the doctor to
    say; None for other dtypes."""
    if compute != torch.float16:
        return None
    return (f"float16 matmuls, with the decoder's residual stream and norm inputs in "
            f"{_dtype_name(residual_dtype(compute))} (Qwen2-class activations overflow float16), the VAE in "
            f"{_dtype_name(vae_dtype(compute))}; a prompt that still overflows stops after its prefill, naming the fix")


def kernels_report(traits: DeviceTraits) -> dict:
    """What the device rules say of a device: the dtype `auto` computes in (and what the runtime does about float16),
    native bfloat16, and which weight formats have kernels there (and why not)."""
    fp8_problem = fp8_refusal(traits)
    int4_problem = int4_refusal(traits, torch.bfloat16)  # the dtype every int4 kernel takes
    return {
        "description": traits.describe(),
        "capability": None if traits.capability is None else ".".join(map(str, traits.capability)),
        "auto_dtype": _dtype_name(auto_dtype(traits)), "bf16_native": bf16_native(traits),
        "float16": float16_handling(auto_dtype(traits)),
        "fp8": {"works": fp8_problem is None, "problem": fp8_problem,
                "kernel": None if fp8_problem else "fused fp8 matmul" if fp8_matmul_fused(traits)
                else "dequantised to the compute dtype per layer (saves memory, not time)"},
        "int4": {"works": int4_problem is None, "problem": int4_problem},
    }


def device_report(device: torch.device, run_device: torch.device) -> dict:
    """A device: its name and memory, and its kernels (kernels_report). Free memory is measured on the CPU and the
    run device only: measuring another CUDA GPU's would open a CUDA context there (hundreds of MB of its memory,
    taken from whoever uses it); its total comes from its properties."""
    traits = DeviceTraits.of(device)
    if device.type == "cuda" and device != run_device:
        free, total = None, torch.cuda.get_device_properties(device).total_memory
    else:
        free, total = device_memory(device) or (None, None)  # RAM for the CPU
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else traits.describe()
    return {"device": str(device), "name": name, "memory_free_bytes": free, "memory_total_bytes": total,
            **kernels_report(traits)}


def attention_report(device: torch.device) -> dict:
    """Whether flash-attn imports and computes on `device`, and the backend each loader choice runs."""
    problem = flash_attn_problem(device)
    difference = None
    if problem is None:
        try:
            difference = flash_attn_difference(device)
        except Exception as exc:  # noqa: BLE001 - whatever a broken kernel raises is the answer, not a crash
            problem = f"flash-attn imports but its kernel failed ({exception_line(exc)})"
        else:
            if not difference <= FLASH_ATTN_TOLERANCE:
                problem = (f"flash-attn runs but differs from PyTorch SDPA by {difference:.3g} (more than "
                           f"{FLASH_ATTN_TOLERANCE}); use attention sdpa")
    backends = {}
    for name in BACKENDS:
        kernel, warning = attention_choice(name, device)
        backends[name] = {"runs": "sdpa" if kernel is None else "flash_attn", "warning": warning}
    return {"flash_attn": {"works": problem is None, "problem": problem, "max_difference": difference},
            "backends": backends}


_compile_probes: dict[str, dict] = {}
"""Per device type, the tiny compile's outcome: once per process (a server asks for it with every page)."""


def compile_report(device: torch.device) -> dict:
    """Whether torch.compile works for `device`: the runtime's up-front check (`compile_problem`), then a tiny
    function compiled and timed. Its constant is drawn anew per process, so its kernel is never in inductor's
    cache (a temp folder) and the compiler truly runs. `turned_off`: torch's own switch (TORCH_COMPILE_DISABLE=1)
    is on, which runs are quiet about (compiled_step.SolverSteps)."""
    if device.type not in _compile_probes:
        turned_off = bool(torch._dynamo.config.disable)
        problem = "torch.compile is turned off in this process (TORCH_COMPILE_DISABLE=1)" if turned_off else None
        problem, seconds = (problem, None) if turned_off else _probe_compile(device)
        _compile_probes[device.type] = {"works": problem is None, "problem": problem, "seconds": seconds,
                                        "turned_off": turned_off}
    return _compile_probes[device.type]


def _probe_compile(device: torch.device) -> tuple[str | None, float | None]:
    """(why compiling does not work, or None; the tiny compile's seconds)."""
    problem = compile_problem(device)
    if problem is not None:
        return problem, None
    offset = random.Random().uniform(1.0, 2.0)
    x = torch.linspace(-3, 3, 64, device=device)
    start = time.perf_counter()
    try:
        compiled = torch.compile(lambda value: torch.sin(value) * 2 + offset, fullgraph=True)(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as exc:  # noqa: BLE001 - a toolchain inductor cannot use, any compiler error: report it
        return f"torch.compile failed ({exception_line(exc)})", None
    seconds = time.perf_counter() - start
    difference = float((compiled - (torch.sin(x) * 2 + offset)).abs().max())
    if not difference <= 1e-4:
        return f"torch.compile's kernel computes a wrong result (off by {difference:.3g})", seconds
    return None, seconds


def _folder_entry(path: Path) -> dict:
    """A model folder's name and what it holds, or why it is not one the loader lists."""
    entry = {"name": path.name, "path": str(path)}
    try:
        return {**entry, **_folder_contents(path)}
    except (NextStepError, OSError) as exc:  # unreadable headers, a folder this user may not list, ...
        return {**entry, "problem": str(exc)}


def _folder_contents(path: Path) -> dict:
    if path.is_file():
        return {"problem": f"a file; NextStep models are whole repo folders ({CONFIG_NAME}, weights, tokenizer) in "
                           f"their own folder here"}
    if not holds_model_config(path):
        inner = [child.name for child in sorted(path.iterdir()) if holds_model_config(child)]
        hint = (f"; the model folder inside, {path.name}/{inner[0]}, belongs directly in this folder" if inner
                else "; not a model folder")
        return {"problem": f"holds no {CONFIG_NAME}{hint}"}
    folder = ModelFolder.open(path)
    return {"weights": folder.weights_description, "parameters": folder.parameter_count(),
            "vae": (path / "vae").is_dir()}


def model_folders_report(roots: list[Path]) -> list[dict]:
    """Each model search folder (inside ComfyUI, the `nextstep` ones) and what it holds."""
    report = []
    for root in roots:
        try:
            entries = [_folder_entry(child) for child in sorted(root.iterdir())] if root.is_dir() else []
        except OSError as exc:  # a search folder this user may not list
            entries = [{"name": ".", "path": str(root), "problem": f"cannot be listed ({exc.strerror or exc})"}]
        report.append({"path": str(root), "exists": root.is_dir(), "entries": entries})
    return report


def capacity_report(device: torch.device) -> dict:
    """Whether the released 14B models run on `device` here, and in which weight mode: the planner's `auto` choice for
    one 512x512 image against the device's free memory (the loader's default), and when that does not fit, the mode
    the planner suggests instead and whether that one fits."""
    footprint = ModelFootprint.from_config(ModelConfig.from_dict(NEXTSTEP_14B_CONFIG))
    targets = Targets.on(DeviceList((device,)), "auto", free_memory, vae_on_run_device=True)
    plan, _ = plan_load(footprint, "auto", None, Job(), targets, "the 14B model")
    report = {"device": str(device), "loads_as": plan.loads_as, "fits": plan.fits,
              "needs_bytes": plan.devices[-1].peak_bytes, "free_bytes": plan.devices[-1].free_bytes,
              "advice": plan.advice, "suggested": None}
    if not plan.fits and plan.suggested_mode is not None:
        suggested = plan_mode(footprint, plan.suggested_mode, Job(), targets, "the 14B model")
        report["suggested"] = {"loads_as": suggested.loads_as, "fits": suggested.fits,
                               "needs_bytes": suggested.devices[-1].peak_bytes}
    return report


def hf_cache_report() -> dict:
    """The cache's NextStep repos, and the entries skipped as broken (`problems`: repo id or path -> why)."""
    scan = scan_model_cache()
    return {"path": str(cache_root()),
            "nextstep_repos": {repo: str(snapshot) for repo, snapshot in cached_nextstep_repos(scan).items()},
            "problems": scan.problems}


def versions_report() -> dict:
    return {"python": platform.python_version(), "platform": platform.platform(), "executable": sys.executable,
            "torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
            "mps_available": torch.backends.mps.is_available()}


def _indexed(device: torch.device) -> torch.device:
    """`cuda` as the current GPU, named as the device list names it (`cuda:N`)."""
    return torch.device("cuda", torch.cuda.current_device()) if device.type == "cuda" and device.index is None else device


def run_device_report(device: torch.device) -> dict:
    """What runs the models on `device`: its kernels, attention and compiling (all the loader's warnings need)."""
    device = _indexed(device)
    return {"run_device": device_report(device, device), "attention": attention_report(device),
            "compile": {"device": device.type, **compile_report(device)}}


_measured_run_devices: dict[torch.device, dict] = {}
"""run_device_report per device, measured once per process for the Model Loader's panel (measured_run_device)."""


def measured_run_device(device: torch.device) -> dict:
    """run_device_report of `device`, measured at the first call in this process and reused: the Model Loader's panel
    asks at every page load, and measuring runs a flash-attn kernel and reads the GPU's memory (host syncs on a GPU
    that may be generating), while what the warnings say (kernels, whether flash-attn and compiling work) does not
    change while a process runs."""
    device = _indexed(device)
    if device not in _measured_run_devices:
        _measured_run_devices[device] = run_device_report(device)
    return _measured_run_devices[device]


def environment_report(device: torch.device, model_roots: list[Path] | None = None) -> dict:
    """Everything but the self-check, for models run on `device`; `model_roots`: the model search folders to
    list (ComfyUI's `nextstep` folders), None outside ComfyUI."""
    device = _indexed(device)
    devices = [device_report(visible, device) for visible in visible_devices()]
    run = run_device_report(device)  # its memory read next to the others', before compiling takes some
    return {
        "versions": versions_report(),
        "run_device": run["run_device"],
        "devices": devices,
        "attention": run["attention"],
        "compile": run["compile"],
        "hf_cache": hf_cache_report(),
        "nextstep_14b": capacity_report(device),
        "model_folders": None if model_roots is None else model_folders_report(model_roots),
    }
