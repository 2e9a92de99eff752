"""Research: how much fine detail can the shipped model's autoencoder keep at all? Encode real
aligned crops of the shared clips, decode them (heatmap decoder fed the crop's own landmarks),
and compare: Laplacian energy (1 px blur first, as ``safefm-eval``'s sharpness) of the centre
of the crop, decoded / real, and PSNR. No generator is involved, so this is the ceiling of
every face the product draws at 128 px.

    .venv/bin/python research/probe_ae_ceiling.py [--clips liveportrait_d3,liveportrait_d9,liveportrait_d12] [--frames 5]
"""
from __future__ import annotations

import argparse

import cv2
import numpy as np
import torch


def energy(rgb: np.ndarray) -> float:
    """Laplacian variance of the centre half of an (S, S, 3) uint8 crop after a 1 px Gaussian."""
    s = rgb.shape[0]
    grey = cv2.GaussianBlur(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32), (0, 0), 1.0)
    return float(cv2.Laplacian(grey, cv2.CV_32F)[s // 4:3 * s // 4, s // 4:3 * s // 4].var())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clips", default="liveportrait_d3,liveportrait_d9,liveportrait_d12")
    ap.add_argument("--frames", type=int, default=5, help="frames per clip, spread over it")
    ap.add_argument("--model", default="default")
    args = ap.parse_args()
    from safefm.checkpoint import load_model
    from safefm.face import alignment, heatmaps
    from safefm.face.landmarks import FaceMeshDetector
    from safefm.media import VideoReader
    from safefm.paths import resolve_model_path, shared_data_dir

    model, _ = load_model(resolve_model_path(args.model))
    S = model.cfg.image_size
    print(f"latent {tuple(model.cfg.latent_shape)} for a {S} x {S} x 3 crop")
    rows = []
    with FaceMeshDetector(max_faces=1, static_image=True) as det:
        for clip in args.clips.split(","):
            with VideoReader(shared_data_dir() / "videos" / f"{clip}.mp4") as rd:
                frames = [f for f, _ in rd]
            for i in np.linspace(0, len(frames) - 1, args.frames).round().astype(int):
                faces = det.detect(frames[i])
                if not faces:
                    continue
                M = alignment.align_matrix(faces[0], S)
                crop = alignment.crop_face(frames[i], M, S)
                lm = alignment.transform_points(faces[0], M)
                x = torch.from_numpy(crop).permute(2, 0, 1)[None].float() / 127.5 - 1
                heat = torch.from_numpy(heatmaps.render_heatmaps(lm, S, model.cfg.heatmap_size))[None]
                with torch.no_grad():
                    y = model.decode(model.encode(x), heat)
                out = ((y[0].permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
                mse = float(((out.astype(np.float64) - crop) ** 2).mean())
                rows.append((clip, int(i), energy(out) / max(energy(crop), 1e-6), 10 * np.log10(255 ** 2 / mse)))
                print(f"{clip} frame {i}: energy kept {rows[-1][2]:.3f}, PSNR {rows[-1][3]:.1f} dB")
    e = np.array([r[2] for r in rows])
    print(f"{len(rows)} crops: energy kept median {np.median(e):.3f} (range {e.min():.3f}-{e.max():.3f}), "
          f"PSNR median {np.median([r[3] for r in rows]):.1f} dB")


if __name__ == "__main__":
    main()
