"""The generated face fitted to the person's head: its outline moved onto theirs.

The generator draws the identity's own face shape: a wide face on a narrow head spills over
the background beside the cheeks (pasted as a disc with a blurred rim), a narrow one leaves the
person's cheeks to a smooth fill. :func:`follow_outline` moves the identity's face-oval points
(jaw, cheeks, forehead edge) a ``share`` of the way onto the person's and keeps its eyes, brows,
nose and lips where they are; :func:`warp_maps` turns that into a smooth thin-plate-spline
warp of the generated crop (:func:`cv2.remap` maps), so the face keeps its own features and
takes the head it sits on. The person's outline never reaches the generator (the context hides
it, :mod:`safefm.face.context`); it only shapes the paste, and the identity choice judges
candidates after it.

Landmarks are ``(478, 2|3)`` MediaPipe points in crop pixels; pure functions.
"""

from __future__ import annotations

import cv2
import numpy as np

from .composite import face_oval_indices
from .retarget import BROWS, EYELIDS, IRISES, LIPS

# Nose bridge, tip, wings and base: with the eyes, brows and lips, the points the warp keeps.
NOSE = (1, 2, 4, 5, 6, 19, 48, 64, 94, 98, 168, 195, 197, 278, 294, 327)
PINNED = np.array(sorted(set(LIPS + EYELIDS + IRISES + BROWS + NOSE)), np.int64)
GRID = 33          # the spline is evaluated on GRID x GRID points, then resized (it is smooth)
STIFF = 1e-6       # thin-plate regularisation (unit-crop units): near-coincident points cannot fold it


def follow_outline(generated: np.ndarray, real: np.ndarray, share: float) -> np.ndarray:
    """``generated`` (478, 2|3) with its face-oval points moved ``share`` (0-1) of the way onto
    ``real``'s (478, 2|3), x and y only. Returns a new float32 array shaped like ``generated``."""
    out = np.array(generated, np.float32, copy=True)
    oval = face_oval_indices()
    real = np.asarray(real, np.float32)
    out[oval, :2] += np.float32(share) * (real[oval, :2] - out[oval, :2])
    return out


def _kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Thin-plate radial basis U(r) = r^2 log r between the points ``a`` (N, 2) and ``b`` (M, 2): (N, M)."""
    d2 = np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2.0 * a @ b.T, 1e-12)
    return 0.5 * d2 * np.log(d2)


def warp_maps(source: np.ndarray, target: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``cv2.remap`` maps (two ``(size, size) float32``) that move a ``size`` px crop's
    ``source`` landmarks onto ``target`` (both (478, 2|3), crop pixels): output pixel (x, y)
    reads the crop at (map_x, map_y). The face-oval and :data:`PINNED` points are the spline's
    anchors (exact up to :data:`STIFF`); elsewhere the displacement is the smoothest that fits
    them (a thin-plate spline), continued beyond the oval."""
    idx = np.concatenate([face_oval_indices(), PINNED])
    p = np.asarray(target, np.float64)[idx, :2] / size
    v = (np.asarray(source, np.float64)[idx, :2] - np.asarray(target, np.float64)[idx, :2]) / size
    n = len(p)
    a = np.zeros((n + 3, n + 3))
    a[:n, :n] = _kernel(p, p) + STIFF * np.eye(n)
    a[:n, n] = a[n, :n] = 1.0
    a[:n, n + 1:] = p
    a[n + 1:, :n] = p.T
    b = np.zeros((n + 3, 2))
    b[:n] = v
    coef = np.linalg.solve(a, b)
    g = ((np.arange(GRID) + 0.5) * size / GRID - 0.5) / size   # where cv2.resize puts the grid's samples
    gx, gy = np.meshgrid(g, g)
    grid = np.stack([gx.ravel(), gy.ravel()], axis=1)
    disp = _kernel(grid, p) @ coef[:n] + coef[n] + grid @ coef[n + 1:]
    disp = cv2.resize((disp * size).reshape(GRID, GRID, 2).astype(np.float32), (size, size),
                      interpolation=cv2.INTER_LINEAR)
    xs = np.arange(size, dtype=np.float32)
    return xs[None, :] + disp[..., 0], xs[:, None] + disp[..., 1]


def fit_to_head(crop: np.ndarray, generated: np.ndarray, real: np.ndarray,
                share: float) -> tuple[np.ndarray, np.ndarray]:
    """The generated ``crop`` ((S, S, 3) uint8) warped so its face outline (its landmarks
    ``generated``, (478, 3) crop pixels) lies ``share`` of the way on the person's (``real``,
    the same crop's); returns (the warped crop, its landmarks). ``share`` 0: both unchanged."""
    if share <= 0:
        return crop, generated
    target = follow_outline(generated, real, share)
    mx, my = warp_maps(generated, target, crop.shape[0])
    return cv2.remap(crop, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE), target
