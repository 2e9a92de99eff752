"""The generated face fitted to the person's head (safefm.face.outline, ``outline_follow``)."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np

from safefm.config import load_runtime_config
from safefm.face.alignment import load_template
from safefm.face.composite import face_mask, face_oval_indices
from safefm.face.landmarks import FaceMeshDetector
from safefm.face.outline import PINNED, fit_to_head, follow_outline, warp_maps

from conftest import needs_data

S = 128
SKIN, BACK, EYE = (205, 160, 135), (30, 90, 40), (20, 20, 20)


def _widened(lm, k):
    out = lm.copy()
    cx = lm[:, 0].mean()
    out[:, 0] = cx + (lm[:, 0] - cx) * k
    return out


def _drawn(lm):
    """A crop with the face oval of ``lm`` filled with skin on a green background, dark pupils."""
    img = np.full((S, S, 3), BACK, np.uint8)
    cv2.fillConvexPoly(img, cv2.convexHull(np.round(lm[face_oval_indices(), :2]).astype(np.int32)), SKIN)
    for i in (468, 473):   # the irises' centres
        cv2.circle(img, tuple(int(round(v)) for v in lm[i, :2]), 3, EYE, -1)
    return img


def test_the_outline_moves_onto_the_persons_and_the_features_stay():
    real = load_template() * S
    ident = _widened(real, 1.2)                         # a wide face ...
    oval = face_oval_indices()
    assert np.array_equal(follow_outline(ident, real, 0.0), ident)
    half = follow_outline(ident, real, 0.5)
    np.testing.assert_allclose(half[oval, :2], (ident[oval, :2] + real[oval, :2]) / 2, atol=1e-4)
    full = follow_outline(ident, real, 1.0)
    np.testing.assert_allclose(full[oval, :2], real[oval, :2], atol=1e-4)
    np.testing.assert_array_equal(full[PINNED], ident[PINNED])
    mx, my = warp_maps(ident, ident, S)                 # nothing to move: the crop is read where it lies
    grid = np.arange(S, dtype=np.float32)
    assert np.abs(mx - grid[None]).max() < 1e-3 and np.abs(my - grid[:, None]).max() < 1e-3


def test_a_wide_face_is_fitted_to_a_narrow_head_with_its_eyes_kept():
    real = load_template() * S
    ident = _widened(real, 1.2)                         # ... on a narrower head
    crop = _drawn(ident)
    fitted, lm = fit_to_head(crop, ident, real, 1.0)
    assert fitted is not crop and np.array_equal(lm[face_oval_indices(), :2], real[face_oval_indices(), :2])
    inside = face_mask([real], (S, S), 0.0, 0.0) > 0.99
    beyond = face_mask([real], (S, S), 0.04, 0.0) < 0.01       # 0.04 face widths (~3.5 px) outside the head
    skin = np.abs(fitted.astype(int) - SKIN).max(axis=2) < 30
    was = np.abs(crop.astype(int) - SKIN).max(axis=2) < 30
    assert (was & beyond).sum() > 600                           # before: a band of skin beside the cheeks
    assert (skin & beyond).sum() < 15                           # after: none beyond the head
    assert skin[inside].mean() > 0.9                            # and the head is still all face
    for i in (468, 473):                                        # the pupils where they were
        x, y = np.round(ident[i, :2]).astype(int)
        assert fitted[y, x].max() < 60
    same, lm0 = fit_to_head(crop, ident, real, 0.0)
    assert same is crop and lm0 is ident


@needs_data
def test_the_pasted_face_stays_on_the_head_however_wide_the_identity(clip_frames):
    """With a wide identity face the frame changes beside the cheeks (over the background) unless
    the outline follows the person's (the default)."""
    from safefm.tiny import tiny_engine

    frame = clip_frames[0]
    with FaceMeshDetector(max_faces=1, static_image=True) as det:
        lm = det.detect(frame)[0]
    cfg = load_runtime_config(runtime="torch")
    beyond = face_mask([lm], frame.shape[:2], cfg.mask_dilate + cfg.mask_feather + 0.03, 0.0) < 0.01
    changed = {}
    for follow in (0.0, 1.0):
        eng = tiny_engine(dataclasses.replace(cfg, outline_follow=follow), seed=0)
        ident = eng.identity
        eng.identity = dataclasses.replace(ident, shape=_widened(ident.shape, 1.25))
        out = eng.process(frame, 0.0).image
        eng.close()
        changed[follow] = (np.abs(out.astype(int) - frame.astype(int)).max(axis=2) > 6) & beyond
    assert changed[0.0].sum() > 2000                    # the identity's wide face over the background
    assert changed[1.0].sum() < 0.05 * changed[0.0].sum()
