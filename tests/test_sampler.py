"""The flow-matching convention and the Euler sampler against velocities with exact solutions."""

import math

import pytest
import torch

from safefm import flow
from safefm.sampler import euler_solve, first_step, sample, time_grid


def test_interpolation_endpoints_and_target():
    x0, x1 = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    assert torch.allclose(flow.interpolate(x0, x1, 0.0), x0)
    assert torch.allclose(flow.interpolate(x0, x1, 1.0), x1)
    t = torch.tensor([0.25, 0.75])
    xt = flow.interpolate(x0, x1, t)
    assert torch.allclose(xt[0], 0.75 * x0[0] + 0.25 * x1[0])
    assert torch.allclose(flow.target_velocity(x0, x1), x1 - x0)
    # the data estimate from the true velocity recovers x1 from any point on the path
    assert torch.allclose(flow.predict_data(xt, x1 - x0, t), x1, atol=1e-6)


def test_loss_is_zero_for_the_true_velocity_and_positive_otherwise():
    x0, x1 = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    assert flow.flow_matching_loss(x1 - x0, x0, x1).item() == 0.0
    assert flow.flow_matching_loss(torch.zeros_like(x0), x0, x1).item() > 0.1


def test_sample_time_is_inside_unit_interval():
    t = flow.sample_time(10000, torch.Generator().manual_seed(0))
    assert t.min() > 0 and t.max() < 1 and abs(t.mean().item() - 0.5) < 0.02


@pytest.mark.parametrize("steps", [1, 3, 4, 5])
def test_euler_reproduces_the_straight_flow_exactly(steps):
    """For a single data point x1 the optimal field v(x, t) = (x1 - x) / (1 - t) is straight: Euler is exact."""
    x1 = torch.randn(1, 4, 8, 8)
    noise = torch.randn(1, 4, 8, 8)

    def v(x, t):
        return (x1 - x) / (1 - t)

    out = sample(v, noise, steps)
    assert torch.allclose(out, x1, atol=1e-5)


def test_euler_matches_an_analytic_linear_ode():
    """dx/dt = a * x has x(1) = x(0) e^a; Euler converges at first order."""
    a = 0.7
    x0 = torch.ones(1, 1, 1, 1)
    errs = [abs(euler_solve(lambda x, t: a * x, x0, n).item() - math.e ** a) for n in (4, 8, 16, 32)]
    for e_coarse, e_fine in zip(errs, errs[1:]):
        assert 1.8 < e_coarse / e_fine < 2.2


def test_time_grid():
    assert time_grid(4, 0.5, 1.0) == [0.5, 0.625, 0.75, 0.875, 1.0]
    with pytest.raises(ValueError):
        time_grid(0)


@pytest.mark.parametrize("steps, t0, start", [(4, 0.5, 2), (4, 0.6, 3), (4, 0.9, 3), (3, 1 / 3, 1), (5, 0.2, 1),
                                            (4, 0.01, 1)])
def test_warm_start_is_a_slice_of_the_one_grid(steps, t0, start):
    """A warm frame starts at the grid point at or after t0 (never at t = 1) on the path between
    noise and the previous latent, and takes only the remaining steps of the cold grid."""
    noise, z_prev = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    c = torch.randn(1, 4, 4, 4)
    seen = []

    def v(x, t):  # constant field: Euler is exact, x(1) = x(t_start) + (1 - t_start) c
        seen.append((t, x.clone()))
        return c

    out = sample(v, noise, steps, z_prev=z_prev, t0=t0)
    grid = time_grid(steps)
    ts = grid[start]
    assert first_step(steps, t0) == start
    assert [t for t, _ in seen] == grid[start:-1]               # steps - start network calls, on the grid
    assert torch.allclose(seen[0][1], (1 - ts) * noise + ts * z_prev, atol=1e-6)
    assert torch.allclose(out, (1 - ts) * noise + ts * z_prev + (1 - ts) * c, atol=1e-5)


def test_warm_start_continues_from_the_previous_latent():
    """Same noise and field, another previous latent: another result, moved by t_start * dz."""
    noise, z_a, z_b = torch.randn(3, 1, 4, 4, 4)

    def v(x, t):
        return -x

    a = sample(v, noise, 4, z_prev=z_a, t0=0.5)
    b = sample(v, noise, 4, z_prev=z_b, t0=0.5)
    # linear field: x(1) = (1 - 0.25)^2 x(0.5), x(0.5) = 0.5 noise + 0.5 z_prev
    assert torch.allclose(a - b, 0.75 ** 2 * 0.5 * (z_a - z_b), atol=1e-6)
    assert not torch.allclose(a, sample(v, noise, 4), atol=1e-3)   # not the cold answer


def test_cold_start_ignores_previous_when_t0_is_zero():
    noise = torch.randn(1, 4, 4, 4)
    x1 = torch.randn(1, 4, 4, 4)
    calls = []

    def v(x, t):
        calls.append(t)
        return (x1 - x) / (1 - t)

    assert torch.allclose(sample(v, noise, 4, z_prev=torch.randn_like(noise), t0=0.0), x1, atol=1e-5)
    assert calls == time_grid(4)[:-1] and first_step(4, 0.0) == 0
