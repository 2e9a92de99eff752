"""Shared fixtures. Tests that need ../shared/data skip cleanly when it is absent."""

from __future__ import annotations

import os

import cv2
import numpy as np
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("PYSTRAY_BACKEND", "dummy")

from safefm.paths import shared_data_dir  # noqa: E402

DATA = shared_data_dir()
VIDEOS = DATA / "videos"
needs_data = pytest.mark.skipif(not VIDEOS.is_dir(), reason="../shared/data not present")


def have_dlib() -> bool:
    """Whether dlib and its face_recognition_models weights can be loaded."""
    from safefm import recognition

    try:
        recognition.models_dir()
        recognition._import_dlib()
        return True
    except recognition.RecognitionUnavailable:
        return False


needs_dlib = pytest.mark.skipif(not have_dlib(), reason="dlib or face_recognition_models missing")


def read_frames(path, n: int, step: int = 1, max_side: int | None = None) -> list[np.ndarray]:
    """The first ``n`` frames (every ``step``-th) of a video as RGB uint8."""
    cap = cv2.VideoCapture(str(path))
    frames, i = [], 0
    while len(frames) < n:
        ok, bgr = cap.read()
        if not ok:
            break
        if i % step == 0:
            if max_side and max(bgr.shape[:2]) > max_side:
                s = max_side / max(bgr.shape[:2])
                bgr = cv2.resize(bgr, None, fx=s, fy=s, interpolation=cv2.INTER_AREA)
            frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
        i += 1
    cap.release()
    return frames


@pytest.fixture(scope="session")
def clip_frames():
    """40 frames of a talking-face clip (every 2nd frame of liveportrait_d0)."""
    if not VIDEOS.is_dir():
        pytest.skip("../shared/data not present")
    return read_frames(VIDEOS / "liveportrait_d0.mp4", 40, step=2)
