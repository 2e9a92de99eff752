#!/usr/bin/env python
"""How well the latent autoencoder keeps a face: PSNR and MediaPipe landmark error by region.

For the held-back rows of the latent cache (the rows the decoder stage never trains on), each
decoder available in ``runs/`` (the autoencoder's own, and ``runs/decoder``'s fast one) decodes
the cached latent; MediaPipe FaceMesh (static-image mode, crops upscaled 2x) runs on the crop and
on its reconstruction, and the report gives, per decoder:

- PSNR (dB) against the crop, and the face detection rate on reconstructions;
- mean landmark error in crop pixels (128 px crop) over all 478 points, the eye contours, the
  irises and the lips;
- correlation of mouth opening and eye opening (safefm.eval.metrics) between crop and reconstruction;
- the decoder's time per 128 px image (torch, batch 1, this process's threads).

    python scripts/ae_report.py [--rows 256] [--json docs/ae_report.json]

Prints a Markdown table. Numbers only: no image is written.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _regions() -> dict[str, np.ndarray]:
    from mediapipe.python.solutions import face_mesh_connections as fc

    def pts(conns):
        return np.array(sorted({i for c in conns for i in c}))

    return {"all": np.arange(478),
            "eyes": pts(fc.FACEMESH_LEFT_EYE | fc.FACEMESH_RIGHT_EYE),
            "irises": pts(fc.FACEMESH_LEFT_IRIS | fc.FACEMESH_RIGHT_IRIS),
            "lips": pts(fc.FACEMESH_LIPS)}


def _landmarks(mesh, img: np.ndarray) -> np.ndarray | None:
    """(S, S, 3) uint8 RGB crop -> (478, 3) landmarks in crop pixels, or None."""
    import cv2

    s = img.shape[0]
    big = cv2.resize(img, (2 * s, 2 * s), interpolation=cv2.INTER_CUBIC)
    res = mesh.process(big)
    if not res.multi_face_landmarks:
        return None
    lm = res.multi_face_landmarks[0].landmark
    return np.array([[p.x * s, p.y * s, p.z * s] for p in lm], np.float32)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=Path, default=None)
    ap.add_argument("--rows", type=int, default=256, help="held-back cache rows to use")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)

    import mediapipe as mp
    import torch

    from safefm.train.data import LatentCache, cache_root, load_shards
    from safefm.eval.metrics import eye_opening, mouth_opening, pearson
    from safefm.models import SafeFMModel
    from safefm.train.autoencoder import load_autoencoder
    from safefm.train.common import checkpoint_model_config, load_checkpoint, runs_root
    from safefm.train.decoder import _images, cache_pairs, without_decoder

    torch.set_num_threads(1)
    root = Path(a.runs or runs_root())
    ae = load_checkpoint(root / "ae" / "last.pt")
    models = {f"AutoencoderTiny decoder (width {checkpoint_model_config(ae).ae_width})": load_autoencoder(ae).eval()}
    if (root / "decoder" / "last.pt").exists():
        dk = load_checkpoint(root / "decoder" / "last.pt")
        cfg = checkpoint_model_config(dk)
        m = SafeFMModel(cfg, with_controlnet=False, with_lora=False)
        m.load_state_dict({**without_decoder(ae["state"]["model"]), **dk["state"]["model"]}, strict=False)
        models[f"fast decoder {tuple(cfg.decoder_widths)}x{tuple(cfg.decoder_blocks)} ({dk['step']} steps)"] = m.eval()

    cache = LatentCache(cache_root() / "latents.npz")
    data = load_shards(keys=("crops", "path"))
    rows_c, rows_d = cache_pairs(cache, data)
    sel = np.arange(len(rows_c) - a.rows, len(rows_c))      # the decoder stage's held-back rows
    z = torch.from_numpy(np.asarray(cache.a["z"], np.float32)[rows_c[sel]])
    flipped = np.asarray(cache.a["flipped"], bool)[rows_c[sel]]
    x = _images(data["crops"], rows_d[sel], flipped)
    crops = ((x.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().astype(np.uint8)
    regions = _regions()
    mesh = mp.solutions.face_mesh.FaceMesh(static_image_mode=True, max_num_faces=1, refine_landmarks=True)
    ref = [_landmarks(mesh, c) for c in crops]

    report = {"rows": int(len(sel)), "crop_faces_detected": int(sum(r is not None for r in ref)), "decoders": {}}
    for name, m in models.items():
        with torch.no_grad():
            y = torch.cat([m.decode(z[i:i + 32]) for i in range(0, len(z), 32)])
            t0 = time.perf_counter()
            for i in range(10):
                m.decode(z[i:i + 1])
            ms = (time.perf_counter() - t0) / 10 * 1000
        mse = ((y - x) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)
        rec = ((y.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().astype(np.uint8)
        errs = {k: [] for k in regions}
        mouth, eyes, detected = [], [], 0
        for r, img in zip(ref, rec):
            lm = _landmarks(mesh, img)
            detected += lm is not None
            if r is None or lm is None:
                continue
            d = np.linalg.norm(lm[:, :2] - r[:, :2], axis=1)
            for k, idx in regions.items():
                errs[k].append(float(d[idx].mean()))
            mouth.append((mouth_opening(r), mouth_opening(lm)))
            eyes.append((eye_opening(r, "r") + eye_opening(r, "l"), eye_opening(lm, "r") + eye_opening(lm, "l")))
        mo, ey = np.array(mouth), np.array(eyes)
        report["decoders"][name] = {
            "psnr_db": float((10 * torch.log10(1 / mse)).mean()), "detected": detected / len(rec),
            "landmark_error_px": {k: float(np.mean(v)) if v else None for k, v in errs.items()},
            "mouth_opening_r": pearson(mo[:, 0], mo[:, 1]) if len(mo) > 2 else None,
            "eye_opening_r": pearson(ey[:, 0], ey[:, 1]) if len(ey) > 2 else None,
            "decode_ms_torch_1thread": ms}
    print(f"{report['rows']} held-back crops (face found on {report['crop_faces_detected']}), "
          "landmark error in px of the 128 px crop\n")
    print("| decoder | PSNR dB | face found | err all | eyes | irises | lips | mouth r | eye r | decode ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in report["decoders"].items():
        e = r["landmark_error_px"]
        print(f"| {name} | {r['psnr_db']:.2f} | {r['detected']:.2f} | {e['all']:.2f} | {e['eyes']:.2f} | "
              f"{e['irises']:.2f} | {e['lips']:.2f} | {r['mouth_opening_r']:.2f} | {r['eye_opening_r']:.2f} | "
              f"{r['decode_ms_torch_1thread']:.1f} |")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
