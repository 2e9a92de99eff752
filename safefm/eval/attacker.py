"""A stronger attacker than the pretrained recogniser (``safefm-eval --attacker``, the report's
``attacker`` part): one that has seen this anonymizer.

Re-identification: for each method, training photos of people who are *not* evaluation people
(LFW people outside ``EVAL_IDENTITIES.txt`` and UTKFace, :func:`training_photos`) are
anonymized; a small head (:class:`ReidHead`, a residual MLP on dlib embeddings) is trained on
the (anonymized, original) embedding pairs to map an anonymized face to its original's
embedding (:func:`train_head`: InfoNCE over the batch, every other original a negative). The
evaluation people's anonymized photos, embedded as in :mod:`safefm.eval.privacy` (detected on the
source face, else located at its box), are then mapped by the head and matched against the
gallery of their originals: rank-1 next to the plain recogniser's, with the probe's own original
in the gallery (the privacy protocol) and without it (only the person's other photos).

Linkage: each video clip (one person each) is anonymized in video mode and cut into two halves,
"two clips of the same person"; each half's output embeddings (every ``embed_stride``-th frame,
located at the input's dlib face) are averaged. :func:`linkage` then asks whether halves of the
same clip are closer than halves of different clips, all wearing the same synthetic identity
(AUC and rank-1), with the plain recogniser's embeddings and through the trained head. Halves
of one clip also share the background and light, so this is an upper bound on linkage by face.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from . import metrics as M
from .faces import DlibCache
from .options import EngineFactory, EvalOptions, variants
from .resume import ResumeCache
from ..media import VideoReader, read_image

TRAIN_PHOTOS = 800    # training photos anonymized per method (LFW_SHARE of them from LFW)
LFW_SHARE = 0.7


def training_photos(data_dir: Path, n: int) -> list[Path]:
    """``n`` photos of people the evaluation never uses: round(LFW_SHARE * n) LFW people outside
    ``EVAL_IDENTITIES.txt`` (one photo each, spread evenly over the sorted names) and the rest
    UTKFace photos (spread evenly over the sorted file names). Deterministic."""
    lfw = Path(data_dir) / "lfw"
    held_out = set((lfw / "EVAL_IDENTITIES.txt").read_text().split())
    people = sorted(p for p in lfw.iterdir() if p.is_dir() and p.name not in held_out)
    utk = sorted((Path(data_dir) / "utkface").glob("*.jpg"))
    n_lfw = min(len(people), round(LFW_SHARE * n)) if utk else min(len(people), n)
    n_utk = min(len(utk), n - n_lfw)

    def spread(xs, k):
        return [xs[i] for i in np.linspace(0, len(xs) - 1, k).round().astype(int)] if k > 0 else []
    return [sorted(p.glob("*.jpg"))[0] for p in spread(people, n_lfw)] + spread(utk, n_utk)


def originals(photos: Sequence[Path], dl: DlibCache) -> dict:
    """{"photos", "boxes", "emb" (N, 128)} of the photos whose original dlib detects a face."""
    out = {"photos": [], "boxes": [], "emb": []}
    for p in photos:
        img = read_image(p)
        boxes = dl.detect(img)
        if boxes:
            out["photos"].append(str(p))
            out["boxes"].append(boxes[0])
            out["emb"].append(dl.embed(img, boxes[0]))
    out["emb"] = M.embedding_stack(out["emb"])
    return out


def anonymized_embeddings(engine, photos: Sequence[str], boxes: Sequence, dl: DlibCache) -> np.ndarray:
    """(N, 128): each photo anonymized alone (engine reset) and embedded at the source face
    (:meth:`DlibCache.output`: detected on ``boxes[i]``, else located there)."""
    embs = []
    for p, box in zip(photos, boxes):
        engine.reset()
        embs.append(dl.output(engine.process(read_image(p), 0.0).image, box)[0])
    return M.embedding_stack(embs)


def clip_embeddings(engine, path: Path, dl: DlibCache, stride: int, max_frames: int | None) -> np.ndarray:
    """(T_s, 128): the anonymized clip's output embedding on every ``stride``-th frame (of the
    first ``max_frames``), located at the input's largest dlib face; NaN rows where the input
    has none. The engine sees every frame (video mode)."""
    embs = []
    engine.reset()
    with VideoReader(path) as reader:
        for i, (frame, t) in enumerate(reader):
            if max_frames is not None and i >= max_frames:
                break
            out = engine.process(frame, t).image
            if i % stride == 0:
                boxes = dl.detect(frame)
                embs.append(dl.output(out, boxes[0])[0] if boxes else None)
    return M.embedding_stack(embs)


# ------------------------------------------------------------------------------ the head


def _head_module(dim: int, hidden: int):
    import torch.nn as nn

    class ReidHead(nn.Module):
        """x + MLP(x): (N, dim) anonymized embeddings -> (N, dim) guesses of the originals'."""

        def __init__(self):
            super().__init__()
            self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))

        def forward(self, x):
            return x + self.mlp(x)

    return ReidHead()


def train_head(anon: np.ndarray, orig: np.ndarray, *, hidden: int = 256, epochs: int = 400,
               lr: float = 1e-3, weight_decay: float = 1e-3, temperature: float = 0.05,
               seed: int = 0) -> Callable[[np.ndarray], np.ndarray]:
    """Train the re-identification head on N (anonymized, original) embedding pairs, both
    (N, D) (rows with a NaN are dropped), full batch: InfoNCE over
    logits[i, j] = -|head(anon_i) - orig_j|^2 / temperature (each original its own class).
    Returns ``f``: (M, D) -> (M, D) numpy (NaN rows stay NaN)."""
    import torch

    anon, orig = np.asarray(anon, np.float64), np.asarray(orig, np.float64)
    ok = np.isfinite(anon).all(axis=1) & np.isfinite(orig).all(axis=1)
    if ok.sum() < 2:
        raise ValueError(f"train_head needs at least 2 finite pairs, got {int(ok.sum())}")
    torch.manual_seed(seed)
    head = _head_module(anon.shape[1], hidden)
    a = torch.tensor(anon[ok], dtype=torch.float32)
    o = torch.tensor(orig[ok], dtype=torch.float32)
    target = torch.arange(len(a))
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        logits = -torch.cdist(head(a), o).pow(2) / temperature
        loss = torch.nn.functional.cross_entropy(logits, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()

    def f(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float64)
        out = np.full_like(x, np.nan)
        good = np.isfinite(x).all(axis=1)
        if good.any():
            with torch.no_grad():
                out[good] = head(torch.tensor(x[good], dtype=torch.float32)).numpy()
        return out

    return f


# ------------------------------------------------------------------------------ metrics


def rank1_other_photos(probe: np.ndarray, labels: Sequence, gallery: np.ndarray) -> float:
    """Rank-1 re-identification of probe i (N, D) against the gallery (N, D) of the same photos'
    originals *without* photo i: hit when the nearest other photo carries its label. Probes whose
    person has no other valid gallery photo are left out; a NaN probe is a miss. NaN if none count."""
    probe, gallery = np.asarray(probe, np.float64), np.asarray(gallery, np.float64)
    lab = np.asarray(labels, dtype=object)
    g_ok = np.isfinite(gallery).all(axis=1)
    d = np.linalg.norm(probe[:, None, :] - gallery[None, :, :], axis=-1)
    d[~g_ok[None, :].repeat(len(probe), 0)] = np.inf
    np.fill_diagonal(d, np.inf)
    hits, n = 0, 0
    for i in range(len(probe)):
        if not np.any((lab == lab[i]) & g_ok & (np.arange(len(lab)) != i)):
            continue
        n += 1
        if np.isfinite(probe[i]).all():
            hits += lab[int(np.argmin(d[i]))] == lab[i]
    return hits / n if n else float("nan")


def linkage(a: np.ndarray, b: np.ndarray) -> dict:
    """Can two clips of one person be linked? ``a``, ``b``: (K, D), row k = clip k's first and
    second half (mean embeddings; NaN rows are left out). -> {"auc": P(d(a_k, b_k) < d(a_i, b_j),
    i != j; ties count half; 0.5 = chance, 1 = always linked), "rank1": share of the 2K halves
    whose nearest other-half is their own clip's (1/K = chance), "clips": K}."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ok = np.isfinite(a).all(axis=1) & np.isfinite(b).all(axis=1)
    a, b = a[ok], b[ok]
    k = len(a)
    if k < 2:
        return {"auc": float("nan"), "rank1": float("nan"), "clips": k}
    d = np.linalg.norm(a[:, None, :] - b[None, :, :], axis=-1)
    same, diff = np.diag(d), d[~np.eye(k, dtype=bool)]
    auc = float(((same[:, None] < diff[None, :]).sum() + 0.5 * (same[:, None] == diff[None, :]).sum())
                / (len(same) * len(diff)))
    rank1 = float(((d.argmin(axis=1) == np.arange(k)).sum() + (d.argmin(axis=0) == np.arange(k)).sum()) / (2 * k))
    return {"auc": auc, "rank1": rank1, "clips": k}


def halves(per_frame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean embedding (D,) of the first and of the second half of a clip's (T, D) frame
    embeddings (NaN rows ignored; an all-NaN half gives a NaN mean)."""
    x = np.asarray(per_frame, np.float64)
    h = len(x) // 2

    def mean(rows):
        rows = rows[np.isfinite(rows).all(axis=1)]
        return rows.mean(axis=0) if len(rows) else np.full(x.shape[1], np.nan)
    return mean(x[:h]), mean(x[h:])


def link_clips(clips: Sequence[np.ndarray], f: Callable[[np.ndarray], np.ndarray] | None = None) -> dict:
    """:func:`linkage` of clips given as (T, D) frame embeddings, through ``f`` per frame when given."""
    hs = [halves(c if f is None else f(c)) for c in clips]
    return linkage(np.array([h[0] for h in hs]), np.array([h[1] for h in hs]))


# ------------------------------------------------------------------------------ the part


def run_attacker(opts: EvalOptions, factory: EngineFactory, data_dir: Path,
                 cache: ResumeCache | None = None) -> dict:
    """-> report["attacker"]: the training set and, per :func:`variants` label, the plain
    recogniser's and the trained head's rank-1 and clip linkage."""
    from .privacy import _gallery, eval_people
    from .video import video_clips
    from ..face.landmarks import FaceMeshDetector

    log = opts.log
    cache = cache or ResumeCache(Path(opts.out) / "partial", {}, False, log)
    n_train = opts.attacker_photos or TRAIN_PHOTOS
    dl, dl_video = DlibCache(upsample=1), DlibCache(upsample=0)   # as privacy.py and video.py
    with FaceMeshDetector(max_faces=4, static_image=True) as mp_det:
        g = cache.get_or("privacy_gallery", lambda: _gallery(eval_people(data_dir, opts.max_people), dl, mp_det, log))
    train = cache.get_or(f"attacker_train_originals_n{n_train}", lambda: originals(training_photos(data_dir, n_train), dl))
    clips = video_clips(data_dir, opts.max_clips)
    res = {"train": {"photos": len(train["photos"]), "requested": n_train,
                     "sources": "LFW people outside EVAL_IDENTITIES.txt + UTKFace"},
           "gallery": {"photos": len(g["photos"]), "people": len(set(g["labels"]))},
           "clips": [p.stem for p in clips], "embed_stride": opts.embed_stride, "methods": {}}
    for label, method, steps in variants(opts):
        def compute():
            t0 = time.perf_counter()
            engine = factory(method, steps, False)
            try:
                anon_train = anonymized_embeddings(engine, train["photos"], train["boxes"], dl)
                log(f"attacker {label}: {len(train['photos'])} training photos anonymized ({time.perf_counter() - t0:.0f}s)")
                probe = anonymized_embeddings(engine, g["photos"], g["boxes"], dl)
            finally:
                engine.close()
            engine = factory(method, steps, True)
            try:
                per_clip = [clip_embeddings(engine, p, dl_video, opts.embed_stride, opts.max_frames) for p in clips]
            finally:
                engine.close()
            return {"anon_train": anon_train, "probe": probe, "clips": per_clip,
                    "seconds": time.perf_counter() - t0}
        piece = cache.get_or(cache.key(f"attacker_n{n_train}", method, steps), compute)
        f = train_head(piece["anon_train"], train["emb"])
        lab, gal, probe = g["labels"], g["emb"], piece["probe"]
        m = {"method": method, "steps": steps if method == "safefm" else None,
             "train_pairs": int((np.isfinite(piece["anon_train"]).all(axis=1)).sum()),
             "rank1": {"recogniser": M.rank1_reid(probe, lab, gal, lab),
                       "attacker": M.rank1_reid(f(probe), lab, gal, lab)},
             "rank1_other_photos": {"recogniser": rank1_other_photos(probe, lab, gal),
                                    "attacker": rank1_other_photos(f(probe), lab, gal)},
             "linkage": {"recogniser": link_clips(piece["clips"]), "attacker": link_clips(piece["clips"], f)},
             "seconds": piece["seconds"]}
        res["methods"][label] = m
        log(f"attacker {label}: rank-1 {m['rank1']['recogniser']:.3f} -> {m['rank1']['attacker']:.3f} "
            f"(trained head), linkage AUC {m['linkage']['recogniser']['auc']:.3f} -> "
            f"{m['linkage']['attacker']['auc']:.3f} ({m['seconds']:.0f}s)")
    return res
