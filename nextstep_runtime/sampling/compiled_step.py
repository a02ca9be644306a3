"""The flow head's per-token work as fused kernels: `torch.compile` (inductor) of the solver step, on CUDA GPUs.

Why: per token the head runs S solver steps x depth blocks on a handful of rows, thousands of tiny
operations (layer norms, modulations, activations, the guidance sum) between a few small matmuls. On CUDA inductor
fuses the elementwise work around the matmuls, and the existing graph capture then replays those kernels. On the CPU
it does not pay: on one thread the compiled head was no faster than the eager one (benchmarks/bench_generate.py,
`small` preset: 37.0 against 35.2 ms per token; fusing the linears into reductions as well changed nothing), for a
compile of half a minute and more at the first run, so compiling is off there by default (devices.compile_default).

One step function serves every step of every token: the step index is a [1] long tensor, so one graph
is compiled for the first shape (batch, guidance rows, steps) and reused; the adaLN modulations of a token
are a second small graph. A second shape makes torch compile a dynamic-shape graph that then serves every
later shape too, so a session compiles each function at most twice per dtype and device. Compiling the S steps
unrolled into one graph was tried and rejected: its compile time grows with S and exceeded 13 minutes on two busy
CPU cores (one step compiled in 20-80 s there).

Inductor compiles lazily, at the first call of a new shape: that call logs a progress line and pays the
compile time (the disk cache of inductor makes later processes faster). What can be known before is checked up
front (`compile_problem`: a torch too old for the settings used here, a Python torch.compile refuses, no C++
compiler for CPU kernels, no Triton for GPU ones). If compiling fails anyway (a toolchain inductor cannot use, any
compiler error), one warning is logged and the process runs eagerly from then on, with the same results.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from typing import Any, Callable

import torch

from ..devices import compile_version_refusal, resolve_device
from ..failures import is_out_of_memory
from ..model.flow_head import FlowNet
from .fallback import Fallback, first_line

log = logging.getLogger(__name__)

RECOMPILE_LIMIT = 64
"""Shapes compiled per process before torch falls back to eager (its default of 8 is too few for a
session that changes batch, guidance rows and step counts)."""


def solver_step(head: FlowNet, x: torch.Tensor, modulations: torch.Tensor, step: torch.Tensor,
                weights: torch.Tensor, noise: torch.Tensor | None, keep: torch.Tensor) -> torch.Tensor:
    """One solver step of a token with guidance: x' = (a x + c n) + sum_g W_g v_g.

    x [1, B*D] float32; `step` [1] long; `weights` [S, G, 1] the step's velocity coefficient times each of
    the G guidance rows' weight; `noise` [S, B*D] already scaled by c (None for the ode solver, where a = 1);
    `keep` [S] the coefficients a. The guidance sum is elementwise in float32 (a matmul could run in TF32).
    """
    groups = weights.shape[1]
    tokens = x.view(-1, head.input_proj.in_features).to(head.input_proj.weight.dtype)
    velocity = head.velocity(tokens, modulations, step).float().view(groups, -1)
    base = x if noise is None else noise.index_select(0, step) + keep.index_select(0, step) * x
    return base + (weights.index_select(0, step)[0] * velocity).sum(0, keepdim=True)


def compile_problem(device: torch.device | str | None = None) -> str | None:
    """Why torch.compile of the flow head cannot be attempted for `device` (default: where `auto` runs), or None:
    torch too old (devices.compile_version_refusal), a Python torch.compile refuses, no C++ compiler for CPU
    kernels, no Triton for CUDA ones. A None is no promise: compiling can still fail, and then falls back."""
    refusal = compile_version_refusal()
    if refusal is not None:
        return refusal
    try:
        torch._dynamo.eval_frame.check_if_dynamo_supported()
    except RuntimeError as exc:  # e.g. "Python 3.15+ not yet supported for torch.compile"
        return str(exc)
    device_type = (resolve_device("auto") if device is None else torch.device(device)).type
    if device_type == "cpu":
        from torch._inductor.cpp_builder import get_cpp_compiler

        try:
            get_cpp_compiler()
        except Exception as exc:  # noqa: BLE001 - InvalidCxxCompiler, Windows' "cl is not found", ...
            return (f"no C++ compiler that torch.compile can use was found ({first_line(exc)}); install one (g++ "
                    f"or clang++; on Windows the Visual Studio Build Tools, run from a developer prompt)")
    if device_type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return ("torch.compile on a CUDA GPU needs Triton, which is not installed here or does not run on this "
                    "GPU (compute capability 7.0+); install triton (triton-windows on Windows)")
    return None


_COMPILE_OFF = ("the flow head runs without torch.compile (same images, slower). To skip the attempt, turn compile "
                "off (Model Loader `compile`, CLI --no-compile, from_pretrained(compile=False))")


@functools.cache
def _problem_warned(device_type: str) -> str | None:
    """compile_problem for a device type, checked and warned about once per process."""
    problem = compile_problem(device_type)
    if problem is not None:
        log.warning("NextStep: %s; %s", problem, _COMPILE_OFF)
    return problem


class _Compiled:
    """The process-wide compiled functions: compiled once, shared by every model and call (inductor's graphs are keyed
    on shapes, not on the model instance), through one Fallback: off for good after the first failure (building
    them included: torch.compile itself refuses some installs), every call guarded, a recompile included. Running out
    of memory is not a compile failure: it reaches the caller's memory handling."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.shapes: set[tuple] = set()
        self.fallback = Fallback("torch.compile failed", _COMPILE_OFF, lambda exc: not is_out_of_memory(exc))
        try:
            self.modulations = torch.compile(FlowNet.modulations, fullgraph=True, dynamic=None)
            self.step = torch.compile(solver_step, fullgraph=True, dynamic=None)
        except Exception as exc:  # noqa: BLE001 - whatever torch.compile refuses: never fail the run
            self.fallback.fail(f"{type(exc).__name__}: {first_line(exc)}")
        # a session changes batch, guidance rows and step counts: more shapes than dynamo's default of 8 (raised once,
        # for the process; a limit only ever raised leaves a host's own compiled models as they were)
        dynamo = torch._dynamo.config
        dynamo.recompile_limit = max(dynamo.recompile_limit, RECOMPILE_LIMIT)
        dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, 16 * RECOMPILE_LIMIT)

    def call(self, key: tuple, compiled: Callable[[], Any], eager: Callable[[], Any]) -> Any:
        """compiled(), compiling it first for a new `key` (shape, dtype, device): the first call of a key logs and
        holds the lock, so two threads do not compile it twice; eager() for good once compiling failed."""
        if key in self.shapes:
            return self.fallback.run(compiled, eager)
        with self.lock:
            if self.fallback.failure is None:
                log.info("NextStep: compiling the flow head's %s for %s (a new shape compiles once per process: "
                         "seconds on a GPU, a minute or more on a small CPU)...", key[0], _describe(key))
            start = time.perf_counter()
            result = self.fallback.run(compiled, eager)
            if self.fallback.failure is None:
                self.shapes.add(key)
                log.info("NextStep: compiled flow head %s ready in %.1f s", key[0], time.perf_counter() - start)
            return result


_compiled: _Compiled | None = None


def compile_failure() -> str | None:
    """Why compiling the flow head failed in this process (every later run is eager), or None: not tried yet, or
    it worked."""
    return None if _compiled is None else _compiled.fallback.failure


def _shared() -> _Compiled:
    global _compiled
    if _compiled is None:
        _compiled = _Compiled()
    return _compiled


class SolverSteps:
    """A token's modulations and solver steps, through the compiled functions when `compile` is on and
    compiling works on `device`, eagerly otherwise. Callers see the same results either way (within float
    rounding: fused kernels may order a reduction differently)."""

    def __init__(self, compile: bool, device: torch.device) -> None:
        # torch's own switch (TORCH_COMPILE_DISABLE=1) turns torch.compile into a no-op: then say nothing of compiling
        wanted = compile and not torch._dynamo.config.disable
        self.compiled = _shared() if wanted and _problem_warned(torch.device(device).type) is None else None

    @property
    def active(self) -> bool:
        """Whether the compiled functions are in use (False after a failure fell back to eager)."""
        return self.compiled is not None and self.compiled.fallback.failure is None

    def modulations(self, head: FlowNet, time_embeddings: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        args = (head, time_embeddings, condition)
        if not self.active:
            return FlowNet.modulations(*args)
        key = ("modulations", len(head.res_blocks), condition.shape[0], time_embeddings.shape[0],
               condition.dtype, condition.device)
        return self.compiled.call(key, lambda: self.compiled.modulations(*args), lambda: FlowNet.modulations(*args))

    def step(self, head: FlowNet, x: torch.Tensor, modulations: torch.Tensor, step: torch.Tensor,
             weights: torch.Tensor, noise: torch.Tensor | None, keep: torch.Tensor) -> torch.Tensor:
        args = (head, x, modulations, step, weights, noise, keep)
        if not self.active:
            return solver_step(*args)
        batch, groups = x.numel() // head.input_proj.in_features, weights.shape[1]
        key = ("step", modulations.shape[1], batch, groups, weights.shape[0], noise is None, x.device,
               modulations.dtype)
        return self.compiled.call(key, lambda: self.compiled.step(*args), lambda: solver_step(*args))


def _describe(key: tuple) -> str:
    if key[0] == "modulations":
        return f"{key[2]} rows, {key[3]} steps"
    return f"batch {key[2]}, {key[3]} guidance rows, {key[4]} steps"
