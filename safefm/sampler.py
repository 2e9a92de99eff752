"""ODE solvers for the flow-matching velocity field, as pure functions: Euler (the default,
one network call a step) and two second-order ones, Heun and the midpoint rule (two calls a step).

The solver takes any callable ``velocity(x, t) -> v`` with x: (B, C, H, W) and t a float,
so it is tested against velocity fields with exact solutions and used unchanged with the
network (see :mod:`safefm.generator`).

Every frame walks the same time grid ``time_grid(steps)`` over [0, 1]: a cold frame from its
start, a warm frame (video) only from the grid point at or after its start time ``t0``, so
it costs fewer network calls (:func:`first_step`).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .flow import warm_start_point

Velocity = Callable[[torch.Tensor, float], torch.Tensor]


def time_grid(steps: int, t0: float = 0.0, t1: float = 1.0) -> list[float]:
    """``steps + 1`` evenly spaced times from ``t0`` to ``t1``."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    return [t0 + (t1 - t0) * i / steps for i in range(steps + 1)]


def euler(velocity: Velocity, x: torch.Tensor, ts: Sequence[float]) -> torch.Tensor:
    """Integrate dx/dt = velocity(x, t) along the times ``ts`` (one Euler step, one
    ``velocity`` call, per interval). x: (B, ...) the state at ts[0]; returns the state at
    ts[-1], same shape."""
    for ta, tb in zip(ts[:-1], ts[1:]):
        x = x + (tb - ta) * velocity(x, ta)
    return x


def heun(velocity: Velocity, x: torch.Tensor, ts: Sequence[float]) -> torch.Tensor:
    """Heun's (explicit trapezoidal) rule along ``ts``: two ``velocity`` calls per interval,
    ``x + h/2 (v(x, ta) + v(x + h v(x, ta), tb))``. Shapes as :func:`euler`."""
    for ta, tb in zip(ts[:-1], ts[1:]):
        h = tb - ta
        k1 = velocity(x, ta)
        k2 = velocity(x + h * k1, tb)
        x = x + 0.5 * h * (k1 + k2)
    return x


def midpoint(velocity: Velocity, x: torch.Tensor, ts: Sequence[float]) -> torch.Tensor:
    """The explicit midpoint rule along ``ts``: two ``velocity`` calls per interval,
    ``x + h v(x + h/2 v(x, ta), ta + h/2)``. Shapes as :func:`euler`."""
    for ta, tb in zip(ts[:-1], ts[1:]):
        h = tb - ta
        x = x + h * velocity(x + 0.5 * h * velocity(x, ta), ta + 0.5 * h)
    return x


SOLVERS = {"euler": euler, "heun": heun, "midpoint": midpoint}
CALLS_PER_STEP = {"euler": 1, "heun": 2, "midpoint": 2}   # network evaluations (NFE) a step


def euler_solve(velocity: Velocity, x: torch.Tensor, steps: int, t0: float = 0.0,
                t1: float = 1.0) -> torch.Tensor:
    """Integrate dx/dt = velocity(x, t) from t0 to t1 with ``steps`` even Euler steps.

    x: (B, ...) the state at t0. Returns the state at t1, same shape. Exact for velocity
    fields that are constant along straight paths (the flow-matching optimum for one pair).
    """
    return euler(velocity, x, time_grid(steps, t0, t1))


def first_step(steps: int, t0: float) -> int:
    """Index into ``time_grid(steps)`` where a frame starting at flow time ``t0`` begins.

    0 for a cold start (t0 <= 0); otherwise the first grid time at or after t0, but never the
    final time 1: a warm frame always takes at least one step. ``steps - first_step(steps,
    t0)`` is the number of Euler steps the frame takes.
    """
    if t0 <= 0.0:
        return 0
    ts = time_grid(steps)
    i = next((i for i, t in enumerate(ts) if t >= t0 - 1e-9), steps)
    return min(i, steps - 1)


def sample(velocity: Velocity, noise: torch.Tensor, steps: int, *,
           z_prev: torch.Tensor | None = None, t0: float = 0.0, solver: str = "euler") -> torch.Tensor:
    """Generate a latent (same shape as ``noise``, (B, C, h, w)) on the grid ``time_grid(steps)``.

    Cold (``z_prev=None`` or ``t0 <= 0``): from ``noise`` at t = 0, ``steps`` Euler steps.
    Warm (video): from the path point ``(1 - t) * noise + t * z_prev`` at the grid time
    t = ``time_grid(steps)[first_step(steps, t0)]`` (the first at or after t0), taking only the
    grid's remaining steps, e.g. 2 of 4 for t0 = 0.5. ``solver``: a name in :data:`SOLVERS`.
    """
    ts = time_grid(steps)
    i = 0 if z_prev is None else first_step(steps, t0)
    x = noise if i == 0 else warm_start_point(noise, z_prev, ts[i])
    return SOLVERS[solver](velocity, x, ts[i:])
