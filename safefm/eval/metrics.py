"""Evaluation metrics: pure functions over landmarks, images and face embeddings.

Conventions (shared with :mod:`safefm.face.landmarks` and :mod:`safefm.recognition`):

- Landmarks: (478, 3) float, x/y image pixels, z in the same pixel scale (smaller = nearer).
  "Right"/"left" eye or brow means the *subject's* (the right eye is on the image's left in
  an unmirrored frontal photo). A missing face is ``None``; its features are NaN.
- Images: (H, W, 3) uint8 RGB. Boxes: (x0, y0, x1, y1) int pixels, x1/y1 exclusive.
- Embeddings: (128,) dlib descriptors; stacks are (N, 128) with an all-NaN row for "no face".

Expression features (:data:`FEATURES`, one row per frame, see :func:`expression_features`):
distances are divided by the 3D inter-ocular distance (outer eye corners), so they do not
depend on the face's size in the image; angles are in degrees.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

from ..face.landmarks import clip_box

# FaceMesh indices used below (refine_landmarks=True numbering).
IDX = {
    "eye_outer_r": 33, "eye_inner_r": 133, "lid_up_r": 159, "lid_lo_r": 145, "iris_r": 468,
    "eye_outer_l": 263, "eye_inner_l": 362, "lid_up_l": 386, "lid_lo_l": 374, "iris_l": 473,
    "lip_up": 13, "lip_lo": 14, "nose_tip": 1,
}
BROW_R = (70, 63, 105, 66, 107)
BROW_L = (300, 293, 334, 296, 336)

FEATURES = ("mouth_open", "eye_open_r", "eye_open_l", "brow_raise",
            "yaw", "pitch", "roll", "gaze_x", "gaze_y")
"""Per-frame expression/pose features, in the column order of :func:`expression_features`."""


# ---------------------------------------------------------------------------------------
# Landmark features


def _p(lm: np.ndarray, name: str) -> np.ndarray:
    return np.asarray(lm[IDX[name]], dtype=np.float64)


def inter_ocular(lm: np.ndarray) -> float:
    """3D distance between the outer eye corners (33, 263) in pixels: the feature scale."""
    return float(np.linalg.norm(_p(lm, "eye_outer_r") - _p(lm, "eye_outer_l")))


def mouth_opening(lm: np.ndarray) -> float:
    """Inner-lip gap (13 to 14, 3D) / inter-ocular distance. ~0 closed, ~0.3+ wide open."""
    return float(np.linalg.norm(_p(lm, "lip_up") - _p(lm, "lip_lo"))) / inter_ocular(lm)


def eye_opening(lm: np.ndarray, side: str) -> float:
    """Lid gap / eye width (an eye aspect ratio) of the subject's ``side`` eye ('r' or 'l')."""
    gap = np.linalg.norm(_p(lm, f"lid_up_{side}") - _p(lm, f"lid_lo_{side}"))
    width = np.linalg.norm(_p(lm, f"eye_outer_{side}") - _p(lm, f"eye_inner_{side}"))
    return float(gap / max(width, 1e-9))


def brow_raise(lm: np.ndarray) -> float:
    """Mean 3D distance from each brow's centroid to that eye's upper lid / inter-ocular."""
    lm = np.asarray(lm, dtype=np.float64)
    d_r = np.linalg.norm(lm[list(BROW_R)].mean(axis=0) - lm[IDX["lid_up_r"]])
    d_l = np.linalg.norm(lm[list(BROW_L)].mean(axis=0) - lm[IDX["lid_up_l"]])
    return float((d_r + d_l) / 2.0) / inter_ocular(lm)


def head_rotation(lm: np.ndarray) -> np.ndarray:
    """(3, 3) rotation taking the frontal template (:func:`safefm.face.alignment.load_template`)
    to the landmarks: a 3D similarity fit over the rigid ``alignment.ALIGN_INDICES``.
    Camera frame: x right, y down, z away from the camera."""
    from ..face.alignment import ALIGN_INDICES, load_template, umeyama

    idx = list(ALIGN_INDICES)
    _, r, _ = umeyama(load_template()[idx], np.asarray(lm, dtype=np.float64)[idx])
    return r


def rotation_to_euler(r: np.ndarray) -> tuple[float, float, float]:
    """(yaw, pitch, roll) degrees of a rotation ``R = Ry(-yaw) @ Rx(-pitch) @ Rz(roll)``
    (camera frame x right, y down, z away), i.e. in image terms:

    - yaw > 0: the face turns so its nose points towards the image's right;
    - pitch > 0: the nose points up (chin up);
    - roll > 0: the face is rotated clockwise on screen.
    """
    r = np.asarray(r, dtype=np.float64)
    yaw = -math.atan2(r[0, 2], r[2, 2])
    pitch = math.atan2(r[1, 2], math.hypot(r[0, 2], r[2, 2]))
    roll = math.atan2(r[1, 0], r[1, 1])
    return math.degrees(yaw), math.degrees(pitch), math.degrees(roll)


def head_pose(lm: np.ndarray) -> tuple[float, float, float]:
    """(yaw, pitch, roll) in degrees relative to the frontal template; signs as in
    :func:`rotation_to_euler`. A frontal, upright face gives (0, 0, 0)."""
    return rotation_to_euler(head_rotation(lm))


def gaze(lm: np.ndarray) -> tuple[float, float]:
    """Iris direction (gaze_x, gaze_y), mean of both eyes, in image terms.

    Per eye: the iris centre's offset from the midpoint of the two eye corners, in the eye's
    own 2D frame (u along the corners, image left to right; v perpendicular, image down),
    divided by half the eye width. gaze_x > 0: looking towards the image's right;
    gaze_y > 0: looking down. About +-0.3 at the extremes.
    """
    lm = np.asarray(lm, dtype=np.float64)
    gx = gy = 0.0
    for side in ("r", "l"):
        a, b = lm[IDX[f"eye_outer_{side}"], :2], lm[IDX[f"eye_inner_{side}"], :2]
        if a[0] > b[0]:
            a, b = b, a
        half = np.linalg.norm(b - a) / 2.0
        u = (b - a) / max(2.0 * half, 1e-9)
        v = np.array([-u[1], u[0]])
        d = lm[IDX[f"iris_{side}"], :2] - (a + b) / 2.0
        gx += float(d @ u) / max(half, 1e-9)
        gy += float(d @ v) / max(half, 1e-9)
    return gx / 2.0, gy / 2.0


def expression_features(lm: np.ndarray | None) -> np.ndarray:
    """(len(FEATURES),) float64 features of one face; all NaN when ``lm`` is None."""
    if lm is None:
        return np.full(len(FEATURES), np.nan)
    lm = np.asarray(lm, dtype=np.float64)
    if lm.shape != (478, 3):
        raise ValueError(f"expression_features needs (478, 3) landmarks, got {lm.shape}")
    yaw, pitch, roll = head_pose(lm)
    gx, gy = gaze(lm)
    return np.array([mouth_opening(lm), eye_opening(lm, "r"), eye_opening(lm, "l"),
                     brow_raise(lm), yaw, pitch, roll, gx, gy], dtype=np.float64)


def feature_series(landmarks: Iterable[np.ndarray | None]) -> np.ndarray:
    """(T, len(FEATURES)) features of a sequence of faces (None -> a NaN row)."""
    rows = [expression_features(lm) for lm in landmarks]
    return np.array(rows, dtype=np.float64).reshape(len(rows), len(FEATURES))


# ---------------------------------------------------------------------------------------
# Series comparison


def _paired(a: Sequence[float], b: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"series differ in length: {a.shape} vs {b.shape}")
    ok = np.isfinite(a) & np.isfinite(b)
    return a[ok], b[ok]


def pearson(a: Sequence[float], b: Sequence[float]) -> float:
    """Pearson correlation of two (T,) series over the frames where both are finite.
    NaN if fewer than 3 such frames or either series is constant there."""
    a, b = _paired(a, b)
    if a.size < 3:
        return float("nan")
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float(a @ a) * float(b @ b))
    if den <= 1e-12 * max(1.0, float(np.abs(a).max() * np.abs(b).max())):
        return float("nan")
    return float(np.clip((a @ b) / den, -1.0, 1.0))


def mae(a: Sequence[float], b: Sequence[float]) -> float:
    """Mean absolute difference of two (T,) series over frames where both are finite (NaN if none)."""
    a, b = _paired(a, b)
    return float(np.abs(a - b).mean()) if a.size else float("nan")


def compare_series(inp: np.ndarray, out: np.ndarray,
                   names: Sequence[str] = FEATURES) -> dict[str, dict[str, float]]:
    """Input vs output feature series, both (T, F) -> {feature: {pearson, mae, n}}, where n
    is the number of frames with the feature finite in both."""
    inp, out = np.asarray(inp, np.float64), np.asarray(out, np.float64)
    if inp.shape != out.shape or inp.ndim != 2 or inp.shape[1] != len(names):
        raise ValueError(f"compare_series needs two (T, {len(names)}) arrays, got {inp.shape}, {out.shape}")
    res = {}
    for j, name in enumerate(names):
        n = int((np.isfinite(inp[:, j]) & np.isfinite(out[:, j])).sum())
        res[name] = {"pearson": pearson(inp[:, j], out[:, j]), "mae": mae(inp[:, j], out[:, j]), "n": n}
    return res


def demean_within(series: list[np.ndarray]) -> np.ndarray:
    """(T_i, F) series (one per clip) -> their concatenation, each clip's own mean (over its
    finite frames) taken off each feature: what is left is how each clip varies within itself.
    Correlating input and output after this is the *within-clip* r: the expression's movement,
    not the person's resting shape (which an anonymizer replaces with its identity's)."""
    out = []
    for s in series:
        s = np.asarray(s, np.float64)
        both = np.isfinite(s)
        mean = np.array([s[both[:, j], j].mean() if both[:, j].any() else np.nan for j in range(s.shape[1])])
        out.append(s - mean)
    return np.concatenate(out) if out else np.zeros((0, 0))


# ---------------------------------------------------------------------------------------
# Images: boxes and temporal change


def same_face(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether two boxes (possibly from different detectors, so of different conventions) are
    on the same face: each box's centre lies inside the other box."""
    def inside(p, box):
        return box[0] <= p[0] <= box[2] and box[1] <= p[1] <= box[3]
    ca = ((a[0] + a[2]) / 2.0, (a[1] + a[3]) / 2.0)
    cb = ((b[0] + b[2]) / 2.0, (b[1] + b[3]) / 2.0)
    return inside(ca, b) and inside(cb, a)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (left, top, right, bottom) boxes; 0 for empty ones."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def mean_abs_diff(a: np.ndarray, b: np.ndarray, box: Sequence[int] | None = None) -> float:
    """Mean absolute pixel difference (0-255 scale) of two same-shape images inside ``box``
    (whole image if None). NaN for an empty box."""
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    if box is not None:
        x0, y0, x1, y1 = clip_box(box, a.shape)
        a, b = a[y0:y1, x0:x1], b[y0:y1, x0:x1]
    if a.size == 0:
        return float("nan")
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def flicker_ratio(out_diffs: Sequence[float], in_diffs: Sequence[float]) -> float:
    """Output flicker relative to the input's own motion: sum of the output's frame-to-frame
    changes over the sum of the input's (same frame pairs, same face boxes; pairs with a NaN
    are skipped). 0 for a frozen output, 1 when the output changes exactly as much as the
    input, > 1 when it flickers more. NaN when the input never changes."""
    o, i = _paired(out_diffs, in_diffs)
    tot = float(i.sum())
    return float(o.sum()) / tot if tot > 0 else float("nan")


def flicker(inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray],
            boxes: Sequence[Sequence[int] | None]) -> float:
    """:func:`flicker_ratio` of a clip: T input and T output (H, W, 3) frames, T boxes of the
    input face (None: no face; the pair ending at that frame is skipped)."""
    if not (len(inputs) == len(outputs) == len(boxes)):
        raise ValueError("flicker needs as many inputs, outputs and boxes")
    d_in, d_out = [], []
    for t in range(1, len(inputs)):
        if boxes[t] is None:
            continue
        d_in.append(mean_abs_diff(inputs[t], inputs[t - 1], boxes[t]))
        d_out.append(mean_abs_diff(outputs[t], outputs[t - 1], boxes[t]))
    return flicker_ratio(d_out, d_in)


# ---------------------------------------------------------------------------------------
# Embeddings: identity


def _emb(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected an (N, D) stack of embeddings, got {x.shape}")
    return x


def embedding_stack(embs: Sequence[np.ndarray | None], dim: int = 128) -> np.ndarray:
    """(N, dim) float64 stack; None entries become NaN rows."""
    out = np.full((len(embs), dim), np.nan)
    for i, e in enumerate(embs):
        if e is not None:
            out[i] = np.asarray(e, dtype=np.float64).ravel()
    return out


def _valid(x: np.ndarray) -> np.ndarray:
    return np.isfinite(x).all(axis=1)


def rank1_reid(probe: np.ndarray, probe_labels: Sequence, gallery: np.ndarray,
               gallery_labels: Sequence) -> float:
    """Rank-1 re-identification rate: the share of probes (N, D) whose nearest gallery
    embedding (M, D), by euclidean distance, carries the probe's label. A NaN probe (no face)
    counts as a miss; NaN gallery rows are ignored. NaN if there are no probes."""
    probe, gallery = _emb(probe), _emb(gallery)
    if len(probe) == 0:
        return float("nan")
    g_ok = _valid(gallery)
    gallery = gallery[g_ok]
    g_lab = np.asarray(gallery_labels, dtype=object)[g_ok]
    p_lab = np.asarray(probe_labels, dtype=object)
    p_ok = _valid(probe)
    if not len(gallery) or not p_ok.any():
        return 0.0
    d = np.linalg.norm(probe[p_ok][:, None, :] - gallery[None, :, :], axis=-1)
    hits = g_lab[d.argmin(axis=1)] == p_lab[p_ok]
    return float(hits.sum()) / len(probe)


def match_rate(a: np.ndarray, b: np.ndarray, threshold: float = 0.6) -> float:
    """Share of row pairs (a[i], b[i]) of two (N, D) stacks closer than ``threshold`` (dlib:
    same person). A pair with a NaN row counts as no match. NaN if N = 0.
    Verification rate (output vs its source) and per-frame leak (output vs input frame)."""
    a, b = _emb(a), _emb(b)
    if a.shape != b.shape:
        raise ValueError(f"stacks differ in shape: {a.shape} vs {b.shape}")
    if len(a) == 0:
        return float("nan")
    ok = _valid(a) & _valid(b)
    d = np.linalg.norm(a[ok] - b[ok], axis=1)
    return float((d < threshold).sum()) / len(a)


def identity_consistency(embs: np.ndarray) -> np.ndarray:
    """(N,) cosine of each embedding to the mean of the valid ones (NaN rows stay NaN).
    1 for a clip whose output is always the same face."""
    e = _emb(embs)
    out = np.full(len(e), np.nan)
    ok = _valid(e)
    if not ok.any():
        return out
    mean = e[ok].mean(axis=0)
    mn = np.linalg.norm(mean)
    norms = np.linalg.norm(e[ok], axis=1)
    out[ok] = (e[ok] @ mean) / np.maximum(norms * mn, 1e-12)
    return out


def distances_to_mean(embs: np.ndarray) -> np.ndarray:
    """(N,) euclidean distance of each embedding to the mean of the valid ones (NaN rows stay
    NaN). 0 for a clip that is always the same face; with dlib descriptors, frames 0.3 from
    the mean on opposite sides are 0.6 apart (:data:`safefm.recognition.MATCH_THRESHOLD`):
    different people.
    Companion of :func:`identity_consistency`, whose cosines of dlib descriptors crowd near 1."""
    e = _emb(embs)
    out = np.full(len(e), np.nan)
    ok = _valid(e)
    if ok.any():
        out[ok] = np.linalg.norm(e[ok] - e[ok].mean(axis=0), axis=1)
    return out


def nan_stats(x: Sequence[float]) -> dict[str, float]:
    """{mean, median, p5, p95, min, max, n} of the finite values (NaN where none)."""
    x = np.asarray(x, dtype=np.float64).ravel()
    x = x[np.isfinite(x)]
    if not x.size:
        return {k: float("nan") for k in ("mean", "median", "p5", "p95", "min", "max")} | {"n": 0}
    return {"mean": float(x.mean()), "median": float(np.median(x)),
            "p5": float(np.percentile(x, 5)), "p95": float(np.percentile(x, 95)),
            "min": float(x.min()), "max": float(x.max()), "n": int(x.size)}
