"""Compositing: the mask covers the face, pasting leaves no raw face pixel, fallbacks are opaque."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from safefm.face import composite as C

H, W = 480, 640
CROP_RGB = np.array([200, 30, 220], np.uint8)


def synthetic_landmarks(cx=320.0, cy=240.0, rx=60.0, ry=80.0, seed=0) -> np.ndarray:
    """(478, 3) float32: the face oval on an ellipse, every other point inside it."""
    rng = np.random.default_rng(seed)
    lm = np.zeros((478, 3), np.float32)
    r = np.sqrt(rng.uniform(0, 0.6, 478))
    a = rng.uniform(0, 2 * np.pi, 478)
    lm[:, 0], lm[:, 1] = cx + rx * r * np.cos(a), cy + ry * r * np.sin(a)
    oval = C.face_oval_indices()
    ang = np.linspace(0, 2 * np.pi, len(oval), endpoint=False)
    lm[oval, 0], lm[oval, 1] = cx + rx * np.cos(ang), cy + ry * np.sin(ang)
    for idx, (x, y) in {234: (cx - rx, cy), 454: (cx + rx, cy), 10: (cx, cy - ry),
                        152: (cx, cy + ry)}.items():
        lm[idx, :2] = x, y
    return lm


def hull_and_distance(lm: np.ndarray, shape=(H, W)):
    """(filled oval hull (H, W) bool, distance of every pixel to it (H, W) float32)."""
    canvas = np.full(shape, 255, np.uint8)
    pts = lm[C.face_oval_indices(), :2]
    cv2.fillConvexPoly(canvas, cv2.convexHull(np.round(pts * 16).astype(np.int32)), 0,
                       lineType=cv2.LINE_8, shift=4)
    return canvas == 0, cv2.distanceTransform(canvas, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)


def test_face_oval_indices_come_from_mediapipe():
    oval = C.face_oval_indices()
    assert len(oval) == 36 and {10, 152, 234, 454} <= set(oval.tolist())


def test_mask_is_one_over_dilated_hull_and_feathers_outward():
    lm = synthetic_landmarks()
    width = C.face_width(lm)
    assert width == pytest.approx(120, abs=1)
    mask = C.face_mask([lm], (H, W, 3), dilate=0.1, feather=0.1)
    assert mask.shape == (H, W) and mask.dtype == np.float32
    assert mask.min() >= 0 and mask.max() <= 1
    hull, dist = hull_and_distance(lm)
    grow, feather = 0.1 * width, 0.1 * width
    assert (mask[hull] == 1.0).all()
    assert (mask[dist <= grow - 1] == 1.0).all()           # exactly 1 over the dilated hull
    ring = (dist > grow + 1) & (dist < grow + feather - 1)
    assert ((mask[ring] > 0) & (mask[ring] < 1)).all()    # the soft edge lies outside
    assert (mask[dist > grow + feather + 1] == 0).all()
    # Falls off with the distance from the face (up to the distance transform's rounding).
    order = np.argsort(dist[ring])
    assert (np.diff(mask[ring][order]) <= 0.1).all()
    assert np.corrcoef(dist[ring], mask[ring])[0, 1] < -0.95


def test_mask_covers_the_union_of_all_landmark_sets_and_skips_none():
    a, b = synthetic_landmarks(200, 200, 50, 60), synthetic_landmarks(420, 260, 40, 50, seed=1)
    mask = C.face_mask([a, None, b], (H, W), dilate=0.0, feather=0.05)
    for lm in (a, b):
        hull, _ = hull_and_distance(lm)
        assert (mask[hull] == 1.0).all()
    out = np.ones((H, W), np.float32)
    assert C.face_mask([], (H, W), 0.1, 0.1, out=out) is out and not out.any()


def test_mask_of_a_face_leaving_the_frame():
    lm = synthetic_landmarks(cx=10, cy=470)   # centre near the corner, most of it outside
    mask = C.face_mask([lm], (H, W), dilate=0.08, feather=0.06)
    hull, _ = hull_and_distance(lm)
    assert hull.any() and (mask[hull] == 1.0).all()
    assert not C.face_mask([synthetic_landmarks(cx=-500)], (H, W), 0.08, 0.06).any()


def test_mask_rejects_non_finite_landmarks():
    lm = synthetic_landmarks()
    lm[5, 0] = np.nan
    with pytest.raises(ValueError):
        C.face_mask([lm], (H, W), 0.08, 0.06)


def _paste_setup(crop_scale=0.8):
    """Noise frame, flat crop covering only part of the face, mask of the dilated face."""
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    lm = synthetic_landmarks()
    S = 64
    crop = np.empty((S, S, 3), np.uint8)
    crop[:] = CROP_RGB
    side = crop_scale * 160 / S                 # crop -> frame: a square over the face centre
    M_inv = np.array([[side, 0, 320 - side * S / 2], [0, side, 240 - side * S / 2]])
    mask = C.face_mask([lm], frame.shape, dilate=0.08, feather=0.06)
    return frame, crop, M_inv, mask


def test_paste_leaves_no_raw_pixel_inside_the_mask():
    frame, crop, M_inv, mask = _paste_setup()
    before = frame.copy()
    out = C.paste(frame, crop, M_inv, mask)
    assert np.array_equal(frame, before)                      # input untouched
    full = mask == 1.0
    same = (out == frame).all(axis=2)
    assert not (same & full).any(), "a raw frame pixel survived under the mask"
    # Under the full mask every pixel is the crop colour, the placeholder grey, or a mix of both.
    grey = np.array(C.PLACEHOLDER_RGB, np.float32)
    px = out[full].astype(np.float32)
    alpha = ((px - grey) @ (CROP_RGB - grey)) / np.dot(CROP_RGB - grey, CROP_RGB - grey)
    mix = grey + np.clip(alpha, 0, 1)[:, None] * (CROP_RGB - grey)
    assert np.abs(px - mix).max() <= 2
    # The mask reaches beyond the crop's footprint: there the placeholder grey was used.
    assert (out[full] == grey).all(axis=1).any()
    assert np.array_equal(out[mask == 0], frame[mask == 0])   # nothing changes outside


def test_paste_into_out_and_in_place():
    frame, crop, M_inv, mask = _paste_setup(crop_scale=2.0)
    expected = C.paste(frame, crop, M_inv, mask)
    buf = np.zeros_like(frame)
    assert C.paste(frame, crop, M_inv, mask, out=buf) is buf
    assert np.array_equal(buf, expected)
    inplace = frame.copy()
    C.paste(inplace, crop, M_inv, mask, out=inplace, box=C.mask_box(mask))
    assert np.array_equal(inplace, expected)
    assert (expected[mask == 1.0] == CROP_RGB).all()          # crop covers the whole face here
    assert np.array_equal(C.paste(frame, crop, M_inv, np.zeros((H, W), np.float32)), frame)


def _placeholder_colours_only(pixels: np.ndarray) -> bool:
    """Every pixel a grey between the fill and the icon colour (no original content)."""
    lo, hi = min(C.PLACEHOLDER_RGB[0], C.ICON_RGB[0]), max(C.PLACEHOLDER_RGB[0], C.ICON_RGB[0])
    return bool(((pixels >= lo) & (pixels <= hi)).all() and (pixels.max(1) == pixels.min(1)).all())


def test_placeholder_box_replaces_every_pixel_of_the_region():
    rng = np.random.default_rng(1)
    frame = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    out = C.cover_placeholder(frame, (100, 120, 200, 260), margin=0.1)   # pad 14 px
    region = out[106:274, 86:214]
    assert _placeholder_colours_only(region.reshape(-1, 3))
    assert not (region == frame[106:274, 86:214]).all(axis=2).any()
    assert (region == C.ICON_RGB).all(axis=2).any()                      # the icon is drawn
    keep = np.ones((H, W), bool)
    keep[106:274, 86:214] = False
    assert np.array_equal(out[keep], frame[keep])


def test_placeholder_landmarks_cover_the_dilated_hull_in_place():
    rng = np.random.default_rng(2)
    frame = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    original = frame.copy()
    lm = synthetic_landmarks()
    assert C.cover_placeholder(frame, lm, out=frame, margin=0.1) is frame
    hull, dist = hull_and_distance(lm)
    covered = dist <= 0.1 * C.face_width(lm) - 1
    assert _placeholder_colours_only(frame[covered])
    assert not (frame == original).all(axis=2)[covered].any()
    assert np.array_equal(frame[dist > 0.2 * 120], original[dist > 0.2 * 120])


def test_color_match_moves_means_toward_the_surroundings_without_copying_texture():
    h = w = 96
    yy, xx = np.mgrid[:h, :w]
    mask = (((xx - 48) / 30) ** 2 + ((yy - 48) / 38) ** 2 <= 1).astype(np.float32)
    rng = np.random.default_rng(3)
    generated = np.empty((h, w, 3), np.uint8)
    generated[:] = (220, 190, 170)                        # bright, evenly lit synthetic face
    generated[..., 0] = np.clip(200 + (xx % 7) * 4, 0, 255)   # a little texture of its own
    reference = rng.normal((110, 80, 60), 6, (h, w, 3)).clip(0, 255).astype(np.uint8)
    reference[mask > 0] = rng.integers(0, 256, (int(mask.sum()), 3))  # real face: must not leak
    out = C.color_match(generated, reference, mask)
    assert out.shape == generated.shape and out.dtype == np.uint8
    inside = mask > 0.5
    before = np.abs(generated[inside].mean(0) - [110, 80, 60]).sum()
    after = np.abs(out[inside].astype(float).mean(0) - [110, 80, 60]).sum()
    assert after < 0.3 * before
    # Texture: the output is a per-channel function of the generated face, nothing else.
    flat = generated.copy()
    flat[..., 0] = 210
    flat_out = C.color_match(flat, reference, mask)
    assert flat_out[inside].std(axis=0).max() < 1.0


def test_color_match_without_a_usable_ring_returns_the_face():
    gen = np.full((32, 32, 3), 100, np.uint8)
    assert np.array_equal(C.color_match(gen, gen, np.ones((32, 32), np.float32)), gen)
    assert np.array_equal(C.color_match(gen, gen, np.zeros((32, 32), np.float32)), gen)


def test_status_frame_and_badge():
    img = C.status_frame(320, 240, "SAFE-FM starting...")
    assert img.shape == (240, 320, 3) and img.dtype == np.uint8
    assert (img == C.PLACEHOLDER_RGB).all(axis=2).mean() > 0.8    # mostly the flat fill
    assert (img.min(axis=2) > 200).sum() > 50                     # with bright text drawn
    assert C.status_frame(64, 48, "line one\nline two").shape == (48, 64, 3)
    frame = np.zeros((240, 320, 3), np.uint8)
    out = C.badge(frame)
    assert not frame.any()                                        # input untouched
    changed = out.any(axis=2)
    ys, xs = np.nonzero(changed)
    assert ys.max() < 60 and xs.max() < 240                       # a small top-left badge
    assert (out == C.BADGE_RGB).all(axis=2).sum() > 200
    assert C.badge(frame, out=frame) is frame and frame.any()
