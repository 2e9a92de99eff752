"""dlib face recognition (the 128-d ResNet descriptor), without ``pkg_resources``.

The model files ship in the ``face_recognition_models`` package; they are located with
``importlib.util.find_spec`` (its ``models/`` folder) and loaded lazily, once per
:class:`FaceRecognizer`.

Images are RGB ``uint8`` arrays (H, W, 3) (read files with :func:`safefm.media.read_image`).
Boxes are ``(x0, y0, x1, y1)`` integer pixels, x1/y1 exclusive. Embeddings are ``(128,)
float32``; two photos are the same person when their euclidean :func:`distance` is below
:data:`MATCH_THRESHOLD` (dlib's 0.6).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

MATCH_THRESHOLD = 0.6  # dlib euclidean distance under which two descriptors are the same person
EMBED_DIM = 128
CHIP_SIZE = 150  # dlib's face chip side for the ResNet
PREDICTOR68 = "shape_predictor_68_face_landmarks.dat"   # dlib's iBUG 68-point predictor
_MODEL_FILES = {
    "recognition": "dlib_face_recognition_resnet_model_v1.dat",
    "shape5": "shape_predictor_5_face_landmarks.dat",
    "mmod": "mmod_human_face_detector.dat",
    "shape68": PREDICTOR68,
}

Box = tuple[int, int, int, int]


class RecognitionUnavailable(RuntimeError):
    """dlib or the face_recognition_models files are missing."""


def models_dir() -> Path:
    """The ``models/`` folder of the installed ``face_recognition_models`` package."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise RecognitionUnavailable(
            "face_recognition_models is not installed: pip install face-recognition-models")
    d = Path(list(spec.submodule_search_locations)[0]) / "models"
    missing = [f for f in _MODEL_FILES.values() if not (d / f).is_file()]
    if missing:
        raise RecognitionUnavailable(f"face_recognition_models at {d} lacks {', '.join(missing)}")
    return d


def _import_dlib():
    try:
        import dlib
    except ImportError:
        raise RecognitionUnavailable("dlib is not installed: pip install dlib-bin") from None
    return dlib


def distance(a: np.ndarray, b: np.ndarray) -> np.ndarray | float:
    """Euclidean distance between descriptors. a: (128,) or (N, 128); b: (128,) or (M, 128).

    Two vectors -> float; otherwise broadcast to (N,), (M,) or (N, M).
    """
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    if a.ndim == 1 and b.ndim == 1:
        return float(np.linalg.norm(a - b))
    if a.ndim == 2 and b.ndim == 2:
        return np.linalg.norm(a[:, None, :] - b[None, :, :], axis=-1)
    return np.linalg.norm(a - b, axis=-1)


def mouth_opening68(pts: np.ndarray) -> float:
    """Inner-lip gap (iBUG points 61-63 to 67-65) over the inter-ocular distance (36 to 45); 0 for
    closed lips. pts: (68, 2)."""
    pts = np.asarray(pts, np.float64)
    gap = np.linalg.norm(pts[[61, 62, 63]] - pts[[67, 66, 65]], axis=1).mean()
    return float(gap / max(np.linalg.norm(pts[36] - pts[45]), 1e-6))


def _area(box: Box) -> int:
    return max(0, box[2] - box[0]) * max(0, box[3] - box[1])


class FaceRecognizer:
    """HOG detector + 5-point shape predictor + dlib ResNet descriptor (lazy, loaded once), and
    dlib's 68-point predictor for :meth:`mouth_opening` (loaded on its first use).

    ``upsample``: HOG detector upsampling (1 finds faces down to ~40 px).
    ``jitter``: dlib ``num_jitters`` (1 = no jitter; larger is slower and slightly steadier).
    """

    def __init__(self, upsample: int = 1, jitter: int = 1):
        self.upsample = upsample
        self.jitter = jitter
        self._dlib = None
        self._detector = self._shape = self._net = self._shape68 = None

    def _load(self) -> None:
        if self._net is not None:
            return
        dlib = _import_dlib()
        d = models_dir()
        self._dlib = dlib
        self._detector = dlib.get_frontal_face_detector()
        self._shape = dlib.shape_predictor(str(d / _MODEL_FILES["shape5"]))
        self._net = dlib.face_recognition_model_v1(str(d / _MODEL_FILES["recognition"]))

    @staticmethod
    def _rgb(rgb: np.ndarray) -> np.ndarray:
        rgb = np.asarray(rgb)
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"expected an RGB uint8 image (H, W, 3), got {rgb.dtype} {rgb.shape}")
        return np.ascontiguousarray(rgb)

    def detect(self, rgb: np.ndarray) -> list[Box]:
        """Face boxes (x0, y0, x1, y1), clipped to the image, largest first."""
        self._load()
        rgb = self._rgb(rgb)
        h, w = rgb.shape[:2]
        boxes = []
        for r in self._detector(rgb, self.upsample):
            b = (max(0, r.left()), max(0, r.top()), min(w, r.right() + 1), min(h, r.bottom() + 1))
            if _area(b) > 0:
                boxes.append(b)
        return sorted(boxes, key=_area, reverse=True)

    def _descriptor(self, rgb: np.ndarray, box: Box) -> np.ndarray:
        dlib = self._dlib
        rect = dlib.rectangle(int(box[0]), int(box[1]), int(box[2]) - 1, int(box[3]) - 1)
        shape = self._shape(rgb, rect)
        chip = dlib.get_face_chip(rgb, shape, size=CHIP_SIZE, padding=0.25)
        return np.asarray(self._net.compute_face_descriptor(chip, self.jitter), np.float32)

    def embed(self, rgb: np.ndarray, box: Box | None = None) -> np.ndarray | None:
        """(128,) float32 descriptor of the face in ``box`` (None: the largest detected face).

        Returns None when ``box`` is None and no face is detected.
        """
        self._load()
        rgb = self._rgb(rgb)
        if box is None:
            boxes = self.detect(rgb)
            if not boxes:
                return None
            box = boxes[0]
        return self._descriptor(rgb, box)

    def mouth_opening(self, rgb: np.ndarray, box: Box) -> float:
        """:func:`mouth_opening68` of the face in ``box``, read by dlib's 68-point predictor."""
        self._load()
        if self._shape68 is None:
            self._shape68 = self._dlib.shape_predictor(str(models_dir() / PREDICTOR68))
        rect = self._dlib.rectangle(int(box[0]), int(box[1]), int(box[2]) - 1, int(box[3]) - 1)
        shape = self._shape68(self._rgb(rgb), rect)
        return mouth_opening68(np.array([(shape.part(i).x, shape.part(i).y) for i in range(68)], np.float64))

    def embed_all(self, rgb: np.ndarray) -> list[tuple[Box, np.ndarray]]:
        """Every detected face, largest first: [(box, (128,) float32)]."""
        self._load()
        rgb = self._rgb(rgb)
        return [(b, self._descriptor(rgb, b)) for b in self.detect(rgb)]

