"""Alignment: the similarity crop the generator works in."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from conftest import needs_data

from safefm.face.alignment import (ALIGN_INDICES, affine_scale, align_matrix, crop_face, invert_affine,
                              load_template, transform_points, umeyama)
from safefm.face.retarget import EYELIDS, JAW, LIPS

FACE_OVAL = (10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400,
             377, 152, 148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109)


def rot3(yaw=0.0, pitch=0.0, roll=0.0) -> np.ndarray:
    """Rotation (degrees) about y (yaw), x (pitch), z (roll)."""
    y, p, r = np.radians([yaw, pitch, roll])
    ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    rx = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
    rz = np.array([[np.cos(r), -np.sin(r), 0], [np.sin(r), np.cos(r), 0], [0, 0, 1]])
    return rz @ ry @ rx


def posed_face(shape=None, scale=300.0, yaw=0.0, pitch=0.0, roll=0.0, shift=(320.0, 240.0, 0.0)):
    """Frame-pixel (478, 3) landmarks of a canonical shape under a head pose."""
    shape = load_template() if shape is None else shape
    c = shape - load_template().mean(axis=0)
    return (scale * c @ rot3(yaw, pitch, roll).T + np.array(shift)).astype(np.float32)


def test_umeyama_recovers_known_similarity_2d_and_3d():
    rng = np.random.default_rng(0)
    for d in (2, 3):
        src = rng.normal(size=(40, d))
        q, _ = np.linalg.qr(rng.normal(size=(d, d)))
        if np.linalg.det(q) < 0:
            q[:, 0] = -q[:, 0]
        dst = 2.5 * src @ q.T + rng.normal(size=d)
        s, r, t = umeyama(src, dst)
        assert s == pytest.approx(2.5, rel=1e-9)
        np.testing.assert_allclose(r, q, atol=1e-9)
        np.testing.assert_allclose(s * src @ r.T + t, dst, atol=1e-9)


def test_umeyama_never_returns_a_reflection():
    src = np.random.default_rng(1).normal(size=(30, 3))
    dst = src * np.array([-1.0, 1.0, 1.0])           # a mirror image: best proper rotation only
    _, r, _ = umeyama(src, dst)
    assert np.linalg.det(r) == pytest.approx(1.0)


def test_template_frames_the_face_inside_the_crop():
    t = load_template()
    assert t.shape == (478, 3) and t.dtype == np.float32
    oval = t[list(FACE_OVAL)]
    width = oval[:, 0].max() - oval[:, 0].min()
    assert 0.6 < width < 0.8
    assert abs(0.5 * (oval[:, 0].max() + oval[:, 0].min()) - 0.5) < 0.01
    assert 0.05 < oval[:, 1].min() and oval[:, 1].max() < 0.93     # forehead and chin inside
    assert 0.33 < t[[33, 133, 362, 263], 1].mean() < 0.43           # eyes a bit above centre
    assert abs(t[:, 2].mean()) < 1e-3 and t[1, 2] < t[234, 2]        # nose tip nearer than cheek side
    assert t[33, 0] < t[263, 0]                                     # image-left eye is index 33


def test_template_face_maps_onto_itself_from_any_similarity():
    size = 128
    lm = posed_face(scale=270.0, roll=23.0, shift=(400.0, 150.0, 7.0))
    m = align_matrix(lm, size)
    crop = transform_points(lm, m)
    np.testing.assert_allclose(crop[:, :2], load_template()[:, :2] * size, atol=0.05)


def test_points_round_trip_through_the_crop():
    lm = posed_face(yaw=25.0, pitch=-10.0, roll=8.0)
    m = align_matrix(lm, 128)
    back = transform_points(transform_points(lm, m), invert_affine(m))
    assert np.abs(back - lm).max() < 1.0
    assert np.abs(back - lm).max() < 1e-3                          # in fact exact up to float32


def test_crop_scale_barely_changes_when_the_head_turns():
    front = affine_scale(align_matrix(posed_face(), 128))
    for yaw, pitch in ((35.0, 0.0), (-35.0, 0.0), (0.0, 25.0)):
        turned = affine_scale(align_matrix(posed_face(yaw=yaw, pitch=pitch), 128))
        assert turned / front == pytest.approx(1.0, abs=0.02), (yaw, pitch)


def test_talking_and_blinking_barely_move_the_crop():
    size = 128
    rest = posed_face(scale=250.0)
    moving = load_template().copy()
    moving[list(LIPS + JAW), 1] += 0.04                             # mouth wide open, jaw drops
    moving[list(EYELIDS), 1] += 0.01                                # eyes closing
    m0 = align_matrix(rest, size)
    m1 = align_matrix(posed_face(moving, scale=250.0), size)
    eyes_nose = [33, 263, 1, 168]
    shift = np.abs(transform_points(rest, m1)[eyes_nose, :2] - transform_points(rest, m0)[eyes_nose, :2])
    assert shift.max() < 0.25                                       # pixels of the 128 crop


def test_image_round_trip_through_the_crop():
    h, w = 360, 480
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([127 + 100 * np.sin(xx / 9.0), 127 + 100 * np.cos(yy / 11.0),
                    127 + 100 * np.sin((xx + yy) / 13.0)], axis=-1).astype(np.uint8)
    lm = posed_face(scale=140.0, roll=12.0, shift=(240.0, 180.0, 0.0))
    m = align_matrix(lm, 256)                                       # crop finer than the frame
    crop = crop_face(img, m, 256)
    assert crop.shape == (256, 256, 3) and crop.dtype == np.uint8
    back = cv2.warpAffine(crop, invert_affine(m), (w, h), flags=cv2.INTER_LINEAR)
    x0, y0, x1, y1 = [int(v) for v in (*lm[:, :2].min(0), *lm[:, :2].max(0))]
    err = np.abs(back[y0:y1, x0:x1].astype(int) - img[y0:y1, x0:x1]).mean()
    assert err < 4.0                                                # grey levels


def test_align_matrix_rejects_wrong_shapes_and_broken_landmarks():
    with pytest.raises(ValueError, match="478"):
        align_matrix(np.zeros((468, 3), np.float32), 128)
    with pytest.raises(ValueError, match="degenerate"):
        align_matrix(np.zeros((478, 3), np.float32), 128)
    nan = posed_face()
    nan[33] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        align_matrix(nan, 128)


def test_align_indices_avoid_the_mouth_and_jaw():
    assert not set(ALIGN_INDICES) & set(LIPS + JAW)
    assert len(set(ALIGN_INDICES)) == len(ALIGN_INDICES) >= 20


@needs_data
@pytest.mark.shared
def test_real_face_lands_on_the_template(clip_frames):
    from safefm.face.landmarks import FaceMeshDetector

    with FaceMeshDetector(max_faces=1, static_image=True) as det:
        faces = det.detect(clip_frames[0])
    assert len(faces) == 1
    m = align_matrix(faces[0], 128)
    crop_pts = transform_points(faces[0], m)
    idx = list(ALIGN_INDICES)
    err = np.linalg.norm(crop_pts[idx, :2] - load_template()[idx, :2] * 128, axis=1)
    assert err.mean() < 4.0                                         # pixels of the 128 crop
    crop = crop_face(clip_frames[0], m, 128)
    assert crop.shape == (128, 128, 3) and crop.std() > 10
