"""Issue 16: the two objectives on a tiny seeded model, and every solver against known answers
on toy problems (the flow solvers on velocity fields with exact solutions, the diffusion
samplers on data whose exact v-prediction is known)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from safefm import diffusion
from safefm.config import ConfigError, RuntimeConfig, resolve_solver
from safefm.diffusion_sampler import first_index, make_scheduler, sample as dsample
from safefm.sampler import CALLS_PER_STEP, sample as fsample


# --- objectives ------------------------------------------------------------------------------

def test_diffusion_target_is_the_schedulers_v_and_noising_follows_ddpm():
    sched = diffusion.train_scheduler()
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    ab = torch.cumprod(1 - betas, 0)
    g = torch.Generator().manual_seed(0)
    x1, eps = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    tau = torch.tensor([0, 500, 999])
    a = ab[tau].float().view(-1, 1, 1, 1)
    torch.testing.assert_close(diffusion.add_noise(sched, x1, eps, tau), a.sqrt() * x1 + (1 - a).sqrt() * eps)
    torch.testing.assert_close(diffusion.target(sched, x1, eps, tau), a.sqrt() * eps - (1 - a).sqrt() * x1)
    assert ab[-1] < 1e-4   # the noisiest training step is (almost) pure noise: samplers start there
    assert sched.config.prediction_type == "v_prediction"


def test_both_objectives_train_a_tiny_seeded_model_with_their_own_targets():
    from safefm.models import Velocity
    from safefm.train.base import FlowTrainConfig, base_model, diffusion_loss, flow_loss, objective_loss
    from tests.test_train import TINY, _descend, _fixed_batch

    batch, tcfg = _fixed_batch(), FlowTrainConfig(null_prob=0.0)
    seen = {}

    def spy(z, t, heat, tokens):   # records what the network is asked, answers zero
        seen.update(z=z, t=t)
        return torch.zeros_like(z)

    # flow: target x1 - x0 at x_t = (1 - t) x0 + t x1 -> a zero prediction costs E||x1 - x0||^2
    g = torch.Generator().manual_seed(5)
    loss = flow_loss(spy, lambda e: e, batch, tcfg, g)
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(batch["z"].shape, generator=g)
    t = torch.sigmoid(torch.randn(batch["z"].shape[0], generator=g))
    torch.testing.assert_close(seen["t"], t)
    torch.testing.assert_close(loss, torch.mean((batch["z"] - x0) ** 2))
    # diffusion: target = scheduler's v at the scheduler's x_tau, network time tau / 1000
    sched = diffusion.train_scheduler()
    g = torch.Generator().manual_seed(5)
    loss = diffusion_loss(spy, lambda e: e, batch, tcfg, g, sched)
    g = torch.Generator().manual_seed(5)
    eps = torch.randn(batch["z"].shape, generator=g)
    tau = torch.randint(0, 1000, (batch["z"].shape[0],), generator=g)
    torch.testing.assert_close(seen["t"], tau.float() / 1000)
    torch.testing.assert_close(seen["z"], sched.add_noise(batch["z"], eps, tau))
    torch.testing.assert_close(loss, torch.mean(sched.get_velocity(batch["z"], eps, tau) ** 2))
    # and a tiny model learns under each objective
    for objective in ("flow", "diffusion"):
        cfg = dataclasses.replace(TINY, objective=objective)
        torch.manual_seed(0)
        m = base_model(cfg)
        v = Velocity(m.unet, None)
        fn = objective_loss(cfg.objective)
        params = list(m.unet.parameters()) + list(m.identity.parameters())
        losses = _descend(lambda: fn(v, m.identity, batch, tcfg, torch.Generator().manual_seed(3)), params)
        assert losses[-1] < 0.8 * losses[0], objective


def test_solver_must_fit_the_models_objective():
    from safefm import config, diffusion_sampler, sampler

    assert set(config.FLOW_SOLVERS) == set(sampler.SOLVERS)          # the names the config accepts
    assert set(config.DIFFUSION_SOLVERS) == set(diffusion_sampler.SOLVERS)   # are the ones that run
    assert resolve_solver("flow", "auto") == "euler" and resolve_solver("diffusion", "auto") == "ddim"
    with pytest.raises(ConfigError, match="does not run a flow model"):
        resolve_solver("flow", "ddim")
    with pytest.raises(ConfigError, match="solver must be one of"):
        RuntimeConfig(solver="rk4")


# --- flow solvers ----------------------------------------------------------------------------

def test_flow_solvers_known_answers():
    x = torch.ones(2, 3)
    # v = 2t: x(1) = x(0) + 1. Heun and midpoint are exact (linear in t); Euler is not.
    ramp = lambda z, t: torch.full_like(z, 2 * t)   # noqa: E731
    for solver in ("heun", "midpoint"):
        torch.testing.assert_close(fsample(ramp, x, 2, solver=solver), x + 1)
    torch.testing.assert_close(fsample(ramp, x, 2, solver="euler"), x + 0.5)   # 2 * (0 * 0.5 + 0.5 * 0.5)
    # straight paths (the flow-matching optimum for one pair): every solver is exact at 1 step
    x1 = torch.full((2, 3), 3.0)
    straight = lambda z, t: (x1 - z) / (1 - t)   # noqa: E731
    torch.testing.assert_close(fsample(straight, x, 1, solver="euler"), x1)
    # v = x: x(1) = e x(0); the second-order solvers' error falls 4x per halving, Euler's 2x
    grow = lambda z, t: z   # noqa: E731
    for solver, order in (("euler", 1), ("heun", 2), ("midpoint", 2)):
        e1 = (fsample(grow, x, 8, solver=solver) - math.e).abs().max().item()
        e2 = (fsample(grow, x, 16, solver=solver) - math.e).abs().max().item()
        assert 2 ** order * 0.8 < e1 / e2 < 2 ** order * 1.25, solver
    assert CALLS_PER_STEP == {"euler": 1, "heun": 2, "midpoint": 2}


def test_flow_solvers_count_their_network_calls_and_warm_start_takes_the_rest():
    calls = []
    v = lambda z, t: (calls.append(t), torch.zeros_like(z))[1]   # noqa: E731
    x = torch.zeros(1, 2)
    for solver in ("euler", "heun", "midpoint"):
        calls.clear()
        fsample(v, x, 4, solver=solver)
        assert len(calls) == 4 * CALLS_PER_STEP[solver]
        calls.clear()
        fsample(v, x, 4, z_prev=x, t0=0.5, solver=solver)
        assert len(calls) == 2 * CALLS_PER_STEP[solver] and min(calls) >= 0.5


# --- diffusion samplers ----------------------------------------------------------------------

def _exact_v(mu: float, s: float):
    """The exact v-prediction for data ~ N(mu, s^2) per element under the twin's schedule."""
    ab_all = make_scheduler("ddim").alphas_cumprod.double()

    def model(x: torch.Tensor, t_net: float) -> torch.Tensor:
        ab = ab_all[int(round(t_net * 1000))].item()
        a, b = math.sqrt(ab), math.sqrt(1 - ab)
        var = a * a * s * s + b * b
        x1_hat = mu + a * s * s * (x - a * mu) / var        # E[x1 | x_tau]
        eps_hat = (x - a * x1_hat) / b
        return a * eps_hat - b * x1_hat
    return model


@pytest.mark.parametrize("solver", ["ddim", "dpmpp", "ddpm"])
@pytest.mark.parametrize("steps", [1, 2, 3, 5, 10])
def test_diffusion_samplers_reach_point_data_exactly(solver, steps):
    """Data = one point c (s = 0): a perfect model predicts c from every step, so every sampler
    ends exactly at c whatever its step count (the ancestral one too: its last step adds no noise)."""
    noise = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    out = dsample(_exact_v(0.7, 0.0), noise, steps, solver)
    torch.testing.assert_close(out, torch.full_like(out, 0.7), atol=2e-3, rtol=0)


def test_deterministic_samplers_follow_the_probability_flow_of_gaussian_data():
    """Data ~ N(mu, s^2): the probability-flow ODE maps the noise z at tau = 999 to
    mu + s * z (up to the 4e-5 of signal left at tau = 999); DDIM and DPM-Solver++ converge to it
    (DDIM at first order, DPM-Solver++ at second), the ancestral DDPM lands elsewhere but with
    the data's statistics. At one step both return E[x1 | pure noise] = mu: the sample collapses."""
    mu, s = 0.5, 0.6
    noise = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(2))
    exact = mu + s * noise
    err = {(k, n): (dsample(_exact_v(mu, s), noise, n, k) - exact).abs().mean().item()
           for k in ("ddim", "dpmpp") for n in (1, 20, 50, 200)}
    assert 3 < err[("ddim", 50)] / err[("ddim", 200)] < 5          # first order: 4x steps, ~4x less error
    assert err[("dpmpp", 50)] < 0.003 and err[("dpmpp", 20)] < err[("ddim", 20)] / 3
    one = dsample(_exact_v(mu, s), noise, 1, "ddim")
    torch.testing.assert_close(one, torch.full_like(one, mu), atol=0.01, rtol=0)
    anc = dsample(_exact_v(mu, s), noise, 1000, "ddpm", seed=3)   # all 1,000 steps: the exact chain
    assert abs(anc.mean().item() - mu) < 0.03 and abs(anc.std().item() - s) < 0.03
    assert (anc - exact).abs().mean().item() > 0.1    # stochastic: not the ODE's answer


def test_diffusion_warm_start_noises_the_previous_latent_and_takes_the_remaining_steps():
    calls = []
    model = _exact_v(0.0, 1.0)
    spy = lambda x, t: (calls.append(t), model(x, t))[1]   # noqa: E731
    sched = make_scheduler("ddim")
    sched.set_timesteps(4)
    assert sched.timesteps.tolist() == [999, 749, 499, 249]   # trailing: starts at pure noise
    assert first_index(sched.timesteps, 0.5) == 2 and first_index(sched.timesteps, 0.0) == 0
    noise = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    for solver in ("ddim", "dpmpp", "ddpm"):
        calls.clear()
        dsample(spy, noise, 4, solver, z_prev=torch.zeros_like(noise), t0=0.5)
        assert calls == pytest.approx([0.499, 0.249]), solver


def test_generator_runs_a_diffusion_twin_with_its_solvers(tmp_path):
    """A tiny diffusion-objective model loads, runs each of its solvers through the product's
    Generator, gives the same output twice, and refuses a flow solver in one line."""
    from safefm.generator import Generator
    from safefm.tiny import tiny_model, tiny_model_config

    cfg = dataclasses.replace(tiny_model_config(), objective="diffusion")
    heat = np.zeros((9, cfg.heatmap_size, cfg.heatmap_size), np.float32)
    outs = {}
    for solver in ("ddim", "dpmpp", "ddpm"):
        gen = Generator(tiny_model(0, cfg), RuntimeConfig(runtime="torch", device="cpu", solver=solver, steps=3))
        tokens = gen.identity_tokens(np.ones(128, np.float32))
        noise = torch.randn(1, *cfg.latent_shape, generator=torch.Generator().manual_seed(0))
        a, b = gen.generate(heat, tokens, noise), gen.generate(heat, tokens, noise)
        torch.testing.assert_close(a, b)
        assert torch.isfinite(a).all()
        outs[solver] = a
    assert (outs["ddim"] - outs["ddpm"]).abs().max() > 1e-4
    with pytest.raises(ConfigError, match="does not run a diffusion model"):
        Generator(tiny_model(0, cfg), RuntimeConfig(runtime="torch", device="cpu", solver="euler"))


# --- reflow ----------------------------------------------------------------------------------

def test_reflow_pairs_are_the_models_own_ode_solutions_and_train_on_their_noise(tmp_path):
    from safefm.sampler import sample
    from safefm.train.base import FlowTrainConfig, flow_loss
    from safefm.train.data import LatentCache
    from safefm.train.reflow import ReflowPairs, make_pairs, train_reflow
    from safefm.tiny import tiny_model

    model = tiny_model(0)
    cfg = model.cfg
    rng = np.random.default_rng(0)
    n = 12
    lms = np.tile(np.asarray(rng.uniform(8, 24, (1, 478, 3)), np.float16), (n, 1, 1))
    cache = LatentCache(arrays={"z": rng.normal(size=(n, *cfg.latent_shape)).astype(np.float16),
                                "landmarks": lms, "embeddings": rng.normal(size=(n, 128)).astype(np.float32),
                                "image_size": np.int64(cfg.image_size)})
    arrays = make_pairs(model, cache, 6, teacher_steps=3, null_prob=0.5, batch=4, log=lambda *_: None)
    pairs = ReflowPairs(cache, arrays)
    b = pairs.batch([0, 1], heat_size=cfg.heatmap_size)
    with torch.no_grad():   # x1 is the model's 3-step Euler solution from x0 under the stored condition
        tokens = model.identity(b["emb"])
        v = lambda z, t: model.velocity(z, torch.full((z.shape[0],), t), b["heat"], tokens)   # noqa: E731
        torch.testing.assert_close(sample(v, b["x0"], 3), b["z"], atol=2e-3, rtol=1e-2)   # float16 storage
    assert (arrays["emb"] == 0).all(axis=1).any() and not (arrays["emb"] == 0).all()   # null identity share
    # the loss pairs each x1 with its own x0: a straight-line field (x1 - x0) is exactly right
    straight = lambda z, t, heat, tok: (b["z"] - b["x0"])   # noqa: E731
    assert flow_loss(straight, lambda e: e, b, FlowTrainConfig(), torch.Generator().manual_seed(0)).item() < 1e-10
    ck = train_reflow(model, pairs, FlowTrainConfig(batch=4, lr=1e-3, warmup=1, max_steps=25, ckpt_every=25,
                                                    ema_decay=0.9),
                      run_dir=tmp_path / "reflow", max_minutes=0, log=lambda *_: None)
    losses = ck["history"]["loss"]
    assert ck["step"] == 25 and np.mean(losses[-5:]) < np.mean(losses[:5])
