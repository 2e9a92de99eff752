#!/usr/bin/env python
"""Does the generator follow the heatmaps? Expression control measured on the model alone.

For ``--rows`` held-back rows of the latent cache (faces the decoder stage never trains on),
the heatmaps of each face's landmarks condition the generator (default identity, fixed noise
per row, cold start, ``--steps`` Euler steps); MediaPipe reads the landmarks back from the
generated crop. Per ControlNet scale (``--scales``: the adapter's residuals multiplied at load,
see ``RuntimeConfig.controlnet_scale``) it prints the correlation of mouth opening and eye
opening between the conditioning landmarks and the generated face, the mean landmark error
(crop px), and the face detection rate. No video, tracking or retargeting is involved.

    python research/probe_control.py [--model weights/safefm_default.safetensors | --runs runs]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="weights file (default: assemble runs/)")
    ap.add_argument("--runs", type=Path, default=None)
    ap.add_argument("--rows", type=int, default=48)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--scales", default="1,2,3")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)

    import torch

    from safefm.eval.metrics import eye_opening, mouth_opening, pearson
    from safefm.eval.reconstruction import crop_landmarks, to_uint8
    from safefm.face.heatmaps import render_heatmaps
    from safefm.face.landmarks import FaceMeshDetector
    from safefm.identity import load_identity
    from safefm.models import Velocity, scale_controlnet
    from safefm.paths import default_identity_path
    from safefm.sampler import sample
    from safefm.train.data import LatentCache, cache_root

    torch.set_num_threads(1)
    if a.model:
        from safefm.checkpoint import load_model

        model, _ = load_model(a.model)
        label = a.model.name
    else:
        from safefm.train.export import assemble

        model, summary = assemble(a.runs)
        label = f"runs (adapters step {summary.get('adapters_steps')})"
    model.eval()
    ident = load_identity(default_identity_path())
    cache = LatentCache(cache_root() / "latents.npz")
    rows = np.arange(len(cache) - a.rows, len(cache))
    S = model.cfg.image_size
    lms = [cache.landmarks[i].astype(np.float32) for i in rows]
    heat = torch.from_numpy(np.stack([render_heatmaps(lm, S, model.cfg.heatmap_size) for lm in lms]))
    tokens = model.identity(torch.from_numpy(np.asarray(ident.embedding, np.float32))[None]).expand(len(rows), -1, -1)
    noise = torch.randn(len(rows), *model.cfg.latent_shape, generator=torch.Generator().manual_seed(0))
    mesh = FaceMeshDetector(max_faces=1, static_image=True)
    ref_m = np.array([mouth_opening(lm) for lm in lms])
    ref_e = np.array([eye_opening(lm, "r") + eye_opening(lm, "l") for lm in lms])
    out = {"model": label, "rows": len(rows), "steps": a.steps, "scales": {}}
    base_state = {k: v.clone() for k, v in model.controlnet.state_dict().items()}
    print(f"{label}: {len(rows)} held-back faces, {a.steps} steps, identity {ident.name}")
    print("| ControlNet scale | face found | mouth r | eye r | landmark err px |")
    print("|---|---|---|---|---|")
    for s in [float(x) for x in a.scales.split(",")]:
        model.controlnet.load_state_dict(base_state)
        scale_controlnet(model.controlnet, s)
        vel = Velocity(model.unet, model.controlnet)
        with torch.no_grad():
            z = sample(lambda zz, t: vel(zz, torch.full((zz.shape[0],), t), heat, tokens), noise, a.steps)
            img = to_uint8(model.decode(z))
        gm, ge, gr, err = [], [], [], []
        for i, im in enumerate(img):
            lm = crop_landmarks(mesh, im)
            if lm is None:
                continue
            gr.append(i)
            gm.append(mouth_opening(lm))
            ge.append(eye_opening(lm, "r") + eye_opening(lm, "l"))
            err.append(float(np.linalg.norm(lm[:, :2] - lms[i][:, :2], axis=1).mean()))
        gr = np.array(gr, int)
        r = {"detected": len(gr) / len(rows),
             "mouth_r": pearson(ref_m[gr], gm) if len(gr) > 2 else None,
             "eye_r": pearson(ref_e[gr], ge) if len(gr) > 2 else None,
             "landmark_error_px": float(np.mean(err)) if err else None}
        out["scales"][str(s)] = r
        print(f"| {s:g} | {r['detected']:.2f} | {r['mouth_r']:.2f} | {r['eye_r']:.2f} | {r['landmark_error_px']:.2f} |",
              flush=True)
    if a.json:
        a.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
