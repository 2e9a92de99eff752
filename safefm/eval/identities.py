"""How much a synthetic identity's *rendered* face resembles real people (development data only).

A drawn identity's embedding is kept far (> dlib's 0.6) from every training person, but what a
recogniser judges is the rendered, pasted-back face, which drifts towards an average face. Two
measures, both on *training* LFW people (never the ``EVAL_IDENTITIES.txt`` people):

- :func:`photo_scores`: render on reference photos and compare each output with the person it
  replaced (and with the other photos' people): ``scripts/identities.py select``;
- :func:`population_scores`: render on a few driver photos and compare each output with a whole
  population of real people (one embedding each, :func:`load_population`):
  ``scripts/identities.py screen``.

Boxes are dlib's (x0, y0, x1, y1); embeddings (128,) float32; "largest face" is the first of
:meth:`FaceRecognizer.detect` / :meth:`FaceRecognizer.embed_all` (largest first).
"""

from __future__ import annotations

import time
import zlib
from multiprocessing import Pool
from pathlib import Path

import numpy as np

from ..media import read_image
from ..paths import shared_data_dir
from ..recognition import MATCH_THRESHOLD, FaceRecognizer
from ..train.data import training_people
from .metrics import FEATURES, box_iou, expression_features, mae, pearson

# ------------------------------------------------------------------------------ photo sets


def training_photos(n: int, seed: int) -> list[Path]:
    """The first photo each of ``n`` training people (deterministic for a ``seed``)."""
    people = training_people(min_photos=0)
    pick = np.random.default_rng(seed).choice(len(people), size=min(n, len(people)), replace=False)
    return [sorted(people[i].glob("*.jpg"))[0] for i in sorted(pick)]


def driver_photos(n: int, seed: int) -> list[tuple[str, Path]]:
    """(person, photo): the second photo of ``n`` training people with several photos."""
    people = training_people(min_photos=2)
    pick = np.random.default_rng(seed).choice(len(people), size=min(n, len(people)), replace=False)
    return [(people[i].name, sorted(people[i].glob("*.jpg"))[1]) for i in sorted(pick)]


def population_photos(utk: int, seed: int = 0) -> list[tuple[str, Path]]:
    """(person, photo): the first photo of every training person + ``utk`` UTKFace photos."""
    out = [(d.name, sorted(d.glob("*.jpg"))[0]) for d in training_people(min_photos=1)]
    utk_files = sorted((shared_data_dir() / "utkface").rglob("*.jpg"))
    if utk and utk_files:
        pick = np.random.default_rng(seed).choice(len(utk_files), size=min(utk, len(utk_files)), replace=False)
        out += [(f"utk:{utk_files[i].name}", utk_files[i]) for i in sorted(pick)]
    return out


# ------------------------------------------------------------------------------ references


def originals(rec: FaceRecognizer, photos: list[Path]) -> list[tuple[Path, tuple, np.ndarray]]:
    """(photo, dlib box of its largest face, embedding) for the photos where dlib finds a face."""
    out = []
    for p in photos:
        found = rec.embed_all(read_image(p))
        if found:
            out.append((p, *found[0]))
    return out


def prepare_drivers(rec: FaceRecognizer, mesh, drivers: list[tuple[str, Path]]) -> list[dict]:
    """Per driver: person, rgb, dlib box, own embedding, FaceMesh features (drivers without
    both a dlib and a FaceMesh face are dropped)."""
    out = []
    for person, path in drivers:
        rgb = read_image(path)
        boxes = rec.detect(rgb)
        faces = mesh.detect(rgb)
        if not boxes or not faces:
            continue
        out.append({"person": person, "rgb": rgb, "box": boxes[0], "emb": rec.embed(rgb, boxes[0]),
                    "feat": expression_features(faces[0])})
    return out


def population_half(person: str) -> int:
    """0 (half A: used to rank) or 1 (half B: held out), fixed per person name."""
    return zlib.crc32(person.encode()) & 1


_WORKER: dict = {}   # the recogniser of one population worker process


def _init_worker() -> None:
    _WORKER["rec"] = FaceRecognizer(upsample=1)


def _embed_largest(path: Path) -> np.ndarray | None:
    found = _WORKER["rec"].embed_all(read_image(path))
    return found[0][1] if found else None


def load_population(cache: Path, utk: int, workers: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(embeddings (N, 128), person names (N,), half (N,)) of :func:`population_photos`, embedded
    with ``workers`` processes on first use and cached in ``cache`` (an .npz)."""
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            return z["embeddings"], z["person"], z["half"]
    items = population_photos(utk)
    print(f"population: embedding {len(items)} photos with {workers} workers", flush=True)
    t0 = time.perf_counter()
    with Pool(workers, initializer=_init_worker) as pool:
        embs = []
        for i, e in enumerate(pool.imap(_embed_largest, [p for _, p in items], chunksize=16)):
            embs.append(e)
            if (i + 1) % 500 == 0:
                print(f"  {i + 1}/{len(items)} ({time.perf_counter() - t0:.0f}s)", flush=True)
    keep = [i for i, e in enumerate(embs) if e is not None]
    emb = np.stack([embs[i] for i in keep]).astype(np.float32)
    person = np.array([items[i][0] for i in keep])
    half = np.array([population_half(p) for p in person], np.int8)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, embeddings=emb, person=person, half=half)
    print(f"population: {len(keep)} of {len(items)} embedded ({time.perf_counter() - t0:.0f}s)", flush=True)
    return emb, person, half


# ------------------------------------------------------------------------------ measures


def _render(engine, rec: FaceRecognizer, rgb: np.ndarray, box) -> tuple[np.ndarray, np.ndarray, bool]:
    """(output image, dlib embedding of the output face, whether dlib found it near ``box``).

    The engine is reset first (single-image mode, the identity's own noise); the output face is
    embedded at dlib's box overlapping the original's (IoU > 0.3), else at the original's box."""
    engine.reset()
    out = engine.process(rgb, 0.0).image
    hits = [b for b in rec.detect(out) if box_iou(b, box) > 0.3]
    return out, rec.embed(out, hits[0] if hits else box), bool(hits)


def photo_scores(engine, rec: FaceRecognizer, refs, mesh=None) -> dict:
    """Render the engine's identity on every reference photo of :func:`originals`.

    ``leak``: share of outputs dlib matches to their own original (distance < 0.6);
    ``mean_distance`` / ``p05_distance``: output <-> own original; ``other_distance`` /
    ``other_leak``: each output against the *other* reference photos (other people):
    ``other_distance - mean_distance`` is what of the replaced person passes through;
    ``face_found``: share of outputs with a dlib face. With a FaceMesh ``mesh``: Pearson r of
    output vs photo mouth / eye opening (``r_*``) and yaw / pitch MAE in degrees (``mae_*``).
    """
    embs, found, f_in, f_out = [], 0, [], []
    for p, box, _ in refs:
        rgb = read_image(p)
        out, e, hit = _render(engine, rec, rgb, box)
        found += hit
        embs.append(e)
        if mesh is not None:
            a, b = mesh.detect(rgb), mesh.detect(out)
            f_in.append(expression_features(a[0] if a else None))
            f_out.append(expression_features(b[0] if b else None))
    src = np.stack([e for _, _, e in refs])
    dist = np.linalg.norm(np.stack(embs)[:, None] - src[None], axis=2)    # outputs x originals
    d = np.diag(dist)
    other = dist[~np.eye(len(d), dtype=bool)]
    row = {"photos": len(d), "leak": float((d < MATCH_THRESHOLD).mean()),
           "mean_distance": float(d.mean()), "p05_distance": float(np.percentile(d, 5)),
           "other_distance": float(other.mean()), "other_leak": float((other < MATCH_THRESHOLD).mean()),
           "face_found": found / max(len(d), 1)}
    if mesh is not None:
        fi, fo = np.array(f_in), np.array(f_out)
        for name in ("mouth_open", "eye_open_r", "eye_open_l"):
            j = FEATURES.index(name)
            row[f"r_{name}"] = pearson(fi[:, j], fo[:, j])
        for name in ("yaw", "pitch"):
            j = FEATURES.index(name)
            row[f"mae_{name}"] = mae(fi[:, j], fo[:, j])
    return row


def population_scores(engine, rec: FaceRecognizer, mesh, drivers: list[dict],
                      pop: np.ndarray, pop_person: np.ndarray, pop_half: np.ndarray) -> dict:
    """Render the engine's identity on every driver of :func:`prepare_drivers`.

    ``match_a`` / ``match_b``: mean share of population half A / B within 0.6 of an output (the
    driver's own person left out); ``nearest``: mean distance to the nearest such person;
    ``own_distance`` / ``own_leak``: output <-> the driver's own face; ``face_found``; and the
    FaceMesh pose / eye bias of output minus driver (``pitch_bias``, ``pitch_mae``, ``yaw_bias``
    in degrees, ``eye_bias``).
    """
    rate = {0: [], 1: []}
    own, nearest, found, dfeat = [], [], 0, []
    for d in drivers:
        out, e, hit = _render(engine, rec, d["rgb"], d["box"])
        found += hit
        dist = np.linalg.norm(pop - e[None], axis=1)
        other = pop_person != d["person"]
        for h in (0, 1):
            m = other & (pop_half == h)
            rate[h].append(float((dist[m] < MATCH_THRESHOLD).mean()))
        nearest.append(float(dist[other].min()))
        own.append(float(np.linalg.norm(e - d["emb"])))
        faces = mesh.detect(out)
        dfeat.append(expression_features(faces[0] if faces else None) - d["feat"])
    dfeat = np.array(dfeat)
    fi = {k: FEATURES.index(k) for k in ("yaw", "pitch", "eye_open_r", "eye_open_l")}
    return {"renders": len(drivers), "match_a": float(np.mean(rate[0])), "match_b": float(np.mean(rate[1])),
            "nearest": float(np.mean(nearest)), "own_distance": float(np.mean(own)),
            "own_leak": float(np.mean(np.array(own) < MATCH_THRESHOLD)), "face_found": found / len(drivers),
            "pitch_bias": float(np.nanmean(dfeat[:, fi["pitch"]])),
            "pitch_mae": float(np.nanmean(np.abs(dfeat[:, fi["pitch"]]))),
            "yaw_bias": float(np.nanmean(dfeat[:, fi["yaw"]])),
            "eye_bias": float(np.nanmean(dfeat[:, [fi["eye_open_r"], fi["eye_open_l"]]]))}
