"""Command line: `python -m nextstep_runtime generate ...` writes PNGs (and optionally tensors)."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import NoReturn, Sequence

import torch
from safetensors.torch import save_file

from .errors import NextStepError
from .images import center_crop_to_multiple, load_rgb, save_png, to_uint8
from .pipeline import DTYPES, SIZE_MULTIPLE, GenerationSettings, NextStepPipeline, images_to_unit
from .prompt import PROFILES
from .sampling import CFG_SCHEDULES, SAMPLERS

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad arguments in one line, like every other input error."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"error: {message} (see --help)\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the empty ones (None, off)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    defaults = GenerationSettings()
    parser = _Parser(prog="python -m nextstep_runtime", description="NextStep text-to-image and image editing.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    gen = commands.add_parser("generate", help="generate or edit images",
                              formatter_class=_HelpFormatter)
    gen.add_argument("--model", required=True, help="NextStep model folder (config.json, weights, tokenizer)")
    gen.add_argument("--vae", help="VAE folder or .safetensors file (default: the model's vae_name_or_path)")
    gen.add_argument("--prompt", required=True, help="caption; for editing it holds <image> where the image goes")
    gen.add_argument("--positive", help="appended to the caption after a space")
    gen.add_argument("--negative", help="negative prompt (empty when omitted)")
    gen.add_argument("--image", help="input image for editing")
    gen.add_argument("--width", type=int, default=defaults.width, help="pixels, a multiple of 16")
    gen.add_argument("--height", type=int, default=defaults.height, help="pixels, a multiple of 16")
    gen.add_argument("--batch", type=int, default=defaults.batch, help="images per prompt")
    gen.add_argument("--steps", type=int, default=defaults.steps, help="solver steps per token")
    gen.add_argument("--cfg", type=float, default=defaults.cfg, help="text guidance scale (1 = off)")
    gen.add_argument("--cfg-img", type=float, default=defaults.cfg_img, help="image guidance scale for editing")
    gen.add_argument("--cfg-schedule", choices=CFG_SCHEDULES, default=defaults.cfg_schedule,
                     help="guidance per token: constant, or linear (rising for official, falling for hf)")
    gen.add_argument("--shift", type=float, default=defaults.timesteps_shift, help="timesteps shift")
    gen.add_argument("--sampler", choices=SAMPLERS, default=defaults.sampler, help="flow-matching solver")
    gen.add_argument("--profile", choices=PROFILES, default=defaults.profile,
                     help="official: GitHub pipeline; hf: pipeline shipped in the Hugging Face repos")
    gen.add_argument("--use-norm", action="store_true", help="LayerNorm each sampled token (NextStep-1-Large)")
    gen.add_argument("--seed", type=int, default=defaults.seed, help="noise seed (drawn on the CPU: same image on any device)")
    gen.add_argument("--device", default="auto", help="cpu, cuda or auto")
    gen.add_argument("--dtype", choices=("auto", *DTYPES), default="auto", help="compute dtype (auto: bf16 on CUDA)")
    gen.add_argument("--fp8", action="store_true",
                     help="store the decoder's linear weights as float8 (NextStep-14B in about 15 GB)")
    gen.add_argument("--gpu-layers", type=int, metavar="N",
                     help="keep only N decoder layers on the GPU and stream the rest from RAM (default: all)")
    gen.add_argument("--no-compile", dest="compile", action="store_false",
                     help="run the flow head eagerly instead of compiling it with torch.compile (compiling takes "
                          "a minute or more per image shape on a CPU; without a C++ compiler it falls back anyway)")
    gen.add_argument("--out", required=True, help="output PNG; a batch writes OUT_0.png, OUT_1.png, ...")
    gen.add_argument("--save-tensors", help="also write tokens, latents and images to this .safetensors file")
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


def run_generate(args: argparse.Namespace) -> None:
    settings = GenerationSettings(
        width=args.width, height=args.height, batch=args.batch, steps=args.steps, cfg=args.cfg,
        cfg_img=args.cfg_img, cfg_schedule=args.cfg_schedule, timesteps_shift=args.shift, sampler=args.sampler,
        profile=args.profile, use_norm=args.use_norm, seed=args.seed)
    settings.validate()  # before the (slow) model load
    edit_images = [_input_image(args.image)] if args.image else []
    pipe = NextStepPipeline.from_pretrained(args.model, vae=args.vae, device=args.device, dtype=args.dtype,
                                            fp8=args.fp8, resident_layers=args.gpu_layers, compile=args.compile)
    result = pipe.generate(args.prompt, settings, negative=args.negative, positive=args.positive,
                           edit_images=edit_images, callback=ProgressBar())
    unit = images_to_unit(result.images)
    for path in save_png(unit, args.out):
        sys.stderr.write(f"saved {path}\n")
    if args.save_tensors:
        save_file({"tokens": result.tokens.cpu().contiguous(), "latents": result.latents.cpu().contiguous(),
                   "images": result.images.cpu().contiguous(), "images_uint8": to_uint8(unit).cpu().contiguous()},
                  args.save_tensors)
        sys.stderr.write(f"saved {args.save_tensors}\n")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_request:  # --help, or a bad argument already reported in one line
        return int(exit_request.code or 0)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # progress lines such as compiling
    try:
        run_generate(args)
    except NextStepError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        sys.stderr.write("\ncancelled\n")
        return 130
    return 0
