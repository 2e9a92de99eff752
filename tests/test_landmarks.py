"""Landmarks: FaceMesh detection, One-Euro smoothing and the face tracker."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import needs_data

from safefm.face.alignment import load_template
from safefm.config import RuntimeConfig
from safefm.errors import InputError
from safefm.face.landmarks import FaceMeshDetector, FaceTracker, OneEuroFilter, face_box

FPS = 30.0


def face_at(x: float, y: float, width: float = 120.0) -> np.ndarray:
    """Template face (478, 3) in frame pixels, centred near (x, y), ``width`` px across the crop."""
    t = load_template() - 0.5
    return (t * width + np.array([x, y, 0.0])).astype(np.float32)


# -- One-Euro filter ---------------------------------------------------------------------------

def test_one_euro_removes_jitter_of_a_still_face():
    rng = np.random.default_rng(0)
    f = OneEuroFilter(min_cutoff=1.0, beta=0.05)
    still = np.full((478, 3), 100.0)
    out = np.array([f(still + rng.normal(0, 1.0, still.shape), i / FPS) for i in range(60)])
    assert out[20:].std(axis=0).mean() < 0.35                       # input jitter std is 1.0


def test_one_euro_follows_fast_motion_with_little_lag():
    f = OneEuroFilter(min_cutoff=1.0, beta=0.05)
    lagless = OneEuroFilter(min_cutoff=1.0, beta=0.0)
    speed = 600.0                                                   # px / s: a quick head move
    errs, errs0 = [], []
    for i in range(30):
        x = np.array([speed * i / FPS])
        errs.append(abs(f(x, i / FPS)[0] - x[0]))
        errs0.append(abs(lagless(x, i / FPS)[0] - x[0]))
    assert errs[-1] < 3.0                                           # pixels behind
    assert errs[-1] < 0.25 * errs0[-1]                              # beta is what removes the lag


def test_one_euro_reset_and_time_going_backwards_restart_the_filter():
    f = OneEuroFilter()
    f(np.zeros(3), 0.0)
    f(np.zeros(3), 0.1)
    jump = np.full(3, 50.0)
    assert f(jump, 0.1)[0] == pytest.approx(50.0)                   # same time: restart, no smoothing
    f(np.zeros(3), 0.2)
    f.reset()
    assert f(jump, 0.3)[0] == pytest.approx(50.0)
    with pytest.raises(ValueError):
        OneEuroFilter(min_cutoff=0.0)


# -- face_box ------------------------------------------------------------------------------------

def test_face_box_covers_the_landmarks_and_grows_with_margin():
    lm = face_at(200, 150)
    x0, y0, x1, y1 = face_box(lm)
    assert x0 <= lm[:, 0].min() and lm[:, 0].max() < x1
    assert y0 <= lm[:, 1].min() and lm[:, 1].max() < y1
    gx0, gy0, gx1, gy1 = face_box(lm, margin=0.25)
    assert gx1 - gx0 == pytest.approx(1.5 * (x1 - x0), abs=3) and gx0 < x0 and gy1 > y1
    assert all(isinstance(v, int) for v in (gx0, gy0, gx1, gy1))
    # with the frame's shape: clipped to it, and a face past its edge gives an empty box
    assert face_box(lm, (150, 200, 3), margin=0.25) == (gx0, gy0, 200, 150)
    assert face_box(lm - (400, 0, 0), (300, 300)) == (0, y0, 0, y1)


# -- tracker -------------------------------------------------------------------------------------

def test_tracks_keep_their_ids_as_faces_move_and_swap_order():
    tr = FaceTracker(RuntimeConfig())
    matched, lost = tr.update([face_at(100, 100), face_at(400, 120)], 0.0)
    assert [t.id for t in matched] == [0, 1] and all(t.is_new for t in matched) and lost == []
    matched, _ = tr.update([face_at(410, 125), face_at(108, 96)], 1 / FPS)   # moved, order swapped
    assert [t.id for t in matched] == [1, 0]
    assert not any(t.is_new for t in matched) and [t.age for t in matched] == [2, 2]
    assert matched[0].landmarks.shape == (478, 3) and matched[0].landmarks.dtype == np.float32


def test_a_lost_face_is_remembered_then_forgotten_and_ids_never_repeat():
    cfg = RuntimeConfig(hold_frames=2, placeholder_frames=3)
    tr = FaceTracker(cfg)
    tr.update([face_at(100, 100)], 0.0)
    for k in range(1, 6):                                           # missing 1..5 = hold + placeholder
        matched, lost = tr.update([], k / FPS)
        assert matched == [] and [(t.id, t.missing) for t in lost] == [(0, k)]
    matched, lost = tr.update([], 6 / FPS)                          # missing 6 > 5: forgotten
    assert lost == []
    matched, _ = tr.update([face_at(100, 100)], 7 / FPS)
    assert [t.id for t in matched] == [1] and matched[0].is_new
    tr.reset()
    matched, _ = tr.update([face_at(100, 100)], 8 / FPS)
    assert [t.id for t in matched] == [2]


def test_a_face_that_comes_back_within_the_hold_keeps_its_id():
    tr = FaceTracker(RuntimeConfig())
    tr.update([face_at(100, 100)], 0.0)
    tr.update([], 1 / FPS)
    matched, lost = tr.update([face_at(105, 100)], 2 / FPS)
    assert [t.id for t in matched] == [0] and matched[0].missing == 0 and lost == []


def test_a_face_that_jumps_far_is_a_new_track():
    tr = FaceTracker(RuntimeConfig(track_max_distance=0.5))
    tr.update([face_at(100, 100)], 0.0)
    matched, lost = tr.update([face_at(400, 100)], 1 / FPS)        # 300 px > 0.5 x ~80 px face
    assert [t.id for t in matched] == [1] and [t.id for t in lost] == [0]


def test_tracker_smooths_landmark_jitter():
    rng = np.random.default_rng(1)
    tr = FaceTracker(RuntimeConfig())
    base = face_at(200, 200)
    out = []
    for i in range(40):
        (t,), _ = tr.update([base + rng.normal(0, 1.0, base.shape).astype(np.float32)], i / FPS)
        out.append(t.landmarks)
        assert np.abs(t.raw - base).max() > 1.0                     # raw stays as detected
    assert np.std(out[15:], axis=0).mean() < 0.4


# -- detector (real MediaPipe) ---------------------------------------------------------------

def test_detector_rejects_bad_input_and_finds_nothing_in_a_blank_image():
    with FaceMeshDetector(max_faces=1, static_image=True) as det:
        assert det.detect(np.full((240, 320, 3), 127, np.uint8)) == []
        with pytest.raises(InputError, match="uint8"):
            det.detect(np.zeros((240, 320, 3), np.float32))
        with pytest.raises(InputError):
            det.detect(np.zeros((240, 320), np.uint8))
    with pytest.raises(InputError, match="closed"):
        det.detect(np.zeros((240, 320, 3), np.uint8))


@needs_data
@pytest.mark.shared
def test_detector_returns_pixel_landmarks_of_a_real_face(clip_frames):
    frame = clip_frames[0]
    h, w = frame.shape[:2]
    with FaceMeshDetector(max_faces=2, static_image=True) as det:
        faces = det.detect(frame)
    assert len(faces) == 1
    lm = faces[0]
    assert lm.shape == (478, 3) and lm.dtype == np.float32
    assert 0 <= lm[:, 0].min() and lm[:, 0].max() < w and 0 <= lm[:, 1].min() and lm[:, 1].max() < h
    width = lm[454, 0] - lm[234, 0]
    assert width > 0.1 * w                                          # a face, in pixels
    assert lm[1, 2] < lm[234, 2] and lm[1, 2] < lm[454, 2]          # nose tip nearer than the face sides
    assert 0.1 * width < lm[234, 2] - lm[1, 2] < 1.0 * width        # z is in pixel scale
    assert lm[33, 0] < lm[263, 0]                                   # image-left eye is index 33


@needs_data
@pytest.mark.shared
def test_tracking_a_real_clip_keeps_one_id(clip_frames):
    tr = FaceTracker(RuntimeConfig())
    ids = set()
    with FaceMeshDetector(max_faces=2) as det:
        for i, frame in enumerate(clip_frames[:20]):
            matched, lost = tr.update(det.detect(frame), i * 2 / 25.0)
            ids |= {t.id for t in matched}
            assert len(matched) == 1 and lost == []
    assert ids == {0}


@needs_data
@pytest.mark.shared
def test_two_real_faces_side_by_side_get_two_tracks(clip_frames):
    pair = np.ascontiguousarray(np.hstack([clip_frames[0], clip_frames[-1]]))
    w = clip_frames[0].shape[1]
    with FaceMeshDetector(max_faces=4, static_image=True) as det:
        faces = det.detect(pair)
    assert len(faces) == 2
    centres = sorted(float(f[:, 0].mean()) for f in faces)
    assert centres[0] < w < centres[1]
    matched, _ = FaceTracker(RuntimeConfig()).update(faces, 0.0)
    assert sorted(t.id for t in matched) == [0, 1]


@needs_data
@pytest.mark.shared
def test_reset_makes_a_video_detector_start_afresh(clip_frames):
    """After ``reset`` (a new file in a batch worker), the next frame is read exactly as a new
    detector reads it: nothing of the previous video's tracking carries over."""
    nxt = clip_frames[30]
    with FaceMeshDetector(max_faces=2) as fresh:
        expected = fresh.detect(nxt)
    with FaceMeshDetector(max_faces=2) as det:
        for frame in clip_frames[:10]:
            det.detect(frame)
        carried = det.detect(nxt)
        det.reset()
        got = det.detect(nxt)
    assert len(expected) == 1 and len(got) == 1
    assert np.abs(carried[0] - expected[0]).max() > 0.01            # tracking does carry state over ...
    np.testing.assert_array_equal(got[0], expected[0])              # ... and reset clears it
