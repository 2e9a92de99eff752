"""Build ``safefm/face/assets/template.npy``: the mean FaceMesh shape in unit crop coordinates.

Runs MediaPipe FaceMesh (static mode, refine_landmarks) on a seeded random sample of
UTKFace images and LFW images of people *not* in ``lfw/EVAL_IDENTITIES.txt``, keeps the
faces with a closed mouth (the template is a *neutral* face), aligns their 478-point shapes
by generalised Procrustes (3D similarity), averages them, turns the mean frontal (eye line
along x, best-fit face plane facing the camera) and places it in the crop frame: face-oval
width = ``--oval-width`` of the crop, centred in x, eye corners at ``--eye-height`` of the
crop height, mean z = 0. See safefm/face/assets/README.md for the numbers of the shipped template.

    python scripts/make_template.py            # writes safefm/face/assets/template.npy
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np

from safefm.face.alignment import TEMPLATE_PATH, umeyama
from safefm.errors import InputError
from safefm.face.landmarks import FaceMeshDetector
from safefm.media import read_image
from safefm.paths import shared_data_dir

FACE_OVAL = (10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378,
             400, 377, 152, 148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21,
             54, 103, 67, 109)
RIGHT_EYE = (33, 133)   # image-left eye corners
LEFT_EYE = (362, 263)   # image-right eye corners
NOSE_TIP = 1
# (upper, lower) inner-lip pairs: a neutral template has a closed mouth.
MOUTH_PAIRS = ((13, 14), (82, 87), (81, 178), (80, 88), (191, 95),
               (312, 317), (311, 402), (310, 318), (415, 324))


def sample_images(data: Path, n_utk: int, n_lfw: int, seed: int) -> list[Path]:
    rng = random.Random(seed)
    utk = sorted((data / "utkface").glob("*.jpg"))
    eval_people = set((data / "lfw" / "EVAL_IDENTITIES.txt").read_text().split())
    people = sorted(p for p in (data / "lfw").iterdir() if p.is_dir() and p.name not in eval_people)
    lfw = [sorted(p.glob("*.jpg"))[0] for p in rng.sample(people, min(n_lfw, len(people)))]
    return rng.sample(utk, min(n_utk, len(utk))) + lfw


def detect_all(paths: list[Path]) -> list[np.ndarray]:
    shapes = []
    with FaceMeshDetector(max_faces=1, static_image=True) as det:
        for p in paths:
            try:
                rgb = read_image(p)
            except InputError:
                continue
            faces = det.detect(rgb)
            if faces:
                shapes.append(faces[0].astype(np.float64))
    return shapes


def procrustes_mean(shapes: list[np.ndarray], iters: int = 6) -> np.ndarray:
    """Generalised Procrustes mean of (478, 3) shapes: centroid 0, RMS radius 1."""
    def normalise(x):
        x = x - x.mean(axis=0)
        return x / np.sqrt((x ** 2).sum(axis=1).mean())

    mean = normalise(shapes[0])
    for _ in range(iters):
        aligned = []
        for x in shapes:
            s, r, t = umeyama(x, mean)
            aligned.append(s * x @ r.T + t)
        mean = normalise(np.mean(aligned, axis=0))
    return mean


def mouth_gap(shape: np.ndarray) -> float:
    """Inner-lip gap of a shape relative to its face-oval width."""
    up, lo = np.array(MOUTH_PAIRS).T
    width = np.ptp(shape[list(FACE_OVAL), 0])
    return float(np.linalg.norm(shape[lo] - shape[up], axis=1).mean() / width)


def frontalise(mean: np.ndarray) -> np.ndarray:
    """Rotate a centred shape so the eye line is +x and the face plane normal is +z (away
    from the camera; the nose tip gets negative z). y = z x x points down (image convention)."""
    ex = mean[list(LEFT_EYE)].mean(axis=0) - mean[list(RIGHT_EYE)].mean(axis=0)
    ex /= np.linalg.norm(ex)
    _, _, vt = np.linalg.svd(mean[:468] - mean[:468].mean(axis=0))
    ez = vt[2] - (vt[2] @ ex) * ex
    ez /= np.linalg.norm(ez)
    if (mean[NOSE_TIP] - mean.mean(axis=0)) @ ez > 0:
        ez = -ez
    ey = np.cross(ez, ex)
    rot = np.stack([ex, ey, ez])
    return mean @ rot.T


def to_crop_frame(shape: np.ndarray, oval_width: float, eye_height: float) -> np.ndarray:
    oval = shape[list(FACE_OVAL)]
    w = oval[:, 0].max() - oval[:, 0].min()
    out = shape * (oval_width / w)
    oval = out[list(FACE_OVAL)]
    eyes = out[list(RIGHT_EYE + LEFT_EYE)]
    out[:, 0] += 0.5 - 0.5 * (oval[:, 0].max() + oval[:, 0].min())
    out[:, 1] += eye_height - eyes[:, 1].mean()
    out[:, 2] -= out[:, 2].mean()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--utk", type=int, default=250, help="UTKFace images to sample")
    ap.add_argument("--lfw", type=int, default=150, help="LFW (non-eval) people to sample")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--oval-width", type=float, default=0.66)
    ap.add_argument("--eye-height", type=float, default=0.37)
    ap.add_argument("--max-mouth-gap", type=float, default=0.01,
                    help="keep faces whose inner-lip gap is below this fraction of the face width")
    ap.add_argument("--out", type=Path, default=TEMPLATE_PATH)
    args = ap.parse_args(argv)

    paths = sample_images(shared_data_dir(), args.utk, args.lfw, args.seed)
    shapes = detect_all(paths)
    print(f"faces: {len(shapes)} of {len(paths)} images")
    shapes = [x for x in shapes if mouth_gap(x) < args.max_mouth_gap]
    print(f"closed-mouth faces used: {len(shapes)}")
    if len(shapes) < 20:
        print("error: too few faces detected to build a template", file=sys.stderr)
        return 1
    tmpl = to_crop_frame(frontalise(procrustes_mean(shapes)), args.oval_width, args.eye_height)
    oval = tmpl[list(FACE_OVAL)]
    print(f"oval x [{oval[:, 0].min():.3f}, {oval[:, 0].max():.3f}]  "
          f"y [{oval[:, 1].min():.3f}, {oval[:, 1].max():.3f}]  "
          f"z [{tmpl[:, 2].min():.3f}, {tmpl[:, 2].max():.3f}]")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.save(args.out, tmpl.astype(np.float32))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
