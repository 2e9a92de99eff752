"""How clean a generated face's skin is: the patches the generator sometimes paints.

Some identities come out of the generator with marbled dark patches on the cheeks and jaw,
blown-out highlights, orange or grey patches, or hair strands biting into the face edge. The
colour match and the paste keep them (they are the face's own shading), so on a call they read
as dirt, bruises or burns. The per-person identity choice (:mod:`safefm.identity_assign`)
prefers candidates whose skin is more even than the others' in the same frame.

:func:`uneven_skin` reads the crop's CIELAB colour over the skin of the face oval, without the
eyes, brows and lips (hulls grown by :data:`FEATURE_GROW` face widths), smoothed at
:data:`SCALE` face widths so pores, grain and the generator's fine texture do not count. It adds
two readings, both in L* / ΔE units: the mean colour difference from a smooth light field (per
channel the least-squares quadratic in x and y: a side light, a shadow under the jaw are not
uneven), which burnt highlights and patches of another hue raise, and the mean lightness by
which the skin falls more than :data:`SLACK` L* below a plane fitted to it (a side light still
is not uneven), which dark smudges and a darkened face edge raise (a quadratic field
half-absorbs a dark rim). The generator's cleanest faces read ~5-7, marbled, burnt or
smudged ones 10-16 (``docs/uneven_s20_d6.jpg``). Images are ``uint8`` RGB; landmarks
``(478, 2|3)`` MediaPipe points in crop pixels.
"""

from __future__ import annotations

import cv2
import numpy as np

from .composite import face_width, oval_distance
from .retarget import BROWS, EYELIDS, IRISES, LIPS

EDGE = 0.02          # the skin read starts this many face widths inside the oval (hair biting in counts)
FEATURE_GROW = 0.05  # eye / brow / lip hulls grown by this many face widths (their own darkness is not a blotch)
SCALE = 0.03         # Gaussian sigma of the colour smoothing, in face widths (blotches, not pores)
SLACK = 6.0          # L* below the skin's light plane that still counts as shading


def skin_region(landmarks: np.ndarray, size: int, dist: np.ndarray | None = None) -> np.ndarray:
    """``(size, size) bool``: the face oval's skin, at least :data:`EDGE` face widths inside
    its edge, less the eyes with their brows (each side's hull) and the lips, grown by
    :data:`FEATURE_GROW` face widths. ``dist``: :func:`oval_distance` when the caller has it."""
    pts = np.asarray(landmarks, np.float32)[:, :2]
    if dist is None:
        dist = oval_distance(pts, size)
    features = np.zeros((size, size), np.uint8)
    eyes = np.array(EYELIDS + BROWS + IRISES)
    left = pts[eyes, 0] < np.median(pts[:, 0])
    for group in (pts[eyes[left]], pts[eyes[~left]], pts[list(LIPS)]):
        if len(group) >= 3:
            cv2.fillConvexPoly(features, cv2.convexHull(np.round(group).astype(np.int32)), 1)
    k = max(1, int(round(FEATURE_GROW * face_width(pts))))
    features = cv2.dilate(features, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * k + 1, 2 * k + 1)))
    return (dist < -EDGE) & (features == 0)


def uneven_skin(image: np.ndarray, landmarks: np.ndarray, dist: np.ndarray | None = None) -> float:
    """How uneven the smoothed skin of a face crop is (0: lit evenly or by a gradient): the mean
    CIELAB ΔE from a smooth light field (per channel the least-squares quadratic in x, y over the
    skin: patches darker, lighter or of another hue) plus the mean L* by which it falls more than
    :data:`SLACK` below a plane fitted to it (dark smudges, a darkened edge). ``image``: ``(S, S, 3)
    uint8`` RGB; ``landmarks``: its face's ``(478, 2|3)`` points in crop pixels; ``dist``: their
    :func:`oval_distance` when the caller has it. NaN when the crop shows too little skin to tell."""
    size = image.shape[0]
    pts = np.asarray(landmarks, np.float32)[:, :2]
    region = skin_region(pts, size, dist)
    if region.sum() < 64:
        return float("nan")
    lab = cv2.cvtColor(image, cv2.COLOR_RGB2Lab).astype(np.float32)   # 8 bit: L * 255 / 100, a + 128, b + 128
    lab[..., 0] *= np.float32(100 / 255)
    lab = cv2.GaussianBlur(lab, (0, 0), SCALE * face_width(pts))
    ys, xs = np.nonzero(region)
    x, y = (xs - xs.mean()) / size, (ys - ys.mean()) / size
    basis = np.stack([np.ones_like(x), x, y, x * x, y * y, x * y], axis=1)
    values = lab[ys, xs].astype(np.float64)                           # (N, 3); a and b offsets cancel in the fit
    coef, *_ = np.linalg.lstsq(basis, values, rcond=None)
    resid = values - basis @ coef
    plane, *_ = np.linalg.lstsq(basis[:, :3], values[:, 0], rcond=None)   # a side light: L* on a plane
    dark = np.clip(basis[:, :3] @ plane - values[:, 0] - SLACK, 0.0, None)
    return float(np.sqrt((resid * resid).sum(axis=1)).mean() + dark.mean())
