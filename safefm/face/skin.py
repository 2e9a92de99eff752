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
smudged ones 10-16 (``docs/uneven_s20_d6.jpg``).

:func:`even_out` is the paste's answer to what the choice cannot avoid: on a small copy it
fits the same kind of light field robustly (patches do not pull it), caps the smoothed skin's
colour difference from it at ``limit`` ΔE (a dark blotch or a burnt patch fades to a shade of
the face's own light; the eyes, brows, lips and nose are left alone) and, given the real face,
swaps the generated face's lightness field for the real one's (light direction and brightness
as the camera sees them) and shifts its colour to the real skin's mean (white balance): 8
numbers, no texture. It also caps the shading round the eyes and beside the nose at real
faces' usual depth (a constant: some identities come out with sockets like dark goggles).
Images are ``uint8`` RGB; landmarks ``(478, 2|3)`` MediaPipe points in crop pixels.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import cv2
import numpy as np

from .composite import face_width, oval_distance, sides as _sides, smooth_fill, smoothstep, to_uint8
from .outline import NOSE
from .retarget import BROWS, EYELIDS, IRISES, LIPS

EDGE = 0.02          # the skin read starts this many face widths inside the oval (hair biting in counts)
FEATURE_GROW = 0.05  # eye / brow / lip hulls grown by this many face widths (their own darkness is not a blotch)
SCALE = 0.03         # Gaussian sigma of the colour smoothing, in face widths (blotches, not pores)
SLACK = 6.0          # L* below the skin's light plane that still counts as shading
LIGHT_SIZE = 64      # even_out fits and corrects on a copy this many pixels wide (the correction is smooth)
ROBUST = 10.0        # ΔE from the light field beyond which a pixel no longer pulls the fit (Tukey's biweight)
SHADE_GROW = 0.03    # the shading zones round the eyes and beside the nose: hulls grown this many face widths ...
SHADE_KEEP = 0.015   # ... less the eye openings, irises and brows grown this many (their own darkness stays)
SHADE_DEPTH = (19.0, 19.0, 15.0)   # L* (mean, unsmoothed) the shading round the left and right eye and beside
                     # the nose may reach: three in four real faces' are no deeper (240 UTKFace training photos
                     # aligned like the generator's crops: median 14 / 14 / 10, 75th percentile 19 / 20 / 15)
SHADE_FLOOR = 0.35   # even_out keeps at least this share of the generated shading in those zones
RIM = 0.03           # even_out's correction is its own from this many face widths inside the oval inward;
                     # outward it is carried on smoothly (the rim and the painted surroundings move with the face)


def _hull(points: np.ndarray, size: int, grow: int) -> np.ndarray:
    """``(size, size) uint8``: 1 on the convex hull of ``points`` ``(n, 2)`` grown by ``grow`` px."""
    hull = np.zeros((size, size), np.uint8)
    if len(points) >= 3:
        cv2.fillConvexPoly(hull, cv2.convexHull(np.round(points).astype(np.int32)), 1)
    if grow > 0:
        hull = cv2.dilate(hull, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * grow + 1, 2 * grow + 1)))
    return hull


def _features(pts: np.ndarray, size: int, grow: float, nose: bool = False) -> np.ndarray:
    """``(size, size) uint8``: 1 on the eyes with their brows (each side's hull), the lips and,
    with ``nose``, the nose, grown by ``grow`` face widths."""
    k = max(1, int(round(grow * face_width(pts))))
    groups = [*_sides(pts, EYELIDS + BROWS + IRISES), LIPS] + ([NOSE] if nose else [])
    return np.maximum.reduce([_hull(pts[list(group)], size, k) for group in groups])


def _shade_zones(pts: np.ndarray, size: int) -> list[np.ndarray]:
    """``(size, size) bool`` each: the skin round the left eye and round the right eye (the
    eye's and brow's hull grown :data:`SHADE_GROW` face widths, less the eye opening, the iris
    and the brow themselves grown :data:`SHADE_KEEP`), and beside the nose (its hull grown
    :data:`SHADE_GROW`, less those): where the light falls into the sockets and beside the nose."""
    width = face_width(pts)
    grow, keep = max(1, int(round(SHADE_GROW * width))), max(1, int(round(SHADE_KEEP * width)))
    kept = np.maximum.reduce([_hull(pts[group], size, keep)
                              for group in (*_sides(pts, BROWS), *_sides(pts, EYELIDS + IRISES))])
    eyes = [_hull(pts[group], size, grow) for group in _sides(pts, EYELIDS + BROWS + IRISES)]
    nose = (_hull(pts[list(NOSE)], size, grow) > 0) & (np.maximum(*eyes) == 0)
    return [(zone > 0) & (kept == 0) for zone in (*eyes, nose)]


def _quadratic(xs: np.ndarray, ys: np.ndarray, size: int) -> np.ndarray:
    """``(N, 6)`` the quadratic basis 1, x, y, x², y², xy at pixels (xs, ys) of a ``size`` px
    crop, in crop widths from its centre (the first three: a plane)."""
    x, y = (np.asarray(xs, np.float64) - size / 2) / size, (np.asarray(ys, np.float64) - size / 2) / size
    return np.stack([np.ones_like(x), x, y, x * x, y * y, x * y], axis=1)


def skin_region(landmarks: np.ndarray, size: int, dist: np.ndarray | None = None) -> np.ndarray:
    """``(size, size) bool``: the face oval's skin, at least :data:`EDGE` face widths inside
    its edge, less the eyes with their brows (each side's hull) and the lips, grown by
    :data:`FEATURE_GROW` face widths. ``dist``: :func:`oval_distance` when the caller has it."""
    pts = np.asarray(landmarks, np.float32)[:, :2]
    if dist is None:
        dist = oval_distance(pts, size)
    return (dist < -EDGE) & (_features(pts, size, FEATURE_GROW) == 0)


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
    basis = _quadratic(xs, ys, size)
    values = lab[ys, xs].astype(np.float64)                           # (N, 3); a and b offsets cancel in the fit
    coef, *_ = np.linalg.lstsq(basis, values, rcond=None)
    resid = values - basis @ coef
    plane, *_ = np.linalg.lstsq(basis[:, :3], values[:, 0], rcond=None)   # a side light: L* on a plane
    dark = np.clip(basis[:, :3] @ plane - values[:, 0] - SLACK, 0.0, None)
    return float(np.sqrt((resid * resid).sum(axis=1)).mean() + dark.mean())


class _Light(NamedTuple):
    """A face crop's light, all on a :data:`LIGHT_SIZE` (n) px copy."""
    small: np.ndarray    # (n, n, 3) float32 RGB in [0, 1]
    lab: np.ndarray      # (n, n, 3) its CIELAB (L 0-100)
    smooth: np.ndarray   # (n, n, 3) that smoothed at SCALE face widths
    field: np.ndarray    # (n, n, 3) the light field fitted to the smoothed skin
    dist: np.ndarray     # (n, n) oval distance (face widths)
    points: np.ndarray   # (478, 2) the landmarks in copy pixels
    width: float         # the face width in copy pixels
    skin: tuple          # (rows, columns) of the skin the field was fitted to


def _light(image: np.ndarray, landmarks: np.ndarray) -> _Light | None:
    """A face crop's light (:class:`_Light`): its light field is per CIELAB channel the
    quadratic fitted to the smoothed skin (:func:`skin_region`, the nose left out too) by
    iteratively reweighted least squares, Tukey's biweight at :data:`ROBUST` ΔE, so patches do
    not pull it. None when the crop shows too little skin."""
    n = LIGHT_SIZE
    pts = np.asarray(landmarks, np.float32)[:, :2] * np.float32(n / image.shape[0])
    small = cv2.resize(image, (n, n), interpolation=cv2.INTER_AREA).astype(np.float32) * np.float32(1 / 255)
    lab = cv2.cvtColor(small, cv2.COLOR_RGB2Lab)                      # float: L 0-100, a and b signed
    width = face_width(pts)
    smooth = cv2.GaussianBlur(lab, (0, 0), SCALE * width)
    dist = oval_distance(pts, n)
    ys, xs = np.nonzero((dist < -EDGE) & (_features(pts, n, FEATURE_GROW, nose=True) == 0))
    if len(xs) < 32:
        return None
    coef = robust_quadratic(_quadratic(xs, ys, n), smooth[ys, xs].astype(np.float64))
    if coef is None:
        return None
    field = (_grid_basis(n) @ coef).reshape(n, n, 3).astype(np.float32)
    return _Light(small, lab, smooth, field, dist, pts, width, (ys, xs))


def robust_quadratic(basis: np.ndarray, values: np.ndarray, rounds: int = 3) -> np.ndarray | None:
    """``(6, C)`` coefficients of the quadratic (``basis`` ``(N, 6)``, :func:`_quadratic`) fitted
    to ``values`` ``(N, C)`` by iteratively reweighted least squares (Tukey's biweight at
    :data:`ROBUST`; each round solves the 6 x 6 normal equations), so patches do not pull it.
    None when the points cannot fix a quadratic (all on one conic: a strip, a line)."""
    weight = np.ones(len(basis))
    try:
        for _ in range(rounds):
            wb = basis * weight[:, None]
            coef = np.linalg.solve(wb.T @ basis, wb.T @ values)
            resid = np.linalg.norm(values - basis @ coef, axis=1)
            weight = np.clip(1.0 - (resid / ROBUST) ** 2, 0.0, None) ** 2 + 1e-3
    except np.linalg.LinAlgError:
        return None
    return coef


@functools.lru_cache(maxsize=4)
def _grid_basis(n: int) -> np.ndarray:
    """``(n * n, 6)`` :func:`_quadratic` at every pixel of an ``n`` px crop, row by row (a constant)."""
    gy, gx = np.mgrid[0:n, 0:n]
    basis = _quadratic(gx.ravel(), gy.ravel(), n)
    basis.flags.writeable = False
    return basis


def _cap_shading(image: np.ndarray, landmarks: np.ndarray, own: _Light) -> np.ndarray:
    """``(S, S) float32`` L* to add to the generated ``image`` so the shading round each eye and
    beside the nose (:func:`_shade_zones`) is no deeper than real faces' usually is there
    (:data:`SHADE_DEPTH`): the (smoothed) shade below the light field is scaled by the cap over
    the zone's mean depth (read unsmoothed, so the dark features next to it do not bleed in; at
    least :data:`SHADE_FLOOR`; never deepened). Some identities come out with sockets like dark
    goggles. The cap is a constant, not the person's own depth: how deep someone's eyes are set
    is theirs (read from the real face it took clips' outputs 0.05 closer to the person under
    dlib's recogniser, docs/results.md, session 22)."""
    size = image.shape[0]
    pts = np.asarray(landmarks, np.float32)[:, :2]
    width = face_width(pts)
    # at full size: the small copy would blur the few-pixel sockets into the features
    light_l = cv2.cvtColor(image.astype(np.float32) * np.float32(1 / 255), cv2.COLOR_RGB2Lab)[..., 0]
    field = cv2.resize(np.ascontiguousarray(own.field[..., 0]), (size, size), interpolation=cv2.INTER_LINEAR)
    depth = np.minimum(light_l - field, 0.0)                                     # read unsmoothed
    shade = np.minimum(cv2.GaussianBlur(light_l, (0, 0), SCALE * width) - field, 0.0)   # corrected smoothed
    out = np.zeros((size, size), np.float32)
    for zone, cap in zip(_shade_zones(pts, size), SHADE_DEPTH):
        if zone.sum() < 16:
            continue
        gain = np.clip(cap / max(-float(depth[zone].mean()), 1e-3), SHADE_FLOOR, 1.0)
        out += (gain - 1.0) * shade * cv2.GaussianBlur(zone.astype(np.float32), (0, 0), SHADE_GROW * width)
    return out


def even_out(image: np.ndarray, landmarks: np.ndarray, limit: float, reference: np.ndarray | None = None,
             ref_landmarks: np.ndarray | None = None) -> np.ndarray:
    """A generated face crop with its skin evened out and, given the real face, lit by the real
    light field. ``image``: ``(S, S, 3) uint8`` RGB; ``landmarks``: its face's ``(478, 2|3)``
    points in crop pixels; ``limit``: ΔE (CIELAB) the smoothed skin may stray from the face's
    own light field (:func:`_light`) before it is pulled back to that distance (0: not pulled;
    the eyes, brows, lips and nose, grown by 0.03 face widths, never are); ``reference``,
    ``ref_landmarks``: the real face on the same crop grid and its points, whose lightness field
    then replaces the generated one's, and whose mean skin colour (a*, b*) the generated skin's
    is shifted to. With ``limit`` > 0 the shading round the eyes and beside the nose is also
    capped at real faces' usual depth (:func:`_cap_shading`). The correction is computed on a
    :data:`LIGHT_SIZE` px copy, carried smoothly beyond the oval (:func:`safefm.face.composite.smooth_fill`: the face's
    rim and its surroundings move with it, no new edge) and added at full size, so texture and
    features stay the generator's. Returns a new ``(S, S, 3) uint8``; a copy of ``image`` when it
    (or, for the light, the reference) shows too little skin. ~2 ms at 128 px."""
    own = None if limit <= 0 and reference is None else _light(image, landmarks)
    if own is None:
        return image.copy()
    correction, shading = np.zeros_like(own.lab), None
    if limit > 0:
        excess = own.smooth - own.field
        far = np.sqrt((excess * excess).sum(axis=2, keepdims=True)) + np.float32(1e-6)
        correction = excess * (np.minimum(1.0, limit / far) - 1.0)
        features = cv2.GaussianBlur(_features(own.points, LIGHT_SIZE, 0.03, nose=True).astype(np.float32),
                                    (0, 0), 0.02 * own.width)
        correction *= (1.0 - np.clip(2.0 * features, 0.0, 1.0))[..., None]
        shading = _cap_shading(image, landmarks, own)
    if reference is not None:
        real = _light(reference, ref_landmarks)
        if real is not None:   # the real light's shape in L*; its colour as one shift (a colour gradient
            # across a real face is mostly green-screen spill, hair or background at the oval's edge)
            shift = real.field - own.field
            shift[..., 1:] = (real.field[real.skin].mean(axis=0) - own.field[own.skin].mean(axis=0))[1:]
            correction += shift
    known = smoothstep(-own.dist / RIM).astype(np.float32)
    correction = smooth_fill(np.ascontiguousarray(correction * known[..., None]), known)
    correction = cv2.GaussianBlur(correction, (0, 0), SCALE * own.width)
    delta = cv2.cvtColor(own.lab + correction, cv2.COLOR_Lab2RGB) - own.small
    size = image.shape[0]
    delta = cv2.resize(delta, (size, size), interpolation=cv2.INTER_LINEAR) * np.float32(255)
    out = image.astype(np.float32) + delta
    if shading is not None:   # worked out at full size: the sockets are a few pixels wide
        lab = cv2.cvtColor(np.clip(out, 0, 255) * np.float32(1 / 255), cv2.COLOR_RGB2Lab)
        lab[..., 0] += shading
        out = cv2.cvtColor(lab, cv2.COLOR_Lab2RGB) * np.float32(255)
    return to_uint8(out)
