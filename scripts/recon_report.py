#!/usr/bin/env python
"""How well a decoder keeps a face: reconstructions of held-back training crops, measured by MediaPipe.

MediaPipe FaceMesh (static-image mode, crops upscaled 2x) runs on each crop and on its
reconstruction (:mod:`safefm.eval.reconstruction`). Two comparisons; each prints a Markdown
table and, with ``--json``, writes the numbers (no image is written):

``decoders`` (docs/ae_report.json): the decoders of the training runs in ``--runs`` (the
autoencoder's own, and ``runs/decoder``'s fast one when present) decode the cached latents of
the last ``--rows`` rows of the latent cache (the rows the decoder stage never trains on).
Per decoder: PSNR (dB) against the crop, face detection rate on reconstructions, mean landmark
error in crop pixels (128 px crop) over all 478 points, the eye contours, the irises and the
lips, correlation of mouth and eye opening between crop and reconstruction, and the decoder's
time per image (torch, batch 1, one thread). JSON: {rows, crop_faces_detected, decoders: {name:
{psnr_db, detected, landmark_error_px: {all, eyes, irises, lips}, mouth_opening_r,
eye_opening_r, decode_ms_torch_1thread}}}.

``models`` (docs/heat_decoder_report.json): does a decoder keep the eyelids? Each model file of
``--models`` encodes and decodes the last ``--rows`` rows of the data shards (the rows
``scripts/train.py --stage heat-decoder`` holds back), a heatmap decoder with the crop's own
heatmaps; again with each crop's latent eye cells taken from another crop (so only the heatmaps
know where the lids are). Per model and case: PSNR (dB), face found, Pearson r of eye (right /
left) and mouth opening. JSON: {model: {file, sha256, decoder_heat, "own latents" | "eye cells
swapped": {psnr, face_found, eye_open_r_r, eye_open_l_r, mouth_open_r}}}.

    python scripts/recon_report.py decoders [--runs runs] [--rows 256] [--json docs/ae_report.json]
    python scripts/recon_report.py models --models large,default [--rows 256] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    dec = sub.add_parser("decoders", help="the training runs' decoders on cached latents (docs/ae_report.json)")
    dec.add_argument("--runs", type=Path, default=None, help="training runs folder (default: runs/)")
    mod = sub.add_parser("models", help="model files' encoder + decoder, eye cells swapped "
                         "(docs/heat_decoder_report.json)")
    mod.add_argument("--models", default="large,default", help="comma list of model names or paths")
    for p in (dec, mod):
        p.add_argument("--rows", type=int, default=256, help="held-back rows to use")
        p.add_argument("--json", type=Path, default=None, help="write the numbers here")
    return ap


def decoders(a, det) -> dict:
    import torch

    from safefm.eval.reconstruction import decoder_scores
    from safefm.models import SafeFMModel
    from safefm.train.autoencoder import load_autoencoder
    from safefm.train.common import checkpoint_model_config, load_checkpoint, runs_root
    from safefm.train.data import LatentCache, cache_root, load_shards
    from safefm.train.decoder import cache_pairs, crop_images, without_decoder

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
    x = crop_images(data["crops"], rows_d[sel], flipped)
    report = decoder_scores(models, z, x, det)

    print(f"{report['rows']} held-back crops (face found on {report['crop_faces_detected']}), "
          "landmark error in px of the 128 px crop\n")
    print("| decoder | PSNR dB | face found | err all | eyes | irises | lips | mouth r | eye r | decode ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in report["decoders"].items():
        e = r["landmark_error_px"]
        cells = [r["psnr_db"], r["detected"], e["all"], e["eyes"], e["irises"], e["lips"],
                 r["mouth_opening_r"], r["eye_opening_r"]]
        print(f"| {name} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in cells)
              + f" | {r['decode_ms_torch_1thread']:.1f} |")
    return report


def models(a, det) -> dict:
    from safefm.checkpoint import load_model
    from safefm.eval.reconstruction import model_scores
    from safefm.paths import resolve_model_path
    from safefm.train.data import finished_shards, load_shards

    if not finished_shards():
        raise SystemExit("no data shards: run scripts/prepare_data.py --pass crops first")
    data = load_shards(keys=("crops", "landmarks"))
    crops, lms = data["crops"][-a.rows:], data["landmarks"][-a.rows:].astype(np.float32)
    res = {}
    for name in a.models.split(","):
        path = resolve_model_path(name.strip())
        model, meta = load_model(path)
        res[name] = {"file": path.name, "sha256": meta["sha256"][:12], "decoder_heat": model.cfg.decoder_heat,
                     **model_scores(model, crops, lms, det)}
    print(f"{len(crops)} held-back training crops (the last rows of the shards)\n")
    print("| model | latents | PSNR dB | face found | eye r R / L | mouth r |")
    print("|---|---|---|---|---|---|")
    for name, r in res.items():
        for k in ("own latents", "eye cells swapped"):
            v = r[k]
            print(f"| {name} | {k} | {v['psnr']:.2f} | {v['face_found']:.2f} | "
                  f"{v['eye_open_r_r']:.2f} / {v['eye_open_l_r']:.2f} | {v['mouth_open_r']:.2f} |")
    return res


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    from safefm.face.landmarks import FaceMeshDetector

    with FaceMeshDetector(max_faces=1, static_image=True) as det:
        report = (decoders if a.command == "decoders" else models)(a, det)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
