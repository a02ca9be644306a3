"""`python -m nextstep_runtime plan MODEL ...`: the memory a model folder needs for a job, and whether (and in
which mode) it fits this machine's GPU or a GPU of a given size. Reads no weights."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

from ..devices import DTYPES, PLANNED_GPU, DeviceTraits, resolve_device
from ..errors import NextStepError
from ..memory.device_memory import device_memory, free_memory
from ..memory.footprint import ModelFootprint
from ..memory.job import PROMPT_ALLOWANCE, Job
from ..memory.plan import GB, MemoryPlan, plan_memory
from ..memory.split import SplitPlan, plan_split
from ..model.placement import DeviceList
from ..settings import GenerationSettings
from ..validation import check_number
from ..weights.modes import WeightMode, loadable_modes
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
    plan.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="compute dtype")
    weights = plan.add_mutually_exclusive_group()
    weights.add_argument("--fp8", action="store_true", help="float8 decoder linear weights (generate --memory fp8; "
                                                            "default: the folder's own format, as loading takes it)")
    weights.add_argument("--int4", action="store_true", help="4-bit decoder linear weights (generate --memory int4; "
                                                             "what a repacked int4 or AutoRound/GPTQ folder holds)")
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
                      help="GPU size in GB (10^9 bytes), taken as all free (default: this machine's CUDA GPU); with "
                           "--devices one size per device, e.g. 24,24")
    plan.add_argument("--devices", metavar="LIST",
                      help="plan a split over several GPUs: cuda:0,cuda:1 (ranges sized by the planner) or explicit "
                           "inclusive layer ranges cuda:0:0-23,cuda:1:24-47; bytes on each device")
    plan.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def _gpu(args: argparse.Namespace) -> tuple[int | None, int | None, DeviceTraits]:
    """(total, free) bytes of the GPU planned for, and its traits: --gpu-memory, else this machine's GPU (CUDA, or an
    Apple GPU's share of the Mac's memory)."""
    if args.gpu_memory is not None:
        if len(args.gpu_memory) != 1:
            raise NextStepError(f"--gpu-memory gives {len(args.gpu_memory)} sizes but one GPU is planned for; give "
                                f"one size, or list the GPUs with --devices")
        size = _bytes(args.gpu_memory[0])
        return size, size, PLANNED_GPU
    device = resolve_device("auto")
    if device.type == "cpu":
        return None, None, PLANNED_GPU
    free, total = device_memory(device)
    return total, free, DeviceTraits.of(device)


def _bytes(gb: float) -> int:
    return int(check_number("--gpu-memory", gb, MIN_GPU_GB, MAX_GPU_GB, " GB") * GB)


def _split_gpus(args: argparse.Namespace, devices: DeviceList) -> tuple[list[int | None], list[DeviceTraits]]:
    """Free bytes and traits of each device of a planned split: --gpu-memory (one size per device), else each device
    of this machine as it is now."""
    if args.gpu_memory is not None:
        if len(args.gpu_memory) != len(devices.devices):
            raise NextStepError(f"--gpu-memory gives {len(args.gpu_memory)} sizes for {len(devices.devices)} devices; "
                                f"give one size per device, e.g. {','.join(['24'] * len(devices.devices))}")
        return [_bytes(size) for size in args.gpu_memory], [PLANNED_GPU] * len(devices.devices)
    try:
        devices.check_present()
    except NextStepError as exc:
        raise NextStepError(f"{exc.args[0].partition(';')[0]}; to plan for GPUs this machine does not have, give "
                            f"their sizes: --gpu-memory {','.join(['24'] * len(devices.devices))}") from None
    return ([free_memory(device) for device in devices.devices],
            [DeviceTraits.of(device) for device in devices.devices])


def _mode_and_job(args: argparse.Namespace, footprint: ModelFootprint, device: DeviceTraits) -> tuple[WeightMode, Job]:
    """The mode asked for; without --fp8/--int4, the first mode the folder loads in (the dtype for a float folder,
    its own format for a repacked or 4-bit one); and the job."""
    dtype = DTYPES[args.dtype]
    mode = WeightMode(dtype=dtype, fp8=args.fp8, int4=args.int4) if args.fp8 or args.int4 else \
        loadable_modes(footprint.stored_format, device, dtype, args.model)[0]
    settings = GenerationSettings(width=args.width, height=args.height, batch=args.batch, cfg=args.cfg,
                                  cfg_img=args.cfg_img, steps=args.steps)
    return replace(mode, gpu_layers=args.gpu_layers), Job(settings, tuple(args.input_size), args.prompt_tokens)


def make_plan(args: argparse.Namespace, footprint: ModelFootprint) -> MemoryPlan:
    """The plan in the mode asked for (see _mode_and_job) on one GPU."""
    total, free, device = _gpu(args)
    mode, job = _mode_and_job(args, footprint, device)
    return plan_memory(footprint, mode, job, gpu_total=total, gpu_free=free, device=device)


def make_split_plan(args: argparse.Namespace, footprint: ModelFootprint) -> SplitPlan:
    """The plan of a split over --devices in the mode asked for (see _mode_and_job)."""
    devices = DeviceList.parse(args.devices)
    free, traits = _split_gpus(args, devices)
    mode, job = _mode_and_job(args, footprint, traits[-1])
    return plan_split(footprint, mode, job, devices, free, traits)


def format_plan(plan: MemoryPlan) -> str:
    """The plan as a small aligned table, sizes in GB."""
    def gb(value: int) -> str:
        return f"{value / GB:8.2f} GB"

    rows = [("weights on the GPU", gb(plan.weights_gpu_bytes)),
            ("weights in host RAM (streamed)", gb(plan.weights_host_bytes)),
            ("VAE weights", gb(plan.vae_bytes)),
            ("KV cache", gb(plan.kv_cache_bytes)),
            ("one run (KV cache, activations, VAE)", gb(plan.job_bytes)),
            ("peak on the GPU", gb(plan.peak_gpu_bytes))]
    if plan.gpu_total_bytes is not None:
        rows.append(("GPU total / free", f"{gb(plan.gpu_total_bytes)} / {plan.gpu_free_bytes / GB:.2f} GB"))
    width = max(len(label) for label, _ in rows)
    lines = [f"mode: {plan.mode.describe()}"] + [f"{label:<{width}}  {value}" for label, value in rows]
    return "\n".join(lines + [f"advice: {plan.advice}"])


def format_split_plan(plan: SplitPlan) -> str:
    """A split's plan as a table: one column per device, sizes in GB."""
    def gb(value: int | None) -> str:
        return "unknown" if value is None else f"{value / GB:.2f} GB"

    rows = [("", [share.device for share in plan.devices]),
            ("decoder layers", [f"{share.first_layer}-{share.last_layer}" for share in plan.devices]),
            ("weights", [gb(share.weights_bytes) for share in plan.devices]),
            ("VAE weights", [gb(share.vae_bytes) for share in plan.devices]),
            ("KV cache", [gb(share.kv_cache_bytes) for share in plan.devices]),
            ("one run (KV cache, activations, VAE)", [gb(share.job_bytes) for share in plan.devices]),
            ("peak", [gb(share.peak_bytes) for share in plan.devices]),
            ("free", [gb(share.free_bytes) for share in plan.devices]),
            ("fits", [{True: "yes", False: "no", None: "?"}[share.fits] for share in plan.devices])]
    label = max(len(name) for name, _ in rows)
    column = max(len(cell) for _, cells in rows for cell in cells)
    lines = [f"mode: {plan.mode.describe()}"]
    lines += [f"{name:<{label}}  " + "  ".join(f"{cell:>{column}}" for cell in cells) for name, cells in rows]
    if plan.weights_host_bytes:
        lines.append(f"weights in host RAM (streamed): {gb(plan.weights_host_bytes)}")
    return "\n".join(lines + [f"advice: {plan.advice}"])


def run(args: argparse.Namespace) -> None:
    footprint = ModelFootprint.from_folder(args.model)
    if footprint.vae_config_assumed:
        sys.stderr.write(f"note: {footprint.vae_config_assumed}\n")
    if args.devices is not None:
        split = make_split_plan(args, footprint)
        sys.stdout.write((json.dumps(split.to_dict()) if args.json else format_split_plan(split)) + "\n")
        return
    plan = make_plan(args, footprint)
    sys.stdout.write((json.dumps(plan.to_dict()) if args.json else format_plan(plan)) + "\n")
