"""Dark blotches on a generated face's skin (safefm.face.skin): what the identity choice avoids."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from safefm.face.alignment import load_template
from safefm.face.skin import SLACK, dark_blotches, skin_region

S = 128


def _face(rgb=(205, 160, 135)):
    """A flat skin-coloured crop with the mean face's landmarks in crop pixels."""
    return np.full((S, S, 3), rgb, np.uint8), load_template() * S


def _lightness(img, x, y):
    return float(cv2.cvtColor(img, cv2.COLOR_RGB2Lab)[y, x, 0]) * 100 / 255


def test_even_skin_and_dark_eyes_brows_and_lips_are_not_blotches():
    img, lm = _face()
    assert dark_blotches(img, lm) == 0.0
    for idx in ((33, 133, 159, 145, 70, 105), (61, 291, 13, 14, 0, 17)):   # an eye with its brow; the lips
        hull = cv2.convexHull(np.round(lm[list(idx), :2]).astype(np.int32))
        cv2.fillConvexPoly(img, hull, (40, 30, 30))
    assert dark_blotches(img, lm) == 0.0


def test_a_dark_patch_on_the_cheek_is_read_by_its_depth_and_size():
    img, lm = _face()
    region = skin_region(lm, S)
    cheek = np.round(lm[205, :2]).astype(int)                 # FaceMesh's right cheek
    assert region[cheek[1], cheek[0]]
    small, big = img.copy(), img.copy()
    for im, r in ((small, 5), (big, 10)):
        cv2.circle(im, tuple(int(v) for v in cheek), r, (120, 85, 70), -1)
    depth = _lightness(img, 0, 0) - _lightness(small, *cheek)
    assert depth > 2 * SLACK                                   # a patch far darker than shading
    a, b = dark_blotches(small, lm), dark_blotches(big, lm)
    assert 0.2 < a < b < depth - SLACK                          # bigger reads larger; never beyond its depth
    assert dark_blotches(np.full((S, S, 3), 128, np.uint8), lm) == 0.0
    assert np.isnan(dark_blotches(img, lm * 0.05))             # a face too small to tell
