"""The diffusion convention of the twin model (issue 16), written down once: :mod:`safefm.flow`'s
counterpart for ``ModelConfig.objective = "diffusion"``.

Discrete-time DDPM as diffusers' ``DDPMScheduler`` defines it (its defaults: 1,000 training
steps, linear betas 1e-4 .. 0.02, which end at alpha_bar ~ 4e-5, so the noisiest training step is
practically pure noise, where every sampler starts)::

    x_tau = sqrt(ab_tau) * x1 + sqrt(1 - ab_tau) * eps     x1 = data latent, eps ~ N(0, I),
                                                            tau in {0 .. 999} (999 = noisiest)
    v*    = sqrt(ab_tau) * eps - sqrt(1 - ab_tau) * x1      (``scheduler.get_velocity``)
    loss  = E || v(x_tau, tau) - v* ||^2

v-prediction rather than epsilon: its data estimate ``sqrt(ab) x - sqrt(1 - ab) v`` stays
well-conditioned at the noisy end, where a 1-2 step sampler takes its first (largest) step and
epsilon-prediction divides by sqrt(ab) ~ 0.006; it is also the diffusion parameterisation closest to
flow matching's velocity (both regress a mix of noise and data), so the comparison isolates the
path and time distribution rather than the target's scale.

The network sees tau through the same time input as the flow model: ``Velocity`` multiplies its
time by ``TIME_SCALE`` (1000), so the diffusion twin is fed ``tau / 1000``. :func:`flow_time` maps a
diffusion step to the flow time with the same role (0 = noise, 1 = data), used where the runtime
settings speak in flow time (warm start ``warm_t0``, guidance ``until``).
"""

from __future__ import annotations

import torch

NUM_TIMESTEPS = 1000
SCHEDULE = {"num_train_timesteps": NUM_TIMESTEPS, "beta_start": 1e-4, "beta_end": 0.02,
            "beta_schedule": "linear", "prediction_type": "v_prediction"}


def train_scheduler():
    """The training scheduler (diffusers ``DDPMScheduler`` with :data:`SCHEDULE`)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULE)


def add_noise(sched, x1: torch.Tensor, noise: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """x_tau of data x1 (B, ...) and noise (B, ...) at integer steps tau (B,)."""
    return sched.add_noise(x1, noise, tau)


def target(sched, x1: torch.Tensor, noise: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """The regression target v* (B, ...) (the scheduler's own ``get_velocity``)."""
    return sched.get_velocity(x1, noise, tau)


def diffusion_loss(sched, v_pred: torch.Tensor, x1: torch.Tensor, noise: torch.Tensor,
                   tau: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the prediction and :func:`target` (scalar)."""
    return torch.mean((v_pred - target(sched, x1, noise, tau)) ** 2)


def net_time(tau: torch.Tensor | int) -> torch.Tensor:
    """The network's time input for diffusion step(s) tau: ``tau / 1000`` (float)."""
    return torch.as_tensor(tau, dtype=torch.float32) / NUM_TIMESTEPS


def flow_time(t_net: float) -> float:
    """Flow time (0 = noise, 1 = data) of a network time input ``tau / 1000``."""
    return 1.0 - float(t_net)


def sample_timesteps(batch: int, generator: torch.Generator, *, warm_prob: float = 0.0,
                     warm_t0: float = 0.5) -> torch.Tensor:
    """Training steps tau (B,) int64: uniform over {0 .. 999} (DDPM's standard), a ``warm_prob``
    share uniform over the less noisy steps tau < (1 - warm_t0) * 1000 (the warm start's range,
    as the flow stages oversample flow times t >= warm_t0)."""
    tau = torch.randint(0, NUM_TIMESTEPS, (batch,), generator=generator)
    if warm_prob > 0:
        warm = torch.rand(batch, generator=generator) < warm_prob
        hi = max(1, int(round((1 - warm_t0) * NUM_TIMESTEPS)))
        tau = torch.where(warm, torch.randint(0, hi, (batch,), generator=generator), tau)
    return tau
