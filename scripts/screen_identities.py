"""Screen synthetic identities by how many real people their *rendered* face resembles.

A drawn identity's embedding is kept far (> dlib's 0.6) from every training person, but the
face the model renders drifts towards an average face, and the recogniser judges the rendered
face. ``scripts/select_identities.py`` compares each output with the one person it replaces on
~80 photos, too few to rank identities whose leak is a few per cent. This script compares every
rendered face with a whole *population* of real people instead:

1. population: one dlib embedding per training person (LFW people outside
   ``EVAL_IDENTITIES.txt``, plus UTKFace photos; the evaluation people are never used), cached
   in ``--population`` (built with two worker processes on first use, ~10 min). People are
   split by a fixed hash into half A (used to rank) and half B (held out: reported for the
   winners, so the chosen identity's figure is not the maximum of noisy draws).
2. every candidate (shipped ``weights/identities`` + fresh sampler draws) is rendered by the
   engine onto ``--drivers`` training photos (second photos of LFW training people); for each
   output: dlib embedding, share of the population within 0.6 (the driver's own person left
   out), distance to the driver's own face, and FaceMesh head pose / eye opening of output vs
   driver (an identity whose face shape biases the pose estimate shows it here).

Ranking: population match rate on half A, lowest first. Usage:

    python scripts/screen_identities.py --candidates 160 --drivers 8 \
        --groups female:adult,male:adult,female:young,male:young --json runs/screen.json --write-best 8
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
import zlib
from multiprocessing import Pool
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from safefm.train.data import eval_identities  # noqa: E402
from safefm.eval.metrics import FEATURES, box_iou, expression_features  # noqa: E402
from safefm.paths import shared_data_dir  # noqa: E402
from safefm.recognition import MATCH_THRESHOLD, FaceRecognizer, load_rgb  # noqa: E402
from select_identities import add_candidate_args, candidate_identities  # noqa: E402

_REC: dict = {}


def _half(person: str) -> int:
    """0 (half A) or 1 (half B), fixed per person name."""
    return zlib.crc32(person.encode()) & 1


def population_photos(utk: int, seed: int = 0) -> list[tuple[str, Path]]:
    """(person, photo): the first photo of every LFW training person + ``utk`` UTKFace photos."""
    data = shared_data_dir()
    banned = eval_identities()
    out = [(d.name, sorted(d.glob("*.jpg"))[0]) for d in sorted((data / "lfw").iterdir())
           if d.is_dir() and d.name not in banned and any(d.glob("*.jpg"))]
    utk_files = sorted((data / "utkface").rglob("*.jpg"))
    if utk and utk_files:
        pick = np.random.default_rng(seed).choice(len(utk_files), size=min(utk, len(utk_files)), replace=False)
        out += [(f"utk:{utk_files[i].name}", utk_files[i]) for i in sorted(pick)]
    return out


def _init_rec() -> None:
    _REC["rec"] = FaceRecognizer(upsample=1)


def _embed_one(path: Path) -> np.ndarray | None:
    found = _REC["rec"].embed_all(load_rgb(path))
    if not found:
        return None
    return max(found, key=lambda f: (f[0][2] - f[0][0]) * (f[0][3] - f[0][1]))[1]


def load_population(cache: Path, utk: int, workers: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(embeddings (N, 128), person names (N,), half (N,)) -- built and cached on first use."""
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            return z["embeddings"], z["person"], z["half"]
    items = population_photos(utk)
    print(f"population: embedding {len(items)} photos with {workers} workers", flush=True)
    t0 = time.perf_counter()
    with Pool(workers, initializer=_init_rec) as pool:
        embs = []
        for i, e in enumerate(pool.imap(_embed_one, [p for _, p in items], chunksize=16)):
            embs.append(e)
            if (i + 1) % 500 == 0:
                print(f"  {i + 1}/{len(items)} ({time.perf_counter() - t0:.0f}s)", flush=True)
    keep = [i for i, e in enumerate(embs) if e is not None]
    emb = np.stack([embs[i] for i in keep]).astype(np.float32)
    person = np.array([items[i][0] for i in keep])
    half = np.array([_half(p) for p in person], np.int8)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, embeddings=emb, person=person, half=half)
    print(f"population: {len(keep)} of {len(items)} embedded ({time.perf_counter() - t0:.0f}s)", flush=True)
    return emb, person, half


def driver_photos(n: int, seed: int) -> list[tuple[str, Path]]:
    """(person, photo): the second photo of ``n`` LFW training people with several photos."""
    banned = eval_identities()
    people = [d for d in sorted((shared_data_dir() / "lfw").iterdir())
              if d.is_dir() and d.name not in banned and len(list(d.glob("*.jpg"))) >= 2]
    pick = np.random.default_rng(seed).choice(len(people), size=min(n, len(people)), replace=False)
    return [(people[i].name, sorted(people[i].glob("*.jpg"))[1]) for i in sorted(pick)]


def _largest(boxes):
    return max(boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1])) if boxes else None


def prepare_drivers(rec: FaceRecognizer, mesh, drivers):
    """Per driver: rgb, dlib box, own embedding, FaceMesh features (drivers without both faces dropped)."""
    out = []
    for person, path in drivers:
        rgb = load_rgb(path)
        box = _largest(rec.detect(rgb))
        faces = mesh.detect(rgb)
        if box is None or not faces:
            continue
        out.append({"person": person, "rgb": rgb, "box": box, "emb": rec.embed(rgb, box),
                    "feat": expression_features(faces[0])})
    return out


def render_scores(engine, rec, mesh, drivers, pop, pop_person, pop_half) -> dict:
    """Render the engine's identity on every driver; population / own / pose statistics."""
    rate = {0: [], 1: []}
    own, nearest, found, dfeat = [], [], 0, []
    for d in drivers:
        engine.reset()
        out = engine.process(d["rgb"], 0.0).image
        hits = [b for b in rec.detect(out) if box_iou(b, d["box"]) > 0.3]
        found += bool(hits)
        e = rec.embed(out, hits[0] if hits else d["box"])
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_candidate_args(ap, candidates=64, seed_base=2000, out_dir="runs/identity_screen")
    ap.add_argument("--population", type=Path, default=Path("runs/population.npz"), help="population cache")
    ap.add_argument("--utk", type=int, default=3000, help="UTKFace photos added to the population")
    ap.add_argument("--workers", type=int, default=2, help="processes for the population embeddings")
    ap.add_argument("--drivers", type=int, default=8, help="training photos each candidate is rendered on")
    ap.add_argument("--driver-seed", type=int, default=0)
    args = ap.parse_args(argv)

    pop, pop_person, pop_half = load_population(args.population, args.utk, args.workers)
    print(f"population: {len(pop)} people (half A {int((pop_half == 0).sum())}, "
          f"half B {int((pop_half == 1).sum())})", flush=True)
    if args.candidates == 0 and not args.json:
        return 0

    from safefm.config import load_runtime_config
    from safefm.engine import Engine
    from safefm.generator import Generator
    from safefm.identity import save_identity
    from safefm.face.landmarks import FaceMeshDetector
    from safefm.paths import resolve_model_path

    cfg = load_runtime_config(None, steps=args.steps)
    model_path = resolve_model_path(args.model)
    gen = Generator.load(model_path, cfg)
    rec = FaceRecognizer(upsample=1)
    mesh = FaceMeshDetector(max_faces=1, static_image=True)
    drivers = prepare_drivers(rec, mesh, driver_photos(args.drivers, args.driver_seed))
    print(f"{len(drivers)} driver photos", flush=True)

    cands = candidate_identities(gen.model_cfg.identity_dim, args.candidates, args.seed_base, args.groups)
    rows = []
    t0 = time.perf_counter()
    for k, (name, ident) in enumerate(cands):
        engine = Engine(gen, ident, cfg, video=False)
        r = {"name": name, "seed": int(ident.seed), **ident.attributes,
             **render_scores(engine, rec, mesh, drivers, pop, pop_person, pop_half)}
        rows.append((r, ident))
        print(f"[{k + 1}/{len(cands)} {time.perf_counter() - t0:.0f}s] {name:>9}: match A {r['match_a']:.4f}"
              f" B {r['match_b']:.4f}  nearest {r['nearest']:.3f}  own {r['own_distance']:.3f}"
              f"  pitch {r['pitch_bias']:+.1f} ({r['pitch_mae']:.1f})  yaw {r['yaw_bias']:+.1f}"
              f"  eye {r['eye_bias']:+.3f}  face {r['face_found']:.2f}", flush=True)
    mesh.close()
    rows.sort(key=lambda x: x[0]["match_a"])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256(model_path.read_bytes()).hexdigest()[:12]
        args.json.write_text(json.dumps({
            "model": model_path.name, "model_sha256": digest, "population": len(pop),
            "drivers": len(drivers), "threshold": MATCH_THRESHOLD, "steps": args.steps,
            "ranking": [r for r, _ in rows]}, indent=1))
    fresh = [(r, i) for r, i in rows if r["name"].startswith("seed")]
    for r, ident in fresh[:args.write_best]:
        print(f"saved {save_identity(ident, args.out_dir / (r['name'] + '.pt'))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
