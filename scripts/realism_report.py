#!/usr/bin/env python
"""Does the anonymized face look filmed by the same camera? (issue 14's realism measures)

Runs the shipped engine (default model and identity, default runtime config) and the blur and
pixelate baselines over the first ``--frames`` frames of a few shared clips and over
``--photos`` LFW photos of the evaluation people (the first photo of people spread over
``lfw/EVAL_IDENTITIES.txt``; every ``--grey-every``-th one turned grey-scale first), and reports
:mod:`safefm.eval.realism`'s ``sharpness``, ``tone_gap`` and ``chroma_excess`` per method, with
the input itself as the ceiling (1, 0, 0). Regions come from FaceMesh landmarks detected on the
input. Also the engine's per-frame composite time (colour match + mask + paste).

    python scripts/realism_report.py --out /tmp/realism.json
    python scripts/realism_report.py --clips d3,d0 --frames 30 --photos 20 --out r.json --pairs /tmp/pairs

``--pairs DIR`` writes input|output side by side (full frames) for one clip frame and one photo.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cv2
import numpy as np

from safefm.config import load_runtime_config, to_dict
from safefm.engine import build_engine
from safefm.eval.baselines import build_baseline
from safefm.eval.privacy import eval_people
from safefm.eval.realism import MEASURES, aggregate, face_realism
from safefm.face.landmarks import FaceMeshDetector
from safefm.media import VideoReader, read_image
from safefm.paths import shared_data_dir

METHODS = ("safefm", "blur", "pixelate", "input")


def read_frames(path: Path, n: int) -> list[tuple[np.ndarray, float]]:
    """The first ``n`` (frame, timestamp) pairs of a video."""
    out = []
    with VideoReader(path) as reader:
        for frame, t in reader:
            out.append((frame, t))
            if len(out) >= n:
                break
    return out


def source_faces(images: list[np.ndarray], video: bool) -> list[np.ndarray | None]:
    """The largest FaceMesh face ``(478, 3)`` of each input image (None where none is found)."""
    with FaceMeshDetector(max_faces=1, static_image=not video) as det:
        found = [det.detect(img) for img in images]
    return [max(f, key=lambda lm: np.ptp(lm[:, 0]) * np.ptp(lm[:, 1])) if f else None for f in found]


def measure(engine, frames, faces, video: bool):
    """(per-face realism rows, output images, composite seconds per frame) of one engine over
    one clip (``video``) or a list of photos (reset before each)."""
    rows, outs, comp = [], [], []
    if video:
        engine.reset()
    for (img, t), lm in zip(frames, faces):
        if not video:
            engine.reset()
        res = engine.process(img, timestamp=t if video else None)
        outs.append(res.image)
        comp.append(res.timings.get("composite", 0.0))
        if lm is not None:
            try:
                rows.append(face_realism(img, res.image, lm))
            except ValueError:       # face (nearly) outside the frame
                pass
    return rows, outs, comp


def build(method: str, cfg, video: bool):
    if method == "safefm":
        return build_engine(cfg, video=video)
    return build_baseline("none" if method == "input" else method, cfg, video=video)


def run_set(name, items, video, cfg, report, pairs_dir, pair_index):
    """Measure every method on ``items`` (a list of frame lists: one per clip, or one of photos)."""
    for method in METHODS:
        rows_all, comp_all = [], []
        engine = build(method, cfg, video)
        try:
            for label, frames, faces in items:
                rows, outs, comp = measure(engine, frames, faces, video)
                rows_all += rows
                comp_all += comp
                if video:
                    report["per_clip"].setdefault(label, {})[method] = aggregate(rows)
                if pairs_dir is not None and method == "safefm" and len(outs) > pair_index:
                    side = np.concatenate([frames[pair_index][0], outs[pair_index]], axis=1)
                    cv2.imwrite(str(pairs_dir / f"{name}_{label}.png"), cv2.cvtColor(side, cv2.COLOR_RGB2BGR))
        finally:
            engine.close()
        report["sets"].setdefault(name, {})[method] = aggregate(rows_all)
        if method == "safefm":
            ms = 1000.0 * np.asarray(comp_all)
            report["composite_ms"][name] = {"median": float(np.median(ms)), "mean": float(ms.mean()),
                                            "p90": float(np.percentile(ms, 90))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="JSON report path")
    ap.add_argument("--data", default=None, help="shared data folder (default: $SAFEFM_SHARED_DATA)")
    ap.add_argument("--clips", default="d3,d0,d6,d9", help="clip names: liveportrait_NAME.mp4")
    ap.add_argument("--frames", type=int, default=60, help="first frames of each clip")
    ap.add_argument("--photos", type=int, default=40, help="LFW photos of evaluation people")
    ap.add_argument("--grey-every", type=int, default=4, help="every K-th photo is made grey-scale")
    ap.add_argument("--config", default=None, help="runtime config TOML (default: the shipped one)")
    ap.add_argument("--pairs", default=None, metavar="DIR", help="write input|output pictures here")
    ap.add_argument("--pair-frame", type=int, default=30, help="clip frame index of the pictures")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    data = Path(args.data) if args.data else shared_data_dir()
    cfg = load_runtime_config(args.config)
    pairs_dir = Path(args.pairs) if args.pairs else None
    if pairs_dir is not None:
        pairs_dir.mkdir(parents=True, exist_ok=True)
    report = {"config": to_dict(cfg), "frames_per_clip": args.frames, "sets": {}, "per_clip": {},
              "composite_ms": {}}

    clips = []
    for name in [c.strip() for c in args.clips.split(",") if c.strip()]:
        frames = read_frames(data / "videos" / f"liveportrait_{name}.mp4", args.frames)
        clips.append((name, frames, source_faces([f for f, _ in frames], video=True)))
    if clips:
        run_set("clips", clips, True, cfg, report, pairs_dir, args.pair_frame)

    people = eval_people(data, max_people=args.photos)
    colour, grey = [], []
    for i, (person, paths) in enumerate(people):
        img = read_image(paths[0])
        if args.grey_every > 0 and i % args.grey_every == args.grey_every - 1:
            grey.append((cv2.cvtColor(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB), None))
        else:
            colour.append((img, None))
    for name, photos in (("photos_colour", colour), ("photos_grey", grey)):
        if photos:
            faces = source_faces([p for p, _ in photos], video=False)
            run_set(name, [(name, photos, faces)], False, cfg, report, pairs_dir, 0)

    report["seconds"] = time.perf_counter() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")

    print(f"{'set':14s} {'method':9s} {'faces':>5s} " + " ".join(f"{m:>13s}" for m in MEASURES))
    for set_name, by_method in report["sets"].items():
        for method, agg in by_method.items():
            print(f"{set_name:14s} {method:9s} {agg['faces']:5d} "
                  + " ".join(f"{agg[m]:13.3f}" for m in MEASURES))
    for set_name, ms in report["composite_ms"].items():
        print(f"composite ms ({set_name}): median {ms['median']:.2f}, p90 {ms['p90']:.2f}")
    print(f"{report['seconds']:.0f} s; written {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
