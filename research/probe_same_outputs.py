"""Research: does a change leave the product's outputs as they were? Byte for byte.

``render`` runs the shipped model on a fixed set of inputs and stores the output images:
the camera path (``safefm-cam``'s runtime defaults) on d3, d10 and d19 (16 frames each, every
4th kept), the files default (per-person identities, seed 1) on d0 and d11 (8 frames, every
4th), and 8 LFW photos of training people through the photo path (24 images; nothing is committed: the file stays
where ``--out`` puts it). ``compare`` reports, per image, the largest difference and the share of
pixels off by more than 2 levels. Speed work should leave ``worst 0``; a 1-level change somewhere
re-seeds a photo's grain (``composite.add_grain`` is seeded by the crop), which shows as a
larger difference on that photo alone.

    .venv/bin/python research/probe_same_outputs.py render --out /tmp/before.npz   # on the old code
    .venv/bin/python research/probe_same_outputs.py render --out /tmp/after.npz    # on the new code
    .venv/bin/python research/probe_same_outputs.py compare /tmp/before.npz /tmp/after.npz
"""
from __future__ import annotations

import argparse
import sys

import numpy as np


def render(out: str) -> None:
    import cv2

    from safefm.config import LIVE_DEFAULTS, RuntimeConfig
    from safefm.engine import build_engine
    from safefm.paths import shared_data_dir
    from safefm.train.data import list_training_images

    data = shared_data_dir()
    res = {}
    runs = [("live", RuntimeConfig(**LIVE_DEFAULTS), ["d3", "d10", "d19"], 16),
            ("files", RuntimeConfig(identity_per_track=True, identity_seed=1), ["d0", "d11"], 8)]
    for name, cfg, clips, n in runs:
        for clip in clips:
            eng = build_engine(cfg, video=True)
            cap = cv2.VideoCapture(str(data / "videos" / f"liveportrait_{clip}.mp4"))
            for i in range(n):
                ok, bgr = cap.read()
                if not ok:
                    break
                r = eng.process(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
                if i % 4 == 3:
                    res[f"{name}_{clip}_{i}"] = r.image.copy()
            eng.close()
    lfw = [item.rel for item in list_training_images(data) if item.rel.startswith("lfw/")]
    photos = [data / rel for rel in lfw[:1000:125]]   # training people only, never the evaluation ones
    eng = build_engine(RuntimeConfig(identity_per_track=True, identity_seed=1), video=False)
    for k, path in enumerate(photos):
        res[f"photo_{k}"] = eng.process(cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)).image.copy()
    np.savez_compressed(out, **res)
    print(f"{len(res)} images -> {out}")


def compare(a_path: str, b_path: str) -> int:
    a, b = np.load(a_path), np.load(b_path)
    if sorted(a.files) != sorted(b.files):
        print("the two files hold different images")
        return 2
    worst = 0
    for k in a.files:
        d = np.abs(a[k].astype(np.int16) - b[k].astype(np.int16))
        worst = max(worst, int(d.max()))
        if d.max() > 0:
            print(f"{k:18s} max {d.max():3d}  mean {d.mean():.4f}  > 2 levels: {(d > 2).mean() * 100:.3f} %")
    print("worst", worst)
    return 0 if worst == 0 else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("render")
    r.add_argument("--out", required=True)
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    args = ap.parse_args()
    if args.cmd == "render":
        render(args.out)
        return 0
    return compare(args.a, args.b)


if __name__ == "__main__":
    sys.exit(main())
