"""Preview grids for a run (written under ``runs/``, git-ignored): what each stage produces.

- ``ae``: held-back crops (top) and their reconstructions (bottom);
- ``base`` / ``adapters``: faces generated with the Euler sampler (:mod:`safefm.sampler`) from
  fixed noise, for identity embeddings of held-back faces (adapters: with those faces'
  landmark heatmaps, shown in the first row).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..models import Velocity
from ..sampler import sample


def _grid(rows: list[np.ndarray]) -> np.ndarray:
    """rows of (N, S, S, 3) uint8 -> one (R*S, N*S, 3) image."""
    return np.concatenate([np.concatenate(list(r), axis=1) for r in rows], axis=0)


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def save_png(img: np.ndarray, path: Path) -> Path:
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), img[..., ::-1])
    return path


@torch.no_grad()
def ae_preview(model, crops: np.ndarray, path: Path) -> Path:
    from .data import to_tensor_image

    x = torch.stack([to_tensor_image(c) for c in crops])
    return save_png(_grid([crops, _to_uint8(model.decode(model.encode(x)))]), path)


@torch.no_grad()
def flow_preview(model, emb: np.ndarray, path: Path, heat: np.ndarray | None = None, steps: int = 8,
                 seed: int = 0) -> Path:
    """emb: (N, 128); heat: optional (N, 9, H, H). Rows: [heat], samples, null-identity samples."""
    n = len(emb)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, *model.cfg.latent_shape, generator=g)
    vel = Velocity(model.unet, model.controlnet if heat is not None else None)
    h = torch.from_numpy(heat).float() if heat is not None else None
    rows = []
    if heat is not None:
        vis = heat.max(axis=1)
        vis = np.stack([np.array(__import__("cv2").resize(v, (model.cfg.image_size,) * 2)) for v in vis])
        rows.append((np.repeat(vis[..., None], 3, -1) * 255).astype(np.uint8))
    for e in (emb, np.zeros_like(emb)):
        tok = model.identity(torch.from_numpy(e).float())
        z = sample(lambda x, t: vel(x, torch.full((n,), t), h, tok), noise, steps)
        rows.append(_to_uint8(model.decode(z)))
    return save_png(_grid(rows), path)
