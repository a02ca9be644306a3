"""bf16 vs fp8 vs 4-bit decoder weights on a random-weight model of a named size; prints one JSON object.

    python benchmarks/bench_weight_modes.py --preset small --height 128 --width 128 --steps 28 --cfg 1 \\
        --repeat 3

The models are filled from the same random weights (seeded), the quantised ones through the loader's own
per-tensor conversion, and generate the same prompt and seed. Modes: float32 (the yardstick: how far bf16
itself is from it), bf16, fp8, int4. Per mode: seconds_per_image (median of
--repeat runs after one warm-up, the modes interleaved so a busy machine slows all alike; flow head uncompiled
unless --compile, so the decoder's share is what differs; 1 CPU thread unless --threads) with its spread
[min, median, max], the decoder's linear weight bytes, and the
difference from bf16: the decoder output for the prompt (relative L2, before the flow head can damp or
amplify it), max and mean absolute token difference, mean absolute image difference (images in
[-1, 1], as the pipeline returns them; the same measures tests/test_weight_modes.py asserts on the tiny
model). cfg 1 (the default) keeps guidance from amplifying the differences, as the tests do.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).parent)]

from bench_generate import CAPTION, TOKENIZER, timed  # noqa: E402
from bounds import spread  # noqa: E402
from presets import PRESETS, random_model, random_vae  # noqa: E402

from nextstep_runtime import (  # noqa: E402
    GenerationResult,
    GenerationSettings,
    LatentNormalization,  # noqa: E402
    NextStepPipeline,
    load_tokenizer,  # noqa: E402
)
from nextstep_runtime.sampling.decode_state import DecodeState  # noqa: E402

MODES = {"float32": (torch.float32, "full"), "bf16": (torch.bfloat16, "full"), "fp8": (torch.bfloat16, "fp8"),
         "int4": (torch.bfloat16, "int4")}
"""(compute dtype, weight storage) per mode; float32 is the yardstick: how far bf16 itself is from it."""


def decoder_linear_bytes(pipe: NextStepPipeline) -> int:
    """Bytes of every tensor (weights, scales) held by the decoder layers' linear modules."""
    return sum(tensor.numel() * tensor.element_size() for name, tensor in pipe.model.layers.state_dict().items()
               if "proj" in name)


def condition(pipe: NextStepPipeline, settings: GenerationSettings) -> torch.Tensor:
    """The decoder's output for the prompt (the first image token's condition), in float32."""
    inputs = pipe.prepare(CAPTION, settings)
    state = DecodeState(pipe.model, inputs.rows, inputs.grid[0] * inputs.grid[1], pipe.attention)
    return state.prefill(inputs.rows, None).float()


def closeness(result: GenerationResult, reference: GenerationResult) -> dict[str, float]:
    tokens = (result.tokens.float() - reference.tokens.float()).abs()
    images = (result.images.float() - reference.images.float()).abs()
    return {"token_max_diff": round(tokens.max().item(), 4), "token_mean_diff": round(tokens.mean().item(), 4),
            "image_mean_diff": round(images.mean().item(), 4)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), required=True)
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--cfg", type=float, default=1.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, as bench_generate.py)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="compile the flow head (torch.compile)")
    return parser.parse_args(argv)


@torch.inference_mode()
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    vae = random_vae(args.preset, torch.bfloat16, device)
    tokenizer = load_tokenizer(TOKENIZER)
    pipes = {}
    for name, (dtype, storage) in MODES.items():
        model = random_model(args.preset, dtype, device, storage)
        pipes[name] = NextStepPipeline(model, tokenizer, LatentNormalization(),
                                       vae if dtype == torch.bfloat16 else random_vae(args.preset, dtype, device),
                                       compile=args.compile)
    settings = GenerationSettings(width=args.width, height=args.height, steps=args.steps, cfg=args.cfg)
    conditions = {name: condition(pipe, settings) for name, pipe in pipes.items()}
    results = {name: pipe.generate(CAPTION, settings) for name, pipe in pipes.items()}  # also the warm-up
    times: dict[str, list[float]] = {name: [] for name in pipes}
    for _ in range(args.repeat):
        for name, pipe in pipes.items():
            times[name].append(timed(lambda: pipe.generate(CAPTION, settings), device))
        logging.info("round done: %s", {name: round(values[-1], 3) for name, values in times.items()})
    report = {}
    for name, pipe in pipes.items():
        seconds = statistics.median(times[name])
        report[name] = {"seconds_per_image": round(seconds, 3), "seconds_per_image_spread": spread(times[name]),
                        "speed_vs_bf16": round(statistics.median(times["bf16"]) / seconds, 3),
                        "decoder_linear_mb": round(decoder_linear_bytes(pipe) / 2**20, 2),
                        "condition_relative_diff": round(((conditions[name] - conditions["bf16"]).norm()
                                                          / conditions["bf16"].norm()).item(), 4),
                        **closeness(results[name], results["bf16"])}
    report["args"] = {**vars(args), "threads": torch.get_num_threads(), "load_average": os.getloadavg()}
    return report


if __name__ == "__main__":
    print(json.dumps(main()))
