"""The solver coefficients and guidance weights the token loop folds together, checked against the
formulas as the spec writes them."""

from __future__ import annotations

import math

import pytest
import torch

from nextstep_runtime.sampling.solvers import guidance_scales, guidance_weights, solver_plan, time_grid


def official_guidance(velocities: torch.Tensor, cfg: float, cfg_img: float) -> torch.Tensor:
    """The official pipeline's guidance, as the spec writes it, over rows (cond[, image_neg], neg)."""
    if velocities.shape[0] == 1:
        return velocities[0]
    if velocities.shape[0] == 2:
        cond, neg = velocities
        return neg + cfg * (cond - neg)
    cond, image_neg, text_neg = velocities
    return text_neg + cfg_img * (image_neg - text_neg) + cfg * (cond - image_neg)


@pytest.mark.parametrize("groups,cfg,cfg_img", [(1, 1.0, 1.0), (2, 7.5, 1.0), (3, 7.5, 2.0), (3, 4.0, 1.5)])
def test_guidance_weights_equal_the_written_formulas(groups, cfg, cfg_img) -> None:
    velocities = torch.randn(groups, 2, 64, dtype=torch.float64)
    weights = torch.tensor(guidance_weights(groups, [cfg], [cfg_img])[0], dtype=torch.float64)
    expected = official_guidance(velocities, cfg, cfg_img)
    assert torch.allclose(torch.einsum("g,gbd->bd", weights, velocities), expected, atol=1e-12)


@pytest.mark.parametrize("sampler", ["ode", "sde", "cps", "sde_score"])
@pytest.mark.parametrize("shift", [1.0, 3.2])
def test_affine_steps_equal_the_written_solvers(sampler: str, shift: float) -> None:
    steps = 6
    grid = time_grid(steps, shift)
    plan = solver_plan(sampler, steps, shift)
    x, v, n = torch.randn(3, 64, dtype=torch.float64)
    for k in range(steps):
        t, t_next = grid[k], grid[k + 1]
        dt, x0, x1 = t_next - t, x - v * t, x + v * (1 - t)
        if sampler == "ode":
            expected = x0 * (1 - t_next) + x1 * t_next
        elif sampler == "sde":
            sigma = 1 - t
            std = 0.8 * math.sqrt(sigma / (1 - (grid[steps - 1] if sigma == 1 else sigma)))
            expected = x0 * (1 - t_next) + x1 * t_next - std**2 * dt / (2 * sigma) * x0 + std * math.sqrt(dt) * n
        elif sampler == "cps":
            std = (1 - t_next) * math.sin(0.8 * math.pi / 2)
            expected = x0 * math.sqrt(max((1 - t_next) ** 2 - std**2, 0)) + x1 * t_next + std * n
        else:
            drift = v + (1 - t) * ((t * v - x) / (1 - t))
            expected = x + drift * dt + math.sqrt(2 * (1 - t)) * math.sqrt(dt) * n
        assert torch.allclose(plan.a[k] * x + plan.b[k] * v + plan.c[k] * n, expected, atol=1e-12), (sampler, k)
    assert plan.stochastic == (sampler != "ode")
    if sampler == "ode":
        assert plan.a == [1.0] * steps and plan.c == [0.0] * steps


def test_time_grid_is_shifted_and_ends_at_one() -> None:
    assert time_grid(4, 1.0) == [0.0, 0.25, 0.5, 0.75, 1.0]
    shifted = time_grid(4, 3.0)
    assert shifted[0] == 0.0 and shifted[-1] == 1.0
    assert shifted[1] == pytest.approx(0.25 / (3 - 2 * 0.25))


def test_linear_schedules_rise_for_official_and_fall_for_hf() -> None:
    official = guidance_scales(7.5, 4, "linear", "official")
    hf = guidance_scales(7.5, 4, "linear", "hf")
    assert official == [3.75, 3.75, 4.25, 5.875]  # max(g/2, 1 + (g-1) n/L)
    assert hf == [7.5, 5.875, 4.25, 2.625]  # 1 + (g-1) (L-n)/L
    assert guidance_scales(7.5, 3, "constant", "hf") == [7.5] * 3
