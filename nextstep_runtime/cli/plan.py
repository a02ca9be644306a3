"""`python -m nextstep_runtime plan MODEL ...`: the memory a model folder needs for a job, and whether (and in
which mode) it fits this machine's GPU or a GPU of a given size. Reads no weights."""

from __future__ import annotations

import argparse
import json
import sys

from ..devices import DTYPES, resolve_device
from ..errors import NextStepError
from ..memory.device_memory import free_memory
from ..memory.footprint import ModelFootprint
from ..memory.job import PROMPT_ALLOWANCE, Job
from ..memory.planner import GB, MEMORY_CHOICES, Plan, Targets, memory_setting, plan_load
from ..model.placement import DeviceList
from ..settings import GenerationSettings
from ..validation import check_number
from .help import HelpFormatter

_DEFAULTS = GenerationSettings()
MIN_GPU_GB, MAX_GPU_GB = 0.001, 100_000


def _size(text: str) -> tuple[int, int]:
    """`WxH` to (height, width)."""
    width, sep, height = text.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 512x512 (width x height)")
    return int(height), int(width)


def _sizes(text: str) -> list[float]:
    """`24` or `24,16`: GB per device."""
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size in GB like 24, or one per device like 24,24") from None


def add_parser(commands: argparse._SubParsersAction) -> None:
    plan = commands.add_parser("plan", help="memory needed for a model and job, and the mode that fits",
                               formatter_class=HelpFormatter,
                               description="Reads config.json and the weights' headers only (no weights).")
    plan.add_argument("model", help="NextStep model folder")
    plan.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                      help="compute dtype (auto: each device's own; bfloat16 for a GPU given by its size)")
    plan.add_argument("--memory", choices=MEMORY_CHOICES, default="auto",
                      help="decoder weights as generate --memory takes them; auto: the mode generate would load in on "
                           "these devices, for this job")
    plan.add_argument("--fp8", action="store_true", help="same as --memory fp8")
    plan.add_argument("--gpu-layers", type=int, metavar="N", default=None,
                      help="decoder layers kept on the GPU, the rest streamed (generate --gpu-layers; default: all)")
    plan.add_argument("--width", type=int, default=_DEFAULTS.width, help="pixels")
    plan.add_argument("--height", type=int, default=_DEFAULTS.height, help="pixels")
    plan.add_argument("--batch", type=int, default=_DEFAULTS.batch, help="images per prompt")
    plan.add_argument("--cfg", type=float, default=_DEFAULTS.cfg, help="text guidance (1 = one row per image)")
    plan.add_argument("--cfg-img", type=float, default=_DEFAULTS.cfg_img,
                      help="image guidance (editing; above 1 adds a row per image)")
    plan.add_argument("--steps", type=int, default=_DEFAULTS.steps, help="solver steps per token")
    plan.add_argument("--input-size", type=_size, action="append", default=[], metavar="WxH",
                      help="an editing input image's size (repeat for several images)")
    plan.add_argument("--prompt-tokens", type=int, metavar="N", default=None,
                      help=f"prompt positions per row besides input images (default: {PROMPT_ALLOWANCE}, a long "
                           f"prompt)")
    plan.add_argument("--gpu-memory", type=_sizes, metavar="GB", default=None,
                      help="GPU size in GB (10^9 bytes), taken as all free (default: this machine's GPU); with "
                           "--devices one size per device, e.g. 24,24")
    plan.add_argument("--devices", metavar="LIST",
                      help="plan a split over several GPUs: cuda:0,cuda:1 (ranges sized by the planner) or explicit "
                           "inclusive layer ranges cuda:0:0-23,cuda:1:24-47; bytes on each device")
    plan.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def _bytes(gb: float) -> int:
    return int(check_number("--gpu-memory", gb, MIN_GPU_GB, MAX_GPU_GB, " GB") * GB)


def _targets(args: argparse.Namespace) -> Targets:
    """The devices planned for: --devices (or this machine's GPU) as they are now, or GPUs of the --gpu-memory sizes
    (this machine need not have them); on a machine without a GPU and no sizes, a GPU of unknown size."""
    listed = DeviceList.parse(args.devices or "cuda")
    if args.gpu_memory is not None:
        return Targets.planned(listed, args.dtype, [_bytes(size) for size in args.gpu_memory])
    if args.devices is None:
        device = resolve_device("auto")
        if device.type == "cpu":
            return Targets.planned(listed, args.dtype, [None])
        listed = DeviceList((device,))
    try:
        listed.check_present()
    except NextStepError as exc:
        raise NextStepError(f"{exc.args[0].partition(';')[0]}; to plan for GPUs this machine does not have, give "
                            f"their sizes: --gpu-memory {','.join(['24'] * len(listed.devices))}") from None
    return Targets.on(listed, args.dtype, free_memory, vae_on_run_device=True)


def make_plan(args: argparse.Namespace, footprint: ModelFootprint) -> tuple[Plan, str | None]:
    """The plan of the --memory setting (auto: the mode generate loads in) on the devices planned for, for the job."""
    settings = GenerationSettings(width=args.width, height=args.height, batch=args.batch, cfg=args.cfg,
                                  cfg_img=args.cfg_img, steps=args.steps)
    job = Job(settings, tuple(args.input_size), args.prompt_tokens)
    return plan_load(footprint, memory_setting(args.memory, args.fp8), args.gpu_layers, job, _targets(args),
                     args.model)


def format_plan(plan: Plan) -> str:
    """The plan as a table: one column per device, sizes in GB."""
    def gb(value: int | None) -> str:
        return "unknown" if value is None else f"{value / GB:.2f} GB"

    rows = [("", [share.device for share in plan.devices]),
            ("decoder layers", [share.layers or "-" for share in plan.devices]),
            ("weights", [gb(share.weights_bytes) for share in plan.devices]),
            ("VAE weights", [gb(share.vae_bytes) for share in plan.devices]),
            ("KV cache", [gb(share.kv_cache_bytes) for share in plan.devices]),
            ("one run (KV cache, activations, VAE)", [gb(share.job_bytes) for share in plan.devices]),
            ("peak", [gb(share.peak_bytes) for share in plan.devices]),
            ("free", [gb(share.free_bytes) for share in plan.devices]),
            ("fits", [{True: "yes", False: "no", None: "?"}[share.fits] for share in plan.devices])]
    label = max(len(name) for name, _ in rows)
    column = max(len(cell) for _, cells in rows for cell in cells)
    lines = [f"loads as: {plan.loads_as}"]
    lines += [f"{name:<{label}}  " + "  ".join(f"{cell:>{column}}" for cell in cells) for name, cells in rows]
    if plan.weights_host_bytes:
        lines.append(f"weights in host RAM (streamed): {gb(plan.weights_host_bytes)}")
    return "\n".join(lines + [f"advice: {plan.advice}"])


def run(args: argparse.Namespace) -> None:
    footprint = ModelFootprint.from_folder(args.model)
    if footprint.vae_config_assumed:
        sys.stderr.write(f"note: {footprint.vae_config_assumed}\n")
    plan, choice = make_plan(args, footprint)
    if args.json:
        sys.stdout.write(json.dumps({**plan.to_dict(), "memory_choice": choice}) + "\n")
        return
    sys.stdout.write((f"{choice}\n" if choice else "") + format_plan(plan) + "\n")
