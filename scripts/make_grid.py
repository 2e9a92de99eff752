#!/usr/bin/env python
"""Grid of what the generator sees and makes, for people to look at (docs/grid.png).

Rows: frames of a clip. Columns: the retargeted expression heatmaps (as a false-colour
summary), then the generated face of each identity. Only generated images and heatmaps are
drawn: no pixel of the source clip ends up in the picture.

    python scripts/make_grid.py --clip liveportrait_d0.mp4 --frames 5 -o docs/grid.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np


def heat_summary(heat: np.ndarray) -> np.ndarray:
    """(9, H, W) heatmaps -> (H, W, 3) uint8 false colour: contours white, openings red, depth blue."""
    contours = heat[:7].max(0)
    rgb = np.stack([np.maximum(contours, heat[7]), contours, np.maximum(contours, 0.6 * heat[8])], -1)
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def main(argv=None) -> int:
    from safefm.face import alignment, heatmaps, retarget
    from safefm.config import load_runtime_config
    from safefm.generator import Generator
    from safefm.identity import load_identity
    from safefm.face.landmarks import FaceMeshDetector
    from safefm.media import VideoReader, write_image
    from safefm.paths import default_model_path, identities_dir, shared_data_dir

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clip", default="liveportrait_d0.mp4")
    ap.add_argument("--frames", type=int, default=5)
    ap.add_argument("--identities", type=int, default=4)
    ap.add_argument("--model", default=None)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("-o", "--output", default="docs/grid.png")
    args = ap.parse_args(argv)

    cfg = load_runtime_config(runtime="torch", steps=args.steps)
    gen = Generator.load(args.model or default_model_path(), cfg)
    S = gen.model_cfg.image_size
    files = sorted(identities_dir().glob("*.pt"), key=lambda p: (p.stem != "default", p.stem))  # default first
    ids = [load_identity(p) for p in files][: args.identities]
    template = alignment.load_template()
    rows = []
    with VideoReader(shared_data_dir() / "videos" / args.clip) as video, \
            FaceMeshDetector(max_faces=1, static_image=True) as det:
        n = video.frame_count
        picks = np.linspace(0, n - 1, args.frames).astype(int)
        neutral = retarget.NeutralEstimator(cfg.neutral_window, warmup=cfg.neutral_warmup)
        for k, (rgb, _) in enumerate(video):
            if k >= n:
                break
            faces = det.detect(rgb)
            if not faces:
                continue
            lm = alignment.transform_points(faces[0], alignment.align_matrix(faces[0], S))
            pose = retarget.pose_fit(lm, template)
            neu = neutral.update(retarget.to_canonical(lm, pose))
            if k not in picks:
                continue
            row = []
            for j, ident in enumerate(ids):
                ret = retarget.retarget(lm, neu, ident.shape, cfg.expression_gain, pose=pose, eye_gain=cfg.eye_gain,
                                        eye_rest=cfg.eye_rest)
                heat = heatmaps.render_heatmaps(ret, S, gen.model_cfg.heatmap_size)
                if j == 0:
                    row.append(cv2.resize(heat_summary(heat), (S, S)))
                z = gen.generate(heat, gen.identity_tokens(ident.embedding), ident.noise(gen.model_cfg.latent_shape))
                row.append(gen.decode(z, heat)[0])
            rows.append(np.concatenate(row, 1))
    grid = np.concatenate(rows, 0)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_image(out, grid)
    print(f"wrote {out} ({len(rows)} frames x {len(ids)} identities)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
