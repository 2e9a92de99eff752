"""Expression retargeting: the generator never sees the user's own face shape.

A face's landmarks are split into a head pose (3D similarity of the template onto the
stable :data:`~safefm.face.alignment.ALIGN_INDICES`), a neutral shape (what the face looks like
at rest, estimated over time by :class:`NeutralEstimator`) and the expression (the
canonical landmarks minus the neutral). :func:`retarget` puts that expression, weighted by
region, on the *identity's* shape and places it back with the user's pose:

    out = from_canonical(identity_shape + gain * w * (to_canonical(landmarks) - neutral), pose)

All shapes called "canonical" are (478, 3) in the template's unit crop coordinates.

Video: the neutral is the rest shape of the last ``window`` frames (closed-mouth frames;
see :class:`NeutralEstimator`), so the user's own face shape cancels out of the expression.

Single images (one frame) have no history, so their neutral is estimated from the photo itself
(:func:`single_image_neutral`): a linear-Gaussian split, fitted on training people with several
photos (``safefm/face/assets/expression_prior.npz``), of the face into what varies between people (kept
in the neutral) and what varies within a person (the expression). Measured on 298 training
photos (dlib, the default model): the output's distance to its own original 0.775 -> 0.806
(other people's photos: 0.823 -> 0.831), own matches 1.3 % -> 0.7 %; mouth / eye opening r of
output vs photo 0.87 / 0.78-0.81 (template neutral: 0.93 / 0.87-0.90, partly the person's own
eye and lip shape). ``image_neutral = "template"`` restores the old behaviour: the expression is
then the face's deviation from the mean face and the person's lip, eye and brow shapes leak.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from .alignment import ALIGN_INDICES, check_landmarks, load_template, umeyama

Pose = tuple[float, np.ndarray, np.ndarray]   # (s, R (3, 3), t (3,)): points = s * R @ canon + t

# Expressive regions (FaceMesh indices): these carry the full expression.
LIPS = (0, 13, 14, 17, 37, 39, 40, 61, 78, 80, 81, 82, 84, 87, 88, 91, 95, 146, 178, 181, 185,
        191, 267, 269, 270, 291, 308, 310, 311, 312, 314, 317, 318, 321, 324, 375, 402, 405,
        409, 415)
EYELIDS = (7, 33, 133, 144, 145, 153, 154, 155, 157, 158, 159, 160, 161, 163, 173, 246,
           249, 263, 362, 373, 374, 380, 381, 382, 384, 385, 386, 387, 388, 390, 398, 466)
IRISES = tuple(range(468, 478))
BROWS = (46, 52, 53, 55, 63, 65, 66, 70, 105, 107, 276, 282, 283, 285, 293, 295, 296, 300,
         334, 336)
# Lower face oval (jaw line and chin): moves when the mouth opens, but also carries identity.
JAW = (58, 132, 136, 148, 149, 150, 152, 172, 176, 288, 361, 365, 377, 378, 379, 397, 400)

# The lower lip, inner and outer: moves down with the jaw when the mouth opens.
LOWER_LIP = (14, 17, 84, 87, 88, 91, 95, 146, 178, 181, 314, 317, 318, 321, 324, 375, 402, 405)
JAW_DROP = 0.7        # share of the lower lip's drop the jaw line takes (open_mouth, closed_rest)
REST_GAP = 0.002      # the most open (inner-lip gap, crop units) a rest shape's mouth is (closed_rest): closed
                      # lips read -0.001 to 0.001; a talker whose lips part even in their most closed
                      # quarter of frames (0.01-0.02 on some clips) would otherwise have that gap taken as rest

_EYELID_IDX = np.array(EYELIDS)
FULL_WEIGHT_REGIONS = LIPS + EYELIDS + IRISES + BROWS
# (upper, lower) point pairs across the mouth opening and the two eye openings.
MOUTH_PAIRS = ((13, 14), (82, 87), (81, 178), (80, 88), (191, 95),
               (312, 317), (311, 402), (310, 318), (415, 324))
EYE_PAIRS = ((159, 145), (158, 153), (160, 144), (157, 154), (161, 163), (173, 155), (246, 7),
             (386, 374), (385, 380), (387, 373), (384, 381), (388, 390), (398, 382), (466, 249))
_EYE_UP, _EYE_LO = np.array(EYE_PAIRS).T   # upper and lower eyelid points of EYE_PAIRS
NOSE_BASE = 2         # FaceMesh point under the nose (subnasale)
JAW_WEIGHT = 0.5
RIGID_WEIGHT = 0.15
FALLOFF = 0.03        # Gaussian falloff (unit crop units) of the full weight around expressive points
EXPRESSION_PRIOR_PATH = Path(__file__).resolve().parent / "assets" / "expression_prior.npz"


def _check_canonical(shape: np.ndarray, what: str) -> np.ndarray:
    """(478, 3) float32 view of a canonical shape; a clear error for pixel-scale input."""
    shape = np.asarray(shape, dtype=np.float32)
    if shape.shape != (478, 3):
        raise ValueError(f"{what} must be (478, 3), got {shape.shape}")
    width = float(np.ptp(shape[:, 0]))
    if not 0.1 < width < 10.0:
        raise ValueError(f"{what} must be canonical (unit crop coordinates, width ~0.7), got width "
                         f"{width:.3g}: fit poses with pose_fit(landmarks, load_template())")
    return shape


def pose_fit(landmarks: np.ndarray, template: np.ndarray) -> Pose:
    """3D similarity of the canonical ``template`` (478, 3) onto ``landmarks`` (478, 3, any
    pixel frame) over the stable :data:`ALIGN_INDICES`: landmarks ~ s * R @ template + t."""
    idx = list(ALIGN_INDICES)
    return umeyama(np.asarray(template)[idx], check_landmarks(np.asarray(landmarks)[idx]))


def upright_shape(shape: np.ndarray, template: np.ndarray | None = None) -> np.ndarray:
    """A canonical (478, 3) shape turned about its stable points' centroid so that
    :func:`pose_fit` of it against ``template`` (default: the shipped template) has no rotation.

    A neutral identity shape whose rigid points sit tilted against the template (a random
    deformation lifts the nose a little, say) would show that tilt as a head-pose offset in
    every output frame; upright, the output's head pose is the user's. Size, position and the
    shape itself are kept. Returns a float32 copy.
    """
    shape = _check_canonical(shape, "shape")
    tmpl = load_template() if template is None else np.asarray(template, dtype=np.float64)
    idx = list(ALIGN_INDICES)
    _, r, _ = umeyama(tmpl[idx], shape[idx].astype(np.float64))
    if np.allclose(r, np.eye(3), atol=1e-6):       # upright already (idempotent to the bit)
        return shape.copy()
    c = shape[idx].astype(np.float64).mean(axis=0)
    return ((shape.astype(np.float64) - c) @ r + c).astype(np.float32)


def to_canonical(landmarks: np.ndarray, pose: Pose) -> np.ndarray:
    """(478, 3) pixel landmarks -> (478, 3) float32 canonical shape (pose removed)."""
    s, r, t = pose
    return (((np.asarray(landmarks, dtype=np.float64) - t) @ r) / s).astype(np.float32)


def from_canonical(canon: np.ndarray, pose: Pose) -> np.ndarray:
    """(478, 3) canonical shape -> (478, 3) float32 landmarks in the pose's pixel frame."""
    s, r, t = pose
    return (s * np.asarray(canon, dtype=np.float64) @ r.T + t).astype(np.float32)


def mouth_opening(shape: np.ndarray) -> float:
    """Mean vertical gap between the inner lips of a canonical (478, 3) shape (crop units)."""
    up, lo = np.array(MOUTH_PAIRS).T
    return float((shape[lo, 1] - shape[up, 1]).mean())


def open_mouth(landmarks: np.ndarray, amount: float) -> np.ndarray:
    """``landmarks`` ((478, 2|3), pixels, upright) with the mouth opened: the lower lip (inner
    and outer) moved down by ``amount`` face widths (x extent of the points) and the jaw line by
    :data:`JAW_DROP` of that. What a person's face looks like a moment later when they start to
    speak; the identity choice renders it to see whether a candidate's mouth opens (a new array)."""
    out = np.array(landmarks, np.float32, copy=True)
    _drop_lower_lip(out, float(amount) * float(np.ptp(out[:, 0])))
    return out


def _drop_lower_lip(shape: np.ndarray, d: float) -> None:
    """In place: the lower lip (inner and outer) moved down by ``d`` (the shape's own units; < 0:
    up) and the jaw line by :data:`JAW_DROP` of that."""
    shape[list(LOWER_LIP), 1] += d
    shape[list(JAW), 1] += JAW_DROP * d


def closed_rest(shape: np.ndarray, gap: float = REST_GAP) -> np.ndarray:
    """A canonical (478, 3) rest shape with its mouth no more open than ``gap``
    (:func:`mouth_opening`, crop units): the lower lip lifted by the excess and the jaw line by
    :data:`JAW_DROP` of it (:func:`open_mouth` backwards). A resting mouth is closed; a person who
    talks all the time has no closed frames to take the rest from, and an open rest is subtracted
    from every frame, so their output would speak with a mouth that barely opens. Returns a copy."""
    out = np.array(shape, dtype=np.float32)
    excess = mouth_opening(out) - gap
    if excess > 0:
        _drop_lower_lip(out, -excess)
    return out


def close_gaps(shape: np.ndarray) -> np.ndarray:
    """Canonical (478, 3) shape with no negative mouth or eye opening: an (upper, lower) pair
    whose lower point is above its upper point meets in the middle. Returns a copy."""
    out = np.array(shape, dtype=np.float32)
    up, lo = np.array(MOUTH_PAIRS + EYE_PAIRS).T
    mid = 0.5 * (out[up, 1] + out[lo, 1])
    crossed = out[lo, 1] < out[up, 1]
    out[up[crossed], 1] = mid[crossed]
    out[lo[crossed], 1] = mid[crossed]
    return out


def eye_openings(shape: np.ndarray) -> np.ndarray:
    """(2,) mean vertical gap between the upper and lower eyelid of each eye (in the order
    :data:`EYE_PAIRS` lists them: its first seven pairs, then the other seven) of a canonical
    (478, 3) shape (crop units)."""
    gap = np.asarray(shape, np.float64)[_EYE_LO, 1] - np.asarray(shape, np.float64)[_EYE_UP, 1]
    return gap.reshape(2, -1).mean(axis=1)


def with_rest_eyes(identity_shape: np.ndarray, neutral: np.ndarray, keep: float) -> np.ndarray:
    """The identity's canonical (478, 3) shape with each eye's resting opening moved ``keep``
    (0..1) of the way, in log ratio, to the opening of ``neutral`` (the person's rest shape):
    each (upper, lower) eyelid pair is scaled vertically about its own midpoint, so the eye's
    outline, corners and position stay the identity's and only one number per eye, how open it
    rests, comes from the person (narrow-eyed people keep resting narrow eyes, so a squint and a
    wide look read the same in the output as in the input). ``keep`` 0 returns a copy of the
    identity's shape. Returns float32."""
    out = np.array(identity_shape, dtype=np.float32)
    if keep <= 0.0:
        return out
    ident, rest = eye_openings(out), eye_openings(neutral)
    ratio = np.exp(keep * np.log(np.maximum(rest, 1e-4) / np.maximum(ident, 1e-4)))
    ratio = np.where((ident > 1e-4) & (rest > 1e-4), np.clip(ratio, 0.25, 4.0), 1.0)
    up, lo = _EYE_UP, _EYE_LO
    r = np.repeat(ratio, len(EYE_PAIRS) // 2)
    mid = 0.5 * (out[up, 1] + out[lo, 1])
    out[up, 1] = mid + r * (out[up, 1] - mid)
    out[lo, 1] = mid + r * (out[lo, 1] - mid)
    return out


def canonical_shape(landmarks: np.ndarray) -> np.ndarray:
    """Canonical (478, 3) float32 shape of one face's landmarks (e.g. an identity's shape)."""
    return to_canonical(landmarks, pose_fit(landmarks, load_template()))


@lru_cache(maxsize=1)
def _weights_cached() -> np.ndarray:
    tmpl = load_template()
    full = tmpl[list(FULL_WEIGHT_REGIONS), :2]
    d2 = ((tmpl[:, None, :2] - full[None]) ** 2).sum(axis=2).min(axis=1)     # (478,)
    w = RIGID_WEIGHT + (1.0 - RIGID_WEIGHT) * np.exp(-d2 / (2 * FALLOFF ** 2))
    w[list(JAW)] = np.maximum(w[list(JAW)], JAW_WEIGHT)
    w[list(FULL_WEIGHT_REGIONS)] = 1.0
    w = w.astype(np.float32)
    w.setflags(write=False)
    return w


def expression_weights() -> np.ndarray:
    """(478,) float32 in [RIGID_WEIGHT, 1]: how much of each point's expression is transferred."""
    return _weights_cached().copy()


@lru_cache(maxsize=1)
def _lower_face() -> np.ndarray:
    """(478,) bool: points below the nose base (lips, chin, lower cheeks), whose rest shape is
    taken from closed-mouth frames only; everything above uses every buffered frame."""
    tmpl = load_template()
    return tmpl[:, 1] > tmpl[NOSE_BASE, 1]


class NeutralEstimator:
    """Running robust estimate of one track's neutral (rest) canonical shape.

    Keeps up to ``samples`` canonical shapes spanning the track's history: every frame at
    first; when the buffer is full, every other sample is dropped and the sampling stride
    doubles, until the buffer spans ``window`` frames; from then on the oldest sample is
    replaced (a ring over the last ``window`` frames). The rest shape is the per-coordinate
    median of the buffered frames; below the nose (:func:`_lower_face`) only of those whose
    mouth is among the least open quarter (:func:`mouth_opening`): a talking user's mouth is
    open more often than not, but a resting mouth is closed, so a plain median would make
    every closed mouth look like pursed lips. Where even that quarter's lips part (someone who
    talks through the whole window), the rest mouth is closed to :data:`REST_GAP`
    (:func:`closed_rest`), so the output's mouth opens as far as theirs does. While there is
    little history the estimate is pulled to the template:
    ``neutral = template + min(1, n / warmup) * (rest - template)``, ``n`` the frames seen.
    Before any frame the neutral is the template (the engine's single-image behaviour).

    Privacy: whatever of the user's *shape* is in ``canonical - neutral`` reaches the generator.
    With ``warmup = 1`` the neutral is the user's own shape from the first frame, so only
    deviations from it (expressions) are transferred; a slow warm-up passes part of the user's
    lip, eye and brow geometry for as long as it lasts (measured on the video clips' first 150
    frames: per-frame dlib leak 5.5 % with a 30-frame warm-up, 2.5 % with 1). One exception by
    choice: with ``eye_rest`` > 0 (:func:`retarget`; the runtime default 1) each eye's *mean*
    resting opening is taken from the neutral (:func:`with_rest_eyes`): two numbers, not the
    eyelids' shape.

    Why a long window with a short warm-up: the expression is ``canonical - neutral``, so
    anything the neutral follows is removed from the output. A neutral over the last 3 s
    follows a squint, a frown or a long look down and erases them (measured on the video
    clips: eye-opening correlation of the retargeted landmarks 0.66 with a 90-frame window,
    0.9+ with a long one).
    """

    REST_QUANTILE = 0.25

    def __init__(self, window: int, template: np.ndarray | None = None, warmup: int | None = None,
                 samples: int = 64):
        if window < 1:
            raise ValueError(f"NeutralEstimator window must be >= 1, got {window}")
        if samples < 2:
            raise ValueError(f"NeutralEstimator needs samples >= 2, got {samples}")
        self.window = window
        self.template = (load_template() if template is None else np.asarray(template)).astype(np.float32)
        self.warmup = max(1, window // 3 if warmup is None else warmup)
        n = min(window, samples)
        self._buf = np.empty((n,) + self.template.shape, np.float32)
        self._open = np.empty(n, np.float64)
        self.reset()

    def reset(self) -> None:
        self._seen = 0
        self._stored = 0
        self._next = 0
        self.stride = 1
        self._ring = False
        self._rest = self.template.copy()
        self._neutral = self.template.copy()

    @property
    def neutral(self) -> np.ndarray:
        """Current (478, 3) float32 neutral estimate (a copy)."""
        return self._neutral.copy()

    def _make_room(self) -> None:
        n = len(self._buf)
        if self._ring or self._stored < n:
            return
        if self.stride * n * 2 <= self.window:         # decimate: keep every other sample
            half = (n + 1) // 2
            self._buf[:half] = self._buf[0:n:2]
            self._open[:half] = self._open[0:n:2]
            self._stored = self._next = half
            self.stride *= 2
        else:                                          # full span: replace the oldest from now on
            self._ring = True
            self._next = 0

    def update(self, canon: np.ndarray) -> np.ndarray:
        """Add one frame's canonical (478, 3) shape; returns the updated neutral (a copy)."""
        canon = _check_canonical(canon, "NeutralEstimator.update input")
        if self._seen % self.stride == 0:
            self._make_room()
            self._buf[self._next] = canon
            self._open[self._next] = mouth_opening(canon)
            self._next = (self._next + 1) % len(self._buf)
            self._stored = min(self._stored + 1, len(self._buf))
            opening = self._open[:self._stored]
            closed = opening <= np.quantile(opening, self.REST_QUANTILE)
            buf, lower = self._buf[:self._stored], _lower_face()
            self._rest[~lower] = np.median(buf[:, ~lower], axis=0)
            self._rest[lower] = np.median(buf[np.ix_(closed, lower)], axis=0)
            self._rest = closed_rest(self._rest)
        self._seen += 1
        w = min(1.0, self._seen / self.warmup)
        self._neutral = (self.template + w * (self._rest - self.template)).astype(np.float32)
        return self._neutral.copy()


@lru_cache(maxsize=1)
def load_expression_prior() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean (478, 3), basis (K, 1434), filter (K, K)) float32 of ``safefm/face/assets/expression_prior.npz``
    (``scripts/make_expression_prior.py``; statistics of training faces, read without pickle)."""
    if not EXPRESSION_PRIOR_PATH.is_file():
        raise FileNotFoundError(f"expression prior missing: {EXPRESSION_PRIOR_PATH} "
                                "(run scripts/make_expression_prior.py)")
    with np.load(EXPRESSION_PRIOR_PATH, allow_pickle=False) as z:
        mean, basis, filt = (z[k].astype(np.float32) for k in ("mean", "basis", "filter"))
    if mean.shape != (478, 3) or basis.shape[1] != 478 * 3 or filt.shape != (len(basis),) * 2:
        raise ValueError(f"expression prior {EXPRESSION_PRIOR_PATH} has inconsistent shapes")
    for a in (mean, basis, filt):
        a.setflags(write=False)
    return mean, basis, filt


def single_image_neutral(canon: np.ndarray, prior=None, template: np.ndarray | None = None) -> np.ndarray:
    """The closed-mouth rest shape of a face seen once (a photo has no history to take it from).

    canon: (478, 3) canonical shape of one face. Model (fitted by
    ``scripts/make_expression_prior.py``): a photo's shape = the photo mean m + the person's own
    deviation + the photo's expression, the last varying *within* people (a smile, an open mouth,
    closed eyes), the person's deviation *between* people (lip, eye and brow shapes). With the
    prior's principal directions B (K, 1434) and filter W = S_e (S_id + S_e)^-1 (K, K)
    (:func:`load_expression_prior`) the person's expected deviation is
    ``(canon - m) - B^T W B (canon - m)`` (detail outside B counts as the person's), put on the
    closed-mouth template:

        neutral = template + (canon - m) - B^T W B (canon - m)

    so ``canon - neutral`` (what reaches the generator) is the expected expression plus the mean
    photo's expression over the template, and the person's own shape stays out.
    Returns (478, 3) float32.
    """
    mean, basis, filt = load_expression_prior() if prior is None else prior
    tmpl = load_template() if template is None else template
    d = (np.asarray(canon, np.float32) - mean).reshape(-1)
    person = d - basis.T @ (filt @ (basis @ d))
    return (tmpl + person.reshape(478, 3)).astype(np.float32)


def retarget(landmarks: np.ndarray, neutral: np.ndarray, identity_shape: np.ndarray,
             gain: float = 1.0, pose: Pose | None = None, eye_gain: float = 1.0,
             eye_rest: float = 0.0) -> np.ndarray:
    """The user's expression on the identity's face, in the user's pose.

    landmarks: (478, 3) user landmarks in some pixel frame; neutral, identity_shape: (478, 3)
    canonical; pose: the landmarks' :func:`pose_fit` if already known. Returns (478, 3)
    float32 landmarks in the same pixel frame: same head pose (rotation, position, scale),
    the identity's face shape, the user's expression scaled by ``gain`` (the eyelids' by
    ``gain * eye_gain``); lips and eyelids never cross (:func:`close_gaps`). ``eye_rest``
    (0..1): how much of the user's resting eye opening the identity's eyes take
    (:func:`with_rest_eyes`; 0: none, the identity's own).
    """
    if pose is None:
        pose = pose_fit(landmarks, load_template())
    neutral = _check_canonical(neutral, "neutral")
    identity_shape = _check_canonical(identity_shape, "identity_shape")
    if eye_rest > 0.0:
        identity_shape = with_rest_eyes(identity_shape, neutral, eye_rest)
    expression = (to_canonical(landmarks, pose) - neutral) * _weights_cached()[:, None]
    if eye_gain != 1.0:
        expression[_EYELID_IDX] *= eye_gain
    return from_canonical(close_gaps(identity_shape + gain * expression), pose)
