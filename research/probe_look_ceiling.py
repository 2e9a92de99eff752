"""Research: how good can the pasted face look if the generator were perfect? Whole frames.

At frames N of each clip the product runs as shipped (files defaults, per-person identities); its
output is shown next to three *oracle* faces pasted into the same frame by the product's own
paste (``Engine._paste``: outline fit, even skin, light and colour match, the 2x detail stage,
grain, seamless fill), each drawn on the person's own landmarks:

- ``real 128``: the person's own aligned 128 px crop: a generator that drew the real face
  exactly, at the resolution the product generates at (the ceiling of 128 px + the paste);
- ``AE``: that crop encoded and decoded by the shipped model's autoencoder (its decoder fed the
  crop's own heatmaps): the ceiling of any generator on this latent space;
- ``AE step N``: the same with a ``scripts/train.py --stage ae`` checkpoint (``--ae``, repeatable);
  ``--ae AE+HEAT``: with the heatmap decoder ``research/ae_adversarial.py`` fine-tuned on it
  (``HEAT``: that run's last.pt).

These oracles are the person's own face, so they say nothing about privacy; they bound the look.
Each column is measured as ``safefm-eval`` measures the output (:mod:`safefm.eval.realism`:
sharpness, tone gap, edge_dark, against the input frame). Clips are MIT-licensed (LivePortrait);
no training data is written out.

    .venv/bin/python research/probe_look_ceiling.py --clips d0,d3,d10,d19 --frames 40,120 \
        [--ae runs/s28/route/ae/last.pt [--ae runs/s28/route/ae/last.pt+runs/s28/adv/last.pt]] \
        --out look_ceiling.png
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_ae_ceiling import reconstruct  # noqa: E402  (the autoencoder round trip, shared)


@torch.no_grad()
def round_trip(model, crop: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """``model.decode(model.encode(crop))`` of one (S, S, 3) uint8 crop (its own heatmaps, (478, 3)
    crop pixels, for a decoder that reads them) -> (S, S, 3) uint8."""
    return reconstruct(model, crop[None], lm[None].astype(np.float32))[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clips", default="d0,d3,d10,d19", help="liveportrait_<name> clips, comma list")
    ap.add_argument("--frames", default="40", help="frame indices, comma list (the figure shows the first)")
    ap.add_argument("--seed", type=int, default=1, help="identity_seed of the shipped run")
    ap.add_argument("--ae", action="append", default=[],
                    help="a --stage ae checkpoint, or AE+HEAT with research/ae_adversarial.py's run on it (repeatable)")
    ap.add_argument("--out", required=True, help="PNG: rows = clips; input, shipped, the oracles")
    ap.add_argument("--size", type=int, default=512, help="each frame drawn at this height")
    args = ap.parse_args()

    from safefm import engine as E
    from safefm.checkpoint import load_model
    from safefm.config import load_runtime_config
    from safefm.engine import build_engine
    from safefm.eval.realism import aggregate, face_realism_or_none
    from safefm.face import alignment
    from safefm.media import VideoReader
    from safefm.paths import resolve_model_path, shared_data_dir
    from safefm.train.autoencoder import load_autoencoder
    from safefm.train.common import load_checkpoint
    from safefm.train.heat_decoder import apply_checkpoint

    oracles = [("AE (shipped)", load_model(resolve_model_path("default"))[0].eval())]
    for spec in args.ae:
        path, _, heat = spec.partition("+")
        ck = load_checkpoint(path)
        model = load_autoencoder(ck).eval()
        if heat:
            hk = load_checkpoint(heat)
            model = apply_checkpoint(model, hk)
        oracles.append((f"AE step {ck['step']}" + (f" + adv. decoder {hk['step']}" if heat else ""), model))
    S = oracles[0][1].cfg.image_size

    caught = {}
    generate = E.Engine._generate_face

    def catch(self, job, plan):   # the shipped path, and the frame's face job kept for the oracles
        generate(self, job, plan)
        caught["job"] = job

    frames = sorted(int(f) for f in args.frames.split(","))
    E.Engine._generate_face = catch
    rows, table = [], []
    for clip in args.clips.split(","):
        eng = build_engine(load_runtime_config(None, identity_per_track=True, identity_seed=args.seed), video=True)
        with VideoReader(shared_data_dir() / "videos" / f"liveportrait_{clip}.mp4") as rd:
            for i, (frame, _) in enumerate(rd):
                caught.clear()
                res = eng.process(frame)
                if i not in frames:
                    continue
                if "job" not in caught or not res.faces:
                    print(f"{clip}: no face generated at frame {i}")
                    continue
                job, lm = caught["job"], res.faces[0].landmarks
                real = alignment.crop_face(frame, job.M, S)
                faces = [("input", frame), ("shipped", res.image)]
                for name, crop in [("real 128", real)] + [(n, round_trip(m, real, job.lm_crop)) for n, m in oracles]:
                    out = frame.copy()
                    eng._paste(out, frame, job.track, crop, job.lm_crop, job.lm_crop, job.M)
                    faces.append((name, out))
                measured = [(name, img, face_realism_or_none(frame, img, lm)) for name, img in faces]
                table += [(clip, i, name, m) for name, _, m in measured if name != "input" and m is not None]
                if i == frames[0]:
                    rows.append(np.concatenate([_tile(img, name, m, args.size) for name, img, m in measured], 1))
                if i >= frames[-1]:
                    break
        eng.close()
    E.Engine._generate_face = generate
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
    cv2.imwrite(args.out, cv2.cvtColor(np.concatenate(rows, 0), cv2.COLOR_RGB2BGR))
    print("| clip | frame | face | sharpness | tone gap | edge_dark |\n|---|---|---|---|---|---|")
    for clip, i, name, m in table:
        print(f"| {clip} | {i} | {name} | {m['sharpness']:.3f} | {m['tone_gap']:.2f} | {m['edge_dark']:.3f} |")
    print("\n| face | faces | sharpness (geometric mean) | tone gap | edge_dark |\n|---|---|---|---|---|")
    for name in dict.fromkeys(n for _, _, n, _ in table):
        agg = aggregate([m for _, _, n, m in table if n == name])
        print(f"| {name} | {agg['faces']} | {agg['sharpness']:.3f} | {agg['tone_gap']:.2f} | {agg['edge_dark']:.3f} |")


def _tile(img: np.ndarray, name: str, m: dict | None, size: int) -> np.ndarray:
    """``img`` drawn ``size`` px high, labelled with its name and measures."""
    tile = cv2.resize(img, (round(img.shape[1] * size / img.shape[0]), size), interpolation=cv2.INTER_AREA)
    label = name if m is None or name == "input" else (
        f"{name}  sharp {m['sharpness']:.2f} tone {m['tone_gap']:.2f} dark {m['edge_dark']:.3f}")
    for colour, width in (((0, 0, 0), 3), ((255, 255, 0), 1)):
        cv2.putText(tile, label, (8, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.6, colour, width)
    return tile


if __name__ == "__main__":
    main()
