#!/usr/bin/env python
"""Does a decoder keep the eyelids? Decoders compared on held-back training crops.

For the last ``--rows`` rows of the data shards (the rows ``scripts/train.py --stage
heat-decoder`` holds back), each model's encoder + decoder reconstructs the crop, with the crop's
own heatmaps for a heatmap decoder; MediaPipe FaceMesh (static-image mode, crops upscaled 2x)
runs on the crop and on the reconstruction. Reported per model, and again with each crop's
latent eye cells taken from another crop (so only the heatmaps know where the lids are):
PSNR (dB), face found, and Pearson r of eye and mouth opening (safefm.eval.metrics) between crop and
reconstruction.

    python scripts/heat_decoder_report.py --models large,default [--rows 256] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _features(det, img: np.ndarray) -> np.ndarray:
    import cv2

    from safefm.eval import metrics as M

    big = cv2.resize(img, None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC)
    faces = det.detect(big)
    return M.expression_features(faces[0] if faces else None)


def report(model, crops: np.ndarray, landmarks: np.ndarray, det, batch: int = 32) -> dict:
    import torch

    from safefm.face import heatmaps
    from safefm.eval import metrics as M
    from safefm.train.data import to_tensor_image
    from safefm.train.heat_decoder import eye_boxes, swap_eye_cells

    S, H = model.cfg.image_size, model.cfg.heatmap_size
    f_in = np.array([_features(det, c) for c in crops])
    out = {}
    for name in ("own latents", "eye cells swapped"):
        recs, psnr = [], []
        for i in range(0, len(crops), batch):
            x = torch.stack([to_tensor_image(c) for c in crops[i:i + batch]])
            lm = landmarks[i:i + batch]
            heat = torch.from_numpy(np.stack([heatmaps.render_heatmaps(l, S, H) for l in lm]))
            with torch.no_grad():
                z = model.encode(x)
                if name != "own latents":
                    n = len(z)
                    z = swap_eye_cells(z, eye_boxes(lm), S, np.ones(n, bool), np.roll(np.arange(n), 1))
                y = model.decode(z, heat)
            mse = ((y - x) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)
            psnr += (10 * torch.log10(1 / mse)).tolist()
            recs += list(((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
        f_out = np.array([_features(det, r) for r in recs])
        fid = M.compare_series(f_in, f_out)
        out[name] = {"psnr": float(np.mean(psnr)),
                     "face_found": float(np.isfinite(f_out).all(axis=1).mean()),
                     **{f"{k}_r": fid[k]["pearson"] for k in ("eye_open_r", "eye_open_l", "mouth_open")}}
    return out


def main(argv=None) -> int:
    from safefm.checkpoint import load_model
    from safefm.train.data import finished_shards, load_shards
    from safefm.face.landmarks import FaceMeshDetector
    from safefm.paths import resolve_model_path

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="large,default", help="comma list of model names or paths")
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    shards = finished_shards()
    if not shards:
        raise SystemExit("no data shards: run scripts/prepare_data.py --pass crops first")
    data = load_shards(keys=("crops", "landmarks"))
    crops, lms = data["crops"][-a.rows:], data["landmarks"][-a.rows:].astype(np.float32)
    res = {}
    with FaceMeshDetector(max_faces=1, static_image=True) as det:
        for name in a.models.split(","):
            path = resolve_model_path(name.strip())
            model, meta = load_model(path)
            res[name] = {"file": path.name, "sha256": meta["sha256"][:12], "decoder_heat": model.cfg.decoder_heat,
                         **report(model, crops, lms, det)}
    print(f"{len(crops)} held-back training crops (the last rows of the shards)\n")
    print("| model | latents | PSNR dB | face found | eye r R / L | mouth r |")
    print("|---|---|---|---|---|---|")
    for name, r in res.items():
        for k in ("own latents", "eye cells swapped"):
            v = r[k]
            print(f"| {name} | {k} | {v['psnr']:.2f} | {v['face_found']:.2f} | "
                  f"{v['eye_open_r_r']:.2f} / {v['eye_open_l_r']:.2f} | {v['mouth_open_r']:.2f} |")
    if a.json:
        a.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
