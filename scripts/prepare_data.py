#!/usr/bin/env python
"""Prepare the training shards: aligned crops, crop landmarks, dlib embeddings, attributes.

For every training image (all UTKFace + LFW people not in EVAL_IDENTITIES), in two passes:

pass 1 ``crops`` (MediaPipe, ~20 ms an image) -> ``shard_XXX.npz``:
   FaceMesh landmarks (the face nearest the image centre; no face -> skipped and counted),
   the canonical aligned crop at model resolution through :mod:`safefm.face.alignment` (the same
   code as inference), the landmarks in crop pixels, UTKFace age/gender/race from the file
   name, LFW person name.
pass 2 ``embed`` (dlib, ~0.2 s an image) -> ``emb_XXX.npz``:
   the dlib descriptor of that face on the ORIGINAL photo (the HOG box that overlaps the
   FaceMesh face, else a box from the landmarks).

Training can start after pass 1; faces whose pass 2 is not done train as the null identity.
Finished shards are skipped (resumable). At most two worker processes, each ``nice``d.

    nohup nice -n 5 python scripts/prepare_data.py --pass all > runs/prepare.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from safefm.train.data import (ImageItem, emb_path, list_training_images, save_shard, shard_plan,
                               shards_dir)
from safefm.eval.metrics import box_iou
from safefm.paths import shared_data_dir

_STATE: dict = {}


def _init_worker(kind: str, size: int, nice: int) -> None:
    try:
        os.nice(nice)
    except OSError:
        pass
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if kind == "crops":
        from safefm.face.landmarks import FaceMeshDetector

        _STATE["mesh"] = FaceMeshDetector(max_faces=3, static_image=True)
    else:
        from safefm.recognition import FaceRecognizer

        _STATE["rec"] = FaceRecognizer(upsample=0)  # faces here are >= 100 px: no upsampling (4x cheaper)
    _STATE["size"] = size


# ---------------------------------------------------------------------------------------
# pass 1: crops


def crop_image(item: ImageItem, data_dir: Path) -> tuple[dict | None, str]:
    """One image -> (record, 'ok') or (None, reason)."""
    from safefm.errors import InputError
    from safefm.face.alignment import align_matrix, crop_face, transform_points
    from safefm.media import read_image

    size = _STATE["size"]
    try:
        rgb = read_image(data_dir / item.rel)
    except InputError:
        return None, "unreadable"
    faces = _STATE["mesh"].detect(rgb)
    if not faces:
        return None, "no_face_mediapipe"
    h, w = rgb.shape[:2]
    centre = np.array([w / 2, h / 2])
    lm = min(faces, key=lambda f: np.linalg.norm(f[:, :2].mean(0) - centre))
    m = align_matrix(lm, size)
    return dict(crops=crop_face(rgb, m, size), landmarks=transform_points(lm, m).astype(np.float16),
                age=item.age, gender=item.gender, race=item.race, source=item.source,
                person=item.person, path=item.rel, matrix=m.astype(np.float32)), "ok"


def crop_shard(args) -> tuple[int, dict, float]:
    idx, items, out_dir, data_dir = args
    t0 = time.time()
    records, why = [], Counter()
    for item in items:
        try:
            r, reason = crop_image(item, data_dir)
        except Exception as exc:  # keep going; count the failure
            r, reason = None, f"error:{type(exc).__name__}"
        why[reason] += 1
        if r is not None:
            records.append(r)
    if records:
        arrays = {k: np.stack([r[k] for r in records]) for k in records[0] if k not in ("person", "path")}
        arrays["person"] = np.array([r["person"] for r in records], dtype=str)
        arrays["path"] = np.array([r["path"] for r in records], dtype=str)
        for k, dt in (("age", np.int16), ("gender", np.int8), ("race", np.int8), ("source", np.int8)):
            arrays[k] = arrays[k].astype(dt)
        save_shard(out_dir / f"shard_{idx:03d}.npz", arrays)
    (out_dir / f"shard_{idx:03d}.json").write_text(json.dumps(dict(why)))
    return idx, dict(why), time.time() - t0


# ---------------------------------------------------------------------------------------
# pass 2: dlib embeddings


def embed_shard(args) -> tuple[int, dict, float]:
    idx, shard, data_dir = args
    from safefm.face.alignment import invert_affine, transform_points
    from safefm.face.landmarks import clip_box, face_box
    from safefm.media import read_image

    t0 = time.time()
    rec = _STATE["rec"]
    with np.load(shard, allow_pickle=False) as z:
        paths, lms, mats = z["path"], z["landmarks"].astype(np.float32), z["matrix"]
    embs = np.zeros((len(paths), 128), np.float32)
    fallback = np.zeros(len(paths), bool)
    why = Counter()
    for i, (rel, lm, m) in enumerate(zip(paths, lms, mats)):
        rgb = read_image(data_dir / str(rel))
        mesh_box = face_box(transform_points(lm, invert_affine(m)))
        best = max(rec.detect(rgb), key=lambda b: box_iou(b, mesh_box), default=None)
        if best is None or box_iou(best, mesh_box) < 0.2:
            fallback[i] = True
            best = clip_box(mesh_box, rgb.shape)
        embs[i] = rec.embed(rgb, best)
    why["embedded"] = len(paths)
    why["fallback_box"] = int(fallback.sum())
    out = emb_path(shard)
    tmp = out.with_name(out.stem + ".tmp.npz")
    np.savez(tmp, embeddings=embs, box_fallback=fallback)
    tmp.replace(out)
    return idx, dict(why), time.time() - t0


def _run(kind, fn, todo, workers, size, nice, total):
    from tqdm import tqdm

    bar = tqdm(total=total, unit="img", smoothing=0.05, mininterval=10, desc=kind)
    if workers == 1:
        _init_worker(kind, size, nice)
        results, pool = map(fn, todo), None
    else:
        import multiprocessing as mp

        pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(kind, size, nice))
        results = pool.imap_unordered(fn, todo)
    for idx, why, secs in results:
        n = sum(v for k, v in why.items() if k != "fallback_box")
        bar.update(n)
        tqdm.write(f"{kind} shard {idx:03d}: {why} in {secs:.0f}s ({n / max(secs, 1e-9):.2f} img/s per worker)")
    bar.close()
    if pool is not None:
        pool.close()
        pool.join()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pass", dest="which", choices=("crops", "embed", "all"), default="all")
    ap.add_argument("--out", type=Path, default=shards_dir())
    ap.add_argument("--data", type=Path, default=None, help="shared data folder (default: safefm.paths)")
    ap.add_argument("--size", type=int, default=128, help="crop side (model image_size)")
    ap.add_argument("--shard-size", type=int, default=1024)
    ap.add_argument("--workers", type=int, default=2, help="processes (at most 2)")
    ap.add_argument("--embed-workers", type=int, default=None, help="processes for pass 2 (default --workers)")
    ap.add_argument("--nice", type=int, default=5)
    ap.add_argument("--limit", type=int, default=0, help="only the first N shards (smoke test)")
    a = ap.parse_args(argv)

    data_dir = a.data or shared_data_dir()
    items = list_training_images(data_dir)
    plan = shard_plan(items, a.shard_size)
    if a.limit:
        plan = plan[:a.limit]
    a.out.mkdir(parents=True, exist_ok=True)
    workers = max(1, min(2, a.workers))
    t0 = time.time()
    if a.which in ("crops", "all"):
        todo = [(i, s, a.out, data_dir) for i, s in enumerate(plan) if not (a.out / f"shard_{i:03d}.json").exists()]
        print(f"pass 1 (crops): {len(items)} training images in {len(plan)} shards; "
              f"{len(plan) - len(todo)} done, {len(todo)} to do -> {a.out}", flush=True)
        _run("crops", crop_shard, todo, workers, a.size, a.nice, sum(len(t[1]) for t in todo))
    if a.which in ("embed", "all"):
        shards = [a.out / f"shard_{i:03d}.npz" for i in range(len(plan))]
        todo = [(i, p, data_dir) for i, p in enumerate(shards) if p.exists() and not emb_path(p).exists()]
        n = 0
        for _, p, _ in todo:
            with np.load(p, allow_pickle=False) as z:
                n += len(z["source"])
        print(f"pass 2 (dlib embeddings): {len(todo)} shards, {n} faces to do", flush=True)
        _run("embed", embed_shard, todo, max(1, min(2, a.embed_workers or workers)), a.size, a.nice, n)
    total = Counter()
    for j in sorted(a.out.glob("shard_*.json")):
        total.update(json.loads(j.read_text()))
    n_emb = 0
    for p in sorted(a.out.glob("emb_*.npz")):
        if not p.name.endswith(".tmp.npz"):
            with np.load(p, allow_pickle=False) as z:
                n_emb += len(z["embeddings"])
    summary = {"images": len(items), "shards": len(plan), "kept": total.get("ok", 0),
               "skipped": {k: v for k, v in total.items() if k != "ok"}, "embedded": n_emb,
               "minutes_this_run": round((time.time() - t0) / 60, 1)}
    (a.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
