"""Retrain the flow stages of a shipped model under another objective (issue 16's diffusion twin).

:func:`frozen_parts_checkpoint` turns a shipped model file into an ``ae`` checkpoint: its
autoencoder (encoder, the fine-tuned decoder), its 2x detail stage and its latent statistics,
with the shipped model config (``objective`` overridden). ``scripts/train.py --stage
from-weights`` writes it as ``<runs>/ae/last.pt``; then ``--stage cache``, ``base`` and
``adapters`` train the UNet + identity projector and the ControlNet + LoRA on exactly the
latents, decoder and detail stage of the shipped model, and ``--stage export`` assembles the
twin (the frozen parts come from this checkpoint).
"""

from __future__ import annotations

import dataclasses
import json

import torch

from ..config import to_dict

FROZEN_PREFIXES = ("autoencoder.", "detail.", "latent_")


def frozen_parts_checkpoint(source, objective: str) -> dict:
    """An ``ae`` checkpoint (see :mod:`safefm.train.common`) from a shipped model file:
    its frozen parts, ``step`` = the file's autoencoder steps, no held-back crops."""
    from ..checkpoint import load_model
    from ..paths import resolve_model_path

    model, meta = load_model(resolve_model_path(source))
    cfg = dataclasses.replace(model.cfg, objective=objective)
    training = json.loads(meta.get("training") or "{}")
    state = {k: v.float() if v.is_floating_point() else v for k, v in model.state_dict().items()
             if k.startswith(FROZEN_PREFIXES)}
    return {"stage": "ae", "model_config": to_dict(cfg), "train_config": {"from_weights": str(source)},
            "step": int(training.get("ae_steps", 0)), "state": {"model": state}, "opt": {}, "ema": None,
            "history": {}, "metrics": {"from_sha256": meta.get("sha256", ""),
                                       "psnr_holdout": training.get("ae_psnr_holdout")},
            "holdout_indices": torch.zeros(0, dtype=torch.int64)}
