"""The self-check: a small random NextStep model, built here and written to a temp folder (nothing is downloaded),
samples the same tokens on the run device in each way a real run can compute them, against the CPU float32
reference. A kernel that imports but computes wrong, a compiler that builds wrong code, a CUDA graph that replays
stale inputs: each shows as a difference beyond what the precision explains.

The model goes through the real loader (`load_model`), so fp8 and int4 are quantised as a real model is, and
the real token loop (`sample_tokens`): prefill with a padded guidance row, the solver with guidance and noise,
tokens fed back through the KV cache.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file

from ..config import ModelConfig
from ..devices import DeviceTraits, auto_dtype
from ..model.network import NextStepModel
from ..model.placement import Placement
from ..sampling.compiled_step import compile_failure
from ..sampling.loop_inputs import TokenLoopInputs
from ..sampling.noise import NoiseSpec
from ..sampling.prompt import PromptRows
from ..sampling.solvers import guidance_scales, solver_plan
from ..sampling.token_loop import sample_tokens
from ..weights.loading import load_model
from ..weights.model_folder import CONFIG_NAME, SINGLE_WEIGHTS_NAME
from ..weights.modes import FLOAT_WEIGHTS, WeightMode, mode_refusal
from .environment import compile_report, exception_line

TINY_CONFIG = {
    "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "intermediate_size": 128, "vocab_size": 64, "boi": 61, "eoi": 62, "image_placeholder_id": 63,
    "attention_bias": True, "o_attention_bias": False, "mlp_bias": False, "max_position_embeddings": 256,
    "latent_channels": 16, "latent_patch_size": 2, "fm_head_dim": 48, "fm_head_layers": 2,
}
"""A NextStep config.json of the released models' shape (grouped-query attention, the flow head), at widths every
weight format's kernels take (int4 groups of 32, CUDA's packing tiles)."""
LAYERS = TINY_CONFIG["num_hidden_layers"]
SDPA = (None,)
"""The one range's attention kernel: SDPA (the attention report checks flash-attn on its own)."""
GRID = (3, 3)
STEPS = 4
CFG = 3.0
SEED = 7
PROMPT = 12
"""Tokens of the prompt rows; the negative row is left-padded by 3 (the padded-prefill path)."""

TOLERANCES = {"float32": 1e-4, "bfloat16": 0.1, "float16": 0.05, "fp8": 0.25, "int4": 0.5}
"""Largest difference from the float32 reference, relative to the reference tokens' largest value, that the
precision explains: float32 differs only by the order of sums (fused kernels); half precision and quantised
weights round each layer, and the error grows as sampled tokens are fed back. A broken kernel is off by the
tokens' whole size (relative difference near or above 1) or gives NaN. Measured on the CPU against this reference:
bfloat16 0.021, float16 0.003, fp8 0.07-0.08, int4 0.26-0.29."""


@dataclass(frozen=True)
class Check:
    """One way of computing the tokens on the run device."""

    name: str
    mode: WeightMode
    dtype: torch.dtype
    compile: bool = False
    cuda_graph: bool = False

    @property
    def precision(self) -> str:
        return str(self.dtype).removeprefix("torch.") if self.mode.storage == "full" else self.mode.storage


def write_tiny_model(folder: Path) -> None:
    """config.json and model.safetensors of a random model (seeded: the same model every time)."""
    config = ModelConfig.from_dict(TINY_CONFIG)
    generator = torch.Generator().manual_seed(SEED)
    with torch.device("meta"):
        shapes = {name: tensor.shape for name, tensor in NextStepModel(config).state_dict().items()}
    tensors = {}
    for name, shape in shapes.items():
        values = torch.randn(shape, generator=generator)
        if len(shape) >= 2:
            tensors[name] = values / shape[-1] ** 0.5
        else:
            tensors[name] = 1 + 0.1 * values if "norm" in name else 0.1 * values
    save_file(tensors, str(folder / SINGLE_WEIGHTS_NAME))
    (folder / CONFIG_NAME).write_text(json.dumps(TINY_CONFIG), encoding="utf-8")


def tiny_inputs(config: ModelConfig) -> TokenLoopInputs:
    """A text-to-image call with guidance: a conditional and a left-padded negative row."""
    generator = torch.Generator().manual_seed(SEED)
    ids = torch.randint(0, config.boi, (2, PROMPT), generator=generator)
    ids[:, -1] = config.boi
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    rows = PromptRows(input_ids=ids, attention_mask=mask, text_length=PROMPT - 1, groups=2, image_rows=[False, False])
    plan = solver_plan("sde", STEPS, 1.0)
    tokens = GRID[0] * GRID[1]
    noise = NoiseSpec.plan(SEED, tokens, STEPS, plan.stochastic, 1, config.token_dim)
    return TokenLoopInputs(rows=rows, image_tokens=None, plan=plan, noise=noise, batch=1, grid=GRID, use_norm=False,
                           cfg=guidance_scales(CFG, tokens, "constant", "official"), cfg_img=[1.0] * tokens)


def checks_for(device: torch.device) -> list[tuple[Check, str | None]]:
    """Each check on `device` with why it cannot run there, or None: eager in the `auto` dtype, compiled, the
    captured CUDA graph, fp8 and int4 weights, each where the device and this install allow it."""
    traits = DeviceTraits.of(device)
    dtype = auto_dtype(traits)
    full, fp8, int4 = (WeightMode(storage) for storage in ("full", "fp8", "int4"))
    compiling = compile_report(device)["problem"]  # the tiny compile's verdict: a compiler that fails is skipped
    return [
        (Check("eager", full, dtype), None),
        (Check("compiled", full, dtype, compile=True), compiling and f"compile unavailable: {compiling}"),
        (Check("cuda graph", full, dtype, compile=compiling is None, cuda_graph=True),
         None if device.type == "cuda" else "CUDA graphs need a CUDA GPU"),
        (Check("fp8", fp8, dtype), mode_refusal(fp8, FLOAT_WEIGHTS, traits, dtype)),
        (Check("int4", int4, dtype), mode_refusal(int4, FLOAT_WEIGHTS, traits, dtype)),
    ]


@contextmanager
def _warnings_logged() -> Iterator[list[str]]:
    """The runtime's warnings while the block runs (a fallback to eager, a failed CUDA graph capture)."""
    records: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())
    runtime = logging.getLogger(__package__.partition(".")[0])
    runtime.addHandler(handler)
    try:
        yield records
    finally:
        runtime.removeHandler(handler)


def _run(folder: Path, check: Check, device: torch.device, reference: torch.Tensor, inputs: TokenLoopInputs) -> dict:
    result = {"name": check.name, "precision": check.precision}
    start = time.perf_counter()
    with _warnings_logged() as warnings:
        try:
            model = load_model(folder, check.mode, Placement.single(device, check.dtype, LAYERS))
            tokens = sample_tokens(model, inputs, SDPA, compile=check.compile, cuda_graphs=check.cuda_graph).cpu()
        except Exception as exc:  # noqa: BLE001 - a kernel or toolchain that fails is the answer, not a crash
            return {**result, "verdict": "error", "note": exception_line(exc), "seconds": time.perf_counter() - start}
    difference = float((tokens - reference).abs().max() / reference.abs().max())
    tolerance = TOLERANCES[check.precision]
    fell_back = check.compile and compile_failure() is not None
    notes = list(dict.fromkeys(warnings + ([compile_failure()] if fell_back else [])))
    verdict = "fail" if not difference <= tolerance else "fell back" if fell_back or warnings else "pass"
    return {**result, "verdict": verdict, "max_difference": difference, "tolerance": tolerance,
            "note": "; ".join(notes) or None, "seconds": time.perf_counter() - start}


def self_check(device: torch.device) -> dict:
    """Each check's largest difference from the CPU float32 reference (relative to the tokens' largest value)
    and its verdict: pass, fail (beyond the precision's tolerance), fell back (right, but a fallback ran: eager
    instead of compiled, no CUDA graph), error (raised; the message is kept), skipped (not possible here, and
    why). Everything it writes is in a temp folder it removes."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="nextstep-doctor-") as temp:
        folder = Path(temp)
        write_tiny_model(folder)
        config = ModelConfig.from_dict(TINY_CONFIG)
        inputs = tiny_inputs(config)
        reference = sample_tokens(load_model(folder, WeightMode(), Placement.single("cpu", torch.float32, LAYERS)),
                                  inputs, SDPA)
        checks = [_run(folder, check, device, reference, inputs) if skip is None
                  else {"name": check.name, "precision": check.precision, "verdict": "skipped", "note": skip}
                  for check, skip in checks_for(device)]
    return {"device": str(device), "checks": checks,
            "passed": all(check["verdict"] in ("pass", "fell back", "skipped") for check in checks),
            "seconds": time.perf_counter() - start}
