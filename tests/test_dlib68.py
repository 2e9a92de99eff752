"""Known answers for the second landmarker's features (safefm.eval.dlib68)."""

import math

import cv2
import numpy as np
import pytest

from conftest import needs_dlib
from safefm.eval.dlib68 import _PNP_INDEX, _PNP_MODEL, Dlib68, FEATURES68, features68, head_pose68


def _face(mouth_gap=0.0, eye_gap=10.0):
    pts = np.zeros((68, 2))
    pts[36], pts[39], pts[42], pts[45] = (100, 100), (140, 100), (160, 100), (200, 100)
    for first in (36, 42):
        x0 = pts[first, 0]
        pts[first + 1], pts[first + 2] = (x0 + 13, 100 - eye_gap / 2), (x0 + 27, 100 - eye_gap / 2)
        pts[first + 5], pts[first + 4] = (x0 + 13, 100 + eye_gap / 2), (x0 + 27, 100 + eye_gap / 2)
    for top, bottom, x in ((61, 67, 135), (62, 66, 150), (63, 65, 165)):
        pts[top], pts[bottom] = (x, 180 - mouth_gap / 2), (x, 180 + mouth_gap / 2)
    return pts


def test_mouth_and_eye_opening_have_exact_answers():
    f = dict(zip(FEATURES68, features68(_face(mouth_gap=20.0, eye_gap=10.0), (300, 300))))
    assert f["mouth_open"] == pytest.approx(20.0 / 100.0)
    assert f["eye_open_r"] == pytest.approx(20.0 / 80.0) and f["eye_open_l"] == pytest.approx(0.25)
    assert features68(_face(mouth_gap=0.0), (300, 300))[0] == 0.0
    assert np.isnan(features68(None, (300, 300))).all()
    tilted = _face()
    tilted[45] = (200, 100 + 100 * math.tan(math.radians(8)))   # outer corners 100 px apart
    assert features68(tilted, (300, 300))[5] == pytest.approx(8.0)


def _ry(a):
    return np.array([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])


def _rx(a):
    return np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])


def _rz(a):
    return np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])


@pytest.mark.parametrize("yaw,pitch,roll", [(0, 0, 0), (20, 0, 0), (0, -15, 0), (0, 0, 10), (15, 10, -5)])
def test_head_pose_recovers_a_known_rotation(yaw, pitch, roll):
    """Project the generic face with a known rotation, then read the angles back."""
    w = h = 512
    cam = np.array([[w, 0, w / 2], [0, w, h / 2], [0, 0, 1.0]])
    model = _PNP_MODEL * np.array([1.0, -1.0, -1.0])
    y, p, r = (math.radians(a) for a in (yaw, pitch, roll))
    rot = _ry(-y) @ _rx(-p) @ _rz(r)            # the convention of safefm.eval.metrics.rotation_to_euler
    img, _ = cv2.projectPoints(model, cv2.Rodrigues(rot)[0], np.array([0, 0, 600.0]), cam, np.zeros(4))
    pts = np.zeros((68, 2))
    pts[list(_PNP_INDEX)] = img.reshape(-1, 2)
    got = head_pose68(pts, (h, w))
    assert got == pytest.approx((yaw, pitch, roll), abs=0.5)


@needs_dlib
def test_dlib_reads_a_real_face_and_refuses_a_box_with_none(clip_frames):
    d = Dlib68()
    first_frame_rgb = clip_frames[0]
    pts = d.points(first_frame_rgb)
    assert pts is not None and pts.shape == (68, 2)
    f = dict(zip(FEATURES68, d.features(first_frame_rgb)))
    assert 0.15 < f["eye_open_r"] < 0.5 and abs(f["roll"]) < 20
    assert d.points(first_frame_rgb, near=(0, 0, 20, 20)) is None
    # Faces found by the recogniser's detector (same upsampling) give the same points.
    from safefm.recognition import FaceRecognizer

    boxes = FaceRecognizer(upsample=d.upsample).detect(first_frame_rgb)
    assert np.array_equal(d.points(first_frame_rgb, boxes=boxes), pts)
    assert d.points(first_frame_rgb, boxes=[]) is None
