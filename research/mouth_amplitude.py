"""How far the output's mouth opens against the person's, from a finished ``safefm-eval`` video run.

    python research/mouth_amplitude.py runs/eval [runs/eval2 ...]

``safefm-eval`` reports Pearson r of mouth opening (dlib-68 and MediaPipe), which does not see
amplitude: an output whose mouth opens half as far as the person's can still read r = 1. This
reads the per-frame readings the evaluation saved (``OUT/partial/video_input_<clip>.pkl`` and
``video_clip_<clip>_safefm_*.pkl``) and prints, per clip and pooled over frames, for both
landmarkers: r, the least-squares slope of the output's opening on the input's, and the output's
mean opening over the input's most open tenth of frames divided by the input's (1: as far as
the person). Session 27, ``docs/results.md``.
"""

from __future__ import annotations

import glob
import pickle
import sys

import numpy as np


def amplitude(inp: np.ndarray, out: np.ndarray) -> tuple[float, float, float]:
    """(r, slope, top) of output vs input openings ``(T,)`` over the frames where both are finite."""
    keep = np.isfinite(inp) & np.isfinite(out)
    a, b = inp[keep], out[keep]
    top = a >= np.quantile(a, 0.9)
    return float(np.corrcoef(a, b)[0, 1]), float(np.polyfit(a, b, 1)[0]), float(b[top].mean() / max(a[top].mean(), 1e-6))


def main(folders: list[str]) -> None:
    for folder in folders:
        pooled: dict[str, list] = {"dlib": [[], []], "mp": [[], []]}
        print(folder)
        for path in sorted(glob.glob(f"{folder}/partial/video_input_*.pkl")):
            clip = path.rsplit("video_input_", 1)[1][:-4]
            outs = glob.glob(f"{folder}/partial/video_clip_{clip}_safefm_*.pkl")
            if not outs:
                continue
            with open(path, "rb") as f:     # the evaluation's own files (a trusted, local run)
                inp = pickle.load(f)
            with open(outs[0], "rb") as f:
                out = pickle.load(f)
            line = []
            for name, a, b in (("dlib", inp.feats68[:, 0], out["_feats68"][:, 0]),
                               ("mp", inp.feats[:, 0], out["_feats"][:, 0])):
                pooled[name][0].append(a)
                pooled[name][1].append(b)
                line.append("%s r %.2f slope %.2f top %.2f" % (name, *amplitude(a, b)))
            print(f"  {clip}: " + " | ".join(line))
        if pooled["dlib"][0]:
            print("  pooled: " + " | ".join("%s r %.3f slope %.2f top %.2f" % (
                name, *amplitude(np.concatenate(v[0]), np.concatenate(v[1]))) for name, v in pooled.items()))


if __name__ == "__main__":
    main(sys.argv[1:] or ["runs/eval"])
