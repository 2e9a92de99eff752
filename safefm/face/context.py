"""The frame around the face, as the generator sees it (context-aware generation, issue 14).

The ControlNet of a model with ``context_channels = 4`` reads, besides the expression heatmaps,
the aligned crop of the real frame with the face masked out and the mask itself, so skin tone,
light direction, white balance, grain, a grey-scale picture and the hair line continue from the
real frame into the synthetic face (the inpainting conditioning of DeepPrivacy2). The mask covers
the face oval (jaw line to the top of the forehead) grown by ``grow`` face widths, for every
landmark set given: the real face's and the identity's retargeted one, so neither the person's
face nor its outline reaches the generator.

Layout of the ``(4, S, S) float32`` context: channels 0-2 the crop's RGB in [-1, 1], 0 under
the mask; channel 3 the mask (1 = generate here). :func:`null_context` (all masked, no pixels)
is what a model trained with context dropout draws without a frame (identity previews, warm-up).
"""

from __future__ import annotations

import numpy as np

from .composite import oval_distance

CHANNELS = ("red", "green", "blue", "mask")


def context_mask(landmark_sets, size: int, grow: float) -> np.ndarray:
    """``(size, size) float32``: 1 within ``grow`` face widths of any given face oval, else 0.

    landmark_sets: one or more ``(478, 2|3)`` landmark arrays in crop pixels."""
    mask = np.zeros((size, size), bool)
    for lm in landmark_sets:
        mask |= oval_distance(lm, size) < grow
    return mask.astype(np.float32)


def render_context(crop: np.ndarray, mask: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """The context of an ``(S, S, 3) uint8`` RGB crop under ``mask`` ``(S, S)`` in [0, 1]:
    ``(4, S, S) float32`` (see the module's layout); written into ``out`` when given."""
    s = crop.shape[0]
    if crop.shape != (s, s, 3) or mask.shape != (s, s):
        raise ValueError(f"context needs an (S, S, 3) crop and an (S, S) mask, got {crop.shape} and {mask.shape}")
    if out is None:
        out = np.empty((len(CHANNELS), s, s), np.float32)
    keep = 1.0 - mask
    out[:3] = (crop.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0) * keep
    out[3] = mask
    return out


def null_context(size: int) -> np.ndarray:
    """``(4, size, size) float32``: no surroundings known, everything to generate."""
    out = np.zeros((len(CHANNELS), size, size), np.float32)
    out[3] = 1.0
    return out


def face_context(crop: np.ndarray, landmark_sets, grow: float, size: int | None = None,
                 out: np.ndarray | None = None) -> np.ndarray:
    """:func:`render_context` of an ``(S, S, 3) uint8`` crop under :func:`context_mask` of
    ``landmark_sets`` (crop pixels), at ``size`` (the heatmaps' side; default S: the crop
    is area-resized and the landmarks scaled when it differs)."""
    s = crop.shape[0]
    size = size or s
    if size != s:
        import cv2

        crop = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)
        k = np.float32(size / s)
        landmark_sets = [np.asarray(lm, np.float32)[:, :2] * k for lm in landmark_sets]
    return render_context(crop, context_mask(landmark_sets, size, grow), out=out)
