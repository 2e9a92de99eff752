"""How well a decoder keeps a face: MediaPipe on a crop and on its reconstruction.

Both measures run MediaPipe FaceMesh (static-image mode, iris refinement) on crops upscaled 2x
(:func:`crop_landmarks`) and compare the crop with what a decoder makes of it:

- :func:`decoder_scores`: decoders of training runs on *cached latents* (PSNR, face found,
  landmark error by region, mouth / eye opening r, decode time): ``scripts/recon_report.py decoders``;
- :func:`model_scores`: a model file's encoder + decoder (with the crop's own heatmaps for a
  heatmap decoder), also with each crop's latent eye cells taken from another crop, so only the
  heatmaps know where the lids are: ``scripts/recon_report.py models``.

Images: torch (N, 3, S, S) in [-1, 1] or numpy (S, S, 3) uint8 RGB crops; landmarks (478, 3)
in crop pixels.
"""

from __future__ import annotations

import time

import numpy as np

from . import metrics as M


def crop_landmarks(det, img: np.ndarray, upscale: int = 2) -> np.ndarray | None:
    """(S, S, 3) uint8 RGB crop -> (478, 3) landmarks in crop pixels, or None without a face.

    ``det``: a static-image :class:`safefm.face.landmarks.FaceMeshDetector`; the crop is
    upscaled ``upscale`` x (bicubic) first, small crops being below FaceMesh's comfort."""
    import cv2

    big = cv2.resize(img, None, fx=upscale, fy=upscale, interpolation=cv2.INTER_CUBIC)
    faces = det.detect(big)
    return faces[0] / upscale if faces else None


def landmark_regions() -> dict[str, np.ndarray]:
    """FaceMesh point indices: all 478, the eye contours, the irises and the lips."""
    from mediapipe.python.solutions import face_mesh_connections as fc

    def pts(conns):
        return np.array(sorted({i for c in conns for i in c}))

    return {"all": np.arange(478),
            "eyes": pts(fc.FACEMESH_LEFT_EYE | fc.FACEMESH_RIGHT_EYE),
            "irises": pts(fc.FACEMESH_LEFT_IRIS | fc.FACEMESH_RIGHT_IRIS),
            "lips": pts(fc.FACEMESH_LIPS)}


def to_uint8(x) -> np.ndarray:
    """torch (N, 3, S, S) in [-1, 1] -> (N, S, S, 3) uint8."""
    return ((x.clamp(-1, 1).permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().astype(np.uint8)


def psnr(y, x):
    """torch (N, ...) reconstructions and targets in [-1, 1] -> (N,) PSNR in dB ([0, 1] scale)."""
    import torch

    mse = ((y - x) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(1 / mse)


def decoder_scores(decoders: dict, z, x, det, batch: int = 32) -> dict:
    """Each model of ``decoders`` ({name: model with .decode}) decodes latents ``z`` (N, C, s, s)
    of crops ``x`` (N, 3, S, S); -> {"rows", "crop_faces_detected", "decoders": {name: {psnr_db,
    detected, landmark_error_px: {region: crop px}, mouth_opening_r, eye_opening_r,
    decode_ms_torch_1thread}}} (the decode time: batch 1, this process's threads)."""
    import torch

    regions = landmark_regions()
    ref = [crop_landmarks(det, c) for c in to_uint8(x)]
    report = {"rows": int(len(x)), "crop_faces_detected": int(sum(r is not None for r in ref)), "decoders": {}}
    for name, m in decoders.items():
        with torch.no_grad():
            y = torch.cat([m.decode(z[i:i + batch]) for i in range(0, len(z), batch)])
            t0 = time.perf_counter()
            for i in range(10):
                m.decode(z[i:i + 1])
            ms = (time.perf_counter() - t0) / 10 * 1000
        errs = {k: [] for k in regions}
        mouth, eyes, detected = [], [], 0
        for r, img in zip(ref, to_uint8(y)):
            lm = crop_landmarks(det, img)
            detected += lm is not None
            if r is None or lm is None:
                continue
            d = np.linalg.norm(lm[:, :2] - r[:, :2], axis=1)
            for k, idx in regions.items():
                errs[k].append(float(d[idx].mean()))
            mouth.append((M.mouth_opening(r), M.mouth_opening(lm)))
            eyes.append((M.eye_opening(r, "r") + M.eye_opening(r, "l"), M.eye_opening(lm, "r") + M.eye_opening(lm, "l")))
        mo, ey = np.array(mouth), np.array(eyes)
        report["decoders"][name] = {
            "psnr_db": float(psnr(y, x).mean()), "detected": detected / len(y),
            "landmark_error_px": {k: float(np.mean(v)) if v else None for k, v in errs.items()},
            "mouth_opening_r": M.pearson(mo[:, 0], mo[:, 1]) if len(mo) > 2 else None,
            "eye_opening_r": M.pearson(ey[:, 0], ey[:, 1]) if len(ey) > 2 else None,
            "decode_ms_torch_1thread": ms}
    return report


def model_scores(model, crops: np.ndarray, landmarks: np.ndarray, det, batch: int = 32) -> dict:
    """A model's encoder + decoder on ``crops`` (N, S, S, 3) uint8 with their ``landmarks``
    (N, 478, 3) crop px -> {"own latents" | "eye cells swapped": {psnr, face_found, eye_open_r_r,
    eye_open_l_r, mouth_open_r}} (r: Pearson r of crop vs reconstruction FaceMesh features)."""
    import torch

    from ..face.heatmaps import render_heatmaps
    from ..train.data import to_tensor_image
    from ..train.heat_decoder import eye_boxes, swap_eye_cells

    S, H = model.cfg.image_size, model.cfg.heatmap_size
    f_in = np.array([M.expression_features(crop_landmarks(det, c)) for c in crops])
    out = {}
    for name in ("own latents", "eye cells swapped"):
        recs, vals = [], []
        for i in range(0, len(crops), batch):
            x = torch.stack([to_tensor_image(c) for c in crops[i:i + batch]])
            lm = landmarks[i:i + batch]
            heat = torch.from_numpy(np.stack([render_heatmaps(l, S, H) for l in lm]))
            with torch.no_grad():
                z = model.encode(x)
                if name != "own latents":
                    n = len(z)
                    z = swap_eye_cells(z, eye_boxes(lm), S, np.ones(n, bool), np.roll(np.arange(n), 1))
                y = model.decode(z, heat)
            vals += psnr(y, x).tolist()
            recs += list(to_uint8(y))
        f_out = np.array([M.expression_features(crop_landmarks(det, r)) for r in recs])
        fid = M.compare_series(f_in, f_out)
        out[name] = {"psnr": float(np.mean(vals)),
                     "face_found": float(np.isfinite(f_out).all(axis=1).mean()),
                     **{f"{k}_r": fid[k]["pearson"] for k in ("eye_open_r", "eye_open_l", "mouth_open")}}
    return out
