"""Flow-matching solvers, the shifted time grid, and classifier-free guidance with its schedules.

Every solver step is affine in (x, v, noise): x' = a x + b v + c n. The coefficients depend only on
the time grid, so they are computed once per (sampler, steps, shift) in float64 on the host and the
token loop does three multiply-adds per step with no host synchronisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import NextStepError

SAMPLERS = ("sde", "cps", "ode", "sde_score")
CFG_SCHEDULES = ("constant", "linear")
NOISE_LEVEL = 0.8
"""Noise level `a` of the official sde and cps solvers."""


def time_grid(steps: int, shift: float) -> list[float]:
    """t_0..t_S: u_k = k/S shifted by t = u / (s - (s - 1) u), then t_S = 1."""
    grid = [(k / steps) / (shift - (shift - 1.0) * (k / steps)) for k in range(steps)]
    return grid + [1.0]


@dataclass(frozen=True)
class SolverPlan:
    """Per-step coefficients of x' = a x + b v + c n, and the flow times the head is evaluated at."""

    times: list[float]
    a: list[float]
    b: list[float]
    c: list[float]
    stochastic: bool


def _step_ode(t: float, t_next: float) -> tuple[float, float, float]:
    # x0 = x - v t, x1 = x + v (1 - t), x' = x0 (1 - t') + x1 t'  ==  x + v (t' - t)
    return 1.0, t_next - t, 0.0


def _step_sde(t: float, t_next: float, t_last: float) -> tuple[float, float, float]:
    sigma = 1.0 - t
    dt = t_next - t
    ratio = t_last if sigma == 1.0 else sigma
    std = NOISE_LEVEL * math.sqrt(sigma / (1.0 - ratio))
    damp = std * std * dt / (2.0 * sigma)
    # x' = x0 (1 - t') + x1 t' - damp x0 + std sqrt(dt) n, with x0 = x - v t, x1 = x + v (1 - t)
    a = (1.0 - t_next) + t_next - damp
    b = -t * (1.0 - t_next) + (1.0 - t) * t_next + damp * t
    return a, b, std * math.sqrt(dt)


def _step_cps(t: float, t_next: float) -> tuple[float, float, float]:
    std = (1.0 - t_next) * math.sin(NOISE_LEVEL * math.pi / 2.0)
    keep = math.sqrt(max((1.0 - t_next) ** 2 - std * std, 0.0))
    # x' = x0 keep + x1 t' + std n
    return keep + t_next, -t * keep + (1.0 - t) * t_next, std


def _step_sde_score(t: float, t_next: float) -> tuple[float, float, float]:
    dt = t_next - t
    # score = (t v - x) / (1 - t); drift = v + (1 - t) score = (1 + t) v - x; x' = x + drift dt + sqrt(2(1-t) dt) n
    return 1.0 - dt, (1.0 + t) * dt, math.sqrt(2.0 * (1.0 - t)) * math.sqrt(dt)


def solver_plan(sampler: str, steps: int, shift: float) -> SolverPlan:
    """Coefficients for every step of `sampler` on the shifted grid."""
    if sampler not in SAMPLERS:
        raise NextStepError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if steps < 1:
        raise NextStepError(f"steps must be at least 1 (got {steps})")
    if shift <= 0:
        raise NextStepError(f"timesteps shift must be positive (got {shift})")
    grid = time_grid(steps, shift)
    coefficients = []
    for k in range(steps):
        t, t_next = grid[k], grid[k + 1]
        if sampler == "ode":
            coefficients.append(_step_ode(t, t_next))
        elif sampler == "sde":
            coefficients.append(_step_sde(t, t_next, grid[steps - 1]))
        elif sampler == "cps":
            coefficients.append(_step_cps(t, t_next))
        else:
            coefficients.append(_step_sde_score(t, t_next))
    a, b, c = (list(column) for column in zip(*coefficients))
    return SolverPlan(grid[:steps], a, b, c, stochastic=sampler != "ode")


def guidance_scales(scale: float, tokens: int, schedule: str, profile: str) -> list[float]:
    """The guidance scale for each of `tokens` image tokens under `schedule`."""
    if schedule not in CFG_SCHEDULES:
        raise NextStepError(f"unknown cfg schedule {schedule!r}; choose constant or linear")
    if schedule == "constant":
        return [scale] * tokens
    if profile == "official":
        return [max(scale / 2.0, 1.0 + (scale - 1.0) * n / tokens) for n in range(tokens)]
    return [1.0 + (scale - 1.0) * (tokens - n) / tokens for n in range(tokens)]


def guidance_weights(groups: int, cfg: list[float], cfg_img: list[float]) -> list[list[float]]:
    """Per token, the weight of each guidance row's velocity, so the guided velocity is one weighted sum
    sum_g w_g v_g that the token loop folds into the solver step. The rows are (cond), (cond, neg) or
    (cond, image_neg, text_neg); the official guidance, expanded:
    - two rows: neg + cfg (cond - neg) = cfg cond + (1 - cfg) neg;
    - three rows (editing): text_neg + cfg_img (image_neg - text_neg) + cfg (cond - image_neg)
      = cfg cond + (cfg_img - cfg) image_neg + (1 - cfg_img) text_neg."""
    if groups == 1:
        return [[1.0] for _ in cfg]
    if groups == 2:
        return [[g, 1.0 - g] for g in cfg]
    return [[g, gi - g, 1.0 - gi] for g, gi in zip(cfg, cfg_img)]
