"""Face landmarks: MediaPipe FaceMesh detection, One-Euro smoothing and face tracking.

Landmark convention (everyone relies on it): float32 (478, 3) per face, x and y in pixels
of the image they were detected in, z in the same pixel scale (MediaPipe z * image width;
smaller z = nearer the camera). 478 = FaceMesh with ``refine_landmarks=True`` (468 mesh
points + 10 iris points).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..config import RuntimeConfig
from ..errors import InputError

N_LANDMARKS = 478


# ---------------------------------------------------------------------------------------
# Detection


class FaceMeshDetector:
    """MediaPipe FaceMesh (with iris refinement) returning pixel-space (478, 3) landmarks.

    ``static_image=True`` runs the detector on every call (photos); ``False`` lets MediaPipe
    track between consecutive video frames (faster, steadier). Use as a context manager or
    call :meth:`close`.
    """

    def __init__(self, max_faces: int = 4, static_image: bool = False,
                 min_detection_confidence: float = 0.5, min_tracking_confidence: float = 0.5):
        try:
            import mediapipe as mp
        except ImportError:
            raise ImportError("mediapipe is not installed: pip install mediapipe==0.10.21") from None
        self._static = static_image
        self._make = lambda: mp.solutions.face_mesh.FaceMesh(
            static_image_mode=static_image, max_num_faces=max_faces, refine_landmarks=True,
            min_detection_confidence=min_detection_confidence,
            min_tracking_confidence=min_tracking_confidence)
        self._mesh = self._make()

    def reset(self) -> None:
        """Forget the faces tracked so far (video mode keeps tracking across calls): the next
        call detects afresh, as on a new stream. A new graph costs a few milliseconds."""
        if self._mesh is not None and not self._static:
            self._mesh.close()
            self._mesh = self._make()

    def detect(self, rgb: np.ndarray) -> list[np.ndarray]:
        """Faces in one (H, W, 3) uint8 RGB image -> list of (478, 3) float32 pixel landmarks."""
        if self._mesh is None:
            raise InputError("FaceMeshDetector is closed")
        if not (isinstance(rgb, np.ndarray) and rgb.ndim == 3 and rgb.shape[2] == 3
                and rgb.dtype == np.uint8):
            raise InputError(f"detect needs an (H, W, 3) uint8 RGB image, got "
                             f"{getattr(rgb, 'shape', type(rgb))} {getattr(rgb, 'dtype', '')}")
        h, w = rgb.shape[:2]
        result = self._mesh.process(np.ascontiguousarray(rgb))
        faces = []
        for face in result.multi_face_landmarks or ():
            pts = np.array([(p.x, p.y, p.z) for p in face.landmark], dtype=np.float32)
            if len(pts) != N_LANDMARKS:  # pragma: no cover - refine_landmarks is always on
                raise InputError(f"FaceMesh returned {len(pts)} landmarks, expected {N_LANDMARKS}")
            pts *= np.array([w, h, w], dtype=np.float32)
            faces.append(pts)
        return faces

    def close(self) -> None:
        if self._mesh is not None:
            self._mesh.close()
            self._mesh = None

    def __enter__(self) -> "FaceMeshDetector":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def face_box(landmarks: np.ndarray, shape: Sequence[int] | None = None,
             margin: float = 0.0) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) int pixel box around (N, 2+) landmarks, grown by ``margin`` x its size
    on every side: x0, y0 floored, x1, y1 exclusive (ceil + 1, so every landmark's pixel is in).
    With ``shape`` ((H, W, ...) of the image) clipped to the image by :func:`clip_box`."""
    xy = np.asarray(landmarks, dtype=np.float64)[:, :2]
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    grow = (hi - lo) * margin
    lo, hi = lo - grow, hi + grow
    box = (math.floor(lo[0]), math.floor(lo[1]), math.ceil(hi[0]) + 1, math.ceil(hi[1]) + 1)
    return box if shape is None else clip_box(box, shape)


def clip_box(box: Sequence[float], shape: Sequence[int]) -> tuple[int, int, int, int]:
    """Integer (x0, y0, x1, y1) box (floor / ceil) clipped to an image of ``shape`` (H, W, ...);
    may come out empty (x1 == x0 or y1 == y0), never inverted."""
    h, w = int(shape[0]), int(shape[1])
    x0, y0 = min(max(math.floor(box[0]), 0), w), min(max(math.floor(box[1]), 0), h)
    x1, y1 = min(max(math.ceil(box[2]), x0), w), min(max(math.ceil(box[3]), y0), h)
    return x0, y0, x1, y1


# ---------------------------------------------------------------------------------------
# Smoothing


def _alpha(cutoff: np.ndarray | float, dt: float) -> np.ndarray | float:
    """Exponential-smoothing factor of a first-order low-pass at ``cutoff`` Hz over ``dt`` s."""
    tau = 1.0 / (2.0 * math.pi * cutoff)
    return 1.0 / (1.0 + tau / dt)


class OneEuroFilter:
    """One-Euro filter (Casiez et al. 2012) applied element-wise to arrays of a fixed shape.

    Low cutoff (``min_cutoff`` Hz) removes jitter when still; the cutoff rises by ``beta`` x
    speed (units per second) so fast motion is followed with little lag. ``d_cutoff`` (Hz)
    smooths the speed estimate. A call whose time does not advance restarts the filter.
    """

    def __init__(self, min_cutoff: float = 1.0, beta: float = 0.05, d_cutoff: float = 1.0):
        if min_cutoff <= 0 or d_cutoff <= 0 or beta < 0:
            raise ValueError("OneEuroFilter needs min_cutoff > 0, d_cutoff > 0 and beta >= 0")
        self.min_cutoff, self.beta, self.d_cutoff = min_cutoff, beta, d_cutoff
        self.reset()

    def reset(self) -> None:
        self._x: np.ndarray | None = None
        self._dx: np.ndarray | None = None
        self._t: float | None = None

    def __call__(self, x: np.ndarray, t: float) -> np.ndarray:
        """Filtered value of ``x`` (any shape, float) observed at time ``t`` seconds."""
        x = np.asarray(x, dtype=np.float64)
        if self._x is None or self._x.shape != x.shape or t <= self._t:
            self._x, self._dx, self._t = x.copy(), np.zeros_like(x), t
            return x.astype(np.float32)
        dt = t - self._t
        dx = (x - self._x) / dt
        self._dx += _alpha(self.d_cutoff, dt) * (dx - self._dx)
        cutoff = self.min_cutoff + self.beta * np.abs(self._dx)
        self._x += _alpha(cutoff, dt) * (x - self._x)
        self._t = t
        return self._x.astype(np.float32)


# ---------------------------------------------------------------------------------------
# Tracking


@dataclass
class Track:
    id: int
    landmarks: np.ndarray                 # (478, 3) float32, One-Euro smoothed, frame pixels
    raw: np.ndarray                       # (478, 3) float32, as detected (last seen)
    box: tuple[int, int, int, int]        # (x0, y0, x1, y1) of the smoothed landmarks
    age: int = 1                          # frames this face was seen
    missing: int = 0                      # consecutive frames it was not matched
    is_new: bool = True                   # first frame of this track


def _centre_width(landmarks: np.ndarray) -> tuple[np.ndarray, float]:
    """(2,) centre of the x, y extent and the face width in pixels."""
    xy = landmarks[:, :2]
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    return (lo + hi) / 2.0, float(max(hi[0] - lo[0], 1.0))


class FaceTracker:
    """Keeps face identities across video frames.

    Each :meth:`update` matches the detected faces to the remembered tracks greedily by
    centre distance (closest pairs first; a pair matches when the distance is below
    ``cfg.track_max_distance`` x the track's face width), smooths each matched face with its
    own One-Euro filter and opens a new track (new id, never reused) for every unmatched face.
    Tracks unmatched for more than ``cfg.hold_frames + cfg.placeholder_frames`` frames are
    forgotten.
    """

    def __init__(self, cfg: RuntimeConfig):
        self.cfg = cfg
        self._next_id = 0
        self._tracks: dict[int, Track] = {}
        self._filters: dict[int, OneEuroFilter] = {}

    def reset(self) -> None:
        """Forget all tracks (ids keep increasing)."""
        self._tracks.clear()
        self._filters.clear()

    @property
    def tracks(self) -> list[Track]:
        return list(self._tracks.values())

    def update(self, faces: list[np.ndarray], t: float) -> tuple[list[Track], list[Track]]:
        """Faces detected at time ``t`` seconds -> (tracks matched this frame, in the order of
        ``faces``; tracks remembered but not seen this frame, ``missing`` incremented)."""
        faces = [np.asarray(f, dtype=np.float32) for f in faces]
        tracks = list(self._tracks.values())
        pairs = []
        for ti, tr in enumerate(tracks):
            c_t, w_t = _centre_width(tr.landmarks)
            for fi, f in enumerate(faces):
                c_f, _ = _centre_width(f)
                d = float(np.linalg.norm(c_f - c_t))
                if d < self.cfg.track_max_distance * w_t:
                    pairs.append((d, ti, fi))
        pairs.sort()
        face_track: dict[int, Track] = {}
        used_tracks: set[int] = set()
        for _, ti, fi in pairs:
            if ti in used_tracks or fi in face_track:
                continue
            used_tracks.add(ti)
            face_track[fi] = tracks[ti]

        matched = []
        for fi, f in enumerate(faces):
            tr = face_track.get(fi)
            if tr is None:
                tr = Track(id=self._next_id, landmarks=f, raw=f, box=face_box(f), age=0)
                self._next_id += 1
                self._tracks[tr.id] = tr
                self._filters[tr.id] = OneEuroFilter(self.cfg.smoothing_min_cutoff,
                                                     self.cfg.smoothing_beta)
            else:
                tr.is_new = False
            tr.landmarks = self._filters[tr.id](f, t)
            tr.raw = f
            tr.box = face_box(tr.landmarks)
            tr.age += 1
            tr.missing = 0
            matched.append(tr)

        lost = []
        for ti, tr in enumerate(tracks):
            if ti in used_tracks:
                continue
            tr.missing += 1
            tr.is_new = False
            if tr.missing > self.cfg.hold_frames + self.cfg.placeholder_frames:
                del self._tracks[tr.id]
                del self._filters[tr.id]
            else:
                lost.append(tr)
        return matched, lost
