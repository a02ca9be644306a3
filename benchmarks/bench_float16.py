"""What the float32 residual stream costs a float16 run (devices.residual_dtype); prints one JSON object.

    python benchmarks/bench_float16.py --preset small --height 128 --width 128 --steps 28 --threads 1 --repeat 7

Time: one random-weight float16 model (benchmarks/presets.py) generates the same prompt and seed as the runtime runs
it (residual stream in float32) and as a plain float16 decoder would (residual stream in float16: the rule swapped
for this benchmark only), interleaved, after one warm-up of each; the median seconds and their ratio. Memory: the
planner's working memory (memory/estimate.py, what a run allocates besides weights) of the 14B model for a 512x512
image with cfg, float16 with the float32 residual stream against a 2-byte residual stream (bfloat16's, which is what
the same plan costs on an Ampere GPU); the KV cache and the weights do not change.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).parent)]

from bench_generate import CAPTION, TOKENIZER, timed  # noqa: E402
from presets import PRESETS, random_model, random_vae  # noqa: E402

import nextstep_runtime.memory.estimate as estimate  # noqa: E402
import nextstep_runtime.model.network as network  # noqa: E402
from nextstep_runtime import GenerationSettings, Job, LatentNormalization, NextStepPipeline, load_tokenizer  # noqa: E402


@contextmanager
def plain_float16_residual():
    """The decoder (and the estimate) with the residual stream in the compute dtype, as before the float32 stream."""
    saved = network.residual_dtype, estimate.residual_dtype
    network.residual_dtype = estimate.residual_dtype = lambda compute: compute
    try:
        yield
    finally:
        network.residual_dtype, estimate.residual_dtype = saved


def planned_work_bytes(job: Job) -> int:
    """The 14B model's planned activations for `job` in float16 (besides the KV cache, weights and loop buffers)."""
    return estimate.layer_work_bytes(PRESETS["full"], torch.float16, job)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--repeat", type=int, default=5)
    return parser.parse_args(argv)


@torch.inference_mode()
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    pipe = NextStepPipeline(random_model(args.preset, torch.float16, device), load_tokenizer(TOKENIZER),
                            LatentNormalization(), random_vae(args.preset, torch.float32, device), compile=False)
    settings = GenerationSettings(width=args.width, height=args.height, steps=args.steps, cfg=1.0)

    def float32_residual() -> float:
        return timed(lambda: pipe.generate(CAPTION, settings), device)

    def float16_residual() -> float:
        with plain_float16_residual():
            return float32_residual()

    runs = {"float32_residual": float32_residual, "float16_residual": float16_residual}
    for run in runs.values():
        run()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeat):
        for name, run in runs.items():
            times[name].append(run())
    seconds = {name: statistics.median(values) for name, values in times.items()}
    job = Job(GenerationSettings(width=512, height=512, cfg=7.5))
    work = planned_work_bytes(job)
    with plain_float16_residual():
        plain_work = planned_work_bytes(job)
    return {"seconds_per_image": {name: round(value, 3) for name, value in seconds.items()},
            "time_ratio": round(seconds["float32_residual"] / seconds["float16_residual"], 3),
            "planned_work_mb_14b_512px": {"float32_residual": round(work / 2**20, 1),
                                          "float16_residual": round(plain_work / 2**20, 1)},
            "planned_work_ratio": round(work / plain_work, 4),
            "args": {**vars(args), "threads": torch.get_num_threads(), "torch": torch.__version__}}


if __name__ == "__main__":
    print(json.dumps(main()))
