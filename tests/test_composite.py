"""Compositing: the mask covers the face, pasting leaves no raw face pixel, fallbacks are opaque."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from safefm.face import composite as C
from safefm.face.retarget import BROWS, EYELIDS, LIPS

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


def _ellipse(h, w, cx, cy, rx, ry) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1).astype(np.float32)


def test_color_match_moves_means_to_the_reference_face_without_copying_texture():
    h = w = 96
    xx = np.mgrid[:h, :w][1]
    gen_mask = _ellipse(h, w, 48, 48, 30, 38)
    ref_mask = _ellipse(h, w, 50, 46, 26, 34)
    rng = np.random.default_rng(3)
    generated = np.empty((h, w, 3), np.uint8)
    generated[:] = (220, 190, 170)                        # bright, evenly lit synthetic face
    generated[..., 0] = np.clip(200 + (xx % 7) * 4, 0, 255)   # a little texture of its own
    reference = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)              # outside: anything
    reference[ref_mask > 0] = rng.normal((110, 80, 60), 6, (int(ref_mask.sum()), 3)).clip(0, 255)
    out = C.color_match(generated, reference, gen_mask, ref_mask)
    assert out.shape == generated.shape and out.dtype == np.uint8
    inside = gen_mask > 0.5
    before = np.abs(generated[inside].mean(0) - [110, 80, 60]).sum()
    after = np.abs(out[inside].astype(float).mean(0) - [110, 80, 60]).sum()
    assert after < 0.15 * before
    # Texture: the output is a per-channel function of the generated face, nothing else.
    flat = generated.copy()
    flat[..., 0] = 210
    flat_out = C.color_match(flat, reference, gen_mask, ref_mask)
    assert flat_out[inside].std(axis=0).max() < 1.0


def test_color_match_on_a_grey_frame_gives_a_grey_face_with_its_own_shading():
    h = w = 64
    mask = _ellipse(h, w, 32, 32, 24, 28)
    rng = np.random.default_rng(4)
    generated = rng.normal((190, 140, 120), 25, (h, w, 3)).clip(0, 255).astype(np.uint8)  # colour face
    grey = np.repeat(rng.normal(120, 2, (h, w, 1)).clip(0, 255).astype(np.uint8), 3, axis=2)  # flat grey
    out = C.color_match(generated, grey, mask, mask).astype(int)
    inside = mask > 0.5
    assert np.abs(out[..., 0] - out[..., 1])[inside].mean() < 1.0
    assert np.abs(out[..., 1] - out[..., 2])[inside].mean() < 1.0
    # The face keeps its own shading, not the flat real face's: lightness follows the generated one.
    lum = lambda img: cv2.cvtColor(img.astype(np.uint8), cv2.COLOR_RGB2GRAY)[inside].astype(float)
    assert np.corrcoef(lum(out), lum(generated))[0, 1] > 0.95 and lum(out).std() > 10


def _to_linear(v):
    v = np.asarray(v, float) / 255.0
    return np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)


def test_color_match_keeps_a_shadow_s_hue_when_a_bright_face_is_made_darker():
    """The synthetic faces come out brighter than most real ones in a video. Darkened to the
    real face's light, a shadow (here half the skin's light) stays a shadow of the same skin:
    its linear-light ratio to the skin is about the same in every channel (a shift of
    lightness with a spread match turned it dark brown: 0.39 red, 0.26 green, 0.15 blue), and
    it keeps most of its light (some contrast is given back: ``keep_contrast``)."""
    h = w = 96
    mask = _ellipse(h, w, 48, 48, 34, 40)
    generated = np.empty((h, w, 3), np.uint8)
    generated[:] = (235, 200, 180)                                  # bright, evenly lit skin
    shadow = (slice(40, 56), slice(20, 40))
    skin_lin = _to_linear(generated[0, 0])
    shade = np.round(255 * np.where(0.5 * skin_lin <= 0.0031308, 12.92 * 0.5 * skin_lin,
                                     1.055 * (0.5 * skin_lin) ** (1 / 2.4) - 0.055))
    generated[shadow] = shade                                       # half the light of the skin
    reference = np.empty_like(generated)
    reference[:] = (150, 95, 65)                                    # a darker, warmer real face
    for keep in (0.0, 0.5):
        out = C.color_match(generated, reference, mask, mask, keep_contrast=keep)
        ratio = _to_linear(out[shadow].reshape(-1, 3).mean(0)) / _to_linear(out[48, 60])
        assert ratio.max() - ratio.min() < 0.08 and ratio.min() > 0.34, (keep, ratio)
        assert np.abs(out[48, 60].astype(int) - reference[0, 0]).max() <= 2   # the skin takes the real light
    flat = C.color_match(generated, reference, mask, mask, keep_contrast=0.0)   # no contrast given back
    exact = _to_linear(flat[shadow].reshape(-1, 3).mean(0)) / _to_linear(flat[48, 60])
    assert np.allclose(exact, 0.5, atol=0.03)                                  # the shadow's exact share of light


def test_color_match_without_a_usable_region_returns_the_face():
    gen = np.full((32, 32, 3), 100, np.uint8)
    ones, zeros = np.ones((32, 32), np.float32), np.zeros((32, 32), np.float32)
    assert np.array_equal(C.color_match(gen, gen, ones, zeros), gen)
    assert np.array_equal(C.color_match(gen, gen, zeros, ones), gen)
    black = np.zeros((32, 32, 3), np.uint8)                  # nothing usable in the reference
    assert np.array_equal(C.color_match(gen, black, ones, ones), gen)


def test_skin_mask_and_face_alpha_follow_the_oval():
    S = 128
    lm = synthetic_landmarks(64, 64, 40, 50)                   # face width 80 px
    hull, _ = hull_and_distance(lm, (S, S))
    skin = C.skin_mask(lm, S)
    assert skin.dtype == np.float32 and skin.shape == (S, S)
    depth = cv2.distanceTransform(hull.astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    assert (skin[depth < 0.15 * 80 - 1] == 0).all()             # 15 % of the width off the edge
    assert (skin[depth > 0.15 * 80 + 1] == 1).all()
    alpha = C.face_alpha(lm, S, inner=0.1, outer=0.0)
    assert alpha.dtype == np.float32 and alpha.min() >= 0 and alpha.max() <= 1
    assert (alpha[depth > 0.1 * 80 + 1] == 1).all()            # the face is kept
    assert (alpha[~hull] == 0).all()                            # the generator's hair is not
    ramp = (depth > 1) & (depth < 0.1 * 80 - 1)
    assert ((alpha[ramp] > 0) & (alpha[ramp] < 1)).all()


def _featured_landmarks(S=128):
    """synthetic_landmarks with brows (y 26-28, near the oval's top), eyes (y 55-60) and lips in place."""
    lm = synthetic_landmarks(64, 64, 40, 50)
    for idx, x0 in ((BROWS[:10], 44), (BROWS[10:], 70)):       # two brows, 14 px long, 2 px thick
        lm[list(idx), 0] = np.linspace(x0, x0 + 14, len(idx))
        lm[list(idx), 1] = np.tile([26.0, 28.0], len(idx) // 2)
    eyes = list(EYELIDS)
    lm[eyes, 0] = np.where(np.arange(len(eyes)) % 2, np.linspace(50, 60, len(eyes)), np.linspace(68, 78, len(eyes)))
    lm[eyes, 1] = np.tile([55.0, 60.0], (len(eyes) + 1) // 2)[:len(eyes)]
    lips = list(LIPS)                                           # a mouth, y 84-90
    lm[lips, 0] = np.linspace(54, 74, len(lips))
    lm[lips, 1] = np.tile([84.0, 90.0], (len(lips) + 1) // 2)[:len(lips)]
    return lm


def test_face_alpha_drops_dark_strands_at_the_edge_but_keeps_dark_features_inside():
    S = 128
    lm = _featured_landmarks(S)
    image = np.full((S, S, 3), (200, 160, 140), np.uint8)      # skin
    image[40:90, 27:31] = (40, 30, 25)                          # a hair strand along the left edge
    image[55:60, 50:60] = (30, 20, 20)                          # an eye, deep inside
    plain = C.face_alpha(lm, S)
    alpha = C.face_alpha(lm, S, image=image)
    assert plain[60, 29] > 0.5 and alpha[60, 29] < 0.1
    assert alpha[57, 55] == plain[57, 55] == 1.0
    far = cv2.dilate((image[..., 0] != 200).view(np.uint8), np.ones((7, 7), np.uint8)) == 0
    assert np.abs(alpha[far] - plain[far]).max() < 1e-3          # skin away from the strand is kept


def test_face_alpha_keeps_a_brow_near_the_edge_and_leaves_no_outline_of_a_strand():
    """A brow close to the oval's top is a feature, not a strand; a soft-edged strand goes with its
    half-dark fringe, so the face over a smooth fill shows no dark line where the strand was."""
    S, skin = 128, np.array((200, 160, 140), np.float32)
    lm = _featured_landmarks(S)
    rng = np.random.default_rng(0)
    image = skin + rng.normal(0, 6, (S, S, 1)).astype(np.float32)          # textured skin
    image[26:29, 44:59] = image[26:29, 70:85] = (60, 45, 35)               # brows, ~0.1 widths below the top
    image[40:90, 25:31] = (40, 30, 25)                                      # a strand along the left edge
    image = np.clip(cv2.GaussianBlur(image, (0, 0), 1.0), 0, 255).astype(np.uint8)   # soft edges, as a camera's
    alpha = C.face_alpha(lm, S, image=image)
    assert alpha[27, 51] > 0.9 and alpha[27, 77] > 0.9                     # the brows stay
    shown = alpha[..., None] * image + (1 - alpha[..., None]) * skin       # the face over a skin-coloured fill
    L = cv2.cvtColor(np.clip(shown, 0, 255).astype(np.uint8), cv2.COLOR_RGB2Lab)[..., 0].astype(np.float32)
    L_skin = float(np.median(L[60:70, 60:70]))
    assert L[45:85, 20:36].min() > L_skin - 12                             # no dark line left where the strand was


def _fringe_face(S=128):
    """A skin face crop with brows at y 50 and a dark fringe from the hair above down to y 35."""
    lm = synthetic_landmarks(64, 70, 40, 50)
    lm[list(BROWS), 1] = 50.0
    image = np.full((S, S, 3), (200, 160, 140), np.uint8)       # skin (and a skin-coloured backdrop)
    image[:35, 20:108] = (45, 35, 30)                            # hair: over the top of the oval and beyond
    return lm, image


def test_hair_over_face_keeps_a_fringe_but_not_the_face_below_the_brows():
    S = 128
    lm, image = _fringe_face(S)
    keep = C.hair_over_face(image, lm, S)
    assert keep.shape == (S, S) and keep.dtype == np.float32
    assert keep[30, 64] > 0.9 and keep[28, 40] > 0.9             # the fringe over the forehead
    assert keep[45:].max() == 0.0                                # brows and everything below: never
    assert keep[image[..., 0] == 200].max() < 0.5                # skin is not hair (only the 1 px softening)
    image[95:, :] = (45, 35, 30)                                 # a dark beard below, joining the outside: not kept
    assert C.hair_over_face(image, lm, S)[45:].max() == 0.0


def test_hair_over_face_ignores_dark_spots_inside_the_face_and_light_highlights():
    S = 128
    lm, _ = _fringe_face(S)
    image = np.full((S, S, 3), (200, 160, 140), np.uint8)
    image[30:36, 60:66] = (40, 30, 25)                           # a mole / shadow inside the forehead
    image[26:32, 40:50] = (255, 250, 245)                        # a highlight
    assert C.hair_over_face(image, lm, S).max() < 0.05


def test_uncover_lowers_the_mask_only_where_the_crop_keeps_the_frame():
    lm = synthetic_landmarks()
    mask = C.face_mask([lm], (H, W), 0.03, 0.04)
    S = 128
    keep = np.zeros((S, S), np.float32)
    keep[40:50, 30:90] = 1.0
    M_inv = np.array([[2.0, 0.0, 200.0], [0.0, 2.0, 100.0]])    # crop (x, y) -> frame (200 + 2x, 100 + 2y)
    before = mask.copy()
    C.uncover(mask, keep, M_inv)
    assert mask[100 + 2 * 45, 200 + 2 * 60] == 0.0 < before[100 + 2 * 45, 200 + 2 * 60]   # inside the block
    changed = np.argwhere(mask != before)
    assert changed[:, 0].min() >= 100 + 2 * 39 and changed[:, 0].max() <= 100 + 2 * 50
    assert changed[:, 1].min() >= 200 + 2 * 29 and changed[:, 1].max() <= 200 + 2 * 90
    assert (mask <= before).all()


def test_is_grey():
    rng = np.random.default_rng(5)
    grey = np.repeat(rng.integers(0, 256, (40, 40, 1), dtype=np.uint8), 3, axis=2)
    assert C.is_grey(grey)
    noisy = grey.astype(int) + rng.integers(-1, 2, grey.shape)        # JPEG-like chroma noise
    assert C.is_grey(noisy.clip(0, 255).astype(np.uint8))
    colour = grey.copy()
    colour[..., 0] = np.clip(colour[..., 0].astype(int) + 12, 0, 255)
    assert not C.is_grey(colour)
    mask = np.zeros((40, 40), np.uint8)
    mask[:20] = 255
    half = grey.copy()
    half[30:, :, 0] = 0                                         # colour only where not looked at
    assert not C.is_grey(half) and C.is_grey(half, mask)
    assert not C.is_grey(grey, np.zeros((40, 40), np.uint8))


def test_smooth_fill_keeps_known_pixels_and_interpolates_between():
    h, w = 32, 64
    weights = np.zeros((h, w), np.float32)
    weights[:, :16], weights[:, 48:] = 1, 1
    values = np.zeros((h, w, 3), np.float32)
    values[:, 48:] = 100
    fill = C.smooth_fill(values, weights)
    assert fill.shape == (h, w, 3) and fill.dtype == np.float32
    assert np.allclose(fill[:, :16], 0, atol=1e-3) and np.allclose(fill[:, 48:], 100, atol=1e-2)
    row = fill[16, 16:48, 0]
    assert (np.diff(row) >= -1e-3).all() and 20 < row[16] < 80          # a ramp, no jump
    assert not C.smooth_fill(values, np.zeros((h, w), np.float32)).any()


def _seamless_setup(frame_rgb=(210, 200, 190)):
    """A light frame, a crop whose face is skin and whose surroundings are dark hair, the mask
    and the face alpha of the engine's seamless paste (crop -> frame: 2x, face at the centre)."""
    S = 64
    lm_crop = synthetic_landmarks(32, 32, 15, 20)
    lm = lm_crop.copy()
    lm[:, :2] = lm[:, :2] * 2 + (320 - 64, 240 - 64)           # the same face in the frame
    crop = np.empty((S, S, 3), np.uint8)
    crop[:] = (40, 30, 25)                                      # the generator's dark hair
    crop[C.oval_distance(lm_crop, S) < 0] = (200, 150, 130)     # its face
    M_inv = np.array([[2.0, 0, 320 - 64], [0, 2.0, 240 - 64]])
    rng = np.random.default_rng(6)
    frame = rng.normal(frame_rgb, 4, (H, W, 3)).clip(0, 255).astype(np.uint8)
    mask = C.face_mask([lm], frame.shape, dilate=0.15, feather=0.08)
    face = C.face_alpha(lm_crop, S, image=crop)
    return frame, crop, M_inv, mask, face, lm


def test_seamless_paste_never_depends_on_the_real_face():
    frame, crop, M_inv, mask, face, _ = _seamless_setup()
    out = C.paste(frame, crop, M_inv, mask, face=face)
    full = mask == 1.0
    other = frame.copy()
    rng = np.random.default_rng(7)
    other[full] = rng.integers(0, 256, (int(full.sum()), 3))   # a different real face
    assert np.array_equal(C.paste(other, crop, M_inv, mask, face=face), out)
    assert np.array_equal(out[mask == 0], frame[mask == 0])     # nothing changes outside
    assert not ((out == frame).all(axis=2) & full).all()
    # The generated face itself is kept as it is.
    warped = cv2.warpAffine(crop, M_inv, (W, H), flags=cv2.INTER_LINEAR)
    core = cv2.warpAffine((face == 1).astype(np.uint8), M_inv, (W, H), flags=cv2.INTER_NEAREST) > 0
    core = cv2.erode(core.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    assert core.sum() > 1000 and np.abs(out[core & full].astype(int) - warped[core & full]).max() <= 1


def test_seamless_paste_leaves_no_dark_band_where_the_generator_painted_hair():
    frame, crop, M_inv, mask, face, lm = _seamless_setup()
    plain = C.paste(frame, crop, M_inv, mask)
    out = C.paste(frame, crop, M_inv, mask, face=face)
    warped_face = cv2.warpAffine(face, M_inv, (W, H), flags=cv2.INTER_LINEAR)
    band = (mask == 1.0) & (warped_face == 0)                   # hair in the crop, real face under it
    assert band.sum() > 500
    lum = lambda img: img[band].astype(float).mean(axis=1)
    assert lum(plain).mean() < 60                               # the old paste: a dark band
    assert lum(out).min() > 150                                 # now: between skin and the frame


def test_seamless_paste_on_a_grey_frame_is_grey():
    frame, crop, M_inv, mask, face, _ = _seamless_setup()
    grey = cv2.cvtColor(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    out = C.paste(grey, crop, M_inv, mask, face=face)
    assert (out.max(axis=2) == out.min(axis=2)).all()
    colour = C.paste(frame, crop, M_inv, mask, face=face)
    assert (colour.max(axis=2).astype(int) - colour.min(axis=2) > 20)[mask == 1.0].any()


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


@pytest.mark.parametrize("side", [1, 2, 3, 4, 5, 9, 17])
def test_seamless_paste_of_a_face_leaving_through_a_corner_does_not_crash(side):
    """A mask that is only a few pixels inside the frame (a face leaving through a corner)."""
    frame = np.full((64, 64, 3), 90, np.uint8)
    crop = np.full((32, 32, 3), 200, np.uint8)
    mask = np.zeros((64, 64), np.float32)
    mask[:side, :side] = 1.0
    M_inv = np.array([[1.0, 0, -16], [0, 1.0, -16]])          # the crop mostly outside the frame
    out = C.paste(frame, crop, M_inv, mask, face=np.ones((32, 32), np.float32))
    assert out.shape == frame.shape and (out[:side, :side] != 90).any()
    assert (out[side:, side:] == 90).all()


def test_seamless_paste_never_reads_another_face_that_is_protected():
    """Two faces side by side: the first one pasted must not carry the second's real pixels."""
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)
    crop = np.full((32, 32, 3), 180, np.uint8)
    mask = np.zeros((64, 96), np.float32)
    mask[8:56, 8:48] = 0.5
    mask[16:48, 16:40] = 1.0
    other = np.zeros((64, 96), np.float32)
    other[8:56, 44:90] = 1.0                        # the second real face, inside the first's feather
    M_inv = np.array([[1.0, 0, 12], [0, 1.0, 16]])
    face = np.zeros((32, 32), np.float32)
    face[10:22, 6:18] = 1.0                         # the generated face; the rest of the mask is fill
    a = C.paste(frame, crop, M_inv, mask, face=face, protect=other)
    changed = frame.copy()
    changed[other > 0] = 255 - changed[other > 0]   # only the other face changes
    b = C.paste(changed, crop, M_inv, mask, face=face, protect=other)
    full = mask == 1.0
    assert np.array_equal(a[full], b[full])
    c = C.paste(changed, crop, M_inv, mask, face=face)
    assert not np.array_equal(a[full], c[full])     # without protection it would have leaked in


@pytest.mark.parametrize("camera_noise", [6.0, 0.0])
def test_pasted_face_gets_the_cameras_grain_and_no_more(camera_noise):
    """A noisy camera: the smooth generated face gets grain like the frame around it (not a
    plastic patch); a clean frame gets none. The same input gives the same output."""
    rng = np.random.default_rng(1)
    frame = np.clip(120 + rng.normal(0, camera_noise, (H, W, 1)), 0, 255).astype(np.uint8).repeat(3, 2)
    lm = synthetic_landmarks()
    S = 64
    crop = np.empty((S, S, 3), np.uint8)
    crop[:] = CROP_RGB
    side = 2.0 * 160 / S
    M_inv = np.array([[side, 0, 320 - side * S / 2], [0, side, 240 - side * S / 2]])
    mask = C.face_mask([lm], frame.shape, dilate=0.03, feather=0.04)
    face = np.ones((S, S), np.float32)
    core = (mask == 1.0).astype(np.uint8)
    plain = C.paste(frame, crop, M_inv, mask, face=face)
    grainy = C.paste(frame, crop, M_inv, mask, face=face, grain=True)
    assert C.noise_sigma(plain, core) < 0.5                       # the generated face alone is smooth
    assert C.noise_sigma(grainy, core) == pytest.approx(camera_noise, abs=0.25 * camera_noise + 0.5)
    assert np.array_equal(grainy, C.paste(frame, crop, M_inv, mask, face=face, grain=True))
    assert np.array_equal(grainy[mask == 0], frame[mask == 0])


def test_grain_is_read_from_the_cameras_noise_not_from_texture():
    """Hair, leaves or wrinkles over much of a region are not the camera's noise: a face pasted
    among them must not get sandpaper."""
    rng = np.random.default_rng(2)
    plain = np.clip(120 + rng.normal(0, 4.0, (200, 200, 1)), 0, 255).astype(np.uint8).repeat(3, 2)
    textured = plain.copy()
    strands = (np.sin(np.arange(200) * 1.3)[None, :] * 60).astype(np.int16)   # fine stripes, 60 % of the area
    textured[:, :120] = np.clip(textured[:, :120].astype(np.int16) + strands[:, :120, None], 0, 255)
    where = np.ones((200, 200), np.uint8)
    assert C.noise_sigma(textured, where) == pytest.approx(C.noise_sigma(plain, where), rel=0.15)
    assert C.noise_sigma(plain, where) == pytest.approx(4.0 * 0.88, rel=0.15)   # grain's spread after the 1 px blur


def _textured(shape, blur, seed, level=40.0):
    """``shape + (3,)`` uint8 grey-ish skin with fine texture softened by a ``blur`` px Gaussian."""
    rng = np.random.default_rng(seed)
    t = cv2.GaussianBlur(rng.normal(0, 1, shape).astype(np.float32), (0, 0), blur)
    t *= level / t.std()
    base = np.array([180, 140, 120], np.float32)
    return np.clip(base + t[..., None], 0, 255).astype(np.uint8)


@pytest.mark.parametrize("crop_blur, frame_blur", [(1.4, 1.0), (0.6, 2.5)])
def test_pasted_face_takes_the_cameras_sharpness(crop_blur, frame_blur):
    """A face softer than the camera draws it is sharpened, a sharper one softened, towards the
    real face's fine detail (one number); nothing outside the mask changes; the same input gives
    the same output; the change is the same on every channel; a dark line stays dark."""
    lm = synthetic_landmarks()
    frame = _textured((H, W), frame_blur, 0)
    S = 128
    crop = _textured((S, S), crop_blur, 1)
    side = 160 / S
    M_inv = np.array([[side, 0, 320 - side * S / 2], [0, side, 240 - side * S / 2]])
    mask = C.face_mask([lm], frame.shape, dilate=0.03, feather=0.04)
    face = np.ones((S, S), np.float32)
    core = cv2.erode((mask == 1.0).astype(np.uint8), np.ones((25, 25), np.uint8)) > 0
    grey = lambda img: cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    real = C.laplacian_energy(grey(frame), core)
    before = C.laplacian_energy(grey(C.paste(frame, crop, M_inv, mask, face=face)), core)
    out = C.paste(frame, crop, M_inv, mask, face=face, sharpen=True)
    after = C.laplacian_energy(grey(out), core)
    assert abs(np.log(after / real)) < 0.5 * abs(np.log(before / real))       # at least halfway there
    assert (after > before) == (real > before)
    assert np.array_equal(out[mask == 0], frame[mask == 0])
    assert np.array_equal(out, C.paste(frame, crop, M_inv, mask, face=face, sharpen=True))
    change = out.astype(int) - C.paste(frame, crop, M_inv, mask, face=face).astype(int)
    unclipped = ((out > 0) & (out < 255)).all(axis=2) & (mask == 1.0)   # (in the feather the blend hides clipping)
    spread = change[unclipped].max(axis=1) - change[unclipped].min(axis=1)
    assert np.abs(change).max() > 2 and spread.max() <= 1      # the same on every channel: no colour fringes
    lashes = np.full((64, 64, 3), 200, np.uint8)
    lashes[::8] = 5                                             # thin dark lines on bright skin, sharpened hard:
    region, weight = np.full((64, 64), 255, np.uint8), np.ones((64, 64), np.float32)
    energy = C.laplacian_energy(cv2.cvtColor(lashes, cv2.COLOR_RGB2GRAY), region)
    sharp = C.match_sharpness(lashes, 10 * energy, region, weight)
    assert sharp[::8].max() <= 5                                # they stay dark (clipped, never flipped bright)


@pytest.mark.parametrize("around, sharp", [((45, 35, 30), True), ((188, 139, 120), False)])
def test_seamless_paste_ends_the_face_in_an_edge_against_hair_but_not_against_skin(around, sharp):
    """Across the band between the face and the real frame the fill turns from one to the other:
    against dark hair within a few pixels (a face has an edge there, not a wide blur); against
    skin of nearly its own colour over the whole band (no edge where a forehead runs on)."""
    frame, crop, M_inv, mask, face, _ = _seamless_setup(around)
    frame = np.full_like(frame, around)                         # flat, so the profile reads the fill alone
    out = C.paste(frame, crop, M_inv, mask, face=face).astype(np.float32)
    row = 240
    alpha = cv2.warpAffine(face, M_inv, (W, H), flags=cv2.INTER_LINEAR)[row]
    x0 = 320 + int(np.argmax(alpha[320:] < 0.5))                # the face's edge, right of its centre
    x1 = 320 + int(np.argmax(mask[row, 320:] < 1.0))            # where the real frame may show
    assert x1 - x0 >= 8
    skin, real = out[row, x0 - 2], np.asarray(around, np.float32)
    share = ((out[row, x0:x1] - skin) @ (real - skin)) / float((real - skin) @ (real - skin))
    turning = int(((share > 0.2) & (share < 0.8)).sum())       # pixels midway between the two
    if sharp:
        assert turning <= 0.3 * (x1 - x0) and share[-1] > 0.9
    else:
        assert turning >= 0.35 * (x1 - x0)


def test_seamless_paste_draws_no_edge_over_the_forehead():
    """Above the brows the mask cuts across a forehead whose skin runs on to the hairline: there
    the fill turns over the whole band even against dark hair (no headband), below them in an edge."""
    around = (45, 35, 30)
    frame, crop, M_inv, mask, face, _ = _seamless_setup(around)
    frame = np.full_like(frame, around)
    out = C.paste(frame, crop, M_inv, mask, face=face).astype(np.float32)
    col = 320
    alpha = cv2.warpAffine(face, M_inv, (W, H), flags=cv2.INTER_LINEAR)[:, col]
    y0 = 240 - int(np.argmax(alpha[240::-1] < 0.5))             # the face's top edge
    y1 = 240 - int(np.argmax(mask[240::-1, col] < 1.0))         # where the real frame may show
    assert y0 - y1 >= 8
    skin, real = out[y0 + 2, col], np.asarray(around, np.float32)
    share = ((out[y1:y0 + 1, col] - skin) @ (real - skin)) / float((real - skin) @ (real - skin))
    assert int(((share > 0.2) & (share < 0.8)).sum()) >= 0.35 * (y0 - y1)


@pytest.mark.parametrize("around, carried", [((226, 176, 156), True), ((45, 35, 30), False)])
def test_seamless_paste_meets_a_real_forehead_without_a_step(around, carried):
    """The mask cuts across a forehead: where the real skin above it is lighter than the
    generated face, the difference is carried down the forehead (no step where they meet), and
    the face below the brows stays as generated; against hair the face's colour is its own."""
    frame, crop, M_inv, mask, face, _ = _seamless_setup(around)
    frame = np.full_like(frame, around)
    out = C.paste(frame, crop, M_inv, mask, face=face).astype(np.float32).mean(axis=2)
    col, generated, real = 320, float(np.mean((200, 150, 130))), float(np.mean(around))
    alpha = cv2.warpAffine(face, M_inv, (W, H), flags=cv2.INTER_LINEAR)[:, col]
    y0 = 240 - int(np.argmax(alpha[240::-1] < 0.5))             # the face's top edge
    y1 = 240 - int(np.argmax(mask[240::-1, col] < 1.0))         # the forehead's edge: where the real frame shows
    profile = out[y1 - 4:241, col]
    assert abs(out[250, col] - generated) <= 2                  # below the brows: the generated face
    top = out[y0 + 3, col]                                      # the face's forehead
    if carried:
        steepest = np.abs(profile[3:] - profile[:-3]).max()     # the largest change over 3 rows
        assert steepest <= 0.2 * (real - generated) and top >= generated + 0.5 * (real - generated)
    else:
        assert top >= generated - 3


def test_the_forehead_seam_leaves_a_tiny_face_its_own_colour():
    """A face so small that no part of it below the brows is whole at the fill's resolution has
    nothing to hold the forehead's shade back: the seam is left out, not spread over the face."""
    around = (226, 176, 156)
    _, crop, _, _, _, _ = _seamless_setup(around)
    lm_crop = synthetic_landmarks(32, 32, 15, 20)
    M_inv = np.array([[0.5, 0, 300.0], [0, 0.5, 220.0]])         # the 64 px crop as 32 frame px
    lm = lm_crop.copy()
    lm[:, :2] = lm[:, :2] * 0.5 + (300, 220)
    frame = np.full((H, W, 3), around, np.uint8)
    mask = C.face_mask([lm], frame.shape, dilate=0.15, feather=0.08)
    out = C.paste(frame, crop, M_inv, mask, face=C.face_alpha(lm_crop, 64, image=crop))
    assert abs(float(out[int(lm[152, 1]) - 4, int(lm[152, 0])].mean()) - np.mean((200, 150, 130))) <= 6   # above the chin
