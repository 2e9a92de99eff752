"""Identity guard: never put a synthetic face on someone it resembles.

A synthetic identity is one fixed face, and by chance it looks like some real people: for them
the anonymized output stays near their own face although nothing of their identity went in
(measured on training LFW photos: the dlib distance between an input and its output correlates
0.3-0.7 with the distance between the input and the identity's own face; docs/results.md).

So, once per session (a video's first frame with a face; every single image on its own), the
engine asks the guard: the real faces are embedded with dlib's recogniser (~70 ms a face, kept
in memory for this decision only, never stored) and compared with each candidate identity's
*reference*, the identity rendered by this model on its own neutral shape. If the chosen identity
is closer than ``RuntimeConfig.identity_guard`` to any face, the candidate farthest from all of
them is used instead, for the whole session, and the switch is logged.

:func:`pick` is the decision as a pure function; :class:`IdentityGuard` holds the candidates and
their references (computed once per generator, ~0.1 s an identity). The recogniser is the
engine's, shared with the identity repel (dlib is loaded once).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .face import heatmaps
from .face.landmarks import face_box
from .identity import Identity, load_identity

log = logging.getLogger(__name__)

_PAD = 64   # grey border (pixels) around a rendered 128 px crop so dlib sees the whole face


def pick(users: np.ndarray, refs: np.ndarray, current: int, threshold: float) -> tuple[int, float]:
    """(index of the identity to use, its distance to the nearest face).

    users: (F, D) embeddings of the real faces; refs: (N, D) candidate references; current: the
    chosen candidate. Keeps ``current`` while every face is at least ``threshold`` from it, else
    the candidate whose nearest face is farthest (ties: the lower index)."""
    users, refs = np.atleast_2d(users), np.atleast_2d(refs)
    d = np.linalg.norm(refs[:, None, :] - users[None, :, :], axis=2).min(axis=1)   # (N,) nearest face
    if d[current] >= threshold:
        return current, float(d[current])
    best = int(np.argmax(d))
    return best, float(d[best])


class IdentityGuard:
    """Chooses among ``candidates`` the identity to wear for the faces in a frame.

    The methods that embed take the ``recognizer``: an object with ``detect(rgb) -> [box]`` and
    ``embed(rgb, box) -> (D,)`` (the engine's :class:`safefm.recognition.FaceRecognizer`)."""

    def __init__(self, candidates: list[Identity], threshold: float):
        if not candidates:
            raise ValueError("the identity guard needs at least one candidate identity")
        self.candidates = list(candidates)
        self.threshold = float(threshold)
        self._refs: np.ndarray | None = None
        self._refs_for = None

    def references(self, gen, recognizer) -> np.ndarray:
        """(N, D) reference embeddings: each candidate rendered by ``gen`` on its own neutral
        shape, embedded at the shape's box (no detection needed). Cached per generator."""
        if self._refs is None or self._refs_for is not gen:
            self._refs = np.stack([self._render_embedding(gen, recognizer, c) for c in self.candidates])
            self._refs_for = gen
        return self._refs

    def _render_embedding(self, gen, recognizer, identity: Identity) -> np.ndarray:
        S = gen.model_cfg.image_size
        pts = (identity.shape * S).astype(np.float32)
        heat = heatmaps.render_heatmaps(pts, S, gen.model_cfg.heatmap_size)
        z = gen.generate(heat, gen.identity_tokens(identity.embedding), identity.noise(gen.model_cfg.latent_shape))
        return embed_crop(recognizer, gen.decode(z, heat)[0], pts)

    def embed_faces(self, recognizer, frame: np.ndarray, faces: list[np.ndarray]) -> np.ndarray:
        """(F, D) embeddings of the real faces given as (478, 3) frame landmarks."""
        return embed_real_faces(recognizer, frame, faces)

    def choose(self, gen, recognizer, frame: np.ndarray, faces: list[np.ndarray],
               current: Identity) -> tuple[Identity, str | None]:
        """(identity to wear for these faces, a one-line reason when it is not ``current``)."""
        users = self.embed_faces(recognizer, frame, faces)
        if len(users) == 0:
            return current, None
        idx = next((i for i, c in enumerate(self.candidates) if same_face(c, current)), None)
        if idx is None:   # e.g. a file picked from the tray: it joins the candidates
            self.candidates, self._refs, idx = [current, *self.candidates], None, 0
        refs = self.references(gen, recognizer)
        best, dist = pick(users, refs, idx, self.threshold)
        if best == idx:
            return current, None
        d_cur = float(np.linalg.norm(users - refs[idx], axis=1).min())
        return self.candidates[best], (
            f"identity guard: '{current.name}' resembles this face (distance {d_cur:.2f} < "
            f"{self.threshold:.2f}); wearing '{self.candidates[best].name}' ({dist:.2f}) instead")


def embed_crop(recognizer, crop: np.ndarray, points: np.ndarray) -> np.ndarray:
    """(D,) recogniser embedding of a generated face crop (S, S, 3) uint8 whose landmarks are
    ``points`` (N, 2+) crop pixels: padded with its edge so dlib sees the whole face, embedded
    at the landmarks' box (no detection needed)."""
    padded = np.pad(crop, ((_PAD, _PAD), (_PAD, _PAD), (0, 0)), mode="edge")
    return np.asarray(recognizer.embed(padded, face_box(points[:, :2] + _PAD)), np.float32)


def embed_real_faces(recognizer, frame: np.ndarray, faces: list[np.ndarray], detect: bool = True) -> np.ndarray:
    """(F, D) recogniser embeddings of the real faces given as (478, 3) frame landmarks; (0, D)
    when none can be embedded. ``recognizer``: ``detect(rgb) -> [box]``, ``embed(rgb, box)``.
    ``detect`` False: at the landmarks' box without looking for dlib's own (half the cost)."""
    out = [recognizer.embed(region, box) for region, box in _face_regions(recognizer, frame, faces, detect)]
    return np.asarray(out, np.float32).reshape(len(out), -1)


def read_real_faces(recognizer, frame: np.ndarray, faces: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """:func:`embed_real_faces` and, at the same boxes, each face's mouth opening as dlib's
    68-point predictor reads it (``recognizer.mouth_opening(rgb, box)``: a reader that shares
    nothing with the mesh the generator follows). Returns ((F, D), (F,))."""
    out, mouth = [], []
    for region, box in _face_regions(recognizer, frame, faces):
        out.append(recognizer.embed(region, box))
        mouth.append(recognizer.mouth_opening(region, box))
    return np.asarray(out, np.float32).reshape(len(out), -1), np.asarray(mouth, np.float64)


def mouth_openings(recognizer, frame: np.ndarray, faces: list[np.ndarray], detect: bool = True) -> np.ndarray:
    """(F,) the mouth openings of :func:`read_real_faces` alone (no embedding), at the same boxes
    (``detect`` False: at the landmarks' boxes, no detection: 1-2 ms a face)."""
    return np.asarray([recognizer.mouth_opening(region, box)
                       for region, box in _face_regions(recognizer, frame, faces, detect)], np.float64)


def _face_regions(recognizer, frame: np.ndarray, faces: list[np.ndarray], detect: bool = True):
    """Yields (region (h, w, 3) around a face, its face box in the region) for each face
    (478, 3) frame landmarks big enough to read: dlib's detection there (``detect``), else the
    landmarks' box less the forehead (a profile or small face the detector misses)."""
    for lm in faces:
        x0, y0, x1, y1 = face_box(lm, frame.shape, margin=0.35)
        if x1 - x0 < 8 or y1 - y0 < 8:
            continue
        region = np.ascontiguousarray(frame[y0:y1, x0:x1])
        hits = recognizer.detect(region) if detect else []
        if hits:
            box = hits[0]
        else:
            bx0, by0, bx1, by1 = face_box(lm[:, :2] - (x0, y0))
            box = (bx0, by0 + (by1 - by0) // 5, bx1, by1)
        yield region, box


def same_face(a: Identity, b: Identity) -> bool:
    """True when two identities render the same face (same embedding, shape and seed)."""
    return (a is b) or (a.seed == b.seed and np.array_equal(a.embedding, b.embedding)
                        and np.array_equal(a.shape, b.shape))


def shipped_candidates(chosen: Identity, folder: Path, embedding_dim: int) -> list[Identity]:
    """``chosen`` first, then every identity file in ``folder`` that is not the same face."""
    out = [chosen]
    for p in sorted(Path(folder).glob("*.pt")):
        try:
            ident = load_identity(p, embedding_dim)
        except Exception as exc:   # a broken file in the folder must not stop anonymizing
            log.warning("identity guard: skipping %s (%s)", p.name, exc)
            continue
        if not any(same_face(ident, c) for c in out):
            out.append(ident)
    return out


def default_guard(cfg, chosen: Identity, embedding_dim: int, folder: Path | None = None) -> IdentityGuard | None:
    """The guard of ``cfg.identity_guard`` (None when 0) with the shipped identities
    (``folder``, default ``weights/identities``) as alternatives to ``chosen``."""
    if cfg.identity_guard <= 0:
        return None
    from .paths import identities_dir

    return IdentityGuard(shipped_candidates(chosen, folder or identities_dir(), embedding_dim), cfg.identity_guard)
