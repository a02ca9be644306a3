"""Command line: `python -m nextstep_runtime generate ...` writes PNGs (and optionally tensors)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, NoReturn, Sequence

import torch
from safetensors.torch import save_file

from . import cli_plan
from .cli_help import HelpFormatter
from .errors import NextStepError
from .images import center_crop_to_multiple, load_rgb, save_png, to_uint8
from .pipeline import DTYPES, PRESET_SETTINGS, SIZE_MULTIPLE, GenerationSettings, NextStepPipeline, images_to_unit
from .presets import DEFAULT_PRESET, PRESETS
from .prompt import PROFILES
from .sampling import CFG_SCHEDULES, SAMPLERS

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
    gen.add_argument("--model", required=True, help="NextStep model folder (config.json, weights, tokenizer)")
    gen.add_argument("--vae", help="VAE folder or .safetensors file (default: the model's vae_name_or_path)")
    gen.add_argument("--prompt", required=True, help="caption; for editing it holds <image> where the image goes")
    gen.add_argument("--positive", help="appended to the caption after a space")
    gen.add_argument("--preset", choices=list(PRESETS), metavar="NAME",
                     help=f"the recommended settings of a released model ({', '.join(PRESETS)}): size, steps, "
                          f"guidance, shift, sampler, profile, use_norm and negative prompt; explicit flags win "
                          f"(default: {DEFAULT_PRESET}'s, shown below)")
    _preset_option(gen, "--negative", "negative", help="negative prompt")
    gen.add_argument("--image", help="input image for editing")
    _preset_option(gen, "--width", "width", type=int, help="pixels, a multiple of 16")
    _preset_option(gen, "--height", "height", type=int, help="pixels, a multiple of 16")
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
    gen.add_argument("--device", default="auto", help="cpu, cuda or auto")
    gen.add_argument("--dtype", choices=("auto", *DTYPES), default="auto", help="compute dtype (auto: bf16 on CUDA)")
    gen.add_argument("--fp8", action="store_true",
                     help="store the decoder's linear weights as float8 (NextStep-14B in about 15 GB)")
    gen.add_argument("--gpu-layers", type=int, metavar="N",
                     help="keep only N decoder layers on the GPU and stream the rest from RAM (default: all)")
    gen.add_argument("--out", required=True, help="output PNG; a batch writes OUT_0.png, OUT_1.png, ...")
    gen.add_argument("--save-tensors", help="also write tokens, latents and images to this .safetensors file")
    cli_plan.add_parser(commands)
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


def _input_image(path: str) -> torch.Tensor:
    image = load_rgb(path)
    cropped = center_crop_to_multiple(image, SIZE_MULTIPLE)
    if cropped.shape != image.shape:
        sys.stderr.write(f"note: input image {path} centre-cropped from {image.shape[-1]}x{image.shape[-2]} to "
                         f"{cropped.shape[-1]}x{cropped.shape[-2]} (multiples of {SIZE_MULTIPLE})\n")
    return cropped


def settings_from_args(args: argparse.Namespace) -> tuple[GenerationSettings, str]:
    """The settings and negative prompt of a `generate` call: the preset's (or the default preset's) values,
    with every flag given explicitly winning."""
    preset = PRESETS[args.preset or DEFAULT_PRESET]
    given = {name: getattr(args, name) for name in PRESET_SETTINGS if getattr(args, name) is not None}
    settings = GenerationSettings.from_preset(preset, batch=args.batch, cfg_schedule=args.cfg_schedule,
                                              seed=args.seed, **given)
    return settings, preset.negative if args.negative is None else args.negative


def run_generate(args: argparse.Namespace) -> None:
    settings, negative = settings_from_args(args)
    settings.validate()  # before the (slow) model load
    edit_images = [_input_image(args.image)] if args.image else []
    pipe = NextStepPipeline.from_pretrained(args.model, vae=args.vae, device=args.device, dtype=args.dtype,
                                            fp8=args.fp8, resident_layers=args.gpu_layers)
    result = pipe.generate(args.prompt, settings, negative=negative, positive=args.positive,
                           edit_images=edit_images, callback=ProgressBar())
    unit = images_to_unit(result.images)
    for path in save_png(unit, args.out):
        sys.stderr.write(f"saved {path}\n")
    if args.save_tensors:
        save_file({"tokens": result.tokens.cpu().contiguous(), "latents": result.latents.cpu().contiguous(),
                   "images": result.images.cpu().contiguous(), "images_uint8": to_uint8(unit).cpu().contiguous()},
                  args.save_tensors)
        sys.stderr.write(f"saved {args.save_tensors}\n")


RUNNERS = {"generate": run_generate, "plan": cli_plan.run}
"""Subcommand name -> the function that runs it."""


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_request:  # --help, or a bad argument already reported in one line
        return int(exit_request.code or 0)
    try:
        RUNNERS[args.command](args)
    except NextStepError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        sys.stderr.write("\ncancelled\n")
        return 130
    return 0
