"""The flow-matching convention, written down once.

Time runs from noise to data::

    x_t = (1 - t) * x0 + t * x1        x0 ~ N(0, I) (noise), x1 = data latent, t in [0, 1]
    v*(x_t, t) = x1 - x0               the velocity the model regresses
    loss = E || v(x_t, t) - (x1 - x0) ||^2

Everything else (training, sampler, warm start) imports these functions instead of
re-deriving the convention.
"""

from __future__ import annotations

import torch


def _bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample time (B,) or scalar so it broadcasts against ``like`` (B, ...)."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return t.reshape(-1, *([1] * (like.dim() - 1))) if t.dim() > 0 else t


def interpolate(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """Point on the straight path: ``(1 - t) * x0 + t * x1``. x0, x1: (B, ...); t: (B,) or scalar."""
    t = _bcast(t, x1)
    return (1 - t) * x0 + t * x1


def target_velocity(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """The regression target ``x1 - x0`` (constant along the path)."""
    return x1 - x0


def flow_matching_loss(v_pred: torch.Tensor, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the predicted and the target velocity (scalar)."""
    return torch.mean((v_pred - target_velocity(x0, x1)) ** 2)


def predict_data(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """One-jump estimate of x1 from x_t and a velocity: ``x_t + (1 - t) * v``."""
    return x_t + (1 - _bcast(t, x_t)) * v


def sample_time(batch: int, generator: torch.Generator | None = None, *, mean: float = 0.0,
                std: float = 1.0, device=None) -> torch.Tensor:
    """Training times t in (0, 1) from a logit-normal distribution (SD3-style): (B,).

    Puts more weight on the middle of the path, where the velocity is hardest to predict,
    while still covering the ends that the 3-5 step sampler visits.
    """
    z = torch.randn(batch, generator=generator, device=device) * std + mean
    return torch.sigmoid(z)


def warm_start_point(noise: torch.Tensor, z_prev: torch.Tensor, t0: float) -> torch.Tensor:
    """Start of a warm frame: the path point at ``t0`` between fixed noise and the previous latent."""
    return interpolate(noise, z_prev, t0)
