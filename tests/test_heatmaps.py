"""Heatmaps: what the ControlNet sees of the (retargeted) expression."""

from __future__ import annotations

import time

import numpy as np
import pytest
from conftest import needs_data

from safefm.face.alignment import align_matrix, load_template, transform_points
from safefm.config import ModelConfig
from safefm.face.heatmaps import CHANNELS, render_heatmaps

INNER_LOWER_LIP = (95, 88, 178, 87, 14, 317, 402, 318, 324)
OUTER_LOWER_LIP = (146, 91, 181, 84, 17, 314, 405, 321, 375)
UPPER_LIDS = (161, 160, 159, 158, 157, 388, 387, 386, 385, 384)


def ch(name: str) -> int:
    return CHANNELS.index(name)


def yawed(shape: np.ndarray, degrees: float) -> np.ndarray:
    """Template-like unit shape turned about the vertical axis through its centre."""
    a = np.radians(degrees)
    r = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    c = shape.mean(axis=0)
    return ((shape - c) @ r.T + c).astype(np.float32)


@pytest.fixture(scope="module")
def face128() -> np.ndarray:
    """The template face in crop pixels of a 128 crop."""
    return load_template() * 128


def test_channels_match_the_model_config():
    assert len(CHANNELS) == ModelConfig().heatmap_channels == 9
    for name in ("face_oval", "brows", "eyes", "irises", "nose", "lips_outer", "lips_inner", "depth"):
        assert name in CHANNELS


def test_every_channel_draws_something_within_unit_range(face128):
    h = render_heatmaps(face128, 128, 128)
    assert h.shape == (9, 128, 128) and h.dtype == np.float32
    assert h.min() >= 0.0 and h.max() <= 1.0
    for i, name in enumerate(CHANNELS):
        assert h[i].max() > 0.3, name
    # contours are thin: each line channel covers only a small part of the crop
    for name in ("face_oval", "brows", "eyes", "nose", "lips_outer", "lips_inner"):
        assert (h[ch(name)] > 0.1).mean() < 0.08, name


def test_opening_the_mouth_changes_the_mouth_channels_only(face128):
    closed = render_heatmaps(face128, 128, 128)
    open_ = face128.copy()
    open_[list(INNER_LOWER_LIP), 1] += 6.0
    open_[list(OUTER_LOWER_LIP), 1] += 6.0
    opened = render_heatmaps(open_, 128, 128)
    diff = np.abs(opened - closed).sum(axis=(1, 2))
    assert diff[ch("lips_inner")] > 20.0
    assert opened[ch("openings")].sum() > closed[ch("openings")].sum() + 20.0   # mouth area grew
    for name in ("brows", "eyes", "irises", "face_oval"):
        assert diff[ch(name)] == 0.0, name


def test_closing_the_eyes_hides_the_irises(face128):
    shut = face128.copy()
    lower = face128[[145, 374], 1]
    shut[list(UPPER_LIDS[:5]), 1] = lower[0]
    shut[list(UPPER_LIDS[5:]), 1] = lower[1]
    h_open, h_shut = render_heatmaps(face128, 128, 128), render_heatmaps(shut, 128, 128)
    assert h_shut[ch("irises")].sum() < 0.3 * h_open[ch("irises")].sum()
    assert h_shut[ch("openings")].sum() < h_open[ch("openings")].sum()


def sample(channel: np.ndarray, pts: np.ndarray, idx: int) -> float:
    """Brightest value of a channel in the 3x3 pixels around landmark ``idx``."""
    x, y = np.round(pts[idx, :2]).astype(int)
    return float(channel[y - 1:y + 2, x - 1:x + 2].max())


def test_depth_channel_follows_the_head_turn():
    tmpl = load_template()
    for yaw, near_side, far_side in ((-30.0, 116, 345), (30.0, 345, 116)):   # cheekbones
        pts = yawed(tmpl, yaw) * 128
        depth = render_heatmaps(pts, 128, 128)[ch("depth")]
        assert sample(depth, pts, near_side) > sample(depth, pts, far_side) + 0.15, yaw


def test_depth_channel_responds_to_z(face128):
    base = render_heatmaps(face128, 128, 128)
    deeper = face128.copy()
    deeper[:, 2] *= 1.6                                           # more relief: nose nearer
    bumped = render_heatmaps(deeper, 128, 128)
    nose = (slice(68, 76), slice(60, 68))                         # around the nose tip (64, 71)
    assert bumped[ch("depth")][nose].mean() > base[ch("depth")][nose].mean() + 0.05
    assert bumped[ch("nose")].max() >= base[ch("nose")].max()


def test_contour_brightness_depends_on_depth():
    pts = yawed(load_template(), 35.0) * 128                      # the face's image-right side is nearer
    oval = render_heatmaps(pts, 128, 128)[ch("face_oval")]
    assert sample(oval, pts, 454) > sample(oval, pts, 234) + 0.1


def test_out_buffer_is_reused_and_matches_a_fresh_render(face128):
    buf = np.full((9, 64, 64), 7.0, np.float32)
    got = render_heatmaps(face128, 128, 64, out=buf)
    assert got is buf
    np.testing.assert_array_equal(buf, render_heatmaps(face128, 128, 64))
    with pytest.raises(ValueError, match="out"):
        render_heatmaps(face128, 128, 64, out=np.zeros((9, 128, 128), np.float32))


def test_render_size_rescales_the_drawing(face128):
    big = render_heatmaps(face128, 128, 128)[ch("face_oval")]
    small = render_heatmaps(face128 * 2, 256, 64)[ch("face_oval")]   # same face, 256 crop, 64 maps

    def centroid(m):
        yy, xx = np.mgrid[0:m.shape[0], 0:m.shape[1]]
        return np.array([(xx * m).sum(), (yy * m).sum()]) / m.sum() / m.shape[0]

    np.testing.assert_allclose(centroid(big), centroid(small), atol=0.01)


def test_render_is_fast_enough_for_real_time(face128):
    out = np.empty((9, 128, 128), np.float32)
    render_heatmaps(face128, 128, 128, out=out)
    best = min(_timed(lambda: render_heatmaps(face128, 128, 128, out=out)) for _ in range(20))
    assert best < 0.010                       # target ~2 ms; loose bound for a shared CPU


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def test_wrong_landmark_shape_is_a_clear_error():
    with pytest.raises(ValueError, match="478"):
        render_heatmaps(np.zeros((468, 3), np.float32), 128, 128)


@needs_data
@pytest.mark.shared
def test_real_face_fills_every_channel(clip_frames):
    from safefm.face.landmarks import FaceMeshDetector

    with FaceMeshDetector(max_faces=1, static_image=True) as det:
        lm = det.detect(clip_frames[0])[0]
    crop_pts = transform_points(lm, align_matrix(lm, 128))
    h = render_heatmaps(crop_pts, 128, 128)
    for i, name in enumerate(CHANNELS):
        assert h[i].max() > 0.3, name
    assert h[ch("depth")].mean() > 0.1                           # the face covers much of the crop
