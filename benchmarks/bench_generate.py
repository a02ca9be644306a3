"""End-to-end generation benchmark on a random-weight model of a named size; prints one JSON object.

    python benchmarks/bench_generate.py --preset small --height 128 --width 128 --steps 28 --cfg 7.5 \\
        --sampler sde --threads 2 --repeat 3 --compare-eager

seconds_per_image: median over --repeat runs after one warm-up, prompt to decoded image (loading
excluded), divided by the batch. The component figures are timed separately on the same inputs:
prefill_ms (prompt rows through the decoder), ms_per_token_backbone (one image token through the
decoder), ms_per_token_head (one token's solver steps with guidance),
vae_decode_ms. ms_per_token is the sampling time (prefill included) over the image's tokens.
planned_peak_vram_mb: the memory planner's peak for the same job, next to the measured peak_vram_mb.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).parent)]

from eager_baseline import eager_sample  # noqa: E402
from presets import PRESETS, VAE_PRESETS, random_model, random_vae  # noqa: E402

from nextstep_runtime.generate import DecodeState, TokenSolver  # noqa: E402
from nextstep_runtime.memory_plan import Job, ModelFootprint, WeightMode, plan_memory  # noqa: E402
from nextstep_runtime.pipeline import DTYPES, GenerationSettings, NextStepPipeline, resolve_device, resolve_dtype  # noqa: E402
from nextstep_runtime.prompt import load_tokenizer  # noqa: E402
from nextstep_runtime.sampling import SAMPLERS  # noqa: E402
from nextstep_runtime.tokens import LatentNormalization  # noqa: E402

TOKENIZER = ROOT / "tests" / "fixtures" / "tiny-nextstep"
CAPTION = "A baby panda wearing an Iron Man mask, holding a board with 'NextStep-1' written on it"
NEGATIVE = ("lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, cropped, "
            "worst quality, low quality, normal quality, jpeg artifacts, signature, watermark, username, blurry.")


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds for fn(), with the device drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _median_ms(fn: Callable[[], object], device: torch.device, repeat: int) -> float:
    return 1000 * statistics.median(_timed(fn, device) for _ in range(repeat))


@torch.inference_mode()
def _component_ms(pipe: NextStepPipeline, inputs, device: torch.device, repeat: int) -> tuple[float, float, float]:
    """(prefill, one token's head work, one token through the decoder at mid-image), median milliseconds."""
    total = inputs.grid[0] * inputs.grid[1]
    state = DecodeState(pipe.model, inputs.rows, total)
    prefill_ms = _median_ms(lambda: state.prefill(inputs.rows, None), device, repeat)
    solve = TokenSolver(pipe.model, inputs)
    condition = state.prefill(inputs.rows, None)
    first = torch.zeros(1, dtype=torch.long, device=device)
    token = solve(first, condition)
    head_ms = _median_ms(lambda: solve(first, condition), device, max(repeat, 5))
    middle = torch.tensor([state.prefill_len + total // 2], device=device)
    backbone_ms = _median_ms(lambda: state.feed(token, middle), device, max(repeat, 5))
    return prefill_ms, head_ms, backbone_ms


def _planned_peak(args: argparse.Namespace, dtype: torch.dtype, prompt_tokens: int) -> int:
    """The memory planner's peak for this run, to compare with the measured peak_vram_mb."""
    footprint = ModelFootprint.from_config(PRESETS[args.preset], vae_config=VAE_PRESETS[args.preset])
    job = Job(width=args.width, height=args.height, batch=args.batch, cfg=args.cfg, steps=args.steps,
              prompt_tokens=prompt_tokens)
    return plan_memory(footprint, WeightMode(dtype, args.fp8), job).peak_gpu_bytes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), required=True)
    defaults = GenerationSettings()
    parser.add_argument("--height", type=int, default=defaults.height)
    parser.add_argument("--width", type=int, default=defaults.width)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--cfg", type=float, default=defaults.cfg)
    parser.add_argument("--sampler", choices=SAMPLERS, default=defaults.sampler)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", choices=("auto", *DTYPES), default="auto")
    parser.add_argument("--fp8", action="store_true", help="decoder linear weights stored as float8 e4m3fn")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--compare-eager", action="store_true",
                        help="also time the straightforward eager loop (benchmarks/eager_baseline.py)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    pipe = NextStepPipeline(random_model(args.preset, dtype, device, fp8=args.fp8), load_tokenizer(TOKENIZER),
                            LatentNormalization(), random_vae(args.preset, dtype, device))
    settings = GenerationSettings(width=args.width, height=args.height, batch=args.batch, steps=args.steps,
                                  cfg=args.cfg, sampler=args.sampler)
    generate = lambda: pipe.generate(CAPTION, settings, negative=NEGATIVE)  # noqa: E731
    generate()  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    runs = [_timed(generate, device) for _ in range(args.repeat)]
    seconds = statistics.median(runs) / args.batch

    inputs = pipe.prepare(CAPTION, settings, negative=NEGATIVE)
    total = inputs.grid[0] * inputs.grid[1]
    prefill_ms, head_ms, backbone_ms = _component_ms(pipe, inputs, device, args.repeat)
    with torch.inference_mode():
        sample_s = statistics.median(_timed(lambda: pipe.sample(CAPTION, settings, negative=NEGATIVE), device)
                                     for _ in range(args.repeat))
        latents = pipe.sample(CAPTION, settings, negative=NEGATIVE).latents
        vae_ms = _median_ms(lambda: pipe.decode(latents), device, args.repeat)

    report = {
        "seconds_per_image": round(seconds, 4),
        "ms_per_token": round(1000 * sample_s / total, 3),
        "ms_per_token_backbone": round(backbone_ms, 3),
        "ms_per_token_head": round(head_ms, 3),
        "prefill_ms": round(prefill_ms, 3),
        "vae_decode_ms": round(vae_ms, 3),
        "tokens_per_s": round(total * args.batch / sample_s, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_vram_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.type == "cuda" else None,
        "planned_peak_vram_mb": round(_planned_peak(args, dtype, inputs.rows.input_ids.shape[1]) / 2**20, 1),
        "args": {**vars(args), "device": str(device), "dtype": str(dtype).removeprefix("torch."),
                 "threads": torch.get_num_threads()},
    }
    if args.compare_eager:
        eager_s = statistics.median(_timed(lambda: eager_sample(pipe, CAPTION, NEGATIVE, settings), device)
                                    for _ in range(args.repeat))
        report["eager_sampling_seconds"] = round(eager_s, 4)
        report["sampling_seconds"] = round(sample_s, 4)
        report["speedup_vs_eager"] = round(eager_s / sample_s, 3)
    return report


if __name__ == "__main__":
    print(json.dumps(main()))
