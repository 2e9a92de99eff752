"""Samplers of the diffusion twin (:mod:`safefm.diffusion`) over a model callable, built on
diffusers' schedulers: DDIM (deterministic), DPM-Solver++ (2nd-order multistep, deterministic)
and ancestral DDPM (stochastic).

The model is any callable ``model(x (B, C, h, w), t_net float) -> v-prediction (B, C, h, w)``
with ``t_net = tau / 1000`` (what :class:`safefm.models.Velocity` is fed), so the samplers are
tested on toy problems with exact answers and used unchanged with the network. Every solver
takes one model call a step (``steps`` = network evaluations, NFE). The time steps are spaced
"trailing" (Lin et al. 2024, "Common diffusion noise schedules and sample steps are flawed"):
the first step starts at tau = 999 (pure noise) for any step count, which the default "leading"
spacing does not do at 1-5 steps.
"""

from __future__ import annotations

from typing import Callable

import torch

from .diffusion import SCHEDULE, flow_time, net_time

Model = Callable[[torch.Tensor, float], torch.Tensor]
SOLVERS = ("ddim", "dpmpp", "ddpm")


def make_scheduler(solver: str):
    """A fresh diffusers scheduler of ``solver`` with the twin's training schedule."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    common = {**SCHEDULE, "timestep_spacing": "trailing"}
    if solver == "ddim":
        return DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=True)
    if solver == "dpmpp":
        return DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2,
                                           lower_order_final=True)
    if solver == "ddpm":
        return DDPMScheduler(**common, clip_sample=False)
    raise ValueError(f"unknown diffusion solver {solver!r} (one of {', '.join(SOLVERS)})")


def first_index(timesteps: torch.Tensor, t0: float) -> int:
    """Index of the first step whose flow time ``1 - tau / 1000`` is at or after ``t0`` (a warm
    start from a previous latent), never past the last step; 0 for t0 <= 0."""
    if t0 <= 0.0:
        return 0
    for i, tau in enumerate(timesteps.tolist()):
        if flow_time(float(net_time(tau))) >= t0 - 1e-9:
            return min(i, len(timesteps) - 1)
    return len(timesteps) - 1


def sample(model: Model, noise: torch.Tensor, steps: int, solver: str = "ddim", *,
           z_prev: torch.Tensor | None = None, t0: float = 0.0, seed: int = 0) -> torch.Tensor:
    """A data latent (shape of ``noise``, (B, C, h, w)) in ``steps`` model calls.

    Cold: from ``noise`` at tau = 999. Warm (``z_prev`` given, t0 > 0): ``z_prev`` noised with
    ``noise`` to the first step at flow time >= t0 (img2img / SDEdit), then the remaining steps.
    ``seed`` seeds the ancestral noise of ``ddpm`` (a fixed seed: the same frame gives the same
    output, like the flow model's fixed noise); the other two solvers draw nothing.
    """
    sched = make_scheduler(solver)
    sched.set_timesteps(steps)
    ts = sched.timesteps
    i = 0 if z_prev is None else first_index(ts, t0)
    if i == 0:
        x = noise * sched.init_noise_sigma
    else:
        x = sched.add_noise(z_prev, noise, ts[i:i + 1])
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(i)
    extra = {"generator": torch.Generator(device=noise.device).manual_seed(seed)} if solver == "ddpm" else {}
    for tau in ts[i:]:
        out = model(x, float(net_time(tau)))
        x = sched.step(out, tau, x, **extra).prev_sample
    return x
