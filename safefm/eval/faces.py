"""Finding and embedding faces in evaluation frames. :class:`DlibCache` wraps the dlib
recogniser and remembers every detection and embedding by image content, so an image seen
twice (the ``none`` method's output is its input) is embedded once; :meth:`DlibCache.output`
embeds an anonymized output at the detected face that lies on the source face, or, when none
does, at the source face's box ("located"); :meth:`DlibCache.features68` reads dlib's 68-point
expression features (:mod:`safefm.eval.dlib68`) at the faces the same detector found.
:func:`mediapipe_faces` and :func:`pick_face`
find the FaceMesh face that lies on a reference box.
"""

from __future__ import annotations

import hashlib

import numpy as np

from . import metrics as M
from .dlib68 import Dlib68
from ..face.landmarks import face_box


class DlibCache:
    """dlib detection and embedding with a cache keyed by image content (and box)."""

    def __init__(self, upsample: int):
        from ..recognition import FaceRecognizer

        self.rec = FaceRecognizer(upsample=upsample)
        self.d68 = Dlib68(upsample=upsample)
        self._det: dict = {}
        self._emb: dict = {}

    @staticmethod
    def _key(rgb: np.ndarray) -> bytes:
        return hashlib.sha1(np.ascontiguousarray(rgb).data).digest() + bytes(str(rgb.shape), "ascii")

    def detect(self, rgb: np.ndarray, key: bytes | None = None) -> list:
        key = key or self._key(rgb)
        if key not in self._det:
            self._det[key] = self.rec.detect(rgb)
        return self._det[key]

    def embed(self, rgb: np.ndarray, box, key: bytes | None = None) -> np.ndarray:
        k = (key or self._key(rgb), tuple(int(v) for v in box))
        if k not in self._emb:
            self._emb[k] = self.rec.embed(rgb, tuple(int(v) for v in box))
        return self._emb[k]

    def output(self, rgb: np.ndarray, src_box) -> tuple[np.ndarray, bool]:
        """(embedding, detected): at the detected face on ``src_box``, else located at ``src_box``."""
        key = self._key(rgb)
        hit = next((b for b in self.detect(rgb, key) if M.same_face(b, src_box)), None)
        return self.embed(rgb, hit if hit is not None else src_box, key), hit is not None

    def features68(self, rgb: np.ndarray, src_box) -> np.ndarray:
        """(len(FEATURES68),) dlib-68 features of the detected face nearest ``src_box`` (NaN if
        none lies near it); the detection is the cached one the embeddings use."""
        return self.d68.features(rgb, near=src_box, boxes=self.detect(rgb))


def mediapipe_faces(detector, rgb: np.ndarray) -> list[tuple[np.ndarray, tuple]]:
    """[(landmarks, tight landmark box)] of every face ``detector`` (FaceMesh) finds in ``rgb``."""
    return [(lm, face_box(lm, rgb.shape)) for lm in detector.detect(rgb)]


def pick_face(found, ref_box):
    """The (landmarks, box) in ``found`` on ``ref_box`` nearest its centre (None if none);
    with no ``ref_box``, the largest face."""
    if ref_box is None:
        return max(found, key=lambda f: (f[1][2] - f[1][0]) * (f[1][3] - f[1][1]), default=None)
    cx, cy = (ref_box[0] + ref_box[2]) / 2, (ref_box[1] + ref_box[3]) / 2
    ok = [f for f in found if M.same_face(f[1], ref_box)]
    return min(ok, key=lambda f: abs((f[1][0] + f[1][2]) / 2 - cx) + abs((f[1][1] + f[1][3]) / 2 - cy),
               default=None)
