"""`python -m nextstep_runtime doctor`: what this install can do and why not, then a self-check on a small random
model (see nextstep_runtime/doctor). Never downloads; writes only to temp folders."""

from __future__ import annotations

import argparse
import json
import sys

from ..devices import resolve_device
from ..doctor import doctor_report, render_text
from ..weights.comfyui_folders import enclosing_comfyui
from .help import HelpFormatter


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "doctor", help="report what this install can do, and check the computation on a small random model",
        formatter_class=HelpFormatter,
        description="Python, torch and CUDA versions; each device with its memory and weight-format kernels; "
                    "flash-attn and the attention backend; whether torch.compile works (a tiny compile, timed); "
                    "the Hugging Face cache and the model folders of the ComfyUI this pack sits in (from any folder: "
                    "its place under custom_nodes, extra_model_paths.yaml), with the dtype each folder stores; whether "
                    "the 14B models fit here and in which mode; the warnings each setting deserves here. Then a self-check: a small "
                    "random model (built in a temp folder, no download) samples on the run device (eager, "
                    "compiled, the CUDA graph, fp8, int4, where possible) against the CPU float32 reference. "
                    "Never downloads; writes only to temp folders.")
    parser.add_argument("--device", default="auto", help="the run device to check: cpu, cuda, cuda:N, mps or auto")
    parser.add_argument("--json", action="store_true", help="print the report as JSON (for bug reports)")


def run(args: argparse.Namespace) -> None:
    install = enclosing_comfyui()
    report = doctor_report(resolve_device(args.device), None if install is None else list(install.model_folders))
    report["comfyui"] = None if install is None else str(install.root)
    sys.stdout.write(json.dumps(report, indent=2) + "\n" if args.json else render_text(report))
