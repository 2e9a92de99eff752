"""How clean a generated face's skin is: the dark blotches the generator sometimes paints.

Some identities come out of the generator with marbled dark patches on the cheeks and jaw, a
hard side shadow, or hair strands biting into the face edge. The colour match and the paste
keep them (they are the face's own shading), so on a call they read as dirt or bruises. The
per-person identity choice (:mod:`safefm.identity_assign`) prefers candidates whose skin is
cleaner than the others' in the same frame.

:func:`dark_blotches` reads the crop's CIELAB lightness over the skin of the face oval, without
the eyes, brows and lips (hulls grown by :data:`FEATURE_GROW` face widths), smoothed at
:data:`SCALE` face widths so pores, grain and the generator's fine texture do not count, and
returns the mean lightness below the skin's median by more than :data:`SLACK` L* (a face lit
evenly reads ~0.5, a blotched one 2-5). Images are ``uint8`` RGB; landmarks ``(478, 2|3)``
MediaPipe points in crop pixels.
"""

from __future__ import annotations

import cv2
import numpy as np

from .composite import face_width, oval_distance
from .retarget import BROWS, EYELIDS, IRISES, LIPS

EDGE = 0.02          # the skin read starts this many face widths inside the oval (hair biting in counts)
FEATURE_GROW = 0.05  # eye / brow / lip hulls grown by this many face widths (their own darkness is not a blotch)
SCALE = 0.03         # Gaussian sigma of the lightness smoothing, in face widths (blotches, not pores)
SLACK = 6.0          # L* below the skin's median that still counts as shading


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


def dark_blotches(image: np.ndarray, landmarks: np.ndarray, dist: np.ndarray | None = None) -> float:
    """Mean L* (0-100) by which the smoothed skin of a face crop falls more than :data:`SLACK`
    below its median (0: even skin; larger: darker patches, or more of them). ``image``:
    ``(S, S, 3) uint8`` RGB; ``landmarks``: its face's ``(478, 2|3)`` points in crop pixels.
    NaN when the crop shows too little skin to tell."""
    size = image.shape[0]
    region = skin_region(landmarks, size, dist)
    if region.sum() < 64:
        return float("nan")
    L = cv2.cvtColor(image, cv2.COLOR_RGB2Lab)[..., 0].astype(np.float32) * np.float32(100 / 255)
    L = cv2.GaussianBlur(L, (0, 0), SCALE * face_width(np.asarray(landmarks, np.float32)[:, :2]))
    skin = L[region]
    return float(np.clip(np.median(skin) - skin - SLACK, 0.0, None).mean())
