"""Does the output face look like it was filmed by the same camera? (issue 14's measures)

Every measure compares an output frame with its input frame over regions fixed by the input's
(source) face box, at the frame's own resolution:

- the **inner face**: the ellipse centred in the source face box with semi-axes ``INNER`` x
  the box's half sides (eyes, nose, mouth and cheeks; no hair, no background);
- the **ring**: the band between ``RING[0]`` and ``RING[1]`` x the box's half sides (an ellipse
  scaled up), i.e. just outside the face: hair, ears, neck, background, and on the output the
  seam where the synthetic face meets the real frame. Pixels outside the frame are left out.

Measures (pure functions of ``(H, W, 3) uint8`` RGB images and ``(N, 2|3)`` source landmarks):

- :func:`sharpness`: ``var(Laplacian(Gaussian_1px(grey)))`` over the inner face, output / input,
  both cut at the source face box. Grain that a 1 px Gaussian smooths away does not count as
  detail. 1 = as sharp as the input; over faces aggregate with the geometric mean.
- :func:`tone_gap`: ``| dE(mean Lab of inner face, mean Lab of ring)_out - the same_in |``
  (CIE76 dE, CIELAB from OpenCV's float conversion: L in [0, 100]). 0 = the face sits in its
  surroundings as the real one did; a viewer notices 2-3.
- :func:`chroma_excess`: ``max(0, mean C*_out - mean C*_in)`` over the face ellipse inscribed
  in the box (``C* = sqrt(a*^2 + b*^2)``): the colour the output adds. A grey-scale input must
  stay at ~0.
- :func:`edge_dark`: ``max(0, share_out - share_in)`` of the face's outer band (the face
  ellipse outside the inner face: forehead, temples, cheek edges, jaw) whose lightness lies more
  than :data:`DARK_DROP` L* below the inner face's median: the hair-like smudges and dark
  seams a generator paints into the face edge, over what the input has there (its own hair,
  shadows). 0 = no more dark structure at the face edge than the real face.

Grey-scale pictures are told apart by :func:`is_grey` and made by :func:`to_grey`, so that
``chroma_excess`` can be reported on them separately.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import cv2
import numpy as np

from ..face.composite import laplacian_energy
from ..face.landmarks import face_box

INNER = 0.7          # inner-face ellipse, as a fraction of the box's half sides
RING = (1.1, 1.5)    # ring just outside the face, same units
SHARPNESS_SIGMA = 1.0
MEASURES = ("sharpness", "tone_gap", "chroma_excess", "edge_dark")
DARK_DROP = 15.0     # L* (0-100) below the inner face's median lightness that counts as dark (hair, not shading)
GREY_CHROMA = 1.5    # mean CIELAB chroma under which a whole picture counts as grey-scale


def _check_pair(inp: np.ndarray, out: np.ndarray) -> None:
    for name, img in (("input", inp), ("output", out)):
        if not (isinstance(img, np.ndarray) and img.ndim == 3 and img.shape[2] == 3
                and img.dtype == np.uint8):
            raise ValueError(f"{name} must be an (H, W, 3) uint8 RGB image, got "
                             f"{getattr(img, 'shape', type(img))} {getattr(img, 'dtype', '')}")
    if inp.shape != out.shape:
        raise ValueError(f"input {inp.shape} and output {out.shape} differ in size")


def _clipped_box(landmarks: np.ndarray, shape) -> tuple[int, int, int, int]:
    """The source face box ``(x0, y0, x1, y1)`` clipped to the frame; ValueError if empty."""
    x0, y0, x1, y1 = face_box(landmarks, shape)
    if x1 - x0 < 4 or y1 - y0 < 4:
        raise ValueError("the face box lies (almost) outside the frame")
    return x0, y0, x1, y1


def ellipse_radius(landmarks: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """Normalised elliptic radius of every pixel of ``box`` (frame coordinates ``(x0, y0, x1,
    y1)``, exclusive ends) about the source face box of ``landmarks`` ``(N, 2|3)``: 1 on the
    ellipse inscribed in that face box. Returns ``(y1 - y0, x1 - x0) float32``."""
    fx0, fy0, fx1, fy1 = face_box(landmarks)
    cx, cy = (fx0 + fx1 - 1) / 2.0, (fy0 + fy1 - 1) / 2.0
    a, b = max((fx1 - fx0 - 1) / 2.0, 1.0), max((fy1 - fy0 - 1) / 2.0, 1.0)
    x0, y0, x1, y1 = box
    xs = ((np.arange(x0, x1, dtype=np.float32) - cx) / a)[None, :]
    ys = ((np.arange(y0, y1, dtype=np.float32) - cy) / b)[:, None]
    return np.sqrt(xs * xs + ys * ys)


def _lab_radius(img: np.ndarray, landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CIELAB ``(h, w, 3) float32`` of ``img`` over the box around the ring's outer ellipse
    (clipped to the frame; it holds the inner face, the face and the ring) and the elliptic
    radius ``(h, w)`` of its pixels (:func:`ellipse_radius`); both empty off the frame."""
    fx0, fy0, fx1, fy1 = face_box(landmarks)
    cx, cy = (fx0 + fx1) / 2.0, (fy0 + fy1) / 2.0
    hx, hy = RING[1] * (fx1 - fx0) / 2.0 + 1, RING[1] * (fy1 - fy0) / 2.0 + 1
    H, W = img.shape[:2]
    x0, y0 = max(int(math.floor(cx - hx)), 0), max(int(math.floor(cy - hy)), 0)
    x1, y1 = min(int(math.ceil(cx + hx)) + 1, W), min(int(math.ceil(cy + hy)) + 1, H)
    if x0 >= x1 or y0 >= y1:
        return np.zeros((0, 0, 3), np.float32), np.zeros((0, 0), np.float32)
    lab = cv2.cvtColor(img[y0:y1, x0:x1].astype(np.float32) * (1 / 255), cv2.COLOR_RGB2Lab)
    return lab, ellipse_radius(landmarks, (x0, y0, x1, y1))


def _chroma(lab: np.ndarray) -> np.ndarray:
    """CIELAB chroma ``sqrt(a*^2 + b*^2)`` ``(h, w) float32`` of ``(h, w, 3) float32`` Lab."""
    return cv2.magnitude(np.ascontiguousarray(lab[..., 1]), np.ascontiguousarray(lab[..., 2]))


def _masked_mean(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``(C,) float64`` mean of ``x`` ``(h, w[, C]) float32`` (C <= 3) over ``mask`` ``(h, w) bool``."""
    return np.array(cv2.mean(x, mask.astype(np.uint8))[:1 if x.ndim == 2 else x.shape[2]])


def _ring_delta_e(lab: np.ndarray, r: np.ndarray) -> float:
    """:func:`face_ring_delta_e` from :func:`_lab_radius`'s ``(lab, r)``."""
    inner, ring = r <= INNER, (r >= RING[0]) & (r <= RING[1])
    if inner.sum() < 16 or ring.sum() < 16:
        raise ValueError("the inner face or the ring around it has fewer than 16 pixels in the frame")
    return float(np.linalg.norm(_masked_mean(lab, inner) - _masked_mean(lab, ring)))


def _face_chroma(lab: np.ndarray, r: np.ndarray) -> float:
    """:func:`mean_chroma` from :func:`_lab_radius`'s ``(lab, r)``."""
    face = r <= 1.0
    if face.sum() < 16:
        raise ValueError("the face has fewer than 16 pixels in the frame")
    return float(_masked_mean(_chroma(lab), face)[0])


def _edge_dark_share(lab: np.ndarray, r: np.ndarray) -> float:
    """Share of the face's outer band (``INNER < r <= 1``) darker than the inner face's median
    L* minus :data:`DARK_DROP`, from :func:`_lab_radius`'s ``(lab, r)``."""
    inner, band = r <= INNER, (r > INNER) & (r <= 1.0)
    if inner.sum() < 16 or band.sum() < 16:
        raise ValueError("the inner face or its outer band has fewer than 16 pixels in the frame")
    L = lab[..., 0]
    return float((L[band] < float(np.median(L[inner])) - DARK_DROP).mean())


def sharpness(inp: np.ndarray, out: np.ndarray, landmarks: np.ndarray) -> float:
    """Fine detail the output keeps in the inner face, relative to the input (1 = as sharp).

    ``inp``, ``out``: ``(H, W, 3) uint8`` RGB, same size; ``landmarks``: ``(N, 2|3)`` source
    face points in frame pixels. Both images are cut at the source face box (clipped to the
    frame), turned grey, and :func:`laplacian_energy` is taken over the inner-face ellipse.
    A flat input face gives 1.0 if the output is flat too, else ``inf``.
    """
    _check_pair(inp, out)
    x0, y0, x1, y1 = box = _clipped_box(landmarks, inp.shape)
    mask = ellipse_radius(landmarks, box) <= INNER
    if mask.sum() < 16:
        raise ValueError("the inner face has fewer than 16 pixels in the frame")
    e_in, e_out = (laplacian_energy(cv2.cvtColor(img[y0:y1, x0:x1], cv2.COLOR_RGB2GRAY), mask, SHARPNESS_SIGMA)
                   for img in (inp, out))
    if e_in <= 1e-9:
        return 1.0 if e_out <= 1e-9 else math.inf
    return e_out / e_in


def face_ring_delta_e(img: np.ndarray, landmarks: np.ndarray) -> float:
    """CIE76 dE between the mean Lab of the inner face and of the ring around it in ``img``
    ``(H, W, 3) uint8`` RGB, regions from ``landmarks`` ``(N, 2|3)``."""
    return _ring_delta_e(*_lab_radius(img, landmarks))


def tone_gap(inp: np.ndarray, out: np.ndarray, landmarks: np.ndarray) -> float:
    """``|face_ring_delta_e(out) - face_ring_delta_e(inp)|`` (CIE76 dE units, >= 0): how much
    more (or less) the output's face stands out from its surroundings than the real one did."""
    _check_pair(inp, out)
    return abs(face_ring_delta_e(out, landmarks) - face_ring_delta_e(inp, landmarks))


def mean_chroma(img: np.ndarray, landmarks: np.ndarray) -> float:
    """Mean CIELAB chroma ``sqrt(a*^2 + b*^2)`` of ``img`` ``(H, W, 3) uint8`` RGB over the face
    ellipse inscribed in the source face box of ``landmarks`` ``(N, 2|3)``."""
    return _face_chroma(*_lab_radius(img, landmarks))


def is_grey(img: np.ndarray) -> bool:
    """Whether ``img`` ``(H, W, 3) uint8`` RGB is a grey-scale picture: mean CIELAB chroma of the
    whole image below :data:`GREY_CHROMA` (LFW's black-and-white photos are under 0.5, its
    colour photos above 4)."""
    return cv2.mean(_chroma(cv2.cvtColor(img.astype(np.float32) * (1 / 255), cv2.COLOR_RGB2Lab)))[0] < GREY_CHROMA


def to_grey(img: np.ndarray) -> np.ndarray:
    """Grey-scale copy of ``img`` ``(H, W, 3) uint8`` RGB, still ``(H, W, 3) uint8`` RGB."""
    return cv2.cvtColor(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)


def chroma_excess(inp: np.ndarray, out: np.ndarray, landmarks: np.ndarray) -> float:
    """``max(0, mean_chroma(out) - mean_chroma(inp))``: colour the output adds to the face
    (CIELAB chroma units; ~0 for a grey-scale photo anonymized in grey)."""
    _check_pair(inp, out)
    return max(0.0, mean_chroma(out, landmarks) - mean_chroma(inp, landmarks))


def edge_dark(inp: np.ndarray, out: np.ndarray, landmarks: np.ndarray) -> float:
    """``max(0, share_out - share_in)``: the share of the face's outer band (inside the face
    ellipse of ``landmarks`` ``(N, 2|3)``, outside the inner face) that is dark (more than
    :data:`DARK_DROP` L* under the inner face's median) in the output and was not in the input:
    hair-like smudges and dark seams painted into the face edge. 0..1."""
    _check_pair(inp, out)
    return max(0.0, _edge_dark_share(*_lab_radius(out, landmarks)) - _edge_dark_share(*_lab_radius(inp, landmarks)))


def face_realism(inp: np.ndarray, out: np.ndarray, landmarks: np.ndarray) -> dict[str, float]:
    """All four measures for one face: ``{"sharpness", "tone_gap", "chroma_excess",
    "edge_dark"}`` (each image converted to Lab once)."""
    _check_pair(inp, out)
    lab_in, lab_out = _lab_radius(inp, landmarks), _lab_radius(out, landmarks)
    return {"sharpness": sharpness(inp, out, landmarks),
            "tone_gap": abs(_ring_delta_e(*lab_out) - _ring_delta_e(*lab_in)),
            "chroma_excess": max(0.0, _face_chroma(*lab_out) - _face_chroma(*lab_in)),
            "edge_dark": max(0.0, _edge_dark_share(*lab_out) - _edge_dark_share(*lab_in))}


def face_realism_or_none(inp: np.ndarray, out: np.ndarray,
                         landmarks: np.ndarray | None) -> dict[str, float] | None:
    """:func:`face_realism`, or None when there is no source face (``landmarks`` None) or it lies
    (almost) outside the frame."""
    if landmarks is None:
        return None
    _check_pair(inp, out)             # bad images stay an error
    try:
        return face_realism(inp, out, landmarks)
    except ValueError:                # the face lies (almost) outside the frame
        return None


def aggregate(rows: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Over faces: geometric mean of ``sharpness``, arithmetic means of ``tone_gap``,
    ``chroma_excess`` and ``edge_dark`` (NaN when rows saved before it was measured lack it),
    and ``faces`` (their number). Empty input gives NaNs and 0 faces."""
    rows = list(rows)
    if not rows:
        return {**dict.fromkeys(MEASURES, math.nan), "faces": 0}
    sharp = np.array([r["sharpness"] for r in rows], np.float64)
    dark = [r["edge_dark"] for r in rows if "edge_dark" in r]
    return {"sharpness": float(np.exp(np.log(np.maximum(sharp, 1e-12)).mean())),
            "tone_gap": float(np.mean([r["tone_gap"] for r in rows])),
            "chroma_excess": float(np.mean([r["chroma_excess"] for r in rows])),
            "edge_dark": float(np.mean(dark)) if len(dark) == len(rows) else math.nan,
            "faces": len(rows)}
