"""The PNG figures of a ``safefm-eval`` report: privacy per method (and against the number of
Euler steps when several were run), fidelity per clip and per feature, stability and leak per
clip, and the input-vs-output series of one clip. Figures show numbers only, never images from
the data, and each carries :func:`figure_caption`: data, model, identity, steps and seed.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from . import metrics as M
from .options import PARTS


def figure_caption(meta: dict) -> str:
    """The line every figure carries: data, model, identity, steps, seed."""
    d = meta["data"]
    parts = meta.get("parts", PARTS)
    data = []
    if "privacy" in parts:
        data.append("LFW eval ids" + ("" if d["max_people"] is None else f" ({d['max_people']} people)"))
    if "video" in parts:
        data.append("liveportrait clips" + ("" if d["max_clips"] is None else f" ({d['max_clips']})")
                    + ("" if d["max_frames"] is None else f", <={d['max_frames']} frames"))
    return (f"data: {' + '.join(data)} | model: {meta['model']} | identity: {meta['identity']} | "
            f"steps: {','.join(map(str, meta['steps']))} | seed: {meta['seed']}")


def write_plots(report: dict, out: Path, plot: dict) -> list[Path]:
    """PNG figures (no images from the data: numbers only), each captioned by
    :func:`figure_caption`. Returns the written paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cap = figure_caption(report["meta"])
    written = []

    def save(fig, name):
        fig.text(0.01, 0.005, cap, fontsize=6.5, ha="left", va="bottom", wrap=True)
        fig.tight_layout(rect=(0, 0.04, 1, 1))
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)

    if "privacy" in report:
        ms = report["privacy"]["methods"]
        keys = ["rank1", "verification", "face_detected_dlib", "face_detected_mediapipe"]
        fig, ax = plt.subplots(figsize=(8, 3.8))
        x = np.arange(len(keys))
        w = 0.8 / max(len(ms), 1)
        for i, (k, m) in enumerate(ms.items()):
            ax.bar(x + i * w, [m[q] if m[q] is not None else np.nan for q in keys], w, label=k)
        ax.set_xticks(x + w * (len(ms) - 1) / 2, ["rank-1 re-ID", "verification", "detected (dlib)",
                                                   "detected (MediaPipe)"])
        ax.set_ylim(0, 1.05)
        ax.set_title("Privacy on LFW eval identities (lower re-ID / verification = more private)")
        ax.legend(fontsize=8)
        save(fig, "privacy.png")
        sf = [(m["steps"], m) for m in ms.values() if m["method"] == "safefm"]
        if len(sf) > 1:
            fig, ax = plt.subplots(figsize=(7, 3.8))
            sf.sort(key=lambda t: t[0])
            xs = [s for s, _ in sf]
            for q, name in (("rank1", "rank-1 re-ID"), ("verification", "verification"),
                            ("face_detected_dlib", "face detected (dlib)"),
                            ("face_detected_mediapipe", "face detected (MediaPipe)")):
                line = ax.plot(xs, [m[q] for _, m in sf], marker="o", label=name)[0]
                if q == "rank1":
                    for k, style in (("blur", "--"), ("pixelate", ":")):
                        if k in ms and ms[k][q] is not None:
                            ax.axhline(ms[k][q], ls=style, lw=1, color=line.get_color(),
                                       label=f"rank-1 re-ID, {k} baseline")
            ax.set_xticks(xs)
            ax.set_xlabel("Euler steps")
            ax.set_ylim(0, 1.05)
            ax.set_title("SAFE-FM privacy vs steps (LFW eval identities)")
            ax.legend(fontsize=7)
            save(fig, "privacy_vs_steps.png")
    if "video" in report:
        v = report["video"]
        ms = v["methods"]
        clips = list(v["clips"])
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        w = 0.8 / max(len(ms), 1)
        x = np.arange(len(clips))
        for i, (k, m) in enumerate(ms.items()):
            vals = []
            for c in clips:
                pr = [m["clips"][c]["fidelity"][f]["pearson"] for f in v["features"]]
                pr = [p for p in pr if p is not None and math.isfinite(p)]
                vals.append(np.mean(pr) if pr else np.nan)
            axes[0].bar(x + i * w, vals, w, label=k)
        axes[0].set_xticks(x + w * (len(ms) - 1) / 2, [c.replace("liveportrait_", "") for c in clips])
        axes[0].set_ylabel("mean Pearson r over features")
        axes[0].set_title("Fidelity per clip")
        axes[0].set_ylim(-0.2, 1.05)
        xf = np.arange(len(v["features"]))
        for i, (k, m) in enumerate(ms.items()):
            axes[1].bar(xf + i * w, [m["overall"]["fidelity"][f]["pearson"] if
                                     m["overall"]["fidelity"][f]["pearson"] is not None else np.nan
                                     for f in v["features"]], w, label=k)
        axes[1].set_xticks(xf + w * (len(ms) - 1) / 2, v["features"], rotation=40, fontsize=8)
        axes[1].set_title("Fidelity per feature (all frames)")
        axes[1].set_ylim(-0.2, 1.05)
        axes[1].legend(fontsize=8)
        save(fig, "fidelity.png")

        fig, axes = plt.subplots(1, 4, figsize=(13, 3.6))
        panels = (("flicker", None, "flicker (output / input change)"),
                  ("identity_consistency", "mean", "identity consistency (cosine)"),
                  ("identity_distance", "median", "distance to clip mean (dlib)"),
                  ("leak_rate", None, "per-frame leak rate"))
        for ax, (key, stat, title) in zip(axes, panels):
            allv = []
            for i, (k, m) in enumerate(ms.items()):
                vals = [m["clips"][c][key][stat] if stat else m["clips"][c][key] for c in clips]
                vals = [np.nan if q is None else q for q in vals]
                allv += vals
                ax.bar(x + i * w, vals, w, label=k)
            if key == "identity_consistency" and np.isfinite(allv).any():
                ax.set_ylim(max(0.0, np.nanmin(allv) - 0.02), 1.0)
            ax.set_xticks(x + w * (len(ms) - 1) / 2, [c.replace("liveportrait_", "") for c in clips],
                          fontsize=7)
            ax.set_title(title, fontsize=9)
        axes[0].legend(fontsize=7)
        save(fig, "stability.png")

        if plot and clips:
            c = clips[0]
            fig, axes = plt.subplots(2, 1, figsize=(9, 4.5), sharex=True)
            for ax, f in zip(axes, ("mouth_open", "yaw")):
                j = M.FEATURES.index(f)
                first = next(iter(plot.values()))[c][0]
                ax.plot(first[:, j], color="k", lw=2, label="input")
                for k, d in plot.items():
                    if k != "none":
                        ax.plot(d[c][1][:, j], lw=1, label=k)
                ax.set_ylabel(f)
            axes[0].legend(fontsize=7, ncol=5)
            axes[0].set_title(f"Expression transfer on {c}: input vs output series")
            axes[1].set_xlabel("frame")
            save(fig, f"series_{c}.png")
    return written
