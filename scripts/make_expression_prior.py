"""Build ``safefm/face/assets/expression_prior.npz``: how to split one photo's face into rest shape + expression.

A video gives the engine the user's own rest shape (:class:`safefm.face.retarget.NeutralEstimator`);
a single image does not, and measuring its expression from the template passes the user's lip,
eye and brow *shapes* to the generator (measured on training photos: the output was 0.05 nearer
its own original, by dlib, than other people's photos, and matched it 5x as often). This script
fits a linear-Gaussian split on training people with several photos:

    canonical shape = mean + identity part + expression part

with the identity part's covariance the *between*-person covariance of the people's mean shapes
(less the expression share a mean of n photos keeps) and the expression part's the pooled
*within*-person covariance, both in the top ``--components`` (80) principal directions of the shapes.
The expected expression given one shape is ``W (shape - mean)``, W = S_e (S_id + S_e)^-1
(:func:`safefm.face.retarget.single_image_neutral`); detail outside those directions is treated as
identity (not transferred).

Data: FaceMesh (static image mode, the engine's alignment and :func:`safefm.face.retarget.pose_fit`)
on every photo of the LFW people *not* in ``lfw/EVAL_IDENTITIES.txt`` who have 2+ photos. Stored:
mean (478, 3), basis (K, 1434), W (K, K) and counts: statistics only, no per-person shape.

    python scripts/make_expression_prior.py      # writes safefm/face/assets/expression_prior.npz
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from safefm.face.alignment import align_matrix, load_template, transform_points
from safefm.train.data import training_people
from safefm.face.landmarks import FaceMeshDetector
from safefm.media import read_image
from safefm.face.retarget import EXPRESSION_PRIOR_PATH, pose_fit, to_canonical


def canonical_shapes(min_photos: int, max_photos: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, 478, 3) canonical shapes and (N,) person index of the training people's photos."""
    people = training_people(min_photos)
    template = load_template()
    shapes, who = [], []
    t0 = time.perf_counter()
    with FaceMeshDetector(max_faces=4, static_image=True) as mesh:
        for k, d in enumerate(people):
            for p in sorted(d.glob("*.jpg"))[:max_photos]:
                rgb = read_image(p)
                faces = mesh.detect(rgb)
                if not faces:
                    continue
                c = np.array(rgb.shape[1::-1], np.float32) / 2   # the face nearest the centre
                lm = min(faces, key=lambda f: float(np.linalg.norm(f[:, :2].mean(0) - c)))
                crop = transform_points(lm, align_matrix(lm, 128))
                shapes.append(to_canonical(crop, pose_fit(crop, template)))
                who.append(k)
            if (k + 1) % 200 == 0:
                print(f"  {k + 1}/{len(people)} people, {len(shapes)} faces ({time.perf_counter() - t0:.0f}s)",
                      flush=True)
    return np.stack(shapes), np.array(who)


def fit(shapes: np.ndarray, who: np.ndarray, components: int, ridge: float) -> dict:
    """Mean, PCA basis and expression filter W from shapes (N, 478, 3) of people ``who``."""
    keep = np.isin(who, [p for p in np.unique(who) if (who == p).sum() >= 2])
    x = shapes[keep].reshape(int(keep.sum()), -1).astype(np.float64)
    who = who[keep]
    mean = x.mean(0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    basis = vt[:components]                                 # (K, 1434) orthonormal rows
    z = (x - mean) @ basis.T                                # (N, K)
    people = np.unique(who)
    pm = np.stack([z[who == p].mean(0) for p in people])   # person means
    n = np.array([(who == p).sum() for p in people], np.float64)
    within = z - pm[np.searchsorted(people, who)]
    s_e = within.T @ within / (len(z) - len(people))        # pooled within-person covariance
    s_b = np.cov(pm.T, aweights=n)                          # between person means
    s_id = s_b - np.mean(1.0 / n) * s_e                     # a mean of n photos keeps S_e / n
    w_, v_ = np.linalg.eigh(s_id)
    s_id = (v_ * np.clip(w_, 0, None)) @ v_.T               # nearest PSD
    reg = ridge * np.trace(s_e + s_id) / components * np.eye(components)
    w = s_e @ np.linalg.inv(s_id + s_e + reg)
    share = float(np.trace(s_e) / np.trace(s_e + s_id))
    return {"mean": mean.reshape(478, 3).astype(np.float32), "basis": basis.astype(np.float32),
            "filter": w.astype(np.float32), "people": len(people), "faces": len(z),
            "expression_share": share}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--min-photos", type=int, default=2)
    ap.add_argument("--max-photos", type=int, default=8)
    ap.add_argument("--components", type=int, default=80, help="principal directions modelled")
    ap.add_argument("--ridge", type=float, default=0.01, help="regulariser, share of the mean variance")
    ap.add_argument("--out", type=Path, default=EXPRESSION_PRIOR_PATH)
    args = ap.parse_args(argv)
    shapes, who = canonical_shapes(args.min_photos, args.max_photos)
    prior = fit(shapes, who, args.components, args.ridge)
    info = {k: prior.pop(k) for k in ("people", "faces", "expression_share")}
    info.update(components=args.components, ridge=args.ridge)
    np.savez(args.out, info=np.array(json.dumps(info)), **prior)
    print(f"wrote {args.out}: {json.dumps(info)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
