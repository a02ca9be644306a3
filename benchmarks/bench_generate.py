"""End-to-end generation benchmark on a random-weight model of a named size; prints one JSON object.

    python benchmarks/bench_generate.py --preset small --height 128 --width 128 --steps 28 --cfg 7.5 \\
        --sampler sde --repeat 5 \\
        --compare-official ~/NextStep-1 --official-python ~/nextstep-official/bin/python

On 1 CPU thread unless --threads says otherwise: on a small shared machine any second process slows
multi-threaded math several-fold (OpenMP threads wait for each other), one thread far less; the report
gives the thread count and the load average it ran under. Every timed figure comes with its spread.

seconds_per_image: median over --repeat runs after one warm-up, prompt to decoded image (loading
excluded), divided by the batch, with the flow head compiled where the runtime compiles it by default (CUDA;
--compile / --no-compile choose) and interleaved with eager runs then;
seconds_per_image_spread: [min, median, max] of those runs (likewise for the eager and official runs).
compile_seconds: the warm-up's extra time over a compiled run (compiling every graph of this shape).
eager_seconds_per_image: the same runs with the head uncompiled, interleaved with the compiled ones (and
with the official pipeline's), so a busy machine slows all of them alike. The component figures are timed
separately on the same inputs, each as [min, median, max]: prefill_ms (prompt rows through the decoder),
ms_per_token_backbone (one image token through the decoder), ms_per_token_head / ms_per_token_head_eager
(one token's solver steps with guidance), vae_decode_ms. ms_per_token_backbone_bound / ms_per_token_head_bound:
the least those can take on this machine (bounds.py: operations and memory traffic against the machine's
rates measured in the same process, machine_rates). head_ops_per_token / head_ops_per_token_eager: operations
one token's head work dispatches (profiler: aten operators not inside another one, plus each fused CPU kernel; on CUDA, GPU
kernels); head_profiler_events_per_token(_eager): every profiler event (internal calls and wrappers too).

--compare-official PATH: a checkout of github stepfun-ai/NextStep-1 (the 2025 pipeline,
nextstep/models/pipeline_nextstep.py), run by --official-python (an environment with its dependencies,
transformers 4.49) on the same random weights, saved in the official layout to a temporary folder, with the
same settings; its own torch.compile is off (ENABLE_TORCH_COMPILE=false) unless --official-compile.
official_ratio: seconds_per_image / official_seconds_per_image.
planned_peak_vram_mb: the memory planner's peak for the same job, next to the measured peak_vram_mb.
--keep-fraction F also times, in the same process and alternating with full runs, a run that keeps the
first F of the token rows of a full run's output and regenerates the rest (inpainting/outpainting cost).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).parent)]

from bounds import bounds, spread  # noqa: E402
from official_layout import save_official_layout  # noqa: E402
from presets import PRESETS, VAE_PRESETS, random_model, random_vae  # noqa: E402

from nextstep_runtime import (  # noqa: E402
    DTYPES,
    SAMPLERS,
    DeviceList,
    DeviceTraits,
    GenerationSettings,
    Job,
    LatentNormalization,
    ModelFootprint,
    NextStepPipeline,
    Targets,
    WeightMode,
    compile_default,
    load_tokenizer,
    plan_mode,
    resolve_device,
    resolve_dtype,
)
from nextstep_runtime.sampling.decode_state import DecodeState  # noqa: E402
from nextstep_runtime.sampling.guided_head import GuidedHead  # noqa: E402
from nextstep_runtime.sampling.token_loop import TokenStep  # noqa: E402

TOKENIZER = ROOT / "tests" / "fixtures" / "tiny-nextstep"
CAPTION = "A baby panda wearing an Iron Man mask, holding a board with 'NextStep-1' written on it"
NEGATIVE = ("lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, cropped, "
            "worst quality, low quality, normal quality, jpeg artifacts, signature, watermark, username, blurry.")


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds for fn(), with the device drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _spread_ms(fn: Callable[[], object], device: torch.device, repeat: int) -> list[float]:
    """[min, median, max] milliseconds of `repeat` calls."""
    return spread([timed(fn, device) for _ in range(repeat)], 1000)


def _profiled_ops(fn: Callable[[], object], device: torch.device) -> tuple[int, int]:
    """(operations dispatched, all profiler events) of one call. Dispatched: aten operators not called from
    inside another aten operator, plus every fused inductor CPU kernel (on CUDA: every GPU kernel instead);
    all events also count the operators' internal calls (as_strided, copy_, ...) and wrappers."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profile:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = profile.events()
    if device.type == "cuda":
        return sum(event.device_type == torch.autograd.DeviceType.CUDA for event in events), len(events)

    def nested(event) -> bool:
        parent = event.cpu_parent
        while parent is not None:
            if parent.name.startswith("aten::"):
                return True
            parent = parent.cpu_parent
        return False

    dispatched = [event for event in events
                  if (event.name.startswith("aten::") or "cpp_fused" in event.name) and not nested(event)]
    return len(dispatched), len(events)


@torch.inference_mode()
def _component_figures(pipe: NextStepPipeline, inputs, device: torch.device, repeat: int) -> dict:
    """Prefill, one token's head work (compiled and eager: time and profiler events), one token through the
    decoder at mid-image; [min, median, max] milliseconds."""
    total = inputs.grid[0] * inputs.grid[1]
    state = DecodeState(pipe.model, inputs.rows, total, pipe.attention)
    figures = {"prefill_ms": _spread_ms(lambda: state.prefill(inputs.rows, None), device, repeat)}
    condition = state.prefill(inputs.rows, None)
    first = torch.zeros(1, dtype=torch.long, device=device)
    for suffix, compile in (("", pipe.compile), ("_eager", False)):
        head = GuidedHead(pipe.model, inputs, compile)
        token = head(first, condition)
        figures[f"ms_per_token_head{suffix}"] = _spread_ms(lambda: head(first, condition), device, max(repeat, 5))
        ops, events = _profiled_ops(lambda: head(first, condition), device)
        figures[f"head_ops_per_token{suffix}"], figures[f"head_profiler_events_per_token{suffix}"] = ops, events
    step = TokenStep(state, head, use_cuda_graphs=False, feed_only=True)
    figures["ms_per_token_backbone"] = _spread_ms(lambda: step.feed(token, total // 2), device, max(repeat, 5))
    if device.type == "cpu":
        figures.update(bounds(pipe.model, state.row_count, inputs.batch, len(inputs.plan.a),
                              state.prefill_len + total - 1))
    return figures


class OfficialPipeline:
    """The official pipeline in its own process (benchmarks/official_runner.py), loaded once; `run()` times one
    image there."""

    def __init__(self, python: str, checkout: Path, model, vae, args: argparse.Namespace, workdir: Path) -> None:
        folder = save_official_layout(model, vae, workdir / "official-model")
        settings = {"caption": CAPTION, "negative": NEGATIVE, "batch": args.batch, "height": args.height,
                    "width": args.width, "cfg": args.cfg, "steps": args.steps, "threads": torch.get_num_threads()}
        env = {**os.environ, "ENABLE_TORCH_COMPILE": "true" if args.official_compile else "false"}
        self.process = subprocess.Popen([python, str(Path(__file__).with_name("official_runner.py")), str(checkout),
                                         str(folder), json.dumps(settings)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.info = self._answer()

    def _answer(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"the official pipeline exited (code {self.process.wait()}); see its messages above")
        return json.loads(line)

    def run(self) -> float:
        self.process.stdin.write("run\n")
        self.process.stdin.flush()
        return self._answer()["seconds"]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def _planned_peak(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, prompt_tokens: int) -> int:
    """The memory planner's peak for this run, to compare with the measured peak_vram_mb."""
    footprint = ModelFootprint.from_config(PRESETS[args.preset], vae_config=VAE_PRESETS[args.preset])
    settings = GenerationSettings(width=args.width, height=args.height, batch=args.batch, cfg=args.cfg,
                                  steps=args.steps)
    job = Job(settings, prompt_tokens=prompt_tokens)
    targets = Targets.on(DeviceList((device,)), str(dtype).removeprefix("torch."), lambda device: None,
                         vae_on_run_device=True)
    return plan_mode(footprint, WeightMode(_storage(args)), job, targets).devices[0].peak_bytes


def _storage(args: argparse.Namespace) -> str:
    return "fp8" if args.fp8 else "int4" if args.int4 else "full"


def _kept_vs_full(pipe: NextStepPipeline, settings: GenerationSettings, latents: torch.Tensor, fraction: float,
                  device: torch.device, repeat: int) -> dict:
    """Median sampling seconds of full runs and of runs keeping the first `fraction` of the token rows of
    `latents`, timed alternately so both see the same machine load."""
    token_pixels = 8 * pipe.model.config.latent_patch_size
    kept_rows = round(fraction * settings.height / token_pixels)
    mask = torch.ones((1, settings.height, settings.width))
    mask[:, : kept_rows * token_pixels] = 0
    full, kept = [], []
    for _ in range(repeat):
        full.append(timed(lambda: pipe.sample(CAPTION, settings, negative=NEGATIVE), device))
        kept.append(timed(lambda: pipe.sample(CAPTION, settings, negative=NEGATIVE, init_latents=latents,
                                               mask=mask), device))
    full_s, kept_s = statistics.median(full), statistics.median(kept)
    return {"kept_rows": kept_rows, "sampling_seconds_full": round(full_s, 4),
            "sampling_seconds_kept": round(kept_s, 4), "kept_over_full": round(kept_s / full_s, 3)}


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
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--fp8", action="store_true", help="decoder linear weights stored as float8 e4m3fn")
    weights.add_argument("--int4", action="store_true", help="decoder linear weights stored as grouped 4-bit")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: figures that a busy machine cannot distort much)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--keep-fraction", type=float,
                        help="also time a run keeping this fraction of the token rows (e.g. 0.5) against a full run")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="time the flow head compiled (torch.compile) beside the eager one (default: where the "
                             "runtime compiles by default, i.e. on CUDA)")
    parser.add_argument("--compare-official", type=Path, metavar="CHECKOUT",
                        help="a checkout of github stepfun-ai/NextStep-1 to time side by side (CPU, float32)")
    parser.add_argument("--official-python", default=sys.executable,
                        help="the Python of an environment where the official pipeline runs (transformers 4.49)")
    parser.add_argument("--official-compile", action="store_true",
                        help="let the official pipeline torch.compile its sampler (its default; minutes on a CPU)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # compile progress on stderr
    torch.set_num_threads(args.threads)
    torch._inductor.config.cpp.enable_kernel_profile = True  # fused CPU kernels visible to the op count
    device = resolve_device(args.device)
    if args.compile is None:
        args.compile = compile_default(DeviceTraits.of(device))
    dtype = resolve_dtype(args.dtype, DeviceTraits.of(device))
    model = random_model(args.preset, dtype, device, _storage(args))
    vae = random_vae(args.preset, dtype, device)
    pipe = NextStepPipeline(model, load_tokenizer(TOKENIZER), LatentNormalization(), vae, compile=args.compile)
    settings = GenerationSettings(width=args.width, height=args.height, batch=args.batch, steps=args.steps,
                                  cfg=args.cfg, sampler=args.sampler)
    generate = lambda: pipe.generate(CAPTION, settings, negative=NEGATIVE)  # noqa: E731
    official = None
    with tempfile.TemporaryDirectory() as workdir:
        if args.compare_official:
            if device.type != "cpu" or dtype != torch.float32 or args.fp8:
                raise SystemExit("--compare-official runs on the CPU in float32: add --device cpu --dtype float32")
            official = OfficialPipeline(args.official_python, args.compare_official, model, vae, args, Path(workdir))
        warmup_s = timed(generate, device)  # compiles every graph of this shape when compiling
        logging.info("warm-up (compiling included) %.1f s", warmup_s)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        official_warmup_s = official.run() if official else None
        runs: dict[str, list[float]] = {"compiled": [], "eager": [], "official": []}
        for _ in range(args.repeat):  # interleaved: a busy machine slows every variant alike
            runs["compiled" if args.compile else "eager"].append(timed(generate, device))
            if args.compile:
                pipe.compile = False
                runs["eager"].append(timed(generate, device))
                pipe.compile = True
            if official:
                runs["official"].append(official.run())
            logging.info("round done: %s", {name: round(times[-1], 3) for name, times in runs.items() if times})
        if official:
            official.close()
    per_image = {name: statistics.median(times) / args.batch for name, times in runs.items() if times}
    spread_names = {"seconds_per_image": "compiled" if args.compile else "eager",
                    "eager_seconds_per_image": "eager", "official_seconds_per_image": "official"}
    seconds = per_image["compiled" if args.compile else "eager"]

    inputs = pipe.prepare(CAPTION, settings, negative=NEGATIVE)
    total = inputs.grid[0] * inputs.grid[1]
    figures = _component_figures(pipe, inputs, device, args.repeat)
    with torch.inference_mode():
        sample_s = statistics.median(timed(lambda: pipe.sample(CAPTION, settings, negative=NEGATIVE), device)
                                     for _ in range(args.repeat))
        latents = pipe.sample(CAPTION, settings, negative=NEGATIVE).latents
        vae_ms = _spread_ms(lambda: pipe.decode(latents), device, args.repeat)

    report = {
        "seconds_per_image": round(seconds, 4),
        "eager_seconds_per_image": round(per_image["eager"], 4),
        "compile_speedup": round(per_image["eager"] / seconds, 3),
        "compile_seconds": round(max(warmup_s - seconds * args.batch, 0.0), 2) if args.compile else None,
        **{f"{key}_spread": spread(runs[name], 1 / args.batch) for key, name in spread_names.items() if runs[name]},
        "runs_seconds": {name: [round(t, 3) for t in times] for name, times in runs.items() if times},
        "ms_per_token": round(1000 * sample_s / total, 3),
        **figures,
        "vae_decode_ms": vae_ms,
        "tokens_per_s": round(total * args.batch / sample_s, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_vram_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.type == "cuda" else None,
        "planned_peak_vram_mb": round(_planned_peak(args, device, dtype, inputs.rows.input_ids.shape[1]) / 2**20, 1),
        "load_average": os.getloadavg(),
        "args": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "device": str(device),
                 "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads()},
    }
    if args.keep_fraction is not None:
        report.update(_kept_vs_full(pipe, settings, latents, args.keep_fraction, device, args.repeat))
    if official:
        report["official_seconds_per_image"] = round(per_image["official"], 4)
        report["official_first_run_seconds"] = round(official_warmup_s, 2)
        report["official_ratio"] = round(seconds / per_image["official"], 3)
        report["official_runtime"] = official.info
    return report


if __name__ == "__main__":
    print(json.dumps(main()))
