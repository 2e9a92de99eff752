"""One reflow pass (rectified flow, Liu et al. 2022) on a trained flow-matching model.

The trained model's ODE couples each noise x0 with the latent x1 it integrates to. Training the
same velocity field again on those fixed (x0, x1) pairs, with the flow-matching loss of
:func:`safefm.train.base.flow_loss` (``x_t = (1 - t) x0 + t x1``, target ``x1 - x0``), makes its
paths straighter, so fewer Euler steps land where many did:

1. :func:`make_pairs`: for training latents' conditions (heatmaps from the crop's landmarks,
   the dlib identity embedding, a ``null_prob`` share as the null identity), draw x0 and integrate
   ``teacher_steps`` Euler steps of the model (:func:`safefm.sampler.sample`) -> x1.
2. :func:`train_reflow`: fine-tune the UNet, its LoRA and the ControlNet on the pairs (the loop
   every flow stage shares, :func:`safefm.train.base.train_flow_stage`), starting from the model.

The conditions are stored with each pair (the identity as used, so no further dropout).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ..models import SafeFMModel
from ..sampler import sample
from .base import NULL_EMBEDDING_VALUE, FlowTrainConfig, train_flow_stage
from .data import ContextDraw

REFLOW_DEFAULTS = FlowTrainConfig(batch=16, lr=5e-5, warmup=20, weight_decay=0.0, ema_decay=0.995,
                                  null_prob=0.0, ckpt_every=50)


class ReflowPairs:
    """(x0, x1) pairs over a :class:`~safefm.train.data.LatentCache`'s conditions:
    ``batch(idx, heat_size)`` -> the cache row's heatmaps, the identity used and ``z`` = x1,
    ``x0`` = its noise (torch tensors, (B, ...))."""

    def __init__(self, cache, arrays: dict):
        self.cache, self.x0, self.x1 = cache, arrays["x0"], arrays["x1"]
        self.rows, self.emb = arrays["rows"], arrays["emb"]
        self.grow = arrays.get("grow")   # a context model's pairs: the context each was drawn with

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, idx, heat_size: int | None = None) -> dict:
        idx = np.asarray(idx)
        grows = None if self.grow is None else self.grow[idx]
        out = self.cache.batch(self.rows[idx], heat_size=heat_size, grows=grows)
        out.update(z=torch.from_numpy(self.x1[idx].astype(np.float32)),
                   x0=torch.from_numpy(self.x0[idx].astype(np.float32)),
                   emb=torch.from_numpy(self.emb[idx].astype(np.float32)))
        return out


@torch.no_grad()
def make_pairs(model: SafeFMModel, cache, n: int, teacher_steps: int, *, seed: int = 0,
               null_prob: float = 0.1, batch: int = 32, log=print) -> dict[str, np.ndarray]:
    """n pairs from ``cache``'s rows (seeded): {x0, x1: (n, C, h, w) float16, rows (n,), emb (n, D)}."""
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    rows = rng.choice(len(cache), size=n, replace=n > len(cache))
    grow = ContextDraw().draw(rng, n) if model.cfg.context_channels else None   # a context model: fixed per pair
    model.eval()
    velocity = model.velocity
    x0s, x1s, embs = [], [], []
    for i in range(0, n, batch):
        b = cache.batch(rows[i:i + batch], heat_size=model.cfg.heatmap_size,
                        grows=None if grow is None else grow[i:i + batch])
        k = len(b["z"])
        drop = torch.rand(k, generator=gen) < null_prob
        emb = torch.where(drop[:, None], torch.full_like(b["emb"], NULL_EMBEDDING_VALUE), b["emb"])
        tokens = model.identity(emb)
        x0 = torch.randn(b["z"].shape, generator=gen)

        def v(z, t, heat=b["heat"], tokens=tokens):
            return velocity(z, torch.full((z.shape[0],), t), heat, tokens)
        x1s.append(sample(v, x0, teacher_steps).half().numpy())
        x0s.append(x0.half().numpy())
        embs.append(emb.numpy())
        if (i // batch) % 20 == 0:
            log(f"reflow pairs: {i + k} of {n}")
    out = {"x0": np.concatenate(x0s), "x1": np.concatenate(x1s), "rows": rows.astype(np.int64),
           "emb": np.concatenate(embs).astype(np.float32)}
    if grow is not None:
        out["grow"] = grow
    return out


def reflow_keys(model: SafeFMModel) -> list[str]:
    """The state-dict names a reflow pass trains: the UNet (with its LoRA) and the ControlNet."""
    return [k for k in model.state_dict() if k.startswith(("unet.", "controlnet."))]


def train_reflow(model: SafeFMModel, pairs: ReflowPairs, tcfg: FlowTrainConfig, *, run_dir: Path,
                 max_minutes: float, resume: bool = True, log=print, runner=None) -> dict:
    """Fine-tune ``model``'s UNet + LoRA + ControlNet on reflow pairs; returns the checkpoint."""
    params = []
    for name, p in model.named_parameters():
        train = name.startswith(("unet.", "controlnet."))
        p.requires_grad_(train)
        if train:
            params.append(p)
    metrics = {"trainable": sum(p.numel() for p in params), "pairs": len(pairs)}
    log(f"reflow: {metrics['trainable'] / 1e6:.2f} M trainable on {len(pairs)} pairs")
    return train_flow_stage("reflow", model.cfg, replace(tcfg, null_prob=0.0), pairs, model=model,
                            velocity=model.velocity, params=params, keys=reflow_keys(model), metrics=metrics,
                            heat_size=model.cfg.heatmap_size, seed_salt=29, title="reflow",
                            run_dir=Path(run_dir), max_minutes=max_minutes, resume=resume, log=log, runner=runner)
