#!/usr/bin/env python
"""Rank synthetic identities by how much their rendered face resembles real people.

A synthetic identity's *embedding* is checked against the training people when it is drawn
(``safefm-identity new``), but what a recogniser sees is the *rendered, pasted-back* face: an
identity whose face comes out "average" is matched to many real people. Both subcommands render
candidates with the same engine as ``safefm-anonymize`` (single-image mode, each candidate's own
noise) on *training* LFW photos (people NOT in ``EVAL_IDENTITIES.txt``; the evaluation people
are never used); the measures are in :mod:`safefm.eval.identities`.

``select``: each candidate on ``--photos`` reference photos, compared with the person it
replaces: ``leak`` (share of outputs dlib still matches to their own original, < 0.6),
``mean_distance`` / ``p05_distance`` (higher: safer), ``other_distance`` / ``other_leak``
(against the *other* photos' people: the gap to ``mean_distance`` is what of the person passes
through), ``face_found``; ``--fidelity`` adds FaceMesh mouth / eye opening r and yaw / pitch
MAE. Ranked by leak, then mean distance (highest first). ~80 photos are too few to rank
identities whose leak is a few per cent: use ``screen`` for that.

``screen``: each candidate on ``--drivers`` photos (second photos of training people), compared
with a whole *population*: one dlib embedding per training person (LFW training people plus
``--utk`` UTKFace photos), cached in ``--population`` (built with ``--workers`` processes on first
use, ~10 min) and split by a fixed hash into half A (ranks) and half B (held out, so the winner's
figure is not the maximum of noisy draws). Per candidate: share of each half within 0.6 of an
output (the driver's own person left out), nearest distance, distance to the driver's own face,
and FaceMesh head pose / eye opening of output vs driver. Ranked by half A, lowest first.

Candidates: the shipped ``weights/identities/*.pt`` (plus ``--identity-files`` for select), then
``--candidates`` fresh sampler draws (seeds ``--seed-base`` + i, named ``seed<seed>``, cycling
through ``--groups``); ``--write-best N`` saves the N best fresh draws to ``--out-dir``.

    python scripts/identities.py select --photos 120 --candidates 24 --json runs/identity_select.json
    python scripts/identities.py select --photos 300 --photo-seed 3 --candidates 0 --fidelity \\
        --identity-files runs/identity_screen/seed2190.pt,... --json docs/identity_dev.json
    python scripts/identities.py screen --candidates 160 --drivers 8 \\
        --groups female:adult,male:adult,female:young,male:young --json runs/screen.json --write-best 8
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def add_candidate_args(ap: argparse.ArgumentParser, candidates: int, seed_base: int, out_dir: str) -> None:
    """The options both subcommands share: model, fresh draws, steps, outputs."""
    ap.add_argument("--model", default=None, help="model name or path (default: the default model)")
    ap.add_argument("--candidates", type=int, default=candidates, help="fresh identities drawn from the sampler")
    ap.add_argument("--seed-base", type=int, default=seed_base, help="seed of the first fresh identity")
    ap.add_argument("--groups", default="", help="comma list of gender:age the fresh draws cycle through "
                    "(e.g. female:adult,male:young; empty: the sampler's whole distribution)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--json", type=Path, default=None, help="write every candidate's row here")
    ap.add_argument("--write-best", type=int, default=0, help="save the N best fresh identities")
    ap.add_argument("--out-dir", type=Path, default=Path(out_dir))


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    sel = sub.add_parser("select", help="compare each output with the person it replaces")
    add_candidate_args(sel, candidates=16, seed_base=1000, out_dir="runs/identity_select")
    sel.add_argument("--photos", type=int, default=120, help="training LFW people rendered per candidate")
    sel.add_argument("--photo-seed", type=int, default=0, help="seed of the photo choice")
    sel.add_argument("--identity-files", default="", help="comma list of identity files scored as well")
    sel.add_argument("--fidelity", action="store_true", help="also FaceMesh mouth / eye r and pose MAE")
    scr = sub.add_parser("screen", help="compare each output with a population of real people")
    add_candidate_args(scr, candidates=64, seed_base=2000, out_dir="runs/identity_screen")
    scr.add_argument("--population", type=Path, default=Path("runs/population.npz"), help="population cache")
    scr.add_argument("--utk", type=int, default=3000, help="UTKFace photos added to the population")
    scr.add_argument("--workers", type=int, default=2, help="processes for the population embeddings")
    scr.add_argument("--drivers", type=int, default=8, help="training photos each candidate is rendered on")
    scr.add_argument("--driver-seed", type=int, default=0)
    return ap


def candidate_identities(dim: int, n: int, seed_base: int, groups: str, files=()) -> list:
    """[(name, Identity)]: the shipped identities, ``files``, then ``n`` fresh sampler draws
    (seeds ``seed_base`` + i, named ``seed<seed>``, cycling through ``groups`` "gender:age,...")."""
    from safefm.cli.identity import new_identity
    from safefm.identity import load_identity
    from safefm.paths import weights_dir

    cands = [(p.stem, load_identity(p, dim)) for p in sorted((weights_dir() / "identities").glob("*.pt"))]
    cands += [(Path(f).stem, load_identity(f, dim)) for f in files]
    cycle = [tuple(g.split(":")) for g in groups.split(",") if g] or [(None, None)]
    for i in range(n):
        gender, age = cycle[i % len(cycle)]
        cands.append((f"seed{seed_base + i}", new_identity(seed_base + i, gender or None, age or None)))
    return cands


def save_best(rows: list, n: int, out_dir: Path) -> None:
    """Save the ``n`` best fresh draws of ranked [(row, Identity)] to ``out_dir``/<name>.pt."""
    from safefm.identity import save_identity

    fresh = [(r, i) for r, i in rows if r["name"].startswith("seed")]
    for r, ident in fresh[:n]:
        print(f"saved {save_identity(ident, out_dir / (r['name'] + '.pt'))}")


def select(args, gen, cfg) -> int:
    from safefm.engine import Engine
    from safefm.eval.identities import originals, photo_scores, training_photos
    from safefm.paths import resolve_model_path
    from safefm.recognition import MATCH_THRESHOLD, FaceRecognizer

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
        r = {"name": name, "seed": int(ident.seed), **ident.attributes, **photo_scores(engine, rec, refs, mesh)}
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
    save_best(rows, args.write_best, args.out_dir)
    return 0


def screen(args, gen, cfg, population) -> int:
    from safefm.checkpoint import sha256_file
    from safefm.engine import Engine
    from safefm.eval.identities import driver_photos, population_scores, prepare_drivers
    from safefm.face.landmarks import FaceMeshDetector
    from safefm.paths import resolve_model_path
    from safefm.recognition import MATCH_THRESHOLD, FaceRecognizer

    model_path = resolve_model_path(args.model)
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
             **population_scores(engine, rec, mesh, drivers, *population)}
        rows.append((r, ident))
        print(f"[{k + 1}/{len(cands)} {time.perf_counter() - t0:.0f}s] {name:>9}: match A {r['match_a']:.4f}"
              f" B {r['match_b']:.4f}  nearest {r['nearest']:.3f}  own {r['own_distance']:.3f}"
              f"  pitch {r['pitch_bias']:+.1f} ({r['pitch_mae']:.1f})  yaw {r['yaw_bias']:+.1f}"
              f"  eye {r['eye_bias']:+.3f}  face {r['face_found']:.2f}", flush=True)
    mesh.close()
    rows.sort(key=lambda x: x[0]["match_a"])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "model": model_path.name, "model_sha256": sha256_file(model_path)[:12], "population": len(population[0]),
            "drivers": len(drivers), "threshold": MATCH_THRESHOLD, "steps": args.steps,
            "ranking": [r for r, _ in rows]}, indent=1))
    save_best(rows, args.write_best, args.out_dir)
    return 0


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    population = None
    if args.command == "screen":
        from safefm.eval.identities import load_population

        population = load_population(args.population, args.utk, args.workers)
        half = population[2]
        print(f"population: {len(half)} people (half A {int((half == 0).sum())}, "
              f"half B {int((half == 1).sum())})", flush=True)
        if args.candidates == 0 and not args.json:
            return 0

    from safefm.config import load_runtime_config
    from safefm.generator import Generator
    from safefm.paths import resolve_model_path

    cfg = load_runtime_config(None, steps=args.steps)
    gen = Generator.load(resolve_model_path(args.model), cfg)
    if args.command == "select":
        return select(args, gen, cfg)
    return screen(args, gen, cfg, population)


if __name__ == "__main__":
    raise SystemExit(main())
