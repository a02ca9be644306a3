"""The whole doctor report: the environment, the warnings per loader setting, and optionally the self-check."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .environment import environment_report, measured_run_device
from .self_check import self_check
from .warnings import setting_warnings


def doctor_report(device: torch.device, model_roots: list[Path] | None = None, check: bool = True) -> dict:
    """A JSON-ready report for models run on `device`: `model_roots` are the model search folders to list (inside
    ComfyUI, its `nextstep` folders; None elsewhere); `check` runs the self-check too (seconds on a CPU).
    Never downloads; writes only to temp folders (the self-check's model, inductor's kernel cache)."""
    start = time.perf_counter()
    report = environment_report(device, model_roots)
    report["warnings"] = setting_warnings(report)
    report["self_check"] = self_check(device) if check else None
    report["seconds"] = time.perf_counter() - start
    return report


def loader_warnings(device: torch.device) -> list[dict]:
    """The warnings of `doctor_report` for models run on `device` alone (warnings.setting_warnings), from the reports
    they are read from only: what the Model Loader's panel asks for at every page load, without listing model
    folders, the Hugging Face cache or other devices; measured once per process (measured_run_device)."""
    return setting_warnings(measured_run_device(device))
