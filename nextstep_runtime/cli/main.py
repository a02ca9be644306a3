"""Command line: `python -m nextstep_runtime generate ...` writes PNGs (and optionally tensors);
`download` fetches a model (download.py); `doctor` reports what this install can do (doctor.py)."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any, NoReturn, Sequence

import torch
from safetensors.torch import save_file

from ..devices import DTYPES
from ..errors import NextStepError
from ..images import images_to_unit, save_png, to_uint8
from ..memory.job import Job
from ..memory.planner import MEMORY_CHOICES, memory_setting
from ..model.attention import BACKENDS
from ..pipeline import NextStepPipeline
from ..presets import DEFAULT_PRESET, PRESETS
from ..sampling.prompt import PROFILES
from ..sampling.solvers import CFG_SCHEDULES, SAMPLERS
from ..settings import PRESET_SETTINGS, GenerationSettings
from . import convert as cli_convert
from . import doctor as cli_doctor
from . import download as cli_download
from . import plan as cli_plan
from .help import HelpFormatter
from .init_image import InitImage, load_cropped_rgb, load_init_image, load_mask
from .output_paths import check_output_paths

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad arguments in one line, like every other input error."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"error: {message} (see --help)\n")


def _preset_option(parser: argparse.ArgumentParser, flag: str, field: str, help: str, **kwargs: Any) -> None:
    """A setting that --preset also sets: parsed as None when not given (so the preset's value applies), with
    the default preset's value shown in --help."""
    if "type" in kwargs and "choices" not in kwargs:
        kwargs["metavar"] = flag.lstrip("-").replace("-", "_").upper()
    shown = getattr(PRESETS[DEFAULT_PRESET], field)
    shown = ("on" if shown else "off") if isinstance(shown, bool) else repr(shown) if shown == "" else shown
    parser.add_argument(flag, dest=field, default=None, **kwargs,
                        help=f"{help} (default: {shown}, or the preset's)")


def build_parser() -> argparse.ArgumentParser:
    defaults = GenerationSettings()
    parser = _Parser(prog="python -m nextstep_runtime", description="NextStep text-to-image and image editing.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    gen = commands.add_parser("generate", help="generate or edit images",
                              formatter_class=HelpFormatter)
    gen.add_argument("--model", required=True, help="NextStep model folder (config.json, weights, tokenizer), or a Hugging Face "
                     "repo id in the local cache (stepfun-ai/NextStep-1.1, optionally @revision)")
    gen.add_argument("--vae", help="VAE folder or .safetensors file (default: the model's vae_name_or_path)")
    gen.add_argument("--prompt", required=True, help="caption; for editing it holds <image> where the image goes")
    gen.add_argument("--positive", help="appended to the caption after a space")
    gen.add_argument("--preset", choices=list(PRESETS), metavar="NAME",
                     help=f"the recommended settings of a released model ({', '.join(PRESETS)}): size, steps, "
                          f"guidance, shift, sampler, profile, use_norm and negative prompt; explicit flags win "
                          f"(default: {DEFAULT_PRESET}'s, shown below)")
    _preset_option(gen, "--negative", "negative", help="negative prompt")
    gen.add_argument("--image", help="input image for editing, resized to the output size (see --keep-input-size)")
    gen.add_argument("--keep-input-size", action="store_true",
                     help="encode --image at its own size (centre-cropped to multiples of 16) instead")
    gen.add_argument("--init-image", help="image to continue, inpaint or outpaint (with --mask), or a --save-tensors "
                                          "file to continue exactly; sets the output size (centre-cropped to "
                                          "multiples of 16)")
    gen.add_argument("--mask", help="with --init-image: white = regenerate; a 16x16 token is regenerated where any "
                                    "of its pixels is at least half white, kept elsewhere (no mask: all regenerated)")
    _preset_option(gen, "--width", "width", type=int, help="pixels, a multiple of 16; with --init-image, its width")
    _preset_option(gen, "--height", "height", type=int, help="pixels, a multiple of 16; with --init-image, its height")
    gen.add_argument("--batch", type=int, default=defaults.batch, help="images per prompt")
    _preset_option(gen, "--steps", "steps", type=int, help="solver steps per token")
    _preset_option(gen, "--cfg", "cfg", type=float, help="text guidance scale (1 = off)")
    _preset_option(gen, "--cfg-img", "cfg_img", type=float, help="image guidance scale for editing")
    gen.add_argument("--cfg-schedule", choices=CFG_SCHEDULES, default=defaults.cfg_schedule,
                     help="guidance per token: constant, or linear (rising for official, falling for hf)")
    _preset_option(gen, "--shift", "timesteps_shift", type=float, help="timesteps shift")
    _preset_option(gen, "--sampler", "sampler", choices=SAMPLERS, help="flow-matching solver")
    _preset_option(gen, "--profile", "profile", choices=PROFILES,
                   help="official: GitHub pipeline; hf: pipeline shipped in the Hugging Face repos")
    _preset_option(gen, "--use-norm", "use_norm", action=argparse.BooleanOptionalAction,
                   help="LayerNorm each sampled token (NextStep-1-Large)")
    gen.add_argument("--seed", type=int, default=defaults.seed, help="noise seed (drawn on the CPU: same image on any device)")
    gen.add_argument("--device", default="auto",
                     help="cpu, cuda, cuda:N, mps (an Apple GPU) or auto (a CUDA GPU, else an Apple GPU, else the CPU)")
    gen.add_argument("--devices", metavar="LIST",
                     help="split the model's decoder layers over several devices instead of --device: cuda:0,cuda:1 "
                          "(ranges sized from each GPU's free memory; the flow head and VAE on the last) or explicit "
                          "inclusive layer ranges, cuda:0:0-23,cuda:1:24-47 (see docs/multi-gpu.md)")
    gen.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                     help="compute dtype (auto: each device's own: bfloat16 on NVIDIA GPUs from Ampere and on Macs "
                          "from macOS 14, float16 on older ones, float32 on the CPU)")
    gen.add_argument("--attention", choices=BACKENDS, default="auto",
                     help="attention kernel: flash-attn where it imports and the GPU runs it (auto), or PyTorch SDPA; "
                          "a missing or broken flash-attn falls back to SDPA with a warning")
    gen.add_argument("--memory", choices=MEMORY_CHOICES, default="auto",
                     help="decoder weights: full (the dtype), fp8 (NextStep-14B in about 15 GB), int4 (about 9 GB), "
                          "or auto: the fastest that fits the GPUs for this job (full on the CPU)")
    gen.add_argument("--fp8", action="store_true", help="same as --memory fp8")
    gen.add_argument("--gpu-layers", type=int, metavar="N",
                     help="keep only N decoder layers on the GPU and stream the rest from RAM (default: all, or "
                          "as --memory auto decides)")
    gen.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                     help="compile the flow head with torch.compile (default: on NVIDIA GPUs only; on a CPU it is "
                          "no faster and takes a minute or more per image shape; without a compiler it falls back "
                          "anyway)")
    gen.add_argument("--out", required=True, help="output PNG; a batch writes OUT_0.png, OUT_1.png, ...")
    gen.add_argument("--save-tensors", help="also write tokens, latents and images to this .safetensors file")
    cli_plan.add_parser(commands)
    cli_download.add_parser(commands)
    cli_convert.add_parser(commands)
    cli_doctor.add_parser(commands)
    return parser


class ProgressBar:
    """A one-line text bar on stderr, redrawn per token."""

    def __init__(self, stream=sys.stderr, width: int = 30) -> None:
        self.stream, self.width, self.start = stream, width, time.monotonic()

    def __call__(self, done: int, total: int, _tokens: torch.Tensor) -> None:
        filled = self.width * done // total
        rate = done / max(time.monotonic() - self.start, 1e-9)
        self.stream.write(f"\rtokens [{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} {rate:.1f} tok/s")
        if done == total:
            self.stream.write("\n")
        self.stream.flush()


def _init_image_size(args: argparse.Namespace, init: InitImage) -> tuple[int, int]:
    """The init image's size (the output size); --width/--height given and different is an error."""
    width, height = init.size
    for flag, given, own in (("--width", args.width, width), ("--height", args.height, height)):
        if given not in (None, own):
            raise NextStepError(f"{flag} {given} differs from the init image's {flag[2:]} {own} (its size "
                                f"{width}x{height}, centre-cropped to multiples of 16, is the output size); leave "
                                f"{flag} out")
    return width, height


def settings_from_args(args: argparse.Namespace) -> tuple[GenerationSettings, str]:
    """The settings and negative prompt of a `generate` call: the preset's (or the default preset's) values,
    with every flag given explicitly winning."""
    preset = PRESETS[args.preset or DEFAULT_PRESET]
    given = {name: getattr(args, name) for name in PRESET_SETTINGS if getattr(args, name) is not None}
    settings = GenerationSettings.from_preset(preset, batch=args.batch, cfg_schedule=args.cfg_schedule,
                                              seed=args.seed, **given)
    return settings, preset.negative if args.negative is None else args.negative


def run_generate(args: argparse.Namespace) -> None:
    if args.mask and not args.init_image:
        raise NextStepError("--mask needs --init-image (the image whose unmasked tokens are kept)")
    init = load_init_image(args.init_image) if args.init_image else None
    if init is not None:
        args.width, args.height = _init_image_size(args, init)
    settings, negative = settings_from_args(args)
    settings.validate()  # before the (slow) model load
    check_output_paths(args.out, args.save_tensors)
    edit_size = None if args.keep_input_size else (settings.width, settings.height)
    edit_images = [load_cropped_rgb(args.image, edit_size)] if args.image else []
    mask = load_mask(args.mask, init) if args.mask else None
    pipe = NextStepPipeline.from_pretrained(args.model, vae=args.vae, device=args.device, devices=args.devices,
                                            dtype=args.dtype, memory=memory_setting(args.memory, args.fp8),
                                            gpu_layers=args.gpu_layers, compile=args.compile,
                                            attention=args.attention,
                                            job=Job(settings, tuple(tuple(image.shape[-2:]) for image in edit_images)))
    result = pipe.generate(args.prompt, settings, negative=negative, positive=args.positive,
                           edit_images=edit_images, callback=ProgressBar(), mask=mask,
                           init_image=init.pixels if init else None, init_latents=init.latents if init else None)
    unit = images_to_unit(result.images)
    for path in save_png(unit, args.out):
        sys.stderr.write(f"saved {path}\n")
    if args.save_tensors:
        save_file({"tokens": result.tokens.cpu().contiguous(), "latents": result.latents.cpu().contiguous(),
                   "images": result.images.cpu().contiguous(), "images_uint8": to_uint8(unit).cpu().contiguous()},
                  args.save_tensors)
        sys.stderr.write(f"saved {args.save_tensors}\n")


RUNNERS = {"generate": run_generate, "plan": cli_plan.run, "download": cli_download.run, "convert": cli_convert.run,
           "doctor": cli_doctor.run}
"""Subcommand name -> the function that runs it."""


class _CurrentStderr(logging.StreamHandler):
    """A handler writing to whatever sys.stderr is when a line is logged: `main` may run in a process that swaps it
    (a test capturing output, an application embedding the CLI), and a stream bound once would then be closed."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _show_runtime_log() -> None:
    """The runtime's own info lines (the mode it loads in, compiling, skipped tensors, ...) on stderr; not other
    libraries' chatter (HTTP requests, ...), so an error stays the one line a failed command prints."""
    runtime = logging.getLogger(__package__.partition(".")[0])
    if not runtime.handlers:
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        runtime.addHandler(handler)
        runtime.setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_request:  # --help, or a bad argument already reported in one line
        return int(exit_request.code or 0)
    _show_runtime_log()
    try:
        RUNNERS[args.command](args)
    except NextStepError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        sys.stderr.write("\ncancelled\n")
        return 130
    except OSError as exc:  # the disk filled up while saving, a file vanished, ...
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_BAD_INPUT
    except Exception as exc:  # a bug: still one line, naming the exception, so a user can report it
        sys.stderr.write(f"error: unexpected {type(exc).__name__}: {exc} (please report this as a bug)\n")
        return EXIT_BAD_INPUT
    return 0
