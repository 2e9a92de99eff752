"""Writing a ``safefm-eval`` report: :func:`jsonable` (what ``report.json`` holds: NaN as
null, numpy as Python), :func:`write_markdown` (``report.md``: the privacy, fidelity (FaceMesh
and dlib-68), stability, per-clip, stronger-attacker and realism tables with the run's provenance),
:func:`write_report` (``report.md`` and the plots of a finished run) and
:func:`rewrite_report` (re-render both from ``report.json``, e.g. after a change to this code,
without running anything).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .options import PARTS
from .plots import figure_caption, write_plots


def jsonable(x):
    """Deep copy with NaN/inf -> None, numpy scalars/arrays -> Python, tuples -> lists."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, Path):
        return str(x)
    return x


def _fmt(v, nd: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def _within(fid: dict | None) -> str:
    """'mouth / eyes' within-clip r of a dlib-68 fidelity dict ('-' for reports without one)."""
    if not fid:
        return "-"
    eyes = [fid[f]["pearson"] for f in ("eye_open_r", "eye_open_l")
            if fid[f]["pearson"] is not None and math.isfinite(fid[f]["pearson"])]
    return f"{_fmt(fid['mouth_open']['pearson'], 2)} / {_fmt(float(np.mean(eyes)) if eyes else None, 2)}"


def write_markdown(report: dict) -> str:
    """The text of ``report.md`` for a :func:`jsonable` report."""
    meta = report["meta"]
    lines = ["# SAFE-FM evaluation report", "",
             f"- created: {meta['created']}" + (" (quick subset)" if meta["quick"] else ""),
             f"- command: `{meta['command']}`" if meta["command"] else "- command: (API call)",
             f"- {figure_caption(meta)}",
             f"- machine: {meta['machine'].get('cpu', meta['machine']['processor'])}, "
             f"{meta['machine']['cpu_count']} cores, {meta['machine']['platform']}",
             "- time of this invocation: " + ", ".join(f"{k} {v:.0f} s" for k, v in meta["seconds"].items())]
    if meta.get("compute_seconds"):
        lines.append("- compute of the methods, resumed pieces included (gallery and input analysis aside): "
                     + ", ".join(f"{k} {v:.0f} s" for k, v in meta["compute_seconds"].items()))
    lines.append("")
    if "privacy" in report:
        p = report["privacy"]
        g = p["gallery"]
        lines += ["## Privacy (LFW eval identities)", "",
                  f"Gallery: {g['photos']} original photos of {g['people']} people "
                  f"({g['skipped_no_dlib_face']} skipped, no dlib face); dlib threshold {g['threshold']}. "
                  "Lower rank-1 / verification = more private. *located*: an output with no detected "
                  "face is embedded at the source face's box; *detected only*: it counts as a miss.", "",
                  "| method | rank-1 | rank-1 (detected only) | verification | verification (detected only) "
                  "| face detected (dlib) | face detected (MediaPipe) | engine found no face | ms/photo |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for k, m in p["methods"].items():
            missed = (m["engine"]["frames_without_engine_face"] / m["photos"]
                      if m["method"] != "none" and m["photos"] else None)
            lines.append(f"| {k} | {_fmt(m['rank1'])} | {_fmt(m['rank1_detected_only'])} | "
                         f"{_fmt(m['verification'])} | {_fmt(m['verification_detected_only'])} | "
                         f"{_fmt(m['face_detected_dlib'])} | {_fmt(m['face_detected_mediapipe'])} | "
                         f"{_fmt(missed)} | {_fmt(m['engine']['ms_per_frame'], 1)} |")
        lines.append("")
    if "video" in report:
        v = report["video"]
        lines += ["## Fidelity (video clips: input vs output, FaceMesh features)", "",
                  "Clips: " + ", ".join(f"{n} ({c['frames']} frames)" for n, c in v["clips"].items()) + ". "
                  "Pearson r over all frames pooled (MAE in brackets; distances / inter-ocular, "
                  "angles in degrees).", "",
                  "| method | " + " | ".join(v["features"]) + " | mean r | output face found |",
                  "|---|" + "---|" * (len(v["features"]) + 2)]
        for k, m in v["methods"].items():
            o = m["overall"]
            cells = [f"{_fmt(o['fidelity'][f]['pearson'], 2)} ({_fmt(o['fidelity'][f]['mae'], 2)})"
                     for f in v["features"]]
            lines.append(f"| {k} | " + " | ".join(cells) +
                         f" | {_fmt(o['fidelity_mean_pearson'])} | {_fmt(o['output_face_found'])} |")
        if "features68" in v:
            lines += ["", "## Fidelity read by dlib's 68-point predictor (video clips)", "",
                      "A second landmarker that shares nothing with the FaceMesh conditioning the "
                      "generator: dlib's HOG detector (upsample 0, the detections the identity "
                      "embeddings use) and 68-point predictor on every frame of input and output, "
                      "at the face nearest the source face box. Pearson r over all frames pooled (MAE "
                      "in brackets: openings / inter-ocular or eye width, angles in degrees); *clip "
                      "mean r*: mouth / eyes r averaged over clips; *within-clip r*: mouth / eyes r "
                      "pooled after taking each clip's own mean off input and output (the movement "
                      "without the person's resting mouth and eye shape, which SAFE-FM replaces with "
                      "its identity's).", "",
                      "| method | " + " | ".join(v["features68"]) + " | mean r | clip mean r (mouth / eyes) "
                      "| within-clip r (mouth / eyes) | dlib face found (output) |",
                      "|---|" + "---|" * (len(v["features68"]) + 4)]
            for k, m in v["methods"].items():
                o = m["overall"]
                fid = o["fidelity_dlib68"]
                cells = [f"{_fmt(fid[f]['pearson'], 2)} ({_fmt(fid[f]['mae'], 2)})" for f in v["features68"]]
                cm = o["fidelity_dlib68_clip_mean"]
                eyes = [cm[f]["pearson"] for f in ("eye_open_r", "eye_open_l") if cm[f]["pearson"] is not None]
                lines.append(f"| {k} | " + " | ".join(cells) + f" | {_fmt(o['fidelity_dlib68_mean_pearson'])} | "
                             f"{_fmt(cm['mouth_open']['pearson'], 2)} / "
                             f"{_fmt(float(np.mean(eyes)) if eyes else None, 2)} | "
                             f"{_within(o.get('fidelity_dlib68_within'))} | "
                             f"{_fmt(o['dlib68_output_face_found'])} |")
        lines += ["", "## Stability and per-frame leak (video clips)", "",
                  f"dlib embeddings every {v['embed_stride']} frames. Flicker: output's frame-to-frame "
                  "change in the face box / the input's (0 frozen, 1 as much as the input). Identity "
                  "consistency: cosine of each output frame's dlib embedding to the clip's mean (dlib "
                  "cosines crowd near 1, so the euclidean distance to the mean is given too: two "
                  "frames 0.3 from the mean on opposite sides are 0.6 apart, dlib's "
                  "different-person threshold).", "",
                  "| method | flicker | identity consistency (mean / p5) "
                  "| distance to clip mean (median / p95) | leak rate | leak (detected only) "
                  "| ms/frame | fps |", "|---|---|---|---|---|---|---|---|"]
        for k, m in v["methods"].items():
            o = m["overall"]
            ic = o["identity_consistency"]
            idd = o["identity_distance"]
            lines.append(f"| {k} | {_fmt(o['flicker'])} | {_fmt(ic['mean'])} / {_fmt(ic['p5'])} | "
                         f"{_fmt(idd['median'])} / {_fmt(idd['p95'])} | {_fmt(o['leak_rate'])} | "
                         f"{_fmt(o['leak_rate_detected_only'])} | "
                         f"{_fmt(m['engine']['ms_per_frame'], 1)} | {_fmt(m['engine']['fps'], 1)} |")
        new = "features68" in v
        lines += ["", "### Per clip", "",
                  "| method | clip | frames | mean r | flicker | id consistency | leak | output face found |"
                  + (" dlib-68 mouth r | dlib-68 eye r (r / l) | sharpness | tone_gap | chroma_excess | edge_dark |"
                     if new else ""),
                  "|---|---|---|---|---|---|---|---|" + ("---|" * 6 if new else "")]
        for k, m in v["methods"].items():
            for n, c in m["clips"].items():
                line = (f"| {k} | {n} | {c['frames']} | {_fmt(_mean_r(c['fidelity']))} | "
                        f"{_fmt(c['flicker'])} | {_fmt(c['identity_consistency']['mean'])} | "
                        f"{_fmt(c['leak_rate'])} | {_fmt(c['output_face_found'])} |")
                if new:
                    f68, rz = c["fidelity_dlib68"], c["realism"]
                    line += (f" {_fmt(f68['mouth_open']['pearson'], 2)} | {_fmt(f68['eye_open_r']['pearson'], 2)}"
                             f" / {_fmt(f68['eye_open_l']['pearson'], 2)} | {_fmt(rz['sharpness'])} | "
                             f"{_fmt(rz['tone_gap'], 2)} | {_fmt(rz['chroma_excess'], 2)} | "
                             f"{_fmt(rz.get('edge_dark', float('nan')))} |")
                lines.append(line)
    lines += _attacker_lines(report)
    lines += _realism_lines(report)
    lines.append("")
    return "\n".join(lines)


def _attacker_lines(report: dict) -> list[str]:
    """The stronger-attacker section (``safefm-eval --attacker``); empty without it."""
    if "attacker" not in report:
        return []
    a = report["attacker"]
    g = a["gallery"]
    lines = ["", "## A stronger attacker: trained on this anonymizer, and clip linkage", "",
             f"*recogniser*: dlib as in the privacy table. *attacker*: a residual MLP on dlib embeddings, "
             f"trained per method on {a['train']['photos']} (anonymized, original) photo pairs of people "
             f"the evaluation never uses ({a['train']['sources']}) to map an anonymized face to its "
             f"original's embedding, then matched against the gallery of originals ({g['photos']} photos "
             f"of {g['people']} people; chance {1 / max(g['people'], 1):.3f}). *other photos*: the probe's "
             "own original is left out of the gallery. *Linkage*: each clip cut in two halves (mean "
             f"embedding of every {a['embed_stride']}-th frame); AUC that two halves of one clip are "
             "closer than halves of two clips (0.5 = chance) and rank-1 of the right half among "
             f"{len(a['clips'])} (chance {1 / max(len(a['clips']), 1):.3f}); halves of one clip share "
             "background and light, so this bounds linkage from above.", "",
             "| method | rank-1 recogniser | rank-1 attacker | rank-1 other photos (recogniser / attacker) "
             "| linkage AUC (recogniser / attacker) | linkage rank-1 (recogniser / attacker) | train pairs |",
             "|---|---|---|---|---|---|---|"]
    for k, m in a["methods"].items():
        r1, ro, lk = m["rank1"], m["rank1_other_photos"], m["linkage"]
        lines.append(f"| {k} | {_fmt(r1['recogniser'])} | {_fmt(r1['attacker'])} | "
                     f"{_fmt(ro['recogniser'])} / {_fmt(ro['attacker'])} | "
                     f"{_fmt(lk['recogniser']['auc'])} / {_fmt(lk['attacker']['auc'])} | "
                     f"{_fmt(lk['recogniser']['rank1'])} / {_fmt(lk['attacker']['rank1'])} | {m['train_pairs']} |")
    return lines


def _mean_r(fid: dict) -> float | None:
    """Mean of the finite Pearson r of a ``{feature: {pearson, ...}}`` table (None if none)."""
    pr = [x["pearson"] for x in fid.values() if x["pearson"] is not None and math.isfinite(x["pearson"])]
    return float(np.mean(pr)) if pr else None


def _realism_lines(report: dict) -> list[str]:
    """The realism section: one row per method and data set (colour photos, grey-scale photos,
    clips pooled); empty for a report without realism figures."""
    sets = []
    if "privacy" in report and all("realism" in m for m in report["privacy"]["methods"].values()):
        g = report["privacy"]["gallery"]
        sets += [("photos, colour", "privacy", "colour"),
                 (f"photos, grey-scale ({g['grey_photos']} grey + {g['grey_copies']} made grey)",
                  "privacy", "grey")]
    if "video" in report and "features68" in report["video"]:
        sets.append(("clips, all frames", "video", None))
    if not sets:
        return []
    lines = ["", "## Realism (does the face look filmed by the same camera?)", "",
             "At the source face (FaceMesh on the input), at the picture's own resolution. *sharpness*: "
             "variance of the Laplacian (after a 1 px Gaussian) of the inner face, output / input, "
             "geometric mean over faces (1 = as sharp as the input, blur ~0); *tone_gap*: | dE76 "
             "between the inner face and a ring just outside it, output minus input | (0 = the face "
             "sits in its surroundings as the real one did, a viewer notices 2-3); *chroma_excess*: "
             "mean CIELAB chroma the output adds inside the face (grey-scale photos must stay at ~0); "
             "*edge_dark*: share of the face's outer band (forehead, temples, cheek edges, jaw) more "
             "than 15 L* darker than the inner face in the output and not in the input (hair-like "
             "smudges, dark seams; 0 = no more than the real face). "
             "*none* is the input itself: the ceiling 1 / 0 / 0 / 0.", "",
             "| method | data | faces | sharpness | tone_gap | chroma_excess | edge_dark |",
             "|---|---|---|---|---|---|---|"]
    for label, part, key in sets:
        for k, m in report[part]["methods"].items():
            rz = m["realism"][key] if part == "privacy" else m["overall"]["realism"]
            lines.append(f"| {k} | {label} | {rz['faces']} | {_fmt(rz['sharpness'])} | "
                         f"{_fmt(rz['tone_gap'], 2)} | {_fmt(rz['chroma_excess'], 2)} | "
                         f"{_fmt(rz.get('edge_dark', float('nan')))} |")
    return lines


def rewrite_report(out: Path) -> list[Path]:
    """Re-render report.md and the plots of ``out/report.json`` (e.g. after a change to the
    report code); the per-frame series plot needs the run itself and is left as it is."""
    out = Path(out)
    report = json.loads((out / "report.json").read_text())
    report["meta"].setdefault("parts", [p for p in PARTS if p in report])
    written = write_plots(report, out, {})
    (out / "report.md").write_text(write_markdown(report))
    return written


def write_report(report: dict, out: Path, plot: dict | None = None) -> None:
    """report.md and the plots (report.json is written by :func:`safefm.eval.run.run` last,
    with timings)."""
    rep = jsonable(report)
    report["meta"]["plots"] = [p.name for p in write_plots(rep, out, plot or {})]
    (out / "report.md").write_text(write_markdown(jsonable(report)))
