"""Uneven skin on a generated face (safefm.face.skin): what the identity choice avoids."""

from __future__ import annotations

import cv2
import numpy as np

from safefm.face.alignment import load_template
from safefm.face.skin import (_quadratic, even_out, robust_quadratic, skin_region,
                               uneven_skin)

S = 128


def _face(rgb=(205, 160, 135)):
    """A flat skin-coloured crop with the mean face's landmarks in crop pixels."""
    return np.full((S, S, 3), rgb, np.uint8), load_template() * S


def _cheek(lm):
    cheek = np.round(lm[205, :2]).astype(int)                 # FaceMesh's right cheek
    assert skin_region(lm, S)[cheek[1], cheek[0]]
    return tuple(int(v) for v in cheek)


def test_even_skin_side_light_and_dark_eyes_brows_and_lips_are_not_uneven():
    img, lm = _face()
    assert uneven_skin(img, lm) < 1e-3
    for idx in ((33, 133, 159, 145, 70, 105), (61, 291, 13, 14, 0, 17)):   # an eye with its brow; the lips
        hull = cv2.convexHull(np.round(lm[list(idx), :2]).astype(np.int32))
        cv2.fillConvexPoly(img, hull, (40, 30, 30))
    assert uneven_skin(img, lm) < 0.2                         # (the smoothing's tail only; real faces read 2-9)
    ramp = np.linspace(0.55, 1.0, S, dtype=np.float32)[None, :, None]    # light from one side: a 25 L* ramp
    lit = (img * ramp).astype(np.uint8)
    assert uneven_skin(lit, lm) < 0.4


def test_a_patch_counts_by_its_size_whether_darker_lighter_or_of_another_hue():
    img, lm = _face()
    cheek = _cheek(lm)
    reads = {}
    for name, rgb, r in (("dark small", (120, 85, 70), 5), ("dark", (120, 85, 70), 10),
                         ("burnt highlight", (255, 240, 225), 10), ("orange", (225, 140, 70), 10)):
        im = img.copy()
        cv2.circle(im, cheek, r, rgb, -1)
        reads[name] = uneven_skin(im, lm)
    assert 0.5 < reads["dark small"] < reads["dark"]          # bigger reads larger
    assert reads["burnt highlight"] > 2.0                     # a blown-out highlight is a patch too
    lab = cv2.cvtColor(np.array([[[205, 160, 135], [225, 140, 70]]], np.uint8), cv2.COLOR_RGB2Lab)[0].astype(float)
    assert abs(lab[0, 0] - lab[1, 0]) * 100 / 255 < 4         # the orange patch is barely darker ...
    assert reads["orange"] > 2.0                              # ... and still reads by its hue


def test_too_little_skin_to_tell_is_nan():
    img, lm = _face()
    assert np.isnan(uneven_skin(img, lm * 0.05))


def test_a_darkened_face_edge_reads_as_uneven_where_a_side_light_does_not():
    from safefm.face.composite import oval_distance

    img, lm = _face()
    rim = (oval_distance(lm, S) > -0.12)[..., None]            # the outer 0.12 face widths of the face
    dark_rim = np.where(rim, (img * 0.6).astype(np.uint8), img)
    ramp = (img * np.linspace(0.55, 1.0, S, dtype=np.float32)[None, :, None]).astype(np.uint8)
    assert uneven_skin(dark_rim, lm) > 3.0 > 10 * uneven_skin(ramp, lm)


def _lab(img, where):
    """Mean CIELAB (L in 0-100) of ``img`` over the bool mask ``where``."""
    lab = cv2.cvtColor(img.astype(np.float32) / 255, cv2.COLOR_RGB2Lab)
    return lab[where].mean(axis=0)


def test_even_out_fades_a_dark_blotch_and_leaves_the_eyes_lips_and_even_skin_alone():
    img, lm = _face()
    assert np.abs(even_out(img, lm, 4.0).astype(int) - img).max() <= 1          # even skin: nothing to do
    cheek = _cheek(lm)
    blotched = img.copy()
    cv2.circle(blotched, cheek, 10, (120, 85, 70), -1)                          # ~30 L* darker
    eye = cv2.convexHull(np.round(lm[[33, 133, 159, 145], :2]).astype(np.int32))
    cv2.fillConvexPoly(blotched, eye, (40, 30, 30))
    out = even_out(blotched, lm, 4.0)
    spot = np.zeros((S, S), np.uint8)
    cv2.circle(spot, cheek, 4, 1, -1)
    spot = spot.astype(bool)
    skin_l = _lab(img, spot)[0]
    assert skin_l - _lab(blotched, spot)[0] > 25
    assert skin_l - _lab(out, spot)[0] < 12                  # the blotch fades to a shade ...
    assert uneven_skin(out, lm) < 0.5 * uneven_skin(blotched, lm)
    inside = np.zeros((S, S), np.uint8)
    cv2.fillConvexPoly(inside, eye, 1)
    inside = cv2.erode(inside, np.ones((3, 3), np.uint8)).astype(bool)
    assert np.abs(out[inside].astype(int) - blotched[inside]).mean() < 3      # ... the eye stays dark
    assert np.array_equal(even_out(blotched, lm, 0.0), blotched)              # 0: off


def test_even_out_takes_the_real_faces_light_and_white_balance():
    img, lm = _face()
    ramp = np.linspace(0.6, 1.0, S, dtype=np.float32)[None, :, None]
    real = (np.full((S, S, 3), (190, 150, 150), np.float32) * ramp).astype(np.uint8)   # side light, pinker skin
    centre = lm[:, :2].mean(axis=0)
    real_lm = lm.copy()
    real_lm[:, :2] = centre + (lm[:, :2] - centre) * 1.1      # the person's face is a little larger
    out = even_out(img, lm, 4.0, real, real_lm)
    region = skin_region(lm, S)
    left, right = region.copy(), region.copy()
    mid = int(np.median(np.nonzero(region)[1]))
    left[:, mid:], right[:, :mid] = False, False
    want = _lab(real, right) - _lab(real, left)
    got = _lab(out, right) - _lab(out, left)
    assert want[0] > 6 and abs(got[0] - want[0]) < 1.5       # the light falls off across the face as it does on the real one
    assert np.linalg.norm(_lab(out, region) - _lab(real, region)) < 2.0   # and the skin's colour is the real one's
    assert np.abs(even_out(img, lm, 4.0, img, lm).astype(int) - img).max() <= 1   # lit alike: unchanged


def _with_sockets(img, lm, darker):
    """``img`` with the skin round both eyes (their and their brows' hull, grown 4 px) ``darker``
    L* darker, dark eyes and brows drawn over it; returns (image, that skin away from the eyes
    and brows)."""
    out = img.copy()
    lab = cv2.cvtColor(img.astype(np.float32) / 255, cv2.COLOR_RGB2Lab)
    lab[..., 0] -= darker
    dark = np.clip(cv2.cvtColor(lab, cv2.COLOR_Lab2RGB) * 255 + 0.5, 0, 255).astype(np.uint8)
    region, features = np.zeros((S, S), np.uint8), np.zeros((S, S), np.uint8)
    sides = (((33, 133, 159, 145, 160, 144), (46, 53, 52, 65, 55, 70, 63, 105, 66, 107)),
             ((362, 263, 386, 374, 387, 373), (276, 283, 282, 295, 285, 300, 293, 334, 296, 336)))
    for eye, brow in sides:
        cv2.fillConvexPoly(region, cv2.convexHull(np.round(lm[list(eye + brow), :2]).astype(np.int32)), 1)
        for part in (eye, brow):
            cv2.fillConvexPoly(features, cv2.convexHull(np.round(lm[list(part), :2]).astype(np.int32)), 1)
    region = cv2.dilate(region, np.ones((9, 9), np.uint8))
    out[region > 0] = dark[region > 0]
    out[features > 0] = (40, 30, 30)
    socket = (region > 0) & (cv2.dilate(features, np.ones((5, 5), np.uint8)) == 0)
    return out, socket


def test_even_out_lightens_sockets_like_dark_goggles_and_leaves_usual_ones():
    """Some identities come out with sockets like dark goggles: they are lightened towards real
    faces' usual depth (a constant, not the person's), the eyes and brows stay dark, and sockets
    as deep as real faces' usually are stay as they are."""
    img, lm = _face()
    cheek = skin_region(lm, S)
    depth = lambda out, socket: _lab(out, cheek)[0] - _lab(out, socket)[0]
    gen, socket = _with_sockets(img, lm, 35.0)
    out = even_out(gen, lm, 4.0)
    assert depth(gen, socket) > 30 and depth(out, socket) < depth(gen, socket) - 5   # lighter by what one sees
    eyes = cv2.erode((gen == (40, 30, 30)).all(axis=2).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    assert _lab(out, eyes)[0] < _lab(gen, eyes)[0] + 8             # the eyes and brows stay dark
    usual, socket = _with_sockets(img, lm, 10.0)
    assert abs(depth(even_out(usual, lm, 4.0), socket) - depth(usual, socket)) < 1.5


def test_the_light_field_fit_is_exact_ignores_a_patch_and_declines_a_strip():
    """A quadratic light field is found exactly; a blotch on a tenth of the skin does not pull
    it; skin on a strip of two columns cannot fix a quadratic: no field (None), not an error
    that would cost the frame its face."""
    ys, xs = np.mgrid[0:64, 0:64]
    ys, xs = ys.ravel(), xs.ravel()
    basis = _quadratic(xs, ys, 64)
    truth = np.array([[60.0, 10.0, 5.0], [8.0, 0.0, 1.0], [-6.0, 2.0, 0.0], [-20.0, 0.0, 0.0],
                      [-12.0, 0.0, 0.0], [4.0, 0.0, 0.0]])
    values = basis @ truth
    assert np.allclose(robust_quadratic(basis, values), truth, atol=1e-9)
    blotched = values.copy()
    blotched[:410, 0] -= 25.0                       # a dark patch 25 L* deep on the top rows
    field = basis @ robust_quadratic(basis, blotched)
    assert np.abs(field - values).max() < 0.5
    strip = (xs >= 30) & (xs < 32)
    assert strip.sum() >= 32 and robust_quadratic(basis[strip], values[strip]) is None
