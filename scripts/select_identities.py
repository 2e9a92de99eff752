"""Rank synthetic identities by how much their rendered face resembles real people.

A synthetic identity's *embedding* is checked against the training people when it is drawn
(``safefm-identity new``), but what a recogniser sees is the *rendered, pasted-back* face: an
identity whose face comes out "average" is matched to many real people. This script renders each
candidate identity onto training photos (LFW people NOT in ``EVAL_IDENTITIES.txt``; the
evaluation people are never used) and measures, per candidate:

- ``leak``: share of photos whose anonymized output dlib still matches to that photo's own face
  (distance < 0.6), the same measure as the evaluation's per-frame leak, on training people;
- ``mean_distance`` / ``p05_distance``: dlib distance between output and original (higher: safer);
- ``other_distance`` / ``other_leak``: the same against the *other* photos (other people); the
  gap to ``mean_distance`` is how much of the replaced person passes through;
- ``face_found``: share of outputs in which dlib finds a face;
- with ``--fidelity``: FaceMesh mouth / eye opening r (output vs photo) and yaw / pitch MAE.

Usage:
    python scripts/select_identities.py --photos 120 --candidates 24 --json runs/identity_select.json
    python scripts/select_identities.py ... --groups female:adult,male:adult --write-best 2 --out-dir runs/identity_select/
    python scripts/select_identities.py --photos 300 --photo-seed 3 --candidates 0 --fidelity \
        --identity-files runs/identity_screen/seed2190.pt,... --json docs/identity_dev.json

Candidates are the shipped ``weights/identities/*.pt`` plus ``--candidates`` fresh draws from the
identity sampler (seeds ``--seed-base`` + i). Rendering uses the same engine as
``safefm-anonymize`` (single-image mode) with a fixed noise seed per candidate (its own).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from safefm.config import load_runtime_config  # noqa: E402
from safefm.train.data import eval_identities  # noqa: E402
from safefm.engine import Engine  # noqa: E402
from safefm.generator import Generator  # noqa: E402
from safefm.identity import load_identity, save_identity  # noqa: E402
from safefm.eval.metrics import FEATURES, box_iou, expression_features, mae, pearson  # noqa: E402
from safefm.paths import resolve_model_path, shared_data_dir, weights_dir  # noqa: E402
from safefm.recognition import MATCH_THRESHOLD, FaceRecognizer, load_rgb  # noqa: E402


def training_photos(n: int, seed: int) -> list[Path]:
    """One photo each of ``n`` LFW people outside the evaluation list (deterministic)."""
    lfw = shared_data_dir() / "lfw"
    banned = eval_identities()
    people = sorted(d for d in lfw.iterdir() if d.is_dir() and d.name not in banned)
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(people), size=min(n, len(people)), replace=False)
    return [sorted(people[i].glob("*.jpg"))[0] for i in sorted(pick)]


def originals(rec: FaceRecognizer, photos: list[Path]) -> list[tuple[Path, tuple, np.ndarray]]:
    """(photo, dlib box of its largest face, embedding) for photos where dlib finds a face."""
    out = []
    for p in photos:
        rgb = load_rgb(p)
        found = rec.embed_all(rgb)
        if found:
            box, emb = max(found, key=lambda f: (f[0][2] - f[0][0]) * (f[0][3] - f[0][1]))
            out.append((p, box, emb))
    return out


def add_candidate_args(ap: argparse.ArgumentParser, candidates: int, seed_base: int, out_dir: str) -> None:
    """The options both identity scripts share: model, fresh draws, steps, outputs."""
    ap.add_argument("--model", default=None, help="model name or path (default: the default model)")
    ap.add_argument("--candidates", type=int, default=candidates, help="fresh identities drawn from the sampler")
    ap.add_argument("--seed-base", type=int, default=seed_base, help="seed of the first fresh identity")
    ap.add_argument("--groups", default="", help="comma list of gender:age the fresh draws cycle through "
                    "(e.g. female:adult,male:young; empty: the sampler's whole distribution)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--json", type=Path, default=None, help="write every candidate's row here")
    ap.add_argument("--write-best", type=int, default=0, help="save the N best fresh identities")
    ap.add_argument("--out-dir", type=Path, default=Path(out_dir))


def candidate_identities(dim: int, n: int, seed_base: int, groups: str, files=()) -> list:
    """[(name, Identity)]: the shipped identities, ``files``, then ``n`` fresh sampler draws
    (seeds ``seed_base`` + i, named ``seed<seed>``, cycling through ``groups`` "gender:age,...")."""
    from safefm.cli.identity import new_identity

    cands = [(p.stem, load_identity(p, dim)) for p in sorted((weights_dir() / "identities").glob("*.pt"))]
    cands += [(Path(f).stem, load_identity(f, dim)) for f in files]
    cycle = [tuple(g.split(":")) for g in groups.split(",") if g] or [(None, None)]
    for i in range(n):
        gender, age = cycle[i % len(cycle)]
        cands.append((f"seed{seed_base + i}", new_identity(seed_base + i, gender or None, age or None)))
    return cands


def score(engine: Engine, rec: FaceRecognizer, refs, mesh=None) -> dict:
    """Render the engine's identity on every reference photo; distances to the originals.

    ``other_distance``: mean distance of each output to the *other* reference photos (other
    people): ``other_distance - mean_distance`` is how much nearer an output is to the person it
    replaces than to anyone else, i.e. what of the person passes through. With a FaceMesh
    ``mesh``: Pearson r of output vs photo mouth / eye opening and yaw / pitch MAE (degrees).
    """
    embs, found, f_in, f_out = [], 0, [], []
    for p, box, emb in refs:
        engine.reset()
        rgb = load_rgb(p)
        out = engine.process(rgb, 0.0).image
        hits = [b for b in rec.detect(out) if box_iou(b, box) > 0.3]
        found += bool(hits)
        embs.append(rec.embed(out, hits[0] if hits else box))
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_candidate_args(ap, candidates=16, seed_base=1000, out_dir="runs/identity_select")
    ap.add_argument("--photos", type=int, default=120, help="training LFW people rendered per candidate")
    ap.add_argument("--photo-seed", type=int, default=0, help="seed of the photo choice")
    ap.add_argument("--identity-files", default="", help="comma list of identity files scored as well")
    ap.add_argument("--fidelity", action="store_true", help="also FaceMesh mouth / eye r and pose MAE")
    args = ap.parse_args(argv)

    cfg = load_runtime_config(None, steps=args.steps)
    gen = Generator.load(resolve_model_path(args.model), cfg)
    rec = FaceRecognizer(upsample=1)
    t0 = time.perf_counter()
    refs = originals(rec, training_photos(args.photos, args.photo_seed))
    print(f"{len(refs)} reference photos with a dlib face ({time.perf_counter() - t0:.0f}s)", flush=True)

    files = [f for f in args.identity_files.split(",") if f]
    cands = candidate_identities(gen.model_cfg.identity_dim, args.candidates, args.seed_base, args.groups, files)
    mesh = None
    if args.fidelity:
        from safefm.face.landmarks import FaceMeshDetector
        mesh = FaceMeshDetector(max_faces=1, static_image=True)
    rows = []
    for name, ident in cands:
        engine = Engine(gen, ident, cfg, video=False)
        t1 = time.perf_counter()
        r = {"name": name, "seed": int(ident.seed), **ident.attributes, **score(engine, rec, refs, mesh)}
        rows.append((r, ident))
        fid = "".join(f"  {k.replace('_', ' ', 1)} {v:.2f}" for k, v in r.items()
                      if k.startswith(("r_", "mae_")))
        print(f"{name:>10}: leak {r['leak']:.3f}  mean d {r['mean_distance']:.3f} (others {r['other_distance']:.3f})"
              f"  p05 {r['p05_distance']:.3f}  face {r['face_found']:.2f}{fid}  ({time.perf_counter() - t1:.0f}s)",
              flush=True)
    rows.sort(key=lambda x: (x[0]["leak"], -x[0]["mean_distance"]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        model = resolve_model_path(args.model).resolve()
        model = model.relative_to(ROOT) if model.is_relative_to(ROOT) else model
        args.json.write_text(json.dumps({"model": str(model), "photos": len(refs), "threshold": MATCH_THRESHOLD,
                                         "ranking": [r for r, _ in rows]}, indent=1))
    fresh = [(r, i) for r, i in rows if r["name"].startswith("seed")]
    for r, ident in fresh[:args.write_best]:
        path = save_identity(ident, args.out_dir / f"{r['name']}.pt")
        print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
