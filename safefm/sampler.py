"""Euler ODE solver for the flow-matching velocity field, as pure functions.

The solver takes any callable ``velocity(x, t) -> v`` with x: (B, C, H, W) and t a float,
so it is tested against velocity fields with exact solutions and used unchanged with the
network (see :mod:`safefm.generator`).
"""

from __future__ import annotations

from typing import Callable

import torch

from .flow import warm_start_point

Velocity = Callable[[torch.Tensor, float], torch.Tensor]


def time_grid(steps: int, t0: float = 0.0, t1: float = 1.0) -> list[float]:
    """``steps + 1`` evenly spaced times from ``t0`` to ``t1``."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    return [t0 + (t1 - t0) * i / steps for i in range(steps + 1)]


def euler_solve(velocity: Velocity, x: torch.Tensor, steps: int, t0: float = 0.0,
                t1: float = 1.0) -> torch.Tensor:
    """Integrate dx/dt = velocity(x, t) from t0 to t1 with ``steps`` Euler steps.

    x: (B, ...) the state at t0. Returns the state at t1, same shape. Exact for velocity
    fields that are constant along straight paths (the flow-matching optimum for one pair).
    """
    ts = time_grid(steps, t0, t1)
    for ta, tb in zip(ts[:-1], ts[1:]):
        x = x + (tb - ta) * velocity(x, ta)
    return x


def sample(velocity: Velocity, noise: torch.Tensor, steps: int, *,
           z_prev: torch.Tensor | None = None, t0: float = 0.0) -> torch.Tensor:
    """Generate a latent: cold from ``noise`` (t = 0), or warm from ``z_prev`` at ``t0``.

    Warm start (video): the state at t0 is ``(1 - t0) * noise + t0 * z_prev`` and the
    remaining path [t0, 1] is integrated with ``steps`` steps. As t0 -> 1 the result tends
    to ``z_prev``; ``z_prev=None`` or ``t0=0`` is a cold start.
    """
    if z_prev is None or t0 <= 0.0:
        return euler_solve(velocity, noise, steps, 0.0, 1.0)
    if t0 >= 1.0:
        return z_prev.clone()
    return euler_solve(velocity, warm_start_point(noise, z_prev, t0), steps, t0, 1.0)
