"""Compositing: paste a synthetic face back into the frame, and the opaque fallbacks.

Conventions: images are ``uint8`` RGB ``(H, W, 3)``; landmarks are ``float32 (478, 3)``
MediaPipe FaceMesh points in frame pixels (x, y, z). Every function is pure except that
``out=`` (where offered) names the array to write into; ``out=None`` returns a new one.
Work is done on the face's region of interest only, so the per-frame cost is small.

Fail-closed rules this module guarantees (see ``tests/test_composite.py``):

- :func:`face_mask` is exactly ``1.0`` over the whole dilated face-oval hull; the feather
  lies *outside* it, so no raw-face pixel is blended into the output. The one exception the
  engine makes (``keep_hair``): :func:`uncover` lowers it where :func:`hair_over_face` finds
  the person's hair hanging over the face above the brows, never below them.
- :func:`paste` never keeps raw content where the mask is set but the warped crop does not
  reach: those pixels get the placeholder colour, or (seamless paste, ``face=``) a smooth fill
  computed from the generated face and the frame where ``mask < 1`` only. Pixels where the
  mask is ``1.0`` never depend on the frame's pixels there.
- :func:`cover_placeholder` replaces every pixel of its region (flat fill + an icon, no blur).
- :func:`color_match` only transfers one gain per channel (light and white balance), never texture.

Seamless paste (what the engine does): :func:`color_match` re-lights the generated face with
the real face's light and white balance (a gain per channel in linear light, from the inner
skin of each, :func:`skin_mask`; a grey-scale frame gives a grey face), :func:`face_alpha`
keeps the generated face and drops the hair and background the generator paints around it, and
:func:`paste` fills the band between the face and the real surroundings smoothly from both
sides, so no dark band or colour jump shows; below the brows, where the two sides' colours
differ (hair, a wall, clothes), the fill turns from one to the other in a few pixels, so the
face ends in an edge as a real one does rather than in a wide blur (:func:`_band_edge`); above
them, where the mask cuts across a forehead whose real skin shows beyond it, the difference
between the two is carried smoothly down the generated forehead, so the two skins meet without
a step (:func:`_forehead_seam`).
"""

from __future__ import annotations

import functools

import cv2
import numpy as np

from .retarget import BROWS, EYELIDS, LIPS

PLACEHOLDER_RGB = (128, 128, 128)   # flat mid-grey fill of the placeholder
ICON_RGB = (168, 168, 168)          # the placeholder's person icon
TEXT_RGB = (235, 235, 235)
BADGE_RGB = (200, 30, 30)

# FaceMesh indices used to size a face (cheeks and forehead/chin on the oval).
_CHEEK_L, _CHEEK_R, _FOREHEAD, _CHIN = 234, 454, 10, 152
_SHIFT = 4                          # sub-pixel bits for cv2 polygon filling
_FONT = cv2.FONT_HERSHEY_SIMPLEX


@functools.lru_cache(maxsize=1)
def face_oval_indices() -> np.ndarray:
    """``(36,) int64`` sorted FaceMesh indices of the face oval (``FACEMESH_FACE_OVAL``)."""
    from mediapipe.python.solutions.face_mesh_connections import FACEMESH_FACE_OVAL

    return np.array(sorted({i for edge in FACEMESH_FACE_OVAL for i in edge}), np.int64)


def face_width(landmarks: np.ndarray) -> float:
    """Face size in pixels: cheek-to-cheek distance, floored at 3/4 of forehead-to-chin so a
    turned head still gets a margin. ``landmarks``: ``(478, 2|3)``."""
    p = np.asarray(landmarks, np.float64)[:, :2]
    width = np.linalg.norm(p[_CHEEK_L] - p[_CHEEK_R])
    height = np.linalg.norm(p[_FOREHEAD] - p[_CHIN])
    return float(max(width, 0.75 * height, 1.0))


def _checked_points(landmarks: np.ndarray) -> np.ndarray:
    pts = np.asarray(landmarks, np.float32)
    if pts.ndim != 2 or pts.shape[1] < 2 or not np.isfinite(pts[:, :2]).all():
        raise ValueError(f"landmarks must be finite (N, 2|3) points, got shape {pts.shape}")
    return pts


def _fill_poly(canvas: np.ndarray, pts_xy: np.ndarray, value) -> None:
    """Fill the convex hull of ``pts_xy`` (float, canvas pixels) into ``canvas``."""
    hull = cv2.convexHull(np.round(pts_xy * (1 << _SHIFT)).astype(np.int32))
    cv2.fillConvexPoly(canvas, hull, value, lineType=cv2.LINE_8, shift=_SHIFT)


def _grow_hull(pts_xy: np.ndarray, radius: float, n: int = 16) -> np.ndarray:
    """Points whose convex hull contains the hull of ``pts_xy`` grown by ``radius`` pixels.

    The disc is replaced by its circumscribed ``n``-gon, so the result is a (tight) superset.
    Returns ``(len(hull) * n, 2) float32`` (the input points when ``radius <= 0``).
    """
    if radius <= 0:
        return pts_xy.astype(np.float32)
    hull = cv2.convexHull(pts_xy.astype(np.float32)).reshape(-1, 2)
    ang = np.arange(n) * (2 * np.pi / n)
    ring = np.stack([np.cos(ang), np.sin(ang)], 1) * (radius / np.cos(np.pi / n))
    return (hull[:, None, :] + ring[None].astype(np.float32)).reshape(-1, 2)


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Bounding box ``(x0, y0, x1, y1)`` (exclusive ends) of ``mask > 0``, or None if empty."""
    rows = np.flatnonzero(mask.max(axis=1) > 0)
    if rows.size == 0:
        return None
    y0, y1 = int(rows[0]), int(rows[-1]) + 1
    cols = np.flatnonzero(mask[y0:y1].max(axis=0) > 0)
    return int(cols[0]), y0, int(cols[-1]) + 1, y1


def face_mask(landmarks_list, shape, dilate: float, feather: float,
              out: np.ndarray | None = None) -> np.ndarray:
    """Compositing mask covering every given face.

    ``landmarks_list``: list of ``(478, 2|3)`` landmark sets in frame pixels (the engine passes
    the real and the retargeted landmarks, so the union covers the real face); None entries
    are skipped. ``shape``: ``(H, W[, C])`` of the frame. The union of the filled convex hulls
    of the sets' face ovals is grown by ``dilate * w`` pixels, where the mask is exactly
    ``1.0``; it then falls smoothly to ``0`` over a further ``feather * w`` pixels (outward
    feather). ``w`` is the largest :func:`face_width` among the sets (so the margin never
    shrinks because a set is small).

    Returns ``(H, W) float32`` in ``[0, 1]`` (written into ``out`` when given).
    """
    H, W = int(shape[0]), int(shape[1])
    if out is None:
        out = np.zeros((H, W), np.float32)
    else:
        out.fill(0.0)
    oval = face_oval_indices()
    sets = [_checked_points(lm) for lm in landmarks_list if lm is not None]
    if not sets:
        return out
    w = max(face_width(p) for p in sets)
    ovals = [p[oval, :2] for p in sets]
    grow, soft = max(dilate, 0.0) * w, max(feather, 0.0) * w
    m = int(np.ceil(grow + soft)) + 2
    allpts = np.concatenate(ovals)
    # Canvas: the ovals' box plus margin, clipped to the frame plus margin (so hull parts just
    # outside the frame still count for the distance of in-frame pixels).
    cx0 = max(int(np.floor(allpts[:, 0].min())) - m, -m)
    cy0 = max(int(np.floor(allpts[:, 1].min())) - m, -m)
    cx1 = min(int(np.ceil(allpts[:, 0].max())) + m + 1, W + m)
    cy1 = min(int(np.ceil(allpts[:, 1].max())) + m + 1, H + m)
    fx0, fy0, fx1, fy1 = max(cx0, 0), max(cy0, 0), min(cx1, W), min(cy1, H)
    if fx0 >= fx1 or fy0 >= fy1:
        return out
    canvas = np.full((cy1 - cy0, cx1 - cx0), 255, np.uint8)
    origin = np.array([cx0, cy0], np.float32)
    for pts in ovals:
        _fill_poly(canvas, pts - origin, 0)
    # Distance (px) of every canvas pixel to the union of hulls (0 inside them).
    dist = cv2.distanceTransform(canvas, cv2.DIST_L2, cv2.DIST_MASK_5)
    dist = dist[fy0 - cy0:fy1 - cy0, fx0 - cx0:fx1 - cx0]
    if soft > 0.5:
        # 1.0 up to `grow`, then a smoothstep down to 0 at `grow + soft` (256-entry table).
        idx = cv2.convertScaleAbs(cv2.max(dist, grow), alpha=255.0 / soft,
                                  beta=-grow * 255.0 / soft)
        val = cv2.LUT(idx, _FEATHER_LUT)
    else:
        val = (dist <= grow + soft).astype(np.float32)
    out[fy0:fy1, fx0:fx1] = val.reshape(fy1 - fy0, fx1 - fx0)
    return out


def _smoothstep_lut() -> np.ndarray:
    t = np.linspace(0.0, 1.0, 256, dtype=np.float64)
    lut = 1.0 - t * t * (3.0 - 2.0 * t)
    lut[0], lut[-1] = 1.0, 0.0
    return lut.astype(np.float32).reshape(1, 256)


_FEATHER_LUT = _smoothstep_lut()


def oval_distance(landmarks: np.ndarray, size: int) -> np.ndarray:
    """Signed distance of every pixel of a ``size`` x ``size`` crop to the edge of the face
    oval's convex hull, in units of :func:`face_width`: negative inside, positive outside.

    ``landmarks``: ``(478, 2|3)`` points in crop pixels. Returns ``(size, size) float32``.
    """
    pts = _checked_points(landmarks)
    inside = np.zeros((size, size), np.uint8)
    _fill_poly(inside, pts[face_oval_indices(), :2], 1)
    d_out = cv2.distanceTransform(1 - inside, cv2.DIST_L2, cv2.DIST_MASK_3)
    d_in = cv2.distanceTransform(inside, cv2.DIST_L2, cv2.DIST_MASK_3)
    return (d_out - d_in) * np.float32(1.0 / face_width(pts))


def skin_mask(landmarks: np.ndarray, size: int, depth: float = 0.15,
              dist: np.ndarray | None = None) -> np.ndarray:
    """The inner face of a ``size`` x ``size`` crop: ``(size, size) float32``, 1 deeper than
    ``depth`` face widths inside the oval of ``landmarks`` (``(478, 2|3)``, crop pixels), else
    0. Away from hair and background; :func:`color_match` compares two faces over it.
    ``dist``: :func:`oval_distance` of ``landmarks`` when the caller already has it."""
    if dist is None:
        dist = oval_distance(landmarks, size)
    return (dist < -depth).astype(np.float32)


def smoothstep(t: np.ndarray) -> np.ndarray:
    """0 below 0, 1 above 1, and 3t² - 2t³ between (the same shape as the feathering's table)."""
    t = np.clip(t, 0.0, 1.0)
    out = t * t
    t *= -2.0   # in place: the same numbers as t * t * (3 - 2 t), two temporaries fewer
    t += 3.0
    out *= t
    return out


def face_alpha(landmarks: np.ndarray, size: int, inner: float = 0.08, outer: float = 0.0,
               image: np.ndarray | None = None, edge: float = 0.2,
               dark: tuple[float, float] = (1.0, 2.5), dist: np.ndarray | None = None) -> np.ndarray:
    """How much of a generated crop is its face: ``(size, size) float32`` in [0, 1].

    ``1`` from ``inner`` face widths inside the oval of ``landmarks`` (``(478, 2|3)``, crop
    pixels) inward, ``0`` from ``outer`` widths outside it on (smoothstep between): beyond the
    oval the generator paints hair and background of its own, which :func:`paste` replaces.
    With ``image`` (the ``(size, size, 3) uint8`` upright crop), the generator's hair painted
    into the face is left out too, each strand with its half-dark fringe (else that fringe
    stays behind as a drawn outline), never the brows or eyes (:func:`_features`):

    - within ``edge`` face widths of the oval: pixels far darker than the inner face (lightness
      ``dark[0]`` to ``dark[1]`` robust standard deviations below its median; the inner face's
      spread, features and shading included, so an edge in shadow stays);
    - on the forehead (the rows above the brows), however deep: pixels as far darker than the
      bare skin (the inner face less its brows, eyes and lips), a fringe the identity wears.

    ``dist``: :func:`oval_distance` of ``landmarks`` when the caller already has it.
    """
    pts = _checked_points(landmarks)
    if dist is None:
        dist = oval_distance(pts, size)
    alpha = smoothstep((outer - dist) / max(inner + outer, 1e-6))
    if image is None:
        return alpha.astype(np.float32)
    L = cv2.cvtColor(image, cv2.COLOR_RGB2Lab)[..., 0].astype(np.float32)   # 0..255
    inside = dist < -edge - 0.05
    if cv2.countNonZero(inside.view(np.uint8)) < 16:
        return alpha.astype(np.float32)
    features = _features(pts, size)
    bare = inside & (features == 0) & (_lips(pts, size) == 0)
    bare = bare if cv2.countNonZero(bare.view(np.uint8)) >= 16 else inside
    ramp = max(0.03 * face_width(pts), 1.0)
    top = float(pts[list(BROWS), 1].min()) - ramp
    forehead = smoothstep((top - np.arange(size, dtype=np.float32)) / ramp)[:, None]
    near_edge = smoothstep((dist + edge) / (0.5 * edge))
    cut = np.maximum(near_edge * _darkness(L, L[inside], dark), forehead * _darkness(L, L[bare], dark))
    cut = cv2.GaussianBlur(cv2.dilate(cut, np.ones((3, 3), np.uint8)), (0, 0), 0.7)   # with the fringe
    alpha *= 1.0 - cut * (1.0 - features)
    return alpha.astype(np.float32)


def _darkness(L: np.ndarray, skin: np.ndarray, dark: tuple[float, float]) -> np.ndarray:
    """How far darker than ``skin`` (lightness samples) each pixel of ``L`` is: 0 up to
    ``dark[0]`` robust standard deviations below its median, 1 from ``dark[1]`` on."""
    med = float(np.median(skin))
    sd = max(1.4826 * float(np.median(np.abs(skin - med))), 5.0)
    return smoothstep(((med - L) / sd - dark[0]) / max(dark[1] - dark[0], 1e-6))


def _lips(pts: np.ndarray, size: int) -> np.ndarray:
    """``(size, size) uint8``: 1 inside the convex hull of the lips of ``pts``."""
    out = np.zeros((size, size), np.uint8)
    _fill_poly(out, pts[list(LIPS), :2], 1)
    return out


def sides(pts: np.ndarray, idx) -> tuple[np.ndarray, np.ndarray]:
    """Landmark indices ``idx`` split into those left and right of the face's middle (crop x)."""
    idx = np.asarray(idx)
    left = pts[idx, 0] < np.median(pts[:, 0])
    return idx[left], idx[~left]


def _features(landmarks: np.ndarray, size: int, reach: float = 0.02) -> np.ndarray:
    """``(size, size) float32`` in [0, 1]: 1 over the brows and eyes of ``landmarks`` (``(478,
    2|3)``, crop pixels; each one's convex hull), fading to 0 ``reach`` face widths out. Dark
    features a face must keep even near its edge (a brow is no hair strand)."""
    pts = _checked_points(landmarks)
    inside = np.zeros((size, size), np.uint8)
    for idx in (*sides(pts, BROWS), *sides(pts, EYELIDS)):   # each brow, each eye
        _fill_poly(inside, pts[idx, :2], 1)
    d = cv2.distanceTransform(1 - inside, cv2.DIST_L2, cv2.DIST_MASK_3)
    return smoothstep(1.0 - d / max(reach * face_width(pts), 1.0)).astype(np.float32)


def hair_over_face(image: np.ndarray, landmarks: np.ndarray, size: int, above: float = 0.04,
                   far: tuple[float, float] = (3.0, 5.0), dist: np.ndarray | None = None) -> np.ndarray:
    """The real hair that hangs over the top of a face (a fringe, hair over the temples), which
    the paste may keep instead of painting a forehead over it.

    ``image``: the real ``(size, size, 3) uint8`` RGB crop; ``landmarks``: its real ``(478,
    2|3)`` points in crop pixels (upright, as :func:`alignment.crop_face` makes them);
    ``dist``: their :func:`oval_distance` when the caller has it. A pixel counts as hair when
    it lies more than ``above`` face widths above the highest brow point, its colour is far
    from the face's own skin (the robust Lab spread of the inner face; ``far[0]`` to ``far[1]``
    spreads, smoothstep) and darker than it by 1-2 spreads (a highlight on a forehead is never
    taken for hair; light blond or grey hair is not kept either), and it belongs to a region
    that continues outside the face oval (hair grows from beyond the face: a mole, a shadow or
    a brow inside it is not kept).
    Returns ``(size, size) float32`` in [0, 1], softened by a 1 px Gaussian; all zeros when
    the inner face has too few pixels to tell skin from hair.
    """
    pts = _checked_points(landmarks)
    if dist is None:
        dist = oval_distance(pts, size)
    lab = cv2.cvtColor(image, cv2.COLOR_RGB2Lab).astype(np.float32)
    skin = lab[dist < -0.15]
    out = np.zeros((size, size), np.float32)
    margin = above * face_width(pts)                  # pixels
    top = float(pts[list(BROWS), 1].min()) - margin   # the hair kept lies above every brow point
    ramp = max(margin, 1.0)                           # and fades out over this many pixels
    if len(skin) < 64 or top <= 1:
        return out
    rows = min(int(np.ceil(top)), size)                # only the rows above the brows are looked at
    skin = skin[::max(1, len(skin) // 2048)]           # a robust centre and spread need ~2,000 pixels
    med = np.median(skin, axis=0)
    spread = np.maximum(1.4826 * np.median(np.abs(skin - med), axis=0), (6.0, 3.0, 3.0))
    z = (lab[:rows] - med) / spread
    darker = smoothstep(-z[..., 0] - 1.0)            # hair is darker than the skin (1-2 spreads on)
    z[..., 0] = np.minimum(z[..., 0], 0.0)
    score = darker * smoothstep((np.sqrt((z * z).sum(-1)) - far[0]) / max(far[1] - far[0], 1e-6))
    score *= smoothstep((top - np.arange(rows, dtype=np.float32)) / ramp)[:, None]   # no straight cut
    hair = (score > 0.5).astype(np.uint8)
    n, labels = cv2.connectedComponents(hair, connectivity=8)
    if n <= 1:
        return out
    outside = np.unique(labels[(dist[:rows] > 0.02) & (hair > 0)])
    keep = np.isin(labels, outside[outside > 0])
    out[:rows][keep] = score[keep]
    return cv2.GaussianBlur(out, (0, 0), 1.0)


def uncover(mask: np.ndarray, keep: np.ndarray, M_inv: np.ndarray) -> np.ndarray:
    """Lower a compositing ``mask`` (``(H, W) float32``, in place) where the real frame should
    stay: ``keep`` (``(S, S) float32`` in [0, 1], crop space, e.g. :func:`hair_over_face`) is
    warped into the frame by ``M_inv`` (``(2, 3)`` crop -> frame) and ``mask *= 1 - keep``.
    Only the frame box that ``keep > 0`` maps to is touched. Returns ``mask``."""
    roi = mask_box(keep)
    if roi is None:
        return mask
    kx0, ky0, kx1, ky1 = roi
    M = np.asarray(M_inv, np.float64).reshape(2, 3)
    corners = np.array([[kx0 - 1, ky0 - 1], [kx1, ky0 - 1], [kx0 - 1, ky1], [kx1, ky1]], np.float64)
    fr = corners @ M[:, :2].T + M[:, 2]
    H, W = mask.shape[:2]
    x0, y0 = max(int(np.floor(fr[:, 0].min())), 0), max(int(np.floor(fr[:, 1].min())), 0)
    x1, y1 = min(int(np.ceil(fr[:, 0].max())) + 1, W), min(int(np.ceil(fr[:, 1].max())) + 1, H)
    if x0 >= x1 or y0 >= y1:
        return mask
    M = M.copy()
    M[0, 2] -= x0
    M[1, 2] -= y0
    k = cv2.warpAffine(np.ascontiguousarray(keep, np.float32), M, (x1 - x0, y1 - y0),
                       flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    sub = mask[y0:y1, x0:x1]
    sub *= 1.0 - np.clip(k, 0.0, 1.0)
    return mask


def to_uint8(x: np.ndarray) -> np.ndarray:
    """A float image in 0..255 levels, rounded and saturated to ``uint8`` (unlike
    ``cv2.convertScaleAbs``, a negative overshoot stays dark)."""
    return np.clip(x + np.float32(0.5), 0, 255).astype(np.uint8)


def _srgb_to_linear_lut() -> np.ndarray:
    """``(256,) float32``: an 8-bit sRGB level's linear light (IEC 61966-2-1), 0..1."""
    v = np.arange(256, dtype=np.float64) / 255.0
    return np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4).astype(np.float32)


_TO_LINEAR = _srgb_to_linear_lut()


def _linear_to_srgb8(y: np.ndarray) -> np.ndarray:
    """Linear light (any shape, clipped to 0..1) -> rounded 8-bit sRGB levels (``uint8``)."""
    y = np.clip(np.asarray(y, np.float64), 0.0, 1.0)
    v = np.where(y <= 0.0031308, 12.92 * y, 1.055 * y ** (1 / 2.4) - 0.055)
    return np.round(v * 255.0).astype(np.uint8)


def light_gain(generated: np.ndarray, reference: np.ndarray, gen_mask: np.ndarray,
               ref_mask: np.ndarray, max_gain: float = 16.0) -> np.ndarray | None:
    """The light :func:`color_match` puts on a generated face: ``(3,) float64`` gains, one per
    RGB channel in linear light (the median of ``reference`` over ``ref_mask``, skipping
    near-black and blown-out pixels, over the median of ``generated`` over ``gen_mask``,
    clamped to ``[1 / max_gain, max_gain]``), or None when a region has fewer than 16 usable
    pixels. Arguments as :func:`color_match`'s."""
    g_in = np.asarray(gen_mask) > 0.5
    lab_r = cv2.cvtColor(reference.astype(np.float32) * (1 / 255), cv2.COLOR_RGB2Lab)
    usable = cv2.inRange(lab_r, (8.0, -128.0, -128.0), (97.0, 128.0, 128.0))  # not black/blown
    r_in = (usable > 0) & (np.asarray(ref_mask) > 0.5)
    if int(g_in.sum()) < 16 or int(r_in.sum()) < 16:
        return None
    med_g = np.median(_TO_LINEAR[generated[g_in]], axis=0)                  # (3,) linear light
    med_r = np.median(_TO_LINEAR[reference[r_in]], axis=0)
    return np.clip(med_r / np.maximum(med_g, 1e-4), 1.0 / max_gain, max_gain)


def _restore_contrast(out: np.ndarray, before: np.ndarray, where: np.ndarray, share: float) -> np.ndarray:
    """``out`` (``(h, w, 3) uint8`` RGB) with ``share`` of the lightness spread it lost against
    ``before`` (L* standard deviation over the boolean ``where``) given back around its mean
    lightness there; ``out`` itself when it lost none."""
    lab = cv2.cvtColor(out.astype(np.float32) * (1 / 255), cv2.COLOR_RGB2Lab)
    L = lab[..., 0]
    sd_out = float(L[where].std())
    sd_before = float(cv2.cvtColor(before.astype(np.float32) * (1 / 255), cv2.COLOR_RGB2Lab)[..., 0][where].std())
    c = 1.0 + share * (max(sd_before / max(sd_out, 1e-3), 1.0) - 1.0)
    if c <= 1.001:
        return out
    mu = float(L[where].mean())
    lab[..., 0] = mu + (L - mu) * c
    return cv2.convertScaleAbs(cv2.max(cv2.cvtColor(lab, cv2.COLOR_Lab2RGB), 0.0), alpha=255.0)


def color_match(generated: np.ndarray, reference: np.ndarray, gen_mask: np.ndarray,
                ref_mask: np.ndarray, max_gain: float = 16.0, keep_contrast: float = 1.0) -> np.ndarray:
    """Re-light the generated face with the real frame's light and white balance.

    ``generated``, ``reference``: ``(h, w, 3) uint8`` RGB on the same pixel grid (the generated
    crop and the real frame warped into crop space); ``gen_mask``, ``ref_mask``: ``(h, w)``
    regions (``> 0.5``) to compare, e.g. the inner skin of each face (:func:`skin_mask`).
    Each channel of ``generated`` is multiplied, in linear light, by one gain
    (:func:`light_gain`: the real skin's median over the generated skin's). That is how a
    change of exposure and light colour acts on a real face: shading and skin keep their
    ratios, so a face made darker keeps its shadows in proportion instead of sinking them into
    brown (an additive Lab shift with a spread match, used before session 18, painted dark
    brown blotches and orange patches). Darkening also flattens the face's lightness spread
    (L*); ``keep_contrast`` of what it loses is given back around the face's mean lightness (1,
    the default: all of it, the face keeps its own spread as it did before; 0: none, which
    measured a sharpness of 0.73 of the input's on the clips instead of 0.84, docs/results.md
    session 18); a face made brighter keeps its own. A
    grey-scale reference gives a grey face (its lightness only). Only these 3 numbers come
    from the reference: no texture. Returns a new ``(h, w, 3) uint8``; ``generated``
    unchanged if a region has fewer than 16 usable pixels.
    """
    gain = light_gain(generated, reference, gen_mask, ref_mask, max_gain)
    if gain is None:
        return generated.copy()
    lut = _linear_to_srgb8(_TO_LINEAR[:, None] * gain[None, :])             # (256, 3) per channel
    out = cv2.LUT(generated, lut.reshape(1, 256, 3))
    if keep_contrast > 0:
        out = _restore_contrast(out, generated, np.asarray(gen_mask) > 0.5, keep_contrast)
    if is_grey(reference, (np.asarray(ref_mask) > 0.5).view(np.uint8)):
        out = cv2.cvtColor(cv2.cvtColor(out, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    return out


def is_grey(image: np.ndarray, mask: np.ndarray | None = None, tol: float = 1.5) -> bool:
    """Whether an ``(h, w, 3) uint8`` RGB image (over ``mask`` ``(h, w) uint8 > 0``, if given)
    is grey-scale: its channels differ by less than ``tol`` on average and by more than
    ``4 * tol`` at under 1 % of the pixels (a grey JPEG saved as colour keeps a little chroma
    noise). False when no pixel is looked at."""
    img = np.asarray(image)
    n = img.shape[0] * img.shape[1] if mask is None else cv2.countNonZero(mask)
    if n == 0:
        return False
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    spread = cv2.absdiff(cv2.max(cv2.max(r, g), b), cv2.min(cv2.min(r, g), b))
    wide = cv2.compare(spread, 4 * tol, cv2.CMP_GT)
    if mask is not None:
        wide = cv2.bitwise_and(wide, wide, mask=mask)
    return float(cv2.mean(spread, mask=mask)[0]) < tol and cv2.countNonZero(wide) < 0.01 * n


def smooth_fill(values: np.ndarray, weights: np.ndarray, levels: int = 6) -> np.ndarray:
    """Fill an image's unknown pixels smoothly from its known ones (pull-push interpolation).

    ``values``: ``(h, w, 3) float32``, already multiplied by ``weights``; ``weights``: ``(h, w)
    float32`` in [0, 1] (1 known, 0 unknown). Known pixels keep their value, unknown ones get a
    smooth blend of the known values around them (coarser the farther they are), over at most
    ``levels`` halvings. Returns ``(h, w, 3) float32`` (all zeros when nothing is known).
    """
    pyr = [(values, weights)]
    while len(pyr) <= levels and min(pyr[-1][1].shape) > 2:
        v, w = pyr[-1]
        pyr.append((cv2.pyrDown(v), cv2.pyrDown(w)))
    v, w = pyr[-1]
    total = float(w.sum())
    if total <= 0:
        return np.zeros_like(values)
    fill = np.empty_like(v)
    fill[:] = v.sum((0, 1)) / total                     # the mean of what is known
    for v, w in reversed(pyr):
        if v.shape[:2] != fill.shape[:2]:
            fill = cv2.pyrUp(fill, dstsize=(v.shape[1], v.shape[0]))
        conf = cv2.min(w * 2.0, 1.0)                    # how much this level knows here
        mean = cv2.divide(v, cv2.merge([w + 1e-6] * 3))
        fill = cv2.blendLinear(mean, fill, conf, 1.0 - conf)
    return fill


BAND_EDGE = (0.25, 8.0, 24.0)   # the band's switch: its width (share of the band) where the sides differ by
                                # the 3rd ΔE or more, all of the band at the 2nd or less (:func:`_band_edge`)
BAND_EDGE_FROM = 0.3            # ... and only below this share of the face's height (the brows): see there


def _band_sides(src: np.ndarray, alpha: np.ndarray, real: np.ndarray,
                known: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Smooth colours for the band between the generated face and its real surroundings, one
    for each side.

    All at the same (low) resolution: ``src`` ``(h, w, 3) float32`` the warped crop; ``alpha``
    ``(h, w) float32`` its face weight there; ``real`` ``(h, w, 3) float32`` the frame's pixels
    multiplied by ``known`` ``(h, w) float32`` in [0, 1] (0 wherever the full mask is: never the
    real face). Returns (the face (where ``alpha`` is ~1, so no hair is mixed in), the real
    frame (None when nothing is known)), each extended across the band (:func:`smooth_fill`),
    ``(h, w, 3) float32``; :func:`_band_switch` says where one gives way to the other.
    """
    inner = smoothstep((alpha - 0.8) * 5.0)
    face = smooth_fill(src * inner[..., None], inner)
    return face, (smooth_fill(real, known) if known.max() > 0 else None)


def _band_switch(alpha8: np.ndarray, known: np.ndarray, width: np.ndarray) -> np.ndarray:
    """``(h, w) float32`` in [0, 1]: how much of the real side's fill a band pixel takes, from
    its relative distance across the band (0 on the convex hull of the face, where ``alpha8``
    (uint8) passes half: a strand cut out of the face is filled from the face; 1 where
    ``known`` (uint8, 255) begins), turning over the first ``width`` (``(h, w) float32`` in
    (0, 1], :func:`_band_edge`) of the way (smoothstep), at the frame's full resolution."""
    face = cv2.compare(alpha8, 128, cv2.CMP_GE)
    contours, _ = cv2.findContours(face, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if contours:
        cv2.fillConvexPoly(face, cv2.convexHull(np.concatenate(contours)), 255)
    d_face = cv2.distanceTransform(cv2.bitwise_not(face), cv2.DIST_L2, cv2.DIST_MASK_3)
    d_real = cv2.distanceTransform(cv2.compare(known, 128, cv2.CMP_LT), cv2.DIST_L2, cv2.DIST_MASK_3)
    rel = d_face / np.maximum(d_face + d_real, 1e-6)
    return smoothstep(rel / width)


def _sides_apart(face_side: np.ndarray, real_side: np.ndarray) -> np.ndarray:
    """``(h, w) float32``: CIELAB ΔE between the band's two sides (``(h, w, 3)`` RGB, ``uint8``
    or float on the 0-255 scale, :func:`_band_sides`)."""
    lab = [cv2.cvtColor(cv2.convertScaleAbs(side), cv2.COLOR_RGB2Lab).astype(np.float32)
           for side in (face_side, real_side)]
    diff = (lab[0] - lab[1]) * np.float32([100 / 255, 1, 1])   # 8-bit Lab: L is scaled to 0..255
    return np.sqrt((diff * diff).sum(-1))


def _band_edge(apart: np.ndarray, edge: tuple[float, float, float] = BAND_EDGE) -> np.ndarray:
    """How sharply the band turns from the face to the real frame (``(h, w) float32`` in [0,
    1]: 1 in an edge ``edge[0]`` of the band wide, 0 over the whole band), from how far apart
    its two sides' colours are (``apart``: ΔE, :func:`_sides_apart`): where the face meets hair,
    a wall or clothes (``edge[2]`` or more) it ends in an edge, as a real face does, not in a
    wide blur; where it meets skin of nearly its own colour (``edge[1]`` or less) no edge is
    drawn."""
    return smoothstep((apart - edge[1]) / max(edge[2] - edge[1], 1e-6)).astype(np.float32)


def _below_brows(face: np.ndarray, start: float = BAND_EDGE_FROM) -> np.ndarray:
    """``(S, S) uint8`` in the crop (upright): 255 from ``start`` of the face's height (``face``:
    its alpha, :func:`face_alpha`) down, 0 above, a tenth of its height between: where the
    band may end the face in an edge. A forehead's skin runs on to the hairline, which the mask
    cuts across: an edge there would draw a band over the forehead."""
    rows = np.flatnonzero(face.max(axis=1) >= 0.5)
    S = face.shape[0]
    if rows.size == 0:
        return np.zeros_like(face, np.uint8)
    top, height = float(rows[0]), float(rows[-1] - rows[0]) + 1.0
    ramp = smoothstep((np.arange(S, dtype=np.float32) - top - start * height) / (0.1 * height))
    return np.repeat(cv2.convertScaleAbs(ramp[:, None], alpha=255.0), face.shape[1], axis=1)


SEAM_SKIN = (12.0, 24.0)   # ΔE between the band's sides: the real side is the face's own skin up to the
                           # first, something else (hair, a wall) from the second (:func:`_forehead_seam`)


def _forehead_seam(face_side: np.ndarray, real_side: np.ndarray, apart: np.ndarray, alpha: np.ndarray,
                   ring: np.ndarray, above: np.ndarray, skin: tuple[float, float] = SEAM_SKIN) -> np.ndarray:
    """What to add to the generated face so its forehead meets the real forehead's skin without
    a step, ``(h, w, 3) float32`` (RGB levels; all at the fill's low resolution).

    The mask cuts across a forehead below its hairline, so there the generated skin meets the
    real skin of the same brow in a seam wherever their colours differ (light from above, a
    shine). Like a gradient-domain blend, the difference between the band's two sides
    (``face_side``, ``real_side``: ``(h, w, 3) float32`` :func:`_band_sides`; ``apart``: their
    ΔE, :func:`_sides_apart`) is read on ``ring`` (``(h, w) float32`` in [0, 1]: where the real
    frame shows beside the face) above the brows (``above``, ``(h, w) float32``) where the real
    side is skin (ΔE up to ``skin[0]``; none from ``skin[1]``: hair, a wall), and carried
    smoothly (:func:`smooth_fill`) into the face, down to nothing where the face (``alpha``
    ``(h, w) float32``) is whole below the brows.
    """
    same = 1.0 - smoothstep((apart - skin[0]) / max(skin[1] - skin[0], 1e-6))
    read = (ring * above * same * (alpha < 0.5)).astype(np.float32)
    anchor = ((alpha >= 0.99) & (above <= 0.01)).astype(np.float32)   # the whole face below the brows: as it is
    if read.max() <= 0 or anchor.max() <= 0:   # (a face a few pixels wide has no whole part to hold)
        return np.zeros_like(face_side)
    weights = np.maximum(read, anchor)
    values = (real_side - face_side) * read[..., None]
    return smooth_fill(np.ascontiguousarray(values, np.float32), weights)


GRAIN_WINDOW = 7          # px: noise_sigma reads the grain's local spread in windows this wide
GRAIN_QUANTILE = 10      # ... and takes this percentile of them (texture raises only some windows)
_QUANTILE_TO_SPREAD = 1 / 0.855   # plain Gaussian grain: that percentile reads 0.855 of its spread


def noise_sigma(image: np.ndarray, where: np.ndarray) -> float:
    """Robust standard deviation (0..255 levels) of an ``(h, w, 3) uint8`` image's fine grain
    (its lightness minus a σ = 1 px Gaussian of it) over ``where`` (``(h, w)`` > 0); 0 when
    fewer than 64 pixels are given. It is a low percentile (:data:`GRAIN_QUANTILE`) of the
    grain's RMS in :data:`GRAIN_WINDOW` px windows, scaled to read plain Gaussian grain's
    spread: hair, leaves, wrinkles and edges raise only the windows they cross, so texture is
    not read as the camera's noise (a face pasted on foliage would otherwise get sandpaper)."""
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
    resid = grey - cv2.GaussianBlur(grey, (0, 0), 1.0)
    local = cv2.boxFilter(resid * resid, -1, (GRAIN_WINDOW, GRAIN_WINDOW))
    r = local[where > 0]
    if r.size < 64:
        return 0.0
    return float(np.sqrt(np.percentile(r, GRAIN_QUANTILE)) * _QUANTILE_TO_SPREAD)


def add_grain(synth: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    """``synth`` ``(h, w, 3) uint8`` plus grey (the same on every channel) Gaussian grain of
    ``sigma`` levels, seeded by ``seed``; returns a new array (``synth`` when ``sigma`` <= 0.2)."""
    if sigma <= 0.2:
        return synth
    g = np.random.default_rng(seed).standard_normal(synth.shape[:2], dtype=np.float32) * sigma
    return to_uint8(synth.astype(np.float32) + g[..., None])


SHARPEN_SIGMA = 1.5   # frame px: the fine band the sharpness match boosts (an unsharp mask of this radius)
SHARPEN_MOST = 1.5    # the largest unsharp-mask amount it uses
SOFTEN_MOST = 0.5     # the largest share of that band it takes away from a face sharper than the camera's


def laplacian_energy(grey: np.ndarray, mask: np.ndarray, sigma: float = 1.0) -> float:
    """Variance of the Laplacian of ``grey`` ``(h, w)`` (any real dtype, 0-255 scale) after a
    Gaussian of ``sigma`` px, over ``mask`` ``(h, w) bool``: fine detail, with grain finer than
    ``sigma`` smoothed away. ``mask`` may also be ``uint8`` (> 0 inside)."""
    mask = mask.view(np.uint8) if mask.dtype == bool else mask
    if cv2.countNonZero(mask) == 0:
        return float("nan")
    return float(cv2.meanStdDev(_fine_laplacian(grey, sigma), mask=mask)[1][0, 0] ** 2)


def _fine_laplacian(grey: np.ndarray, sigma: float) -> np.ndarray:
    g = cv2.GaussianBlur(grey.astype(np.float32), (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
    return cv2.Laplacian(g, cv2.CV_32F, ksize=1, borderType=cv2.BORDER_REFLECT)


def _inner_face(alpha8: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """``(h, w) uint8`` 255 on the inside of a pasted face, where its alpha ``alpha8`` (uint8) is
    full and the mask ``weight`` covers the frame, shrunk by a tenth of its size so the face's
    outline (the real jaw and hairline against the background; the smooth fill in the output)
    is not in it."""
    full = cv2.bitwise_and(cv2.compare(alpha8, 255, cv2.CMP_GE), cv2.compare(weight, 1.0, cv2.CMP_GE))
    depth = cv2.distanceTransform(full, cv2.DIST_L2, cv2.DIST_MASK_3)
    return cv2.compare(depth, 0.1 * np.sqrt(cv2.countNonZero(full)), cv2.CMP_GT)


def _masked_moments(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> tuple[float, float, float]:
    """(var a, var b, cov a b) over ``mask`` ``(h, w) uint8`` (255 inside)."""
    ma, sa = (float(v[0, 0]) for v in cv2.meanStdDev(a, mask=mask))
    mb, sb = (float(v[0, 0]) for v in cv2.meanStdDev(b, mask=mask))
    return sa * sa, sb * sb, float(cv2.mean(cv2.multiply(a, b), mask=mask)[0]) - ma * mb


def match_sharpness(synth: np.ndarray, target: float, region: np.ndarray, weight: np.ndarray,
                    source: np.ndarray | None = None, sigma: float = SHARPEN_SIGMA,
                    most: float = SHARPEN_MOST) -> np.ndarray:
    """``synth`` ``(h, w, 3) uint8`` sharpened or softened until its fine detail over ``region``
    ``(h, w) uint8`` (255 inside; :func:`laplacian_energy`) is ``target``: its lightness's
    high-pass (itself minus a Gaussian of ``sigma`` px) is added, the same on every channel (a
    grey image stays grey; colours are not sharpened into fringes), times ``weight`` ``(h, w)
    float32`` in [0, 1] and an amount ``a`` in [-:data:`SOFTEN_MOST`, ``most``] worked out
    exactly (the energy is a quadratic in ``a``; -1 would be the Gaussian itself). ``source``
    (same shape as ``synth``): the image whose high-pass is used (``synth`` less its grain:
    grain is matched, not sharpened)."""
    if cv2.countNonZero(region) < 16 or not target > 0:   # (NaN: no real face to read)
        return synth
    grey = cv2.cvtColor(synth, cv2.COLOR_RGB2GRAY).astype(np.float32)
    own = grey if source is None else cv2.cvtColor(source, cv2.COLOR_RGB2GRAY).astype(np.float32)
    high = own - cv2.GaussianBlur(own, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
    v0, vh, c = _masked_moments(_fine_laplacian(grey, 1.0), _fine_laplacian(high, 1.0), region)
    if vh <= 1e-9:
        return synth
    # energy(a) = v0 + 2 c a + vh a^2: the root nearest 0 (or the least energy when out of reach)
    root = np.sqrt(max(c * c + vh * (target - v0), 0.0))
    amount = float(np.clip(min((-c + root) / vh, (-c - root) / vh, key=abs), -SOFTEN_MOST, most))
    add = cv2.multiply(high, weight, scale=amount)
    return to_uint8(synth.astype(np.float32) + add[..., None])


def _pyr_up(small: np.ndarray, sizes: list[tuple[int, int]]) -> np.ndarray:
    """A float image worked out ``len(sizes) - 1`` pyramid levels down, back at ``sizes[0]``
    (``(w, h)`` per level, full size first), as ``uint8`` (rounded, saturated)."""
    up = cv2.convertScaleAbs(small)
    for size in reversed(sizes[:-1]):
        up = cv2.pyrUp(up, dstsize=size)
    return up


def paste(frame: np.ndarray, crop: np.ndarray, M_inv: np.ndarray, mask: np.ndarray,
          out: np.ndarray | None = None,
          box: tuple[int, int, int, int] | None = None,
          face: np.ndarray | None = None, fill_levels: int = 2,
          protect: np.ndarray | None = None, grain: bool = False, sharpen: bool = False) -> np.ndarray:
    """Warp ``crop`` into the frame and blend it in under ``mask``.

    ``frame``: ``(H, W, 3) uint8``; ``crop``: ``(S, S, 3) uint8``; ``M_inv``: ``(2, 3)`` affine
    mapping crop pixels to frame pixels; ``mask``: ``(H, W) float32`` in [0, 1] (from
    :func:`face_mask`); ``box``: optional ``(x0, y0, x1, y1)`` bounding ``mask > 0`` (saves a
    scan). Returns ``(H, W, 3) uint8`` (``out`` if given; ``out`` may be ``frame`` to paste in
    place).

    Without ``face``: plain alpha blend; where the mask is set but the warped crop does not
    reach, the placeholder colour is used. With ``face`` (``(S, S) float32`` alpha of the
    crop's own face, :func:`face_alpha`): the generated face is kept; everything else under the
    mask (the generator's hair and background, the area the crop does not reach) becomes a
    smooth fill between the face's edge and the frame where ``mask < 1`` (:func:`_band_sides`,
    at ``2 ** -fill_levels`` of the resolution), so the face meets its real surroundings
    without a band of foreign colour, and a forehead meets the real forehead's skin beyond the
    mask without a step (:func:`_forehead_seam`); a grey-scale frame gets a grey face.
    Either way, no raw content of the frame where ``mask == 1`` is kept or blended in; with
    ``grain`` or ``sharpen`` two numbers are read from this face's own real pixels there (its
    grain level and its fine-detail level), nothing else. ``protect`` (``(H, W) float32``, e.g.
    every real face of the frame): the fill never reads the frame where it is > 0 either
    (another face not pasted yet).
    ``grain`` (with ``face``): grey grain is added to the synthetic region so its fine noise
    matches the camera's (:func:`noise_sigma` on the real face and on the ring just outside the
    mask, the lower: texture only adds; seeded by the crop, so the same input gives the same
    output); grain is not detail: a σ = 1 px blur removes it. ``sharpen`` (with ``face``): the
    face's fine detail is matched to the real face's (:func:`match_sharpness`).
    """
    if out is None:
        out = frame.copy()
    elif out is not frame:
        np.copyto(out, frame)
    roi = mask_box(mask) if box is None else box
    if roi is None:
        return out
    x0, y0, x1, y1 = roi
    M = np.asarray(M_inv, np.float64).reshape(2, 3).copy()
    M[0, 2] -= x0
    M[1, 2] -= y0
    w, h = x1 - x0, y1 - y0
    weight = np.ascontiguousarray(mask[y0:y1, x0:x1], np.float32)
    dst = out[y0:y1, x0:x1]
    if face is None or min(w, h) < 4 << max(0, int(fill_levels)):   # a sliver (a face leaving the frame)
        src = cv2.warpAffine(crop, M, (w, h), flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_CONSTANT, borderValue=PLACEHOLDER_RGB)
        cv2.blendLinear(src, dst, weight, 1.0 - weight, dst=dst)
        return out
    src = cv2.warpAffine(crop, M, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    face8 = cv2.convertScaleAbs(np.asarray(face, np.float32), alpha=255.0)
    alpha8 = cv2.warpAffine(face8, M, (w, h), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    # The fill is smooth: it is worked out 2 ** fill_levels times smaller (Gaussian pyramid).
    known = cv2.compare(weight, 1.0, cv2.CMP_LT)                  # 255 where the frame may be used
    if protect is not None:
        known = cv2.bitwise_and(known, cv2.compare(np.ascontiguousarray(protect[y0:y1, x0:x1]), 0.0, cv2.CMP_LE))
    real = cv2.bitwise_and(dst, dst, mask=known)                  # the real face zeroed out
    sizes = [(w, h)]
    small = [src, alpha8, real, known]
    for _ in range(max(0, int(fill_levels))):
        small = [cv2.pyrDown(img) for img in small]
        sizes.append((small[0].shape[1], small[0].shape[0]))
    src_s, alpha_s, real_s, known_s = small
    band = _band_sides(src_s.astype(np.float32), alpha_s.astype(np.float32) * (1 / 255),
                       real_s.astype(np.float32), known_s.astype(np.float32) * (1 / 255))
    if band[1] is not None:
        apart = _sides_apart(*band)   # the band's edge is read from the sides as they were
        below = cv2.warpAffine(_below_brows(np.asarray(face, np.float32)), M, (w, h), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_REPLICATE)
        weight_s, below_s = (cv2.resize(img, sizes[-1], interpolation=cv2.INTER_AREA) for img in (weight, below))
        ring = (weight_s < 1.0) * (weight_s > 0.0) * (known_s.astype(np.float32) * (1 / 255))
        seam = _forehead_seam(band[0], band[1], apart, alpha_s.astype(np.float32) * (1 / 255), ring,
                              1.0 - below_s.astype(np.float32) * (1 / 255))
        if np.abs(seam).max() >= 0.5:   # the face meets real forehead skin of another shade
            band = (band[0] + seam, band[1])
            src = cv2.add(src, cv2.resize(seam, (w, h), interpolation=cv2.INTER_LINEAR), dtype=cv2.CV_8U)
    face_side, real_side = (None if side is None else _pyr_up(side, sizes) for side in band)
    fill = face_side
    if real_side is not None:
        sharp = cv2.resize(_band_edge(apart), (w, h), interpolation=cv2.INTER_LINEAR)
        sharp = cv2.multiply(sharp, below, scale=1 / 255, dtype=cv2.CV_32F)
        t = _band_switch(alpha8, known, 1.0 - (1.0 - BAND_EDGE[0]) * sharp)
        fill = cv2.blendLinear(real_side, face_side, t, 1.0 - t)
    alpha = cv2.multiply(alpha8, 1 / 255, dtype=cv2.CV_32F)
    synth = cv2.blendLinear(src, fill, alpha, 1.0 - alpha)
    inner = _inner_face(alpha8, weight) if grain or sharpen else None
    if grain:   # the camera's grain on skin, which the generated face and the smooth fill lack
        # the least of the real face's and its surroundings' (texture only adds: hair, leaves, wrinkles)
        ring = cv2.bitwise_and(known, cv2.compare(weight, 0.0, cv2.CMP_GT))
        real = noise_sigma(dst, ring)
        if cv2.countNonZero(inner) >= 64:   # a face too small to read keeps the ring's
            real = min(real, noise_sigma(dst, inner))
        if real > 0.5:   # a clean (or heavily compressed) frame has none to match
            own = noise_sigma(synth, inner)
            synth = add_grain(synth, float(np.sqrt(max(real ** 2 - own ** 2, 0.0))),
                              seed=int(crop[::7, ::7].sum()))
    if sharpen:   # the camera's sharpness: the real face's fine detail (one number)
        target = laplacian_energy(cv2.cvtColor(dst, cv2.COLOR_RGB2GRAY), inner)
        # sharpened: the face over its own side's fill, without the band's edge (no halo round it)
        clean = cv2.blendLinear(src, face_side, alpha, 1.0 - alpha)
        synth = match_sharpness(synth, target, inner, alpha, source=clean)
    if is_grey(real_s, cv2.compare(known_s, 254, cv2.CMP_GE)):   # the frame around the face
        synth = cv2.cvtColor(cv2.cvtColor(synth, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    cv2.blendLinear(synth, dst, weight, 1.0 - weight, dst=dst)
    return out


def _region(frame_shape, landmarks_or_box, margin: float):
    """(x0, y0, x1, y1, polygon points or None) of a placeholder region, clipped to the frame."""
    H, W = frame_shape[:2]
    arr = np.asarray(landmarks_or_box, np.float32)
    if arr.ndim == 1 and arr.size == 4:
        x0, y0, x1, y1 = (float(v) for v in arr)
        pad = margin * max(x1 - x0, y1 - y0)
        box = (int(np.floor(x0 - pad)), int(np.floor(y0 - pad)),
               int(np.ceil(x1 + pad)), int(np.ceil(y1 + pad)))
        poly = None
    else:
        pts = _checked_points(arr)[:, :2]
        size = face_width(pts) if len(pts) > max(_CHEEK_L, _CHEEK_R, _CHIN) else float(
            np.ptp(pts, axis=0).max())
        poly = _grow_hull(pts, margin * size)
        box = (int(np.floor(poly[:, 0].min())), int(np.floor(poly[:, 1].min())),
               int(np.ceil(poly[:, 0].max())) + 1, int(np.ceil(poly[:, 1].max())) + 1)
    x0, y0 = max(box[0], 0), max(box[1], 0)
    x1, y1 = min(box[2], W), min(box[3], H)
    return x0, y0, x1, y1, poly


def _draw_icon(patch: np.ndarray) -> None:
    """Draw a simple person icon centred in ``patch`` ``(h, w, 3)`` (in place)."""
    h, w = patch.shape[:2]
    s = min(h, w)
    if s < 12:
        return
    cx, cy = w // 2, h // 2
    head = max(2, int(0.17 * s))
    cv2.circle(patch, (cx, cy - int(0.12 * s)), head, ICON_RGB, -1, cv2.LINE_AA)
    cv2.ellipse(patch, (cx, cy + int(0.34 * s)), (int(0.3 * s), int(0.22 * s)), 0, 180, 360,
                ICON_RGB, -1, cv2.LINE_AA)


def cover_placeholder(frame: np.ndarray, landmarks_or_box, out: np.ndarray | None = None,
                      margin: float = 0.15) -> np.ndarray:
    """Opaque placeholder over one face region (fail-closed fallback).

    ``landmarks_or_box``: a box ``(x0, y0, x1, y1)`` in frame pixels, grown by
    ``margin * max(box side)`` each side; or landmarks ``(N, 2|3)``, whose convex hull is grown
    by ``margin * face width``. Every pixel of the region becomes the flat placeholder grey or
    the icon drawn on it (no blur of the original). Returns ``(H, W, 3) uint8`` (``out`` if
    given; ``out`` may be ``frame``).
    """
    if out is None:
        out = frame.copy()
    elif out is not frame:
        np.copyto(out, frame)
    x0, y0, x1, y1, poly = _region(frame.shape, landmarks_or_box, margin)
    if x0 >= x1 or y0 >= y1:
        return out
    patch = np.empty((y1 - y0, x1 - x0, 3), np.uint8)
    patch[:] = PLACEHOLDER_RGB
    _draw_icon(patch)
    dst = out[y0:y1, x0:x1]
    if poly is None:
        dst[:] = patch
    else:
        region = np.zeros(patch.shape[:2], np.uint8)
        _fill_poly(region, poly - np.array([x0, y0], np.float32), 255)
        cv2.copyTo(patch, region, dst)
    return out


def _fit_text(text: str, max_w: float, max_h: float):
    """(scale, thickness) so that ``text`` fits in ``max_w x max_h`` pixels."""
    (tw, th), base = cv2.getTextSize(text, _FONT, 1.0, 2)
    scale = max(0.3, min(max_w / max(tw, 1), max_h / max(th + base, 1)))
    return scale, max(2, int(round(scale * 2.0)))


def status_frame(width: int, height: int, text: str) -> np.ndarray:
    """A full placeholder frame ``(height, width, 3) uint8``: flat grey, ``text`` centred
    (``"\\n"`` separates lines). Used while the engine starts or when it cannot run."""
    img = np.empty((int(height), int(width), 3), np.uint8)
    img[:] = PLACEHOLDER_RGB
    lines = text.split("\n") or [""]
    longest = max(lines, key=len) or " "
    scale, thick = _fit_text(longest, 0.8 * width, 0.12 * height)
    scale = min(scale, 1.5 * height / 480)
    (_, th), base = cv2.getTextSize("Ag", _FONT, scale, thick)
    step = int((th + base) * 1.4)
    y = int(height / 2 - step * (len(lines) - 1) / 2 + th / 2)
    for line in lines:
        (tw, _), _ = cv2.getTextSize(line, _FONT, scale, thick)
        cv2.putText(img, line, (int((width - tw) / 2), y), _FONT, scale, TEXT_RGB, thick,
                    cv2.LINE_AA)
        y += step
    return img


def badge(frame: np.ndarray, text: str = "NOT ANONYMIZED",
          out: np.ndarray | None = None) -> np.ndarray:
    """A small red badge with white ``text`` in the top-left corner.

    ``frame``: ``(H, W, 3) uint8``. Returns ``(H, W, 3) uint8`` (``out`` if given; ``out`` may
    be ``frame`` to draw in place)."""
    if out is None:
        out = frame.copy()
    elif out is not frame:
        np.copyto(out, frame)
    H, W = out.shape[:2]
    scale = max(0.35, 0.55 * H / 480)
    thick = max(1, int(round(scale * 1.6)))
    (tw, th), base = cv2.getTextSize(text, _FONT, scale, thick)
    pad = max(3, int(6 * scale))
    x0 = y0 = max(4, int(0.015 * min(H, W)))
    x1, y1 = min(W, x0 + tw + 2 * pad), min(H, y0 + th + base + 2 * pad)
    cv2.rectangle(out, (x0, y0), (x1 - 1, y1 - 1), BADGE_RGB, -1)
    cv2.putText(out, text, (x0 + pad, y0 + pad + th), _FONT, scale, TEXT_RGB, thick,
                cv2.LINE_AA)
    return out
