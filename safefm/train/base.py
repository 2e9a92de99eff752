"""Stage 2: the flow-matching base (UNet + IdentityProjector) on cached latents.

One step, with the convention of :mod:`safefm.flow` (x0 noise, x1 data, target x1 - x0)::

    x1 = cached flow latent (B, C, h, w); x0 ~ N(0, I); t ~ logit-normal (flow.sample_time)
    emb -> NULL_EMBEDDING (zeros) for a ``null_prob`` fraction (unconditional / CFG branch)
    loss = flow_matching_loss(Velocity(unet)(interpolate(x0, x1, t), t, None, identity(emb)), x0, x1)

An EMA of the UNet + projector is kept and is what later stages and the export use.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import diffusion, flow
from ..config import ModelConfig
from ..models import SafeFMModel, Velocity, count_parameters
from .accel import Runner
from .common import (EMA, Deadline, History, checkpoint_model_config, config_dict, load_checkpoint, save_checkpoint,
                     run_payload, stage_dir, train_config_from_dict)

NULL_EMBEDDING_VALUE = 0.0  # the dropped / unconditional identity embedding is all zeros


@dataclass(frozen=True)
class FlowTrainConfig:
    batch: int = 32
    lr: float = 3e-4
    warmup: int = 50
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    null_prob: float = 0.1        # fraction of samples trained with the null identity
    time_mean: float = 0.0        # logit-normal time distribution (flow.sample_time)
    time_std: float = 1.0
    warm_prob: float = 0.0        # fraction of times drawn from U(warm_t0, 1) (video warm start)
    warm_t0: float = 0.5
    max_steps: int = 200_000
    ckpt_every: int = 100
    seed: int = 0


def sample_times(b: int, tcfg: FlowTrainConfig, gen: torch.Generator) -> torch.Tensor:
    """(B,) flow times: logit-normal, a ``warm_prob`` share uniform on [warm_t0, 1)."""
    t = flow.sample_time(b, gen, mean=tcfg.time_mean, std=tcfg.time_std)
    if tcfg.warm_prob > 0:
        warm = torch.rand(b, generator=gen) < tcfg.warm_prob
        tw = tcfg.warm_t0 + (1 - tcfg.warm_t0) * torch.rand(b, generator=gen)
        t = torch.where(warm, tw, t)
    return t


def _identity_tokens(identity: torch.nn.Module, batch: dict, tcfg: FlowTrainConfig, gen: torch.Generator,
                     device) -> torch.Tensor:
    """Identity tokens of the batch's embeddings, a ``null_prob`` share dropped to the null identity."""
    b = batch["emb"].shape[0]
    drop = (torch.rand(b, generator=gen) < tcfg.null_prob).to(device)
    emb = torch.where(drop[:, None], torch.full_like(batch["emb"], NULL_EMBEDDING_VALUE), batch["emb"])
    return identity(emb)


def flow_loss(velocity: Velocity, identity: torch.nn.Module, batch: dict, tcfg: FlowTrainConfig,
              gen: torch.Generator) -> torch.Tensor:
    """Flow-matching loss of one batch: ``z`` (B, C, h, w) data latents, ``emb`` (B, D),
    optional ``heat`` (B, Ch, H, H) and ``x0`` (B, C, h, w) paired noise (reflow; else drawn).
    Noise, times and identity dropout come from ``gen``."""
    x1 = batch["z"]
    b = x1.shape[0]
    if "x0" in batch:   # a reflow pair: the noise the data latent was generated from
        x0 = batch["x0"]
    else:
        x0 = torch.randn(x1.shape, generator=gen).to(x1.device)   # drawn on the CPU: same numbers on any device
    t = sample_times(b, tcfg, gen).to(x1.device)
    v = velocity(flow.interpolate(x0, x1, t), t, batch.get("heat"), _identity_tokens(identity, batch, tcfg, gen,
                                                                                   x1.device))
    return flow.flow_matching_loss(v, x0, x1)


def diffusion_loss(velocity: Velocity, identity: torch.nn.Module, batch: dict, tcfg: FlowTrainConfig,
                   gen: torch.Generator, sched=None) -> torch.Tensor:
    """The diffusion twin's loss of one batch (:mod:`safefm.diffusion`: v-prediction, DDPM
    steps uniform, the same warm-range oversampling, identity dropout and batches as
    :func:`flow_loss`)."""
    sched = sched or diffusion.train_scheduler()
    x1 = batch["z"]
    noise = torch.randn(x1.shape, generator=gen).to(x1.device)
    tau = diffusion.sample_timesteps(x1.shape[0], gen, warm_prob=tcfg.warm_prob, warm_t0=tcfg.warm_t0)
    x_tau = diffusion.add_noise(sched, x1, noise, tau.to(x1.device))
    v = velocity(x_tau, diffusion.net_time(tau).to(x1.device), batch.get("heat"),
                 _identity_tokens(identity, batch, tcfg, gen, x1.device))
    return diffusion.diffusion_loss(sched, v, x1, noise, tau.to(x1.device))


def objective_loss(objective: str):
    """The stage loss of a ModelConfig ``objective``: :func:`flow_loss` or :func:`diffusion_loss`."""
    if objective == "flow":
        return flow_loss
    sched = diffusion.train_scheduler()
    return lambda velocity, identity, batch, tcfg, gen: diffusion_loss(velocity, identity, batch, tcfg, gen, sched)


def base_model(cfg: ModelConfig) -> SafeFMModel:
    return SafeFMModel(cfg, with_controlnet=False, with_lora=False)


def base_keys(model: SafeFMModel) -> list[str]:
    return [k for k in model.state_dict() if k.startswith(("unet.", "identity."))]


def _lr(step: int, tcfg: FlowTrainConfig) -> float:
    return tcfg.lr * min(1.0, (step + 1) / max(1, tcfg.warmup))


def train_base(cfg: ModelConfig, tcfg: FlowTrainConfig, cache, *, ae_ckpt: dict | None = None,
               run_dir: Path | None = None, max_minutes: float = 20, resume: bool = True,
               log=print, runner: Runner | None = None) -> dict:
    """Train (or continue) the base on a :class:`safefm.train.data.LatentCache`; returns the checkpoint."""
    model = base_model(cfg)
    if ae_ckpt is not None:
        model.load_state_dict(ae_ckpt["state"]["model"], strict=False)
    for p in model.autoencoder.parameters():
        p.requires_grad_(False)
    params = [p for n, p in model.named_parameters() if n.startswith(("unet.", "identity."))]
    metrics = {"trainable_params": count_parameters(model.unet) + count_parameters(model.identity)}
    if ae_ckpt is not None:
        metrics["ae_step"] = int(ae_ckpt["step"])   # the latents this base was trained on
    ck = train_flow_stage(
        "base", cfg, tcfg, cache, model=model, velocity=Velocity(model.unet, None), params=params,
        keys=base_keys(model), metrics=metrics, heat_size=None, seed_salt=0,
        title="base flow matching", run_dir=Path(run_dir or stage_dir("base")), max_minutes=max_minutes,
        resume=resume, log=log, runner=runner)
    m = ck["metrics"]
    log(f"base: step {ck['step']}, loss (last 100) {m['loss_last100']:.4f}, "
        f"{m['sec_per_step']:.2f} s/step, {m['trainable_params'] / 1e6:.2f} M trainable params")
    return ck


def train_flow_stage(stage: str, cfg: ModelConfig, tcfg: FlowTrainConfig, cache, *, model: SafeFMModel,
                     velocity: torch.nn.Module, params: list, keys: list[str], metrics: dict,
                     heat_size: int | None, seed_salt: int, title: str, run_dir: Path,
                     max_minutes: float, resume: bool, log, runner: Runner | None, context=None) -> dict:
    """The loop both flow stages share: resumable, EMA of ``keys``, checkpoint every
    ``ckpt_every`` steps (main process only), one plain process or ``accelerate launch``
    (see :mod:`safefm.train.accel`). ``velocity`` wraps the trained modules; ``params`` are
    the trainable parameters; ``keys`` the state-dict names saved and averaged; ``context``: a
    :class:`~safefm.train.data.ContextDraw` for a context model (the cache needs its crops)."""
    from tqdm import tqdm

    runner = runner or Runner()
    ckpt_path = run_dir / "last.pt"
    model.to(runner.device)
    opt = torch.optim.AdamW(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    ema = EMA(model, tcfg.ema_decay, keys)
    step, history = 0, History()
    if resume and ckpt_path.exists():
        ck = load_checkpoint(ckpt_path)
        if checkpoint_model_config(ck) != cfg:
            raise ValueError(f"{ckpt_path} was trained with another model config; use a new run dir")
        tcfg = train_config_from_dict(FlowTrainConfig, {**config_dict(tcfg), "seed": ck["train_config"]["seed"]})
        model.load_state_dict(ck["state"]["model"], strict=False)
        opt.load_state_dict(ck["opt"])
        ema.load_state_dict(ck["ema"])
        step, history = ck["step"], History(ck["history"])
        metrics = {**ck.get("metrics", {}), **metrics}
        log(f"resumed {ckpt_path} at step {step}")
    salt = seed_salt + runner.seed_offset()
    gen = torch.Generator().manual_seed(tcfg.seed * 1_000_003 + step + salt)
    rng = np.random.default_rng(tcfg.seed + 7919 * step + salt)
    net, identity = runner.wrap(velocity), runner.wrap(model.identity)
    opt = runner.prepare_optimizer(opt)
    metrics["processes"] = runner.world
    deadline = Deadline(max_minutes)
    key_set = set(keys)

    def save():
        if runner.is_main:
            state = {k: v for k, v in model.state_dict().items() if k in key_set}
            save_checkpoint(ckpt_path, run_payload(stage, cfg, tcfg, step, state, opt, history, metrics,
                                                   ema=ema.state_dict()))
            history.plot(run_dir / "loss.png", ("loss",), f"{title} (step {step})")

    if runner.world > 1:
        log(f"{stage}: {runner.describe()}; effective batch {runner.world} x {tcfg.batch}")
    model.train()
    model.autoencoder.eval()
    bar = tqdm(total=tcfg.max_steps, initial=step, desc=stage, unit="step", mininterval=5,
               disable=not runner.is_main)
    t0, step0 = time.monotonic(), step
    loss_fn = objective_loss(cfg.objective)
    while step < tcfg.max_steps and not runner.should_stop():
        for g in opt.param_groups:
            g["lr"] = _lr(step, tcfg)
        rows = rng.integers(0, len(cache), tcfg.batch)
        extra = {"context": context, "rng": rng} if context is not None else {}
        batch = runner.batch(cache.batch(rows, heat_size=heat_size, **extra))
        with runner.autocast():
            loss = loss_fn(net, identity, batch, tcfg, gen)
        opt.zero_grad(set_to_none=True)
        runner.backward(loss)
        runner.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(model)
        step += 1
        history.log(step, loss=loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{history.mean_last('loss', 50):.4f}", refresh=False)
        if step % tcfg.ckpt_every == 0:
            save()
        if deadline.passed():
            runner.request_stop()
    bar.close()
    metrics["sec_per_step"] = (time.monotonic() - t0) / max(1, step - step0)
    metrics["steps"] = step
    metrics["loss_last100"] = history.mean_last("loss", 100)
    save()
    runner.wait()
    return load_checkpoint(ckpt_path)


def load_base(ck: dict, model: SafeFMModel, use_ema: bool = True) -> SafeFMModel:
    """Load a base checkpoint's UNet + projector (EMA by default) into ``model``."""
    state = ck["ema"]["shadow"] if use_ema and ck.get("ema") else ck["state"]["model"]
    res = model.load_state_dict(state, strict=False)
    bad = [k for k in res.missing_keys if k.startswith(("unet.", "identity.")) and "lora_" not in k]
    if bad or res.unexpected_keys:
        raise ValueError(f"base checkpoint does not fit the model: {bad[:2]} {res.unexpected_keys[:2]}")
    return model
