"""Known-answer tests of safefm.eval.metrics and the baseline filters (safefm.eval.baselines)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import have_dlib

from safefm.eval import metrics as M
from safefm.face.alignment import load_template
from safefm.face.landmarks import clip_box, face_box
from safefm.eval.baselines import PixelateEngine, blur_box, pixelate_box

SCALE, OFFSET = 200.0, np.array([60.0, 40.0, 0.0])


def face(scale: float = SCALE) -> np.ndarray:
    """A synthetic frontal face: the mean template in pixels, (478, 3) float32."""
    return (load_template().astype(np.float64) * scale + OFFSET).astype(np.float32)


def rotate(lm: np.ndarray, yaw=0.0, pitch=0.0, roll=0.0) -> np.ndarray:
    """Rotate landmarks about their centroid by R = Ry(-yaw) Rx(-pitch) Rz(roll) (degrees)."""
    a, b, c = (math.radians(v) for v in (-yaw, -pitch, roll))
    ry = np.array([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    mu = lm.mean(axis=0)
    return ((lm - mu) @ (ry @ rx @ rz).T + mu).astype(np.float32)


# -- landmark features ---------------------------------------------------------------------

def test_frontal_template_has_zero_pose():
    yaw, pitch, roll = M.head_pose(face())
    assert abs(yaw) < 1e-3 and abs(pitch) < 1e-3 and abs(roll) < 1e-3


@pytest.mark.parametrize("yaw,pitch,roll", [(20, 0, 0), (-35, 0, 0), (0, 15, 0), (0, 0, -25), (25, -10, 8)])
def test_head_pose_recovers_known_rotation(yaw, pitch, roll):
    got = M.head_pose(rotate(face(), yaw, pitch, roll))
    assert got == pytest.approx((yaw, pitch, roll), abs=1e-3)


def test_yaw_sign_follows_the_nose_in_the_image():
    # Turn the head about the vertical axis so that the nose tip moves to the image's right.
    lm = face()
    turned = rotate(lm, yaw=30)
    nose = M.IDX["nose_tip"]
    assert turned[nose, 0] > lm[nose, 0] + 5          # the nose went right...
    assert M.head_pose(turned)[0] == pytest.approx(30, abs=1e-3)  # ...and yaw is positive
    assert M.head_pose(rotate(lm, yaw=-30))[0] < 0
    up = rotate(lm, pitch=20)
    assert up[nose, 1] < lm[nose, 1]                  # pitch > 0: nose moved up
    cw = rotate(lm, roll=20)                          # roll > 0: clockwise on screen (y down)
    assert cw[M.IDX["eye_outer_l"], 1] > lm[M.IDX["eye_outer_l"], 1]


def test_features_do_not_depend_on_face_size_or_rotation():
    f0 = M.expression_features(face())
    f1 = M.expression_features(face(scale=90))
    assert f1 == pytest.approx(f0, abs=1e-4)
    fr = M.expression_features(rotate(face(), yaw=25, pitch=-10))
    for name in ("mouth_open", "eye_open_r", "eye_open_l", "brow_raise"):
        j = M.FEATURES.index(name)
        assert fr[j] == pytest.approx(f0[j], rel=1e-4)


def test_mouth_opening_grows_when_lips_separate():
    lm = face()
    base = M.mouth_opening(lm)
    opened = lm.copy()
    opened[M.IDX["lip_lo"], 1] += 20
    opened[M.IDX["lip_up"], 1] -= 5
    iod = M.inter_ocular(lm)
    assert M.mouth_opening(opened) > base + 20 / iod * 0.9
    wider = opened.copy()
    wider[M.IDX["lip_lo"], 1] += 20
    assert M.mouth_opening(wider) > M.mouth_opening(opened)


def test_eye_opening_and_brow_raise():
    lm = face()
    closed = lm.copy()
    closed[M.IDX["lid_up_r"]] = closed[M.IDX["lid_lo_r"]]
    assert M.eye_opening(closed, "r") == 0.0
    assert M.eye_opening(closed, "l") == pytest.approx(M.eye_opening(lm, "l"))
    raised = lm.copy()
    raised[list(M.BROW_R) + list(M.BROW_L), 1] -= 10
    assert M.brow_raise(raised) > M.brow_raise(lm)


def test_gaze_follows_the_irises():
    lm = face()
    gx0, gy0 = M.gaze(lm)
    assert abs(gx0) < 0.15 and abs(gy0) < 0.15
    right = lm.copy()
    right[468:478, 0] += 6
    assert M.gaze(right)[0] > gx0 + 0.1
    down = lm.copy()
    down[468:478, 1] += 4
    assert M.gaze(down)[1] > gy0 + 0.05


def test_missing_face_gives_nan_row():
    s = M.feature_series([face(), None, face()])
    assert s.shape == (3, len(M.FEATURES))
    assert np.isnan(s[1]).all() and np.isfinite(s[[0, 2]]).all()


# -- series comparison ---------------------------------------------------------------------

def test_pearson_and_mae_known_answers():
    a = np.arange(10.0)
    assert M.pearson(a, 3 * a + 1) == pytest.approx(1.0)
    assert M.pearson(a, -a) == pytest.approx(-1.0)
    assert math.isnan(M.pearson(a, np.ones(10)))          # constant: undefined
    assert math.isnan(M.pearson([1.0, 2.0], [1.0, 2.0]))  # too short
    b = a.copy()
    b[3] = np.nan
    assert M.pearson(a, b) == pytest.approx(1.0)          # NaN frames skipped
    assert M.mae(a, a + 2) == pytest.approx(2.0)
    assert math.isnan(M.mae([np.nan], [1.0]))


def test_compare_series_identity_is_perfect():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, len(M.FEATURES)))
    res = M.compare_series(x, x)
    assert set(res) == set(M.FEATURES)
    assert all(r["pearson"] == pytest.approx(1.0) and r["mae"] == 0 and r["n"] == 50 for r in res.values())


# -- images --------------------------------------------------------------------------------

def test_frozen_output_has_zero_flicker():
    rng = np.random.default_rng(1)
    inputs = [rng.integers(0, 255, (40, 50, 3), dtype=np.uint8) for _ in range(6)]
    boxes = [(5, 5, 40, 35)] * 6
    frozen = [inputs[0]] * 6
    assert M.flicker(inputs, frozen, boxes) == 0.0
    assert M.flicker(inputs, inputs, boxes) == pytest.approx(1.0)
    assert math.isnan(M.flicker(frozen, frozen, boxes))   # no input motion: undefined
    assert M.flicker_ratio([2.0, 4.0, np.nan], [1.0, 1.0, 5.0]) == pytest.approx(3.0)


def test_mean_abs_diff_and_boxes():
    a = np.zeros((10, 10, 3), np.uint8)
    b = a.copy()
    b[:5] = 100
    assert M.mean_abs_diff(a, b) == pytest.approx(50.0)
    assert M.mean_abs_diff(a, b, (0, 0, 10, 5)) == pytest.approx(100.0)
    assert math.isnan(M.mean_abs_diff(a, b, (20, 20, 30, 30)))
    assert clip_box((-5, -2.5, 12.2, 8), (10, 10)) == (0, 0, 10, 8)
    lm = np.array([[2.0, 3.0, 0.0], [6.0, 7.0, 0.0]])
    assert face_box(lm, (100, 100), 0.0) == (2, 3, 7, 8)
    assert face_box(lm, (100, 100), 0.5) == (0, 1, 9, 10)
    assert M.same_face((0, 0, 10, 10), (2, 2, 12, 12))
    assert not M.same_face((0, 0, 10, 10), (8, 8, 30, 30))
    assert M.box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert M.box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)
    assert M.box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0 == M.box_iou((0, 0, 0, 0), (0, 0, 0, 0))


def test_blur_and_pixelate_filters():
    flat = np.full((30, 40, 3), 77, np.uint8)
    assert (blur_box(flat.copy(), (0, 0, 40, 30), 0.3) == 77).all()       # constant stays constant
    rng = np.random.default_rng(2)
    img = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
    px = pixelate_box(img.copy(), (10, 5, 30, 25), blocks=1)
    roi = px[5:25, 10:30].reshape(-1, 3)
    assert (roi == roi[0]).all()                                          # one cell
    assert np.abs(roi[0].astype(float) - img[5:25, 10:30].reshape(-1, 3).mean(0)).max() <= 1
    assert (px[:5] == img[:5]).all() and (px[:, :10] == img[:, :10]).all()  # outside untouched
    bl = blur_box(img.copy(), (10, 5, 30, 25), 0.2)
    assert bl[5:25, 10:30].std() < img[5:25, 10:30].std() / 2
    assert (bl[:5] == img[:5]).all()


# -- embeddings ----------------------------------------------------------------------------

def test_rank1_and_match_rate_known_answers():
    rng = np.random.default_rng(3)
    g = rng.normal(size=(6, 128))
    labels = ["a", "a", "b", "b", "c", "c"]
    assert M.rank1_reid(g, labels, g, labels) == 1.0         # the same image twice
    assert M.rank1_reid(g, ["x"] * 6, g, labels) == 0.0
    probe = g.copy()
    probe[0] = np.nan                                          # no face: a miss
    assert M.rank1_reid(probe, labels, g, labels) == pytest.approx(5 / 6)
    assert M.match_rate(g, g + 0.001) == 1.0
    assert M.match_rate(g, g + 1.0) == 0.0                     # |d| = sqrt(128) > 0.6
    assert M.match_rate(probe, g) == pytest.approx(5 / 6)
    assert math.isnan(M.match_rate(np.zeros((0, 128)), np.zeros((0, 128))))


def test_identity_consistency():
    e = np.tile(np.arange(1.0, 129.0), (4, 1))
    e[2] = np.nan
    c = M.identity_consistency(e)
    assert c[[0, 1, 3]] == pytest.approx(1.0) and np.isnan(c[2])
    orth = np.eye(2, 128) * 5
    assert M.identity_consistency(orth) == pytest.approx([math.sqrt(0.5)] * 2)
    d = M.distances_to_mean(e)
    assert d[[0, 1, 3]] == pytest.approx(0.0) and np.isnan(d[2])
    assert M.distances_to_mean(orth) == pytest.approx([5 / math.sqrt(2)] * 2)
    st = M.nan_stats([1.0, np.nan, 3.0])
    assert st["mean"] == 2.0 and st["n"] == 2 and st["min"] == 1.0 and st["max"] == 3.0


# -- real photos (shared data + dlib) ------------------------------------------------------

def _non_eval_photos(n_people: int):
    """First photos of the first ``n_people`` LFW people with one face and NOT in the eval list."""
    from safefm.paths import shared_data_dir

    lfw = shared_data_dir() / "lfw"
    if not lfw.is_dir():
        return None
    evals = set((lfw / "EVAL_IDENTITIES.txt").read_text().split())
    people = [d for d in sorted(lfw.iterdir()) if d.is_dir() and d.name not in evals]
    return [(d.name, sorted(d.glob("*.jpg"))[0]) for d in people[:n_people]]


needs_data = pytest.mark.skipif(not _non_eval_photos(1) or not have_dlib(),
                                reason="shared LFW data or dlib missing")


@needs_data
@pytest.mark.shared
def test_same_real_image_twice_reidentifies_at_one():
    from safefm.media import read_image
    from safefm.recognition import FaceRecognizer

    rec = FaceRecognizer()
    photos = _non_eval_photos(3)
    embs = [rec.embed(read_image(p)) for _, p in photos]
    labels = [n for n, _ in photos]
    g = M.embedding_stack(embs)
    assert np.isfinite(g).all()
    again = M.embedding_stack([rec.embed(read_image(p)) for _, p in photos])
    assert M.rank1_reid(again, labels, g, labels) == 1.0
    assert M.match_rate(g, g) == 1.0


@needs_data
@pytest.mark.shared
def test_strong_pixelation_drops_face_detection():
    from safefm.face.landmarks import FaceMeshDetector
    from safefm.media import read_image
    from safefm.recognition import FaceRecognizer

    rec = FaceRecognizer()
    with FaceMeshDetector(max_faces=4, static_image=True) as det:
        for _, path in _non_eval_photos(8):
            img = read_image(path)
            if len(rec.detect(img)) == 1 and len(det.detect(img)) == 1:
                break
        else:
            pytest.skip("no single-face photo found")
        engine = PixelateEngine(video=False, blocks=6)
        try:
            out = engine.process(img, 0.0)
        finally:
            engine.close()
        assert len(out.faces) == 1 and out.faces[0].status == "anonymized"
        assert rec.detect(out.image) == []
        assert det.detect(out.image) == []


def test_within_clip_r_ignores_each_clips_resting_level_but_not_its_movement():
    from safefm.eval.metrics import compare_series, demean_within

    t = np.linspace(0, 6, 50)
    a, b = np.sin(t)[:, None], np.cos(t)[:, None]
    a[3, 0] = np.nan                                   # a frame the landmarker missed
    inp = [a + 0.2, b + 0.9]                           # two people, different resting eye opening
    out = [a + 0.6, b + 0.1]                           # the identity's own resting level, same movement
    pooled = compare_series(np.concatenate(inp), np.concatenate(out), ["eye"])["eye"]["pearson"]
    within = compare_series(demean_within(inp), demean_within(out), ["eye"])["eye"]["pearson"]
    assert pooled < 0.8 and within == pytest.approx(1.0)
    assert np.isnan(demean_within(inp)[3, 0]) and demean_within(inp)[:50][np.isfinite(a[:, 0])].mean() == pytest.approx(0)
    flat = [np.full((50, 1), 0.3), np.full((50, 1), 0.3)]   # a frozen output has no within-clip movement
    assert np.isnan(compare_series(demean_within(inp), demean_within(flat), ["eye"])["eye"]["pearson"])
