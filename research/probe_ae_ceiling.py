"""Research: how much fine detail can an autoencoder keep at all? Encode real aligned crops,
decode them, and compare: Laplacian energy (1 px blur first, as ``safefm-eval``'s sharpness) of
the centre of the crop, decoded / real, and PSNR. No generator is involved, so this is the
ceiling of every face a model draws at 128 px.

Crops: frames of the shared clips (``--clips``, ``--frames`` each) and, with ``--holdout N``, the
first N crops of ``data_cache/shards/shard_000.npz`` (every autoencoder run holds those back).
Models: a weights file (``--model``, default the shipped one: its decoder reads the crop's own
heatmaps) and any number of ``scripts/train.py --stage ae`` checkpoints (``--ae PATH``, repeatable),
all on the same crops. ``--grid PNG``: the clip crops above each model's reconstruction of them
(the clips are MIT-licensed; training crops are never written out).

    .venv/bin/python research/probe_ae_ceiling.py [--clips liveportrait_d3,liveportrait_d9,liveportrait_d12] \
        [--frames 5] [--holdout 256] [--ae runs/ae_c16/ae/last.pt ...] [--grid ae.png]
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


def clip_crops(clips: str, frames: int, S: int):
    """(crops (N, S, S, 3) uint8, their landmarks (N, 478, 3)) of the clips' frames."""
    from safefm.face import alignment
    from safefm.face.landmarks import FaceMeshDetector
    from safefm.media import VideoReader
    from safefm.paths import shared_data_dir

    crops, lms = [], []
    with FaceMeshDetector(max_faces=1, static_image=True) as det:
        for clip in clips.split(","):
            with VideoReader(shared_data_dir() / "videos" / f"{clip}.mp4") as rd:
                all_frames = [f for f, _ in rd]
            for i in np.linspace(0, len(all_frames) - 1, frames).round().astype(int):
                faces = det.detect(all_frames[i])
                if faces:
                    M = alignment.align_matrix(faces[0], S)
                    crops.append(alignment.crop_face(all_frames[i], M, S))
                    lms.append(alignment.transform_points(faces[0], M))
    return np.stack(crops), np.stack(lms)


@torch.no_grad()
def reconstruct(model, crops: np.ndarray, lms: np.ndarray, batch: int = 32) -> np.ndarray:
    """model.decode(model.encode(x)) of (N, S, S, 3) uint8 crops (the crops' own heatmaps for a
    decoder that reads them) -> (N, S, S, 3) uint8."""
    from safefm.eval.reconstruction import to_uint8
    from safefm.face import heatmaps

    out = []
    for i in range(0, len(crops), batch):
        x = torch.from_numpy(crops[i:i + batch]).permute(0, 3, 1, 2).float() / 127.5 - 1
        heat = None
        if model.cfg.decoder_heat:
            heat = torch.from_numpy(np.stack([heatmaps.render_heatmaps(lm, model.cfg.image_size,
                                                                       model.cfg.heatmap_size)
                                              for lm in lms[i:i + batch]]))
        y = model.decode(model.encode(x), heat)
        out.append(to_uint8(y))
    return np.concatenate(out)


def scores(crops: np.ndarray, recon: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per crop: (energy kept, PSNR dB)."""
    kept = np.array([energy(b) / max(energy(a), 1e-6) for a, b in zip(crops, recon)])
    mse = ((recon.astype(np.float64) - crops) ** 2).reshape(len(crops), -1).mean(1)
    return kept, 10 * np.log10(255 ** 2 / np.maximum(mse, 1e-10))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clips", default="liveportrait_d3,liveportrait_d9,liveportrait_d12")
    ap.add_argument("--frames", type=int, default=5, help="frames per clip, spread over it")
    ap.add_argument("--holdout", type=int, default=0, help="also the first N crops of shard_000 (held back)")
    ap.add_argument("--model", default="default")
    ap.add_argument("--ae", action="append", default=[], help="a --stage ae checkpoint (repeatable)")
    ap.add_argument("--grid", default=None, help="write the clip crops above each model's reconstruction of them here")
    args = ap.parse_args()
    from safefm.checkpoint import load_model
    from safefm.paths import resolve_model_path
    from safefm.train.autoencoder import load_autoencoder
    from safefm.train.common import load_checkpoint

    models = [(str(args.model), load_model(resolve_model_path(args.model))[0])]
    for path in args.ae:
        ck = load_checkpoint(path)
        models.append((f"{path} (step {ck['step']})", load_autoencoder(ck).eval()))
    S = models[0][1].cfg.image_size
    sets = {"clips": clip_crops(args.clips, args.frames, S)}
    if args.holdout:
        from safefm.train.data import shards_dir

        with np.load(shards_dir() / "shard_000.npz", allow_pickle=False) as z:
            sets["holdout"] = (z["crops"][:args.holdout], z["landmarks"][:args.holdout].astype(np.float32))
    grid = [sets["clips"][0]]
    for name, model in models:
        print(f"{name}: latent {tuple(model.cfg.latent_shape)}")
        for key, (crops, lms) in sets.items():
            recon = reconstruct(model, crops, lms)
            kept, db = scores(crops, recon)
            print(f"  {key} ({len(crops)} crops): energy kept median {np.median(kept):.3f} "
                  f"({kept.min():.3f}-{kept.max():.3f}), PSNR median {np.median(db):.2f} dB, mean {db.mean():.2f}")
            if key == "clips":
                grid.append(recon)
    if args.grid:
        rows = [np.concatenate(list(r), 1) for r in grid]
        cv2.imwrite(args.grid, cv2.cvtColor(np.concatenate(rows, 0), cv2.COLOR_RGB2BGR))


if __name__ == "__main__":
    main()
