"""The frame around the face, as the generator sees it (context-aware generation, issue 14).

The ControlNet of a model with ``context_channels = 4`` reads, besides the expression heatmaps,
the aligned crop of the real frame with the face masked out and the mask itself, so skin tone,
light direction, white balance, grain, a grey-scale picture and the hair line continue from the
real frame into the synthetic face (the inpainting conditioning of DeepPrivacy2). The mask is
the *template's* face oval (jaw line to the top of the forehead of the mean face), scaled about
its centre just enough to cover every landmark set given (the real face and the identity's
retargeted one), then grown by ``grow`` face widths. Its shape is always the template's, so
neither the person's face nor its outline reaches the generator, not even through the mask: all
it tells is one number, how far the face reaches beyond the mean face's outline.

Layout of the ``(4, S, S) float32`` context: channels 0-2 the crop's RGB in [-1, 1], 0 under
the mask; channel 3 the mask (1 = generate here). :func:`null_context` (all masked, no pixels)
is what a model trained with context dropout draws without a frame (identity previews, warm-up).
"""

from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np

from .alignment import load_template
from .composite import face_oval_indices, oval_distance

CHANNELS = ("red", "green", "blue", "mask")


def covering_scale(points: np.ndarray, hull: np.ndarray, centre: np.ndarray) -> float:
    """The least k >= 1 for which the convex polygon ``hull`` ``(V, 2)`` scaled by k about
    ``centre`` (inside it) contains every point of ``points`` ``(N, 2)``.

    For each edge (outward normal n, n . x <= d inside) a point p needs
    k >= n . (p - c) / (d - n . c); the answer is the largest such bound."""
    hull = np.asarray(hull, np.float64)
    c = np.asarray(centre, np.float64)
    a, b = hull, np.roll(hull, -1, axis=0)
    n = np.stack([b[:, 1] - a[:, 1], a[:, 0] - b[:, 0]], axis=1)        # edge normals
    n *= np.sign(((c - a) * n).sum(1, keepdims=True)) * -1.0             # made to point outward
    slack = ((a - c) * n).sum(1)                                         # d - n . c > 0
    need = (np.asarray(points, np.float64)[:, None, :2] - c) @ n.T / slack[None, :]
    return float(max(1.0, need.max()))


@lru_cache(maxsize=4)
def template_oval(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(the template's face-oval hull ``(V, 2)``, its centre ``(2,)``) in pixels of a
    ``size`` crop (cached: treat as read-only)."""
    pts = load_template()[face_oval_indices(), :2].astype(np.float32) * size
    hull = cv2.convexHull(pts).reshape(-1, 2)
    return hull.astype(np.float64), hull.mean(axis=0).astype(np.float64)


def context_mask(landmark_sets, size: int, grow: float) -> np.ndarray:
    """``(size, size) float32``: 1 within ``grow`` face widths of the template's face oval
    scaled to cover every given face oval (see the module), else 0.

    landmark_sets: one or more ``(478, 2|3)`` landmark arrays in crop pixels."""
    hull, c = template_oval(size)
    ovals = np.concatenate([np.asarray(lm, np.float32)[face_oval_indices(), :2] for lm in landmark_sets])
    k = covering_scale(ovals, hull, c)
    scaled = load_template()[:, :2] * size
    scaled = c + (scaled - c) * k
    return (oval_distance(scaled, size) < grow).astype(np.float32)


def render_context(crop: np.ndarray, mask: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """The context of an ``(S, S, 3) uint8`` RGB crop under ``mask`` ``(S, S)`` in [0, 1]:
    ``(4, S, S) float32`` (see the module's layout); written into ``out`` when given."""
    s = crop.shape[0]
    if crop.shape != (s, s, 3) or mask.shape != (s, s):
        raise ValueError(f"context needs an (S, S, 3) crop and an (S, S) mask, got {crop.shape} and {mask.shape}")
    if out is None:
        out = np.empty((len(CHANNELS), s, s), np.float32)
    keep = 1.0 - mask
    out[:3] = (crop.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0) * keep
    out[3] = mask
    return out


def null_context(size: int) -> np.ndarray:
    """``(4, size, size) float32``: no surroundings known, everything to generate."""
    out = np.zeros((len(CHANNELS), size, size), np.float32)
    out[3] = 1.0
    return out


def face_context(crop: np.ndarray, landmark_sets, grow: float, size: int | None = None,
                 out: np.ndarray | None = None) -> np.ndarray:
    """:func:`render_context` of an ``(S, S, 3) uint8`` crop under :func:`context_mask` of
    ``landmark_sets`` (crop pixels), at ``size`` (the heatmaps' side; default S: the crop
    is area-resized and the landmarks scaled when it differs)."""
    s = crop.shape[0]
    size = size or s
    if size != s:
        crop = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)
        k = np.float32(size / s)
        landmark_sets = [np.asarray(lm, np.float32)[:, :2] * k for lm in landmark_sets]
    return render_context(crop, context_mask(landmark_sets, size, grow), out=out)
