"""Realism measures: exact answers on images built to have them."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from safefm.eval import realism as R

H, W = 240, 320


def box_landmarks(x0=110.0, y0=60.0, x1=210.0, y1=180.0) -> np.ndarray:
    """(4, 3) points whose face box is (x0, y0, x1 + 1, y1 + 1)."""
    return np.array([[x0, y0, 0], [x1, y0, 0], [x0, y1, 0], [x1, y1, 0]], np.float32)


def textured(seed=0, shape=(H, W)) -> np.ndarray:
    """A colourful frame with fine texture everywhere."""
    rng = np.random.default_rng(seed)
    img = rng.normal((150, 110, 90), 25, (*shape, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def radius(lm) -> np.ndarray:
    return R.ellipse_radius(lm, (0, 0, W, H))


def test_identical_images_are_perfect():
    img, lm = textured(), box_landmarks()
    assert R.face_realism(img, img, lm) == {"sharpness": 1.0, "tone_gap": 0.0, "chroma_excess": 0.0,
                                            "edge_dark": 0.0}


def test_ellipse_radius_is_one_on_the_box_edge_midpoints():
    lm = box_landmarks()                        # box x 110..210, y 60..180 (inclusive pixels)
    r = radius(lm)
    assert r.shape == (H, W) and r.dtype == np.float32
    assert r[120, 160] == pytest.approx(0.0, abs=1e-6)
    assert r[120, 110] == pytest.approx(1.0, abs=1e-6) and r[60, 160] == pytest.approx(1.0, abs=1e-6)


def test_blurred_output_is_less_sharp_and_grain_is_not_detail():
    img, lm = textured(), box_landmarks()
    blurred = cv2.GaussianBlur(img, (0, 0), 2.0)
    s = R.sharpness(img, blurred, lm)
    assert 0 < s < 0.2
    smooth = cv2.GaussianBlur(img, (0, 0), 3.0)           # a smooth face with fine grain added
    rng = np.random.default_rng(1)
    grainy = np.clip(smooth + rng.normal(0, 1.5, smooth.shape), 0, 255).astype(np.uint8)
    assert R.sharpness(img, grainy, lm) < 0.2
    assert R.sharpness(blurred, img, lm) > 5                # the other way round: sharper


def test_sharpness_only_looks_inside_the_face():
    img, lm = textured(), box_landmarks()
    out = img.copy()
    out[radius(lm) > R.INNER + 0.15] = 0                   # everything well outside the inner face
    assert R.sharpness(img, out, lm) == pytest.approx(1.0, abs=1e-9)


def test_a_flat_face_copied_is_sharpness_one():
    flat = np.full((H, W, 3), 128, np.uint8)
    lm = box_landmarks()
    assert R.sharpness(flat, flat, lm) == 1.0
    assert R.sharpness(flat, textured(), lm) == math.inf


def test_tone_gap_is_the_extra_face_to_ring_contrast():
    lm = box_landmarks()
    r = radius(lm)
    inp = np.full((H, W, 3), 150, np.uint8)                # face and surroundings the same grey
    out = inp.copy()
    out[r <= 1.0] = 100                                    # a darker face pasted on it
    lab = lambda v: cv2.cvtColor(np.full((1, 1, 3), v / 255, np.float32), cv2.COLOR_RGB2Lab)[0, 0]
    expected = float(np.linalg.norm(lab(100) - lab(150)))  # ~19 dE
    assert R.tone_gap(inp, out, lm) == pytest.approx(expected, rel=1e-4)
    assert R.tone_gap(out, inp, lm) == pytest.approx(expected, rel=1e-4)   # symmetric
    # The same contrast already in the input is no gap; a uniform brightness change is none.
    assert R.tone_gap(out, out, lm) == 0.0
    assert R.tone_gap(inp, np.full_like(inp, 90), lm) == pytest.approx(0.0, abs=1e-4)


def test_tone_gap_ignores_what_lies_between_face_and_ring_and_far_away():
    lm = box_landmarks()
    r = radius(lm)
    inp = textured()
    out = inp.copy()
    out[(r > R.INNER + 0.01) & (r < R.RING[0] - 0.01)] = (0, 255, 0)   # the seam band itself
    out[r > R.RING[1] + 0.02] = 0
    assert R.tone_gap(inp, out, lm) == pytest.approx(0.0, abs=1e-4)


def test_chroma_excess_of_a_colour_face_on_a_grey_photo():
    lm = box_landmarks()
    grey = cv2.cvtColor(cv2.cvtColor(textured(), cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    assert R.chroma_excess(grey, grey, lm) == 0.0
    assert R.mean_chroma(grey, lm) == pytest.approx(0.0, abs=0.05)      # float Lab rounding
    out = grey.copy()
    out[radius(lm) <= 0.5] = (200, 140, 110)               # a skin-coloured patch in the face
    assert R.chroma_excess(grey, out, lm) > 5
    assert R.chroma_excess(out, grey, lm) == 0.0           # removing colour adds none


def test_faces_partly_outside_the_frame_and_bad_inputs():
    img = textured()
    lm = box_landmarks(-60, -40, 80, 120)                  # top-left corner cut off
    assert R.face_realism(img, img, lm)["tone_gap"] == 0.0
    with pytest.raises(ValueError):
        R.sharpness(img, img, box_landmarks(-400, -400, -300, -300))
    with pytest.raises(ValueError):
        R.tone_gap(img, img[:, :-1], box_landmarks())
    with pytest.raises(ValueError):
        R.chroma_excess(img, img.astype(np.float32), box_landmarks())


def test_aggregate_uses_the_geometric_mean_of_sharpness():
    rows = [{"sharpness": 0.25, "tone_gap": 2.0, "chroma_excess": 0.0, "edge_dark": 0.1},
            {"sharpness": 4.0, "tone_gap": 4.0, "chroma_excess": 1.0, "edge_dark": 0.0}]
    assert R.aggregate(rows) == {"sharpness": pytest.approx(1.0), "tone_gap": 3.0, "chroma_excess": 0.5,
                                 "edge_dark": pytest.approx(0.05), "faces": 2}
    old = R.aggregate([{k: v for k, v in r.items() if k != "edge_dark"} for r in rows])   # saved before it
    assert math.isnan(old["edge_dark"]) and old["tone_gap"] == 3.0
    empty = R.aggregate([])
    assert empty["faces"] == 0 and math.isnan(empty["sharpness"])


def skin_face(lm, L_face=70.0, seed=0) -> np.ndarray:
    """A frame with an even skin-lit face (Lab lightness ``L_face``) with a little texture,
    on a darker background."""
    rng = np.random.default_rng(seed)
    img = np.full((H, W, 3), (60, 50, 45), np.float32)
    skin = np.array(cv2.cvtColor(np.array([[[L_face, 15.0, 20.0]]], np.float32), cv2.COLOR_Lab2RGB)[0, 0]) * 255
    img[radius(lm) <= 1.2] = skin
    return np.clip(img + rng.normal(0, 2.0, img.shape), 0, 255).astype(np.uint8)


def test_edge_dark_counts_hair_painted_into_the_face_edge_and_nothing_else():
    lm = box_landmarks()
    face = skin_face(lm)
    r = radius(lm)
    band = (r > R.INNER) & (r <= 1.0)
    streaked = face.copy()
    streaked[band & (np.arange(W)[None, :] % 8 < 3)] = (70, 45, 30)     # dark brown strands at the edge
    share = ((np.arange(W)[None, :] % 8 < 3) & band).sum() / band.sum()
    assert R.edge_dark(face, streaked, lm) == pytest.approx(share, abs=0.01)
    assert R.edge_dark(streaked, face, lm) == 0.0                       # removing the input's hair is not a smudge
    assert R.edge_dark(streaked, streaked, lm) == 0.0                   # the person's own hair, kept: none
    shaded = face.copy()                                                # a soft shadow (10 L*) is not hair
    dim = cv2.cvtColor(shaded.astype(np.float32) / 255, cv2.COLOR_RGB2Lab)
    dim[band, 0] -= 10.0
    shaded = np.clip(cv2.cvtColor(dim, cv2.COLOR_Lab2RGB) * 255, 0, 255).astype(np.uint8)
    assert R.edge_dark(face, shaded, lm) < 0.01
    inner = face.copy()                                                 # dark features inside the inner face
    inner[r <= 0.3] = (40, 30, 25)
    assert R.edge_dark(face, inner, lm) < 0.01
    assert R.edge_dark(face, cv2.GaussianBlur(face, (0, 0), 4.0), lm) < 0.01   # blur adds no dark structure


def test_grey_pictures_are_told_apart_and_made():
    img = textured()
    grey = R.to_grey(img)
    assert grey.shape == img.shape and grey.dtype == np.uint8
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    assert R.is_grey(grey) and not R.is_grey(img)
    tinted = np.clip(grey.astype(int) + (2, 0, -2), 0, 255).astype(np.uint8)   # a faint cast stays grey
    assert R.is_grey(tinted)


def test_face_realism_or_none_skips_what_cannot_be_measured():
    img = textured()
    assert R.face_realism_or_none(img, img, None) is None
    assert R.face_realism_or_none(img, img, box_landmarks(-400, -400, -300, -300)) is None
    assert R.face_realism_or_none(img, img, box_landmarks()) == R.face_realism(img, img, box_landmarks())
    with pytest.raises(ValueError):                      # a wrong output is still an error
        R.face_realism_or_none(img, img[:, :-1], box_landmarks())
