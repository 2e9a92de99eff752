"""Stage 3: the expression ControlNet (on landmark heatmaps) + the identity LoRA, base frozen.

The ControlNet is built from the trained base UNet (``ControlNetModel.from_unet``: its
encoder starts as a copy and its zero convolutions make it a no-op at step 0), then the
LoRA (peft, on the UNet attention projections) is added. Everything else - the UNet's own
weights, the IdentityProjector and the autoencoder - is frozen. The loss is the base's
(:func:`safefm.train.base.flow_loss`), now with ``heat`` (B, 9, H, H) from the crop's
landmarks; ``warm_prob`` oversamples late times t in [warm_t0, 1) (the video warm start).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ..config import ModelConfig
from ..models import SafeFMModel, build_controlnet, count_parameters, lora_config
from .base import FlowTrainConfig, flow_loss, load_base
from .common import (EMA, Deadline, History, checkpoint_model_config, config_dict, load_checkpoint, save_checkpoint,
                     stage_dir, train_config_from_dict)

ADAPTER_DEFAULTS = FlowTrainConfig(batch=16, lr=2e-4, warmup=50, weight_decay=0.0,
                                   ema_decay=0.998, warm_prob=0.25, ckpt_every=50)


def adapter_model(cfg: ModelConfig, ae_ckpt: dict | None = None, base_ckpt: dict | None = None) -> SafeFMModel:
    """SafeFMModel with the base (EMA) loaded, then ControlNet-from-UNet and LoRA added.

    Its state-dict keys equal those of ``SafeFMModel(cfg)`` (what export/load use).
    """
    model = SafeFMModel(cfg, with_controlnet=False, with_lora=False)
    if ae_ckpt is not None:
        model.load_state_dict(ae_ckpt["state"]["model"], strict=False)
    if base_ckpt is not None:
        load_base(base_ckpt, model)
    model.controlnet = build_controlnet(cfg, model.unet)
    model.unet.add_adapter(lora_config(cfg))
    return model


def adapter_keys(model: SafeFMModel) -> list[str]:
    """State-dict names this stage trains: the ControlNet and the LoRA matrices."""
    return [k for k in model.state_dict() if k.startswith("controlnet.") or "lora_" in k]


def freeze_for_adapters(model: SafeFMModel) -> list[torch.nn.Parameter]:
    """requires_grad only on ControlNet + LoRA parameters; returns them."""
    out = []
    for n, p in model.named_parameters():
        train = n.startswith("controlnet.") or "lora_" in n
        p.requires_grad_(train)
        if train:
            out.append(p)
    return out


def trainable_report(model: SafeFMModel) -> dict:
    """Parameter counts: trainable (ControlNet + LoRA) vs the whole generator."""
    total = count_parameters(model)
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    cn = count_parameters(model.controlnet)
    trainable = count_parameters(model, trainable_only=True)
    gen = total - count_parameters(model.autoencoder)
    return {"total": total, "generator_without_ae": gen, "trainable": trainable, "controlnet": cn,
            "lora": lora, "trainable_fraction": trainable / total, "trainable_fraction_of_generator": trainable / gen,
            "lora_fraction": lora / total}


def _lr(step: int, tcfg: FlowTrainConfig) -> float:
    return tcfg.lr * min(1.0, (step + 1) / max(1, tcfg.warmup))


def train_adapters(cfg: ModelConfig, tcfg: FlowTrainConfig, cache, *, ae_ckpt: dict, base_ckpt: dict,
                   run_dir: Path | None = None, max_minutes: float = 20, resume: bool = True,
                   log=print) -> dict:
    """Train (or continue) ControlNet + LoRA on a LatentCache with heatmaps; returns the checkpoint."""
    from tqdm import tqdm

    run_dir = Path(run_dir or stage_dir("adapters"))
    ckpt_path = run_dir / "last.pt"
    model = adapter_model(cfg, ae_ckpt, base_ckpt)
    params = freeze_for_adapters(model)
    keys = adapter_keys(model)
    opt = torch.optim.AdamW(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    ema = EMA(model, tcfg.ema_decay, keys)
    step, history, metrics = 0, History(), {}
    if resume and ckpt_path.exists():
        ck = load_checkpoint(ckpt_path)
        if checkpoint_model_config(ck) != cfg:
            raise ValueError(f"{ckpt_path} was trained with another model config; use a new run dir")
        tcfg = train_config_from_dict(FlowTrainConfig, {**config_dict(tcfg), "seed": ck["train_config"]["seed"]})
        model.load_state_dict(ck["state"]["model"], strict=False)
        opt.load_state_dict(ck["opt"])
        ema.load_state_dict(ck["ema"])
        step, history, metrics = ck["step"], History(ck["history"]), ck.get("metrics", {})
        log(f"resumed {ckpt_path} at step {step}")
    metrics.update(trainable_report(model))
    metrics["ae_step"], metrics["base_step"] = int(ae_ckpt["step"]), int(base_ckpt["step"])
    log(f"adapters: trainable {metrics['trainable'] / 1e6:.2f} M of {metrics['total'] / 1e6:.2f} M "
        f"({100 * metrics['trainable_fraction']:.1f} %; LoRA {metrics['lora'] / 1e3:.1f} k)")
    gen = torch.Generator().manual_seed(tcfg.seed * 1_000_003 + step + 17)
    rng = np.random.default_rng(tcfg.seed + 7919 * step + 17)
    velocity = model.velocity
    deadline = Deadline(max_minutes)

    def save():
        payload = {"stage": "adapters", "model_config": config_dict(cfg), "train_config": config_dict(tcfg),
                   "step": step, "state": {"model": {k: v for k, v in model.state_dict().items() if k in set(keys)}},
                   "opt": opt.state_dict(), "ema": ema.state_dict(), "history": history.data,
                   "metrics": metrics}
        save_checkpoint(ckpt_path, payload)
        history.plot(run_dir / "loss.png", ("loss",), f"adapters: ControlNet + LoRA (step {step})")

    model.train()
    model.autoencoder.eval()
    bar = tqdm(total=tcfg.max_steps, initial=step, desc="adapters", unit="step", mininterval=5)
    t0, step0 = time.monotonic(), step
    while step < tcfg.max_steps and not deadline.passed():
        for g in opt.param_groups:
            g["lr"] = _lr(step, tcfg)
        batch = cache.batch(rng.integers(0, len(cache), tcfg.batch), heat_size=cfg.heatmap_size)
        loss = flow_loss(velocity, model.identity, batch, tcfg, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(model)
        step += 1
        history.log(step, loss=loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{history.mean_last('loss', 50):.4f}", refresh=False)
        if step % tcfg.ckpt_every == 0:
            save()
    bar.close()
    metrics["sec_per_step"] = (time.monotonic() - t0) / max(1, step - step0)
    metrics["steps"] = step
    metrics["loss_last100"] = history.mean_last("loss", 100)
    save()
    log(f"adapters: step {step}, loss (last 100) {metrics['loss_last100']:.4f}, {metrics['sec_per_step']:.2f} s/step")
    return load_checkpoint(ckpt_path)


def load_adapters(ck: dict, model: SafeFMModel, use_ema: bool = True) -> SafeFMModel:
    """Load an adapters checkpoint (EMA by default) into an :func:`adapter_model`."""
    state = ck["ema"]["shadow"] if use_ema and ck.get("ema") else ck["state"]["model"]
    res = model.load_state_dict(state, strict=False)
    if res.unexpected_keys:
        raise ValueError(f"adapters checkpoint does not fit the model: {res.unexpected_keys[:2]}")
    return model


__all__ = ["ADAPTER_DEFAULTS", "adapter_model", "train_adapters", "load_adapters", "trainable_report", "replace"]
