#!/usr/bin/env python
"""Before/after strip of a clip for people to look at (docs/strip_<clip>.jpg).

Whole frames at their own resolution (no crop): the input above, the shipped engine's output
below, a few frames spread over the clip. The clips are LivePortrait example assets (MIT,
credited in docs/demo/CREDITS.md), the only face data that may appear in docs/.

    python scripts/make_strip.py --clip liveportrait_d3.mp4 --frames 4 -o docs/strip_d3.jpg
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np


def main(argv=None) -> int:
    from safefm.config import load_runtime_config
    from safefm.engine import build_engine
    from safefm.media import VideoReader
    from safefm.paths import shared_data_dir

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clip", default="liveportrait_d3.mp4", help="a clip in ../shared/data/videos, or a path")
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--config", default=None, help="runtime TOML (default: the shipped defaults)")
    ap.add_argument("--identity-repel", type=float, default=None)
    ap.add_argument("--model", default=None, help="weights file or shipped model name (default: the shipped default)")
    ap.add_argument("--steps", type=int, default=None, help="solver steps (default: the runtime config's)")
    ap.add_argument("-o", "--output", default=None, help="default: docs/strip_<clip>.jpg")
    args = ap.parse_args(argv)

    clip = Path(args.clip) if Path(args.clip).is_file() else shared_data_dir() / "videos" / args.clip
    cfg = load_runtime_config(args.config, identity_repel=args.identity_repel, steps=args.steps)
    with VideoReader(clip) as reader:
        frames = [f for f, _ in reader]
    picks = set(np.linspace(len(frames) * 0.1, len(frames) - 1, args.frames).astype(int).tolist())
    top, bottom = [], []
    with build_engine(cfg, model_path=args.model, video=True) as engine:
        for i, frame in enumerate(frames):   # every frame: the engine tracks the face over time
            out = engine.process(frame, i / reader.fps).image
            if i in picks:
                top.append(frame)
                bottom.append(out)
    strip = np.concatenate([np.concatenate(top, 1), np.concatenate(bottom, 1)], 0)
    out_path = Path(args.output or f"docs/strip_{clip.stem.replace('liveportrait_', '')}.jpg")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out_path), cv2.cvtColor(strip, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
    print(f"wrote {out_path} ({strip.shape[1]}x{strip.shape[0]}, frames {sorted(picks)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
