"""Similarity alignment of a face into the canonical crop (pure functions).

The canonical crop is a ``size`` x ``size`` image in which the template face
(:func:`load_template`, unit crop coordinates) scaled by ``size`` sits upright: face oval
over the central ~72 % of the width, eyes at ~40 % of the height, forehead and chin inside.

:func:`align_matrix` fits the template to the landmarks in 3D (Umeyama, over the stable
:data:`ALIGN_INDICES`) and keeps the fit's scale, in-plane rotation (roll) and position.
Because the scale comes from the 3D fit, turning the head (yaw/pitch) barely changes the
crop's zoom, and because only rigid points are used, talking and blinking barely move it.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

TEMPLATE_PATH = Path(__file__).resolve().parent / "assets" / "template.npy"

# Stable FaceMesh indices (rigid under expression): eye corners, nose bridge/tip/base,
# forehead and the upper/middle face oval down to the cheekbones. Mouth corners, lips,
# jaw and chin are deliberately left out: they move when the user talks or smiles.
ALIGN_INDICES: tuple[int, ...] = (
    33, 133, 362, 263,                  # eye corners (outer/inner, right then left eye)
    168, 6, 197, 195, 5, 4, 1,          # nose bridge down to the tip
    98, 327, 2,                         # nose base (alae, subnasale)
    10, 151, 9,                         # forehead midline
    109, 338, 67, 297, 103, 332,        # upper face oval (forehead sides)
    54, 284, 21, 251, 162, 389,         # face oval (temples)
    127, 356, 234, 454, 93, 323,        # face oval (ear level to cheekbone)
    116, 345, 117, 346,                 # cheekbones
)


@lru_cache(maxsize=1)
def _template_cached() -> np.ndarray:
    if not TEMPLATE_PATH.exists():
        raise FileNotFoundError(f"face template missing: {TEMPLATE_PATH} (run scripts/make_template.py)")
    t = np.load(TEMPLATE_PATH).astype(np.float32)
    if t.shape != (478, 3):
        raise ValueError(f"face template {TEMPLATE_PATH} has shape {t.shape}, expected (478, 3)")
    t.setflags(write=False)
    return t


def load_template() -> np.ndarray:
    """Mean face shape, (478, 3) float32 in unit crop coordinates (x right, y down in [0, 1]
    over the crop, z in the same unit, mean z 0, smaller z = nearer). Returns a copy."""
    return _template_cached().copy()


def umeyama(src: np.ndarray, dst: np.ndarray, with_scale: bool = True
            ) -> tuple[float, np.ndarray, np.ndarray]:
    """Least-squares similarity ``dst ~ s * R @ src + t`` (Umeyama 1991).

    src, dst: (N, D) with D = 2 or 3, N >= D. Returns (s, R (D, D) proper rotation, t (D,)),
    float64; s = 1 when ``with_scale`` is False.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] not in (2, 3):
        raise ValueError(f"umeyama needs two (N, 2) or (N, 3) arrays of one shape, "
                         f"got {src.shape} and {dst.shape}")
    n, d = src.shape
    mu_s, mu_d = src.mean(axis=0), dst.mean(axis=0)
    xs, xd = src - mu_s, dst - mu_d
    cov = xd.T @ xs / n
    u, sig, vt = np.linalg.svd(cov)
    fix = np.ones(d)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        fix[-1] = -1.0
    r = (u * fix) @ vt
    var_s = (xs ** 2).sum() / n
    s = float((sig * fix).sum() / var_s) if with_scale and var_s > 0 else 1.0
    t = mu_d - s * r @ mu_s
    return s, r, t


def check_landmarks(pts: np.ndarray) -> np.ndarray:
    """``pts`` unchanged if finite and spread out; else a one-line ValueError."""
    if not np.all(np.isfinite(pts)):
        raise ValueError("landmarks contain NaN or infinite values")
    if float(np.ptp(pts[:, 0])) + float(np.ptp(pts[:, 1])) < 1e-6:
        raise ValueError("landmarks are degenerate (all points coincide)")
    return pts


def align_matrix(landmarks: np.ndarray, size: int) -> np.ndarray:
    """(2, 3) float64 affine mapping frame pixels -> pixels of the ``size`` x ``size`` crop.

    landmarks: (478, 3) frame-pixel landmarks. The matrix is a similarity (scale, roll,
    shift): the template's 3D fit to the landmarks gives the scale and the in-plane part of
    the rotation; the fitted template centre lands on the crop centre's template point.
    """
    pts = np.asarray(landmarks, dtype=np.float64)
    if pts.shape != (478, 3):
        raise ValueError(f"align_matrix needs (478, 3) landmarks, got {pts.shape}")
    tmpl = _template_cached().astype(np.float64) * size
    idx = list(ALIGN_INDICES)
    s, r, t = umeyama(tmpl[idx], check_landmarks(pts[idx]))
    # Closest 2D rotation to the image-plane block of R: the head's roll.
    a = 0.5 * (r[0, 0] + r[1, 1])
    b = 0.5 * (r[1, 0] - r[0, 1])
    roll = np.arctan2(b, a)
    c, sn = np.cos(roll), np.sin(roll)
    anchor = tmpl[idx].mean(axis=0)                  # template point (crop pixels, 3D)
    anchor_frame = s * r @ anchor + t                # where the fit puts it in the frame
    lin = np.array([[c, sn], [-sn, c]]) / s          # frame -> crop: undo roll and scale
    shift = anchor[:2] - lin @ anchor_frame[:2]
    return np.hstack([lin, shift[:, None]])


def invert_affine(m: np.ndarray) -> np.ndarray:
    """Inverse of a (2, 3) affine matrix, (2, 3) float64."""
    m = np.asarray(m, dtype=np.float64)
    return cv2.invertAffineTransform(m)


def affine_scale(m: np.ndarray) -> float:
    """Isotropic scale of a (2, 3) affine (sqrt of |det| of its linear part)."""
    m = np.asarray(m, dtype=np.float64)
    return float(np.sqrt(abs(np.linalg.det(m[:, :2]))))


def resized_crop_affine(m_inv: np.ndarray, size: int, new_size: int) -> np.ndarray:
    """The crop -> frame affine ``m_inv`` (2, 3) of a ``size`` px crop, for the same crop
    resampled to ``new_size`` px (pixel centres kept: ``p_old = (p_new + 0.5) * size / new_size - 0.5``)."""
    f = size / new_size
    scale = np.array([[f, 0.0, 0.5 * f - 0.5], [0.0, f, 0.5 * f - 0.5], [0.0, 0.0, 1.0]])
    return np.asarray(m_inv, np.float64) @ scale


def transform_points(pts: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Apply a (2, 3) affine to (N, 2) or (N, 3) points; z (if any) is multiplied by the
    affine's scale so it stays in the pixel units of the new image. Returns float32, same shape."""
    pts = np.asarray(pts)
    m = np.asarray(m, dtype=np.float64)
    out = np.empty(pts.shape, dtype=np.float32)
    out[:, :2] = pts[:, :2].astype(np.float64) @ m[:, :2].T + m[:, 2]
    if pts.shape[1] > 2:
        out[:, 2:] = pts[:, 2:] * affine_scale(m)
    return out


def crop_face(image: np.ndarray, m: np.ndarray, size: int) -> np.ndarray:
    """(size, size, C) crop of an (H, W, C) image through the frame->crop affine ``m``
    (bilinear; outside the frame the border is replicated)."""
    return cv2.warpAffine(image, np.asarray(m, dtype=np.float64), (size, size),
                          flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
