"""Baseline "anonymizers" evaluated next to SAFE-FM by the same code (``safefm-eval``).

Each engine has the :class:`safefm.engine.Engine` contract: ``process(frame_rgb, timestamp)
-> FrameResult``, ``reset()``, ``close()``.

- :class:`NoAnonymization` (``none``): returns the frame unchanged (``anonymized=False``,
  no faces): the upper bound for fidelity and the lower bound for privacy.
- :class:`BlurEngine` (``blur``) and :class:`PixelateEngine` (``pixelate``): find the faces
  with MediaPipe FaceMesh (same detector and settings as the engine) and blur or pixelate each
  face's landmark box grown by ``margin``. Naive on purpose: a frame where FaceMesh finds no
  face is returned unchanged (no hold, no placeholder), as a simple blur tool would.
"""

from __future__ import annotations

import time

import cv2
import numpy as np

from ..config import RuntimeConfig
from ..face.landmarks import face_box
from ..results import ANONYMIZED, FaceResult, FrameResult

BASELINES = ("none", "blur", "pixelate")


def blur_box(image: np.ndarray, box, sigma_frac: float = 0.1) -> np.ndarray:
    """Gaussian blur of ``box`` in an (H, W, 3) uint8 image, in place (returned).
    sigma = ``sigma_frac`` x the box's longer side (0.1: strong, features unreadable).

    Large sigmas are computed on a copy downscaled so that sigma is 4 px there, then scaled
    back (bilinear): the same look as a full-size blur, ~100x cheaper."""
    x0, y0, x1, y1 = box
    roi = image[y0:y1, x0:x1]
    if roi.size == 0:
        return image
    h, w = roi.shape[:2]
    sigma = max(0.5, sigma_frac * max(h, w))
    f = max(1.0, sigma / 4.0)
    small = roi if f == 1.0 else cv2.resize(roi, (max(1, round(w / f)), max(1, round(h / f))),
                                            interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (0, 0), sigmaX=sigma / f, sigmaY=sigma / f,
                             borderType=cv2.BORDER_REPLICATE)
    image[y0:y1, x0:x1] = small if f == 1.0 else cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    return image


def pixelate_box(image: np.ndarray, box, blocks: int = 8) -> np.ndarray:
    """Pixelate ``box`` of an (H, W, 3) uint8 image into ``blocks`` cells along its longer
    side (area-averaged cells, nearest upscaling), in place (returned)."""
    x0, y0, x1, y1 = box
    roi = image[y0:y1, x0:x1]
    if roi.size == 0:
        return image
    h, w = roi.shape[:2]
    cell = max(h, w) / max(1, blocks)
    small = cv2.resize(roi, (max(1, round(w / cell)), max(1, round(h / cell))),
                       interpolation=cv2.INTER_AREA)
    image[y0:y1, x0:x1] = cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)
    return image


class NoAnonymization:
    """The identity map: ``FrameResult(image=frame copy, faces=[], anonymized=False)``."""

    name = "none"

    def __init__(self, cfg: RuntimeConfig | None = None, video: bool = True):
        self.cfg, self.video = cfg, video

    def process(self, frame: np.ndarray, timestamp: float | None = None) -> FrameResult:
        t0 = time.perf_counter()
        out = frame.copy()
        timings = {"landmarks": 0.0, "retarget_heatmaps": 0.0, "generator": 0.0, "decode": 0.0,
                   "composite": time.perf_counter() - t0, "generator_steps": 0}
        return FrameResult(image=out, faces=[], timings=timings, anonymized=False)

    def reset(self) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _BoxEngine(NoAnonymization):
    """Detect faces with FaceMesh, then :meth:`_apply` a filter to each grown landmark box."""

    def __init__(self, cfg: RuntimeConfig | None = None, video: bool = True, *,
                 margin: float = 0.1, detector=None):
        super().__init__(cfg or RuntimeConfig(), video)
        self.margin = margin
        self._detector = detector
        self._owns_detector = detector is None

    @property
    def detector(self):
        if self._detector is None:
            from ..face.landmarks import FaceMeshDetector

            c = self.cfg
            self._detector = FaceMeshDetector(
                max_faces=c.max_faces, static_image=not self.video,
                min_detection_confidence=c.min_detection_confidence,
                min_tracking_confidence=c.min_tracking_confidence)
        return self._detector

    def _apply(self, image: np.ndarray, box) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def process(self, frame: np.ndarray, timestamp: float | None = None) -> FrameResult:
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise ValueError(f"frame must be (H, W, 3) uint8 RGB, got {frame.shape} {frame.dtype}")
        t0 = time.perf_counter()
        faces = self.detector.detect(frame)
        t1 = time.perf_counter()
        out = frame.copy()
        results = []
        for i, lm in enumerate(faces):
            box = face_box(lm, out.shape, self.margin)
            self._apply(out, box)
            results.append(FaceResult(i, box, ANONYMIZED, lm))
        timings = {"landmarks": t1 - t0, "retarget_heatmaps": 0.0, "generator": 0.0, "decode": 0.0,
                   "composite": time.perf_counter() - t1, "generator_steps": 0}
        return FrameResult(image=out, faces=results, timings=timings)

    def reset(self) -> None:
        # MediaPipe's tracker has no reset: a fresh detector forgets the last clip.
        if self._owns_detector and self._detector is not None:
            self._detector.close()
            self._detector = None

    def close(self) -> None:
        if self._owns_detector and self._detector is not None:
            self._detector.close()
            self._detector = None


class BlurEngine(_BoxEngine):
    """Gaussian blur of each face box (sigma = ``sigma_frac`` x box side)."""

    name = "blur"

    def __init__(self, cfg: RuntimeConfig | None = None, video: bool = True, *,
                 sigma_frac: float = 0.1, margin: float = 0.1, detector=None):
        super().__init__(cfg, video, margin=margin, detector=detector)
        self.sigma_frac = sigma_frac

    def _apply(self, image, box):
        blur_box(image, box, self.sigma_frac)


class PixelateEngine(_BoxEngine):
    """Pixelation of each face box into ``blocks`` cells along its longer side."""

    name = "pixelate"

    def __init__(self, cfg: RuntimeConfig | None = None, video: bool = True, *,
                 blocks: int = 8, margin: float = 0.1, detector=None):
        super().__init__(cfg, video, margin=margin, detector=detector)
        self.blocks = blocks

    def _apply(self, image, box):
        pixelate_box(image, box, self.blocks)


def build_baseline(name: str, cfg: RuntimeConfig | None = None, video: bool = True):
    """``none``, ``blur`` or ``pixelate`` with the default strengths."""
    kinds = {"none": NoAnonymization, "blur": BlurEngine, "pixelate": PixelateEngine}
    if name not in kinds:
        raise ValueError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}")
    return kinds[name](cfg, video=video)
