"""Context-aware generation (issue 14): teach a trained model's adapters to read the frame.

:func:`context_model` turns a shipped flow model into one with ``context_channels = 4``: the
ControlNet's input convolution gets four more input channels (the crop with the face masked
out, and the mask: :mod:`safefm.face.context`), their weights zero, so before training it draws
exactly what the source model drew. :func:`train_context` then fine-tunes the ControlNet and the
LoRA (the adapters; the base UNet, identity projector, autoencoder and detail stage stay frozen)
with the loss every flow stage shares (:func:`safefm.train.base.flow_loss`) on the latent
cache's crops, each with its own context: the mask grown by a random 0-0.3 face widths, a
10 % share with no context (so the model still draws without a frame).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..config import CONTEXT_CHANNELS
from ..models import SafeFMModel, widen_controlnet_input
from .adapters import adapter_keys, freeze_for_adapters
from .base import FlowTrainConfig, train_flow_stage
from .data import ContextDraw

CONTEXT_DEFAULTS = FlowTrainConfig(batch=16, lr=1e-4, warmup=50, weight_decay=0.0, ema_decay=0.995,
                                   warm_prob=0.25, ckpt_every=50)


def context_model(source: SafeFMModel) -> SafeFMModel:
    """A copy of ``source`` (a model without context) reading the context too, its outputs
    unchanged until trained."""
    if source.cfg.context_channels:
        raise ValueError("the model already reads a context")
    if source.controlnet is None:
        raise ValueError("the model has no ControlNet to read the context with")
    cfg = dataclasses.replace(source.cfg, context_channels=CONTEXT_CHANNELS)
    model = SafeFMModel(cfg)
    model.load_state_dict(widen_controlnet_input(source.state_dict(), CONTEXT_CHANNELS))
    return model


def train_context(model: SafeFMModel, cache, tcfg: FlowTrainConfig, *, run_dir: Path, max_minutes: float,
                  draw: ContextDraw = ContextDraw(), resume: bool = True, log=print, runner=None) -> dict:
    """Fine-tune ``model``'s ControlNet + LoRA on ``cache`` (crops attached) with contexts."""
    if not model.cfg.context_channels:
        raise ValueError("train_context needs a context model (context_model)")
    if getattr(cache, "crops", None) is None:
        raise ValueError("the latent cache has no crops attached (LatentCache.attach_crops)")
    params = freeze_for_adapters(model)
    metrics = {"trainable": sum(p.numel() for p in params), "context_grow": list(draw.grow),
               "context_drop": draw.drop}
    log(f"context: {metrics['trainable'] / 1e6:.2f} M trainable (ControlNet + LoRA)")
    return train_flow_stage("context", model.cfg, tcfg, cache, model=model, velocity=model.velocity,
                            params=params, keys=adapter_keys(model), metrics=metrics,
                            heat_size=model.cfg.heatmap_size, seed_salt=31, title="context adapters",
                            run_dir=Path(run_dir), max_minutes=max_minutes, resume=resume, log=log,
                            runner=runner, context=draw)
