"""Stage 3: the expression ControlNet (on landmark heatmaps) + the identity LoRA, base frozen.

The ControlNet is built from the trained base UNet (``ControlNetModel.from_unet``: its
encoder starts as a copy and its zero convolutions make it a no-op at step 0), then the
LoRA (peft, on the UNet attention projections) is added. Everything else - the UNet's own
weights, the IdentityProjector and the autoencoder - is frozen. The loss is the base's
(:func:`safefm.train.base.flow_loss`), now with ``heat`` (B, 9, H, H) from the crop's
landmarks; ``warm_prob`` oversamples late times t in [warm_t0, 1) (the video warm start).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from ..config import ModelConfig
from ..models import SafeFMModel, build_controlnet, count_parameters, lora_config
from .base import FlowTrainConfig, load_base, train_flow_stage
from .common import stage_dir

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


def train_adapters(cfg: ModelConfig, tcfg: FlowTrainConfig, cache, *, ae_ckpt: dict, base_ckpt: dict,
                   run_dir: Path | None = None, max_minutes: float = 20, resume: bool = True,
                   log=print, runner=None) -> dict:
    """Train (or continue) ControlNet + LoRA on a LatentCache with heatmaps; returns the checkpoint."""
    model = adapter_model(cfg, ae_ckpt, base_ckpt)
    params = freeze_for_adapters(model)
    metrics = trainable_report(model)
    metrics["ae_step"], metrics["base_step"] = int(ae_ckpt["step"]), int(base_ckpt["step"])
    log(f"adapters: trainable {metrics['trainable'] / 1e6:.2f} M of {metrics['total'] / 1e6:.2f} M "
        f"({100 * metrics['trainable_fraction']:.1f} %; LoRA {metrics['lora'] / 1e3:.1f} k)")
    ck = train_flow_stage(
        "adapters", cfg, tcfg, cache, model=model, velocity=model.velocity, params=params,
        keys=adapter_keys(model), metrics=metrics, heat_size=cfg.heatmap_size, seed_salt=17,
        title="adapters: ControlNet + LoRA", run_dir=Path(run_dir or stage_dir("adapters")),
        max_minutes=max_minutes, resume=resume, log=log, runner=runner)
    m = ck["metrics"]
    log(f"adapters: step {ck['step']}, loss (last 100) {m['loss_last100']:.4f}, {m['sec_per_step']:.2f} s/step")
    return ck


def load_adapters(ck: dict, model: SafeFMModel, use_ema: bool = True) -> SafeFMModel:
    """Load an adapters checkpoint (EMA by default) into an :func:`adapter_model`."""
    state = ck["ema"]["shadow"] if use_ema and ck.get("ema") else ck["state"]["model"]
    res = model.load_state_dict(state, strict=False)
    if res.unexpected_keys:
        raise ValueError(f"adapters checkpoint does not fit the model: {res.unexpected_keys[:2]}")
    return model


__all__ = ["ADAPTER_DEFAULTS", "adapter_model", "train_adapters", "load_adapters", "trainable_report", "replace"]
