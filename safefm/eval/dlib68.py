"""Expression read by a second landmarker: dlib's 68-point predictor (not the mesh that drives the generator).

A generator can satisfy the landmarker it is conditioned on while a person, or another
landmarker, reads a different mouth. The evaluation therefore also measures mouth and eye opening
and head pose with dlib's HOG detector + 68-point shape predictor (``face_recognition_models``),
which shares nothing with MediaPipe.

Points are the iBUG 68 layout, (68, 2) float64 pixels (x, y). Features (:data:`FEATURES68`):

- ``mouth_open``: inner-lip gap (points 61-63 to 67-65) / inter-ocular distance (36 to 45);
- ``eye_open_r`` / ``eye_open_l``: eye aspect ratio (lid gaps over eye width) of the subject's
  right eye (points 36-41, the image's left) and left eye (42-47);
- ``yaw`` / ``pitch`` / ``roll`` (degrees): a rigid fit (``cv2.solvePnP``) of six points to a
  generic 3D face, focal length = the image width; roll from the outer eye corners' line;
  signs as :func:`safefm.eval.metrics.head_pose`.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from ..recognition import PREDICTOR68, models_dir, mouth_opening68
from .metrics import rotation_to_euler

FEATURES68 = ("mouth_open", "eye_open_r", "eye_open_l", "yaw", "pitch", "roll")
PREDICTOR_FILE = PREDICTOR68

# A generic face in millimetres (x right, y up, z toward the camera) for the six points
# nose tip 30, chin 8, outer eye corners 36 / 45, mouth corners 48 / 54.
_PNP_INDEX = (30, 8, 36, 45, 48, 54)
_PNP_MODEL = np.array([(0.0, 0.0, 0.0), (0.0, -63.6, -12.5), (-43.3, 32.7, -26.0),
                       (43.3, 32.7, -26.0), (-28.9, -28.9, -24.1), (28.9, -28.9, -24.1)])


def _dist(pts: np.ndarray, a: int, b: int) -> float:
    return float(np.linalg.norm(pts[a] - pts[b]))


def eye_aspect68(pts: np.ndarray, first: int) -> float:
    """Eye aspect ratio of the eye whose six points start at ``first`` (36 or 42). pts: (68, 2)."""
    p = [first + i for i in range(6)]
    lids = _dist(pts, p[1], p[5]) + _dist(pts, p[2], p[4])
    return lids / max(2.0 * _dist(pts, p[0], p[3]), 1e-6)


def head_pose68(pts: np.ndarray, image_size: tuple[int, int]) -> tuple[float, float, float]:
    """(yaw, pitch, roll) degrees of a rigid generic-face fit. pts: (68, 2); image_size: (H, W)."""
    h, w = image_size
    cam = np.array([[w, 0, w / 2.0], [0, w, h / 2.0], [0, 0, 1.0]])
    img = np.ascontiguousarray(pts[list(_PNP_INDEX)], np.float64)
    model = _PNP_MODEL * np.array([1.0, -1.0, -1.0])   # into the camera frame: y down, z away
    ok, rvec, _ = cv2.solvePnP(model, img, cam, np.zeros(4), flags=cv2.SOLVEPNP_ITERATIVE)
    if not ok:
        return math.nan, math.nan, math.nan
    return rotation_to_euler(cv2.Rodrigues(rvec)[0])


def eye_line_roll68(pts: np.ndarray) -> float:
    """Roll (degrees, clockwise on screen > 0) of the line through the outer eye corners. pts: (68, 2)."""
    dx, dy = pts[45] - pts[36]
    return math.degrees(math.atan2(dy, dx))


def features68(pts: np.ndarray | None, image_size: tuple[int, int]) -> np.ndarray:
    """(len(FEATURES68),) float64 features of one face; all NaN when ``pts`` is None.

    Roll comes from the eye line (steadier than the fit, whose mouth corners move with speech)."""
    if pts is None:
        return np.full(len(FEATURES68), np.nan)
    pts = np.asarray(pts, np.float64)
    yaw, pitch, _ = head_pose68(pts, image_size)
    return np.array([mouth_opening68(pts), eye_aspect68(pts, 36), eye_aspect68(pts, 42),
                     yaw, pitch, eye_line_roll68(pts)])


class Dlib68:
    """dlib HOG detector + 68-point predictor, loaded once on first use.

    :meth:`points` finds the face nearest ``near`` (a box ``(x0, y0, x1, y1)``: the source face) or
    the largest one, and returns its (68, 2) points, or None when dlib finds no face there. Given
    ``boxes`` (faces already found in the image, e.g. by
    :meth:`safefm.recognition.FaceRecognizer.detect`), it picks among them instead of detecting.
    """

    def __init__(self, upsample: int = 1):
        self.upsample = upsample
        self._detector = self._predictor = self._dlib = None

    def _load(self) -> None:
        if self._predictor is None:
            import dlib

            self._dlib = dlib
            self._detector = dlib.get_frontal_face_detector()
            self._predictor = dlib.shape_predictor(str(models_dir() / PREDICTOR_FILE))

    def points(self, rgb: np.ndarray, near=None, boxes=None) -> np.ndarray | None:
        self._load()
        rgb = np.ascontiguousarray(rgb)
        if boxes is None:
            rects = list(self._detector(rgb, self.upsample))
        else:   # (x0, y0, x1, y1), x1/y1 exclusive -> dlib's inclusive rectangles
            rects = [self._dlib.rectangle(int(b[0]), int(b[1]), int(b[2]) - 1, int(b[3]) - 1) for b in boxes]
        if not rects:
            return None
        if near is None:
            rect = max(rects, key=lambda r: r.width() * r.height())
        else:
            cx, cy = (near[0] + near[2]) / 2.0, (near[1] + near[3]) / 2.0
            size = max(near[2] - near[0], near[3] - near[1], 1)
            rect = min(rects, key=lambda r: math.hypot(r.center().x - cx, r.center().y - cy))
            if math.hypot(rect.center().x - cx, rect.center().y - cy) > 0.5 * size:
                return None
        shape = self._predictor(rgb, rect)
        return np.array([(shape.part(i).x, shape.part(i).y) for i in range(68)], np.float64)

    def features(self, rgb: np.ndarray, near=None, boxes=None) -> np.ndarray:
        """(len(FEATURES68),) features of the face near ``near`` (NaN when none is found)."""
        return features68(self.points(rgb, near, boxes), rgb.shape[:2])
