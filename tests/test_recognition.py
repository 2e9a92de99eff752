"""dlib recognition on real LFW photos of a person NOT in EVAL_IDENTITIES (skipped without data)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import needs_dlib

from safefm.paths import shared_data_dir
from safefm import recognition as rec
from safefm.media import read_image


def _two_photo_person():
    lfw = shared_data_dir() / "lfw"
    if not lfw.is_dir():
        return None
    evals = set((lfw / "EVAL_IDENTITIES.txt").read_text().split())
    for d in sorted(p for p in lfw.iterdir() if p.is_dir()):
        if d.name in evals:
            continue
        photos = sorted(d.glob("*.jpg"))
        if len(photos) >= 2:
            return photos
    return None


PHOTOS = _two_photo_person()
needs_data = pytest.mark.skipif(PHOTOS is None, reason="shared LFW data absent")


def test_distance():
    a = np.zeros(128, np.float32); a[0] = 1
    b = np.zeros(128, np.float32); b[1] = 1
    assert rec.distance(a, a) == 0.0
    assert rec.distance(a, b) == pytest.approx(np.sqrt(2))
    assert rec.distance(np.stack([a, b]), np.stack([a, b, a])).shape == (2, 3)


@needs_dlib
def test_no_face_returns_none():
    r = rec.FaceRecognizer()
    assert r.embed(np.full((120, 120, 3), 127, np.uint8)) is None
    assert r.embed_all(np.zeros((80, 80, 3), np.uint8)) == []


@needs_data
@needs_dlib
def test_real_photos_same_person():
    r = rec.FaceRecognizer()
    img_a, img_b = read_image(PHOTOS[0]), read_image(PHOTOS[1])
    boxes = r.detect(img_a)
    assert boxes and all(0 <= b[0] < b[2] <= img_a.shape[1] for b in boxes)
    ea = r.embed(img_a)
    assert ea is not None and ea.shape == (128,) and ea.dtype == np.float32
    assert rec.distance(ea, r.embed(img_a)) == 0.0
    assert rec.distance(ea, r.embed(img_a, boxes[0])) == 0.0
    eb = r.embed(img_b)
    assert eb is not None
    assert rec.distance(ea, eb) < 0.75  # same person: typically < 0.6
    assert len(r.embed_all(img_a)) >= 1


def test_mouth_opening_is_the_inner_lip_gap_over_the_eye_corners_distance():
    pts = np.zeros((68, 2))
    pts[36], pts[45] = (0.0, 0.0), (100.0, 0.0)                 # eye corners 100 px apart
    pts[[61, 62, 63], 1], pts[[67, 66, 65], 1] = 50.0, (56.0, 62.0, 56.0)
    assert rec.mouth_opening68(pts) == pytest.approx(8.0 / 100.0)
    pts[[67, 66, 65], 1] = 50.0                                 # lips together
    assert rec.mouth_opening68(pts) == 0.0


@needs_dlib
def test_the_recogniser_reads_an_open_and_a_closed_mouth_apart():
    from conftest import VIDEOS, read_frames

    if not VIDEOS.is_dir():
        pytest.skip("../shared/data not present")
    frames = read_frames(VIDEOS / "liveportrait_d12.mp4", 20)   # frame 0: lips closed; 19: talking
    r = rec.FaceRecognizer(upsample=0)
    closed, talking = (r.mouth_opening(f, r.detect(f)[0]) for f in (frames[0], frames[19]))
    assert closed < 0.04 and talking > 0.12
