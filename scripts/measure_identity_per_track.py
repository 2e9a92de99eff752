"""Measure per-track identities (docs/identity_per_track.md).

    python scripts/measure_identity_per_track.py pair [--left d3 --right d11 --frames 150]
    python scripts/measure_identity_per_track.py lfw  [--people 200]

``pair``: two shared clips side by side (``liveportrait_<left>`` | ``liveportrait_<right>``,
each scaled to 384 px) anonymized with ``--identity auto`` and with the default identity file;
each half of every output frame is embedded with dlib, giving the per-frame distance between the
two outputs (share above dlib's 0.6 match threshold) and each side's identity consistency
(:func:`safefm.eval.metrics.identity_consistency`, as ``safefm-eval`` reports it).

``lfw``: the evaluation people (``lfw/EVAL_IDENTITIES.txt``, one photo each, never trained on)
anonymized as single images with ``--identity auto`` and ``--match gender,age`` (and ``none``);
the attribute classifier (weights/attributes.safetensors) reads the input and the output face:
the share of people whose gender is kept and whose age group is within one group.
Writes JSON to ``runs/identity_per_track/``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import cv2
import numpy as np

from safefm.config import load_runtime_config
from safefm.engine import build_engine
from safefm.paths import REPO_ROOT, shared_data_dir
from safefm.recognition import MATCH_THRESHOLD, FaceRecognizer

OUT = REPO_ROOT / "runs" / "identity_per_track"


class _LogLines(logging.Handler):
    """Keeps the messages logged (the engine's 'face N: identity ... (how it was chosen)')."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _frames(name: str, n: int, side: int) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(shared_data_dir() / "videos" / f"liveportrait_{name}.mp4"))
    out = []
    while len(out) < n:
        ok, bgr = cap.read()
        if not ok:
            break
        out.append(cv2.cvtColor(cv2.resize(bgr, (side, side), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB))
    cap.release()
    return out


def _embed_half(rec: FaceRecognizer, img: np.ndarray) -> np.ndarray:
    e = rec.embed(img)
    return np.full(128, np.nan, np.float32) if e is None else e


def pair(a) -> dict:
    from safefm.eval.metrics import identity_consistency

    left, right = _frames(a.left, a.frames, 384), _frames(a.right, a.frames, 384)
    n = min(len(left), len(right))
    frames = [np.concatenate([left[i], right[i]], axis=1) for i in range(n)]
    rec = FaceRecognizer(upsample=1)
    report = {"clip": f"liveportrait_{a.left} | liveportrait_{a.right}, 384 px each, {n} frames"}
    inputs = np.stack([[_embed_half(rec, f[:, :384]), _embed_half(rec, f[:, 384:])] for f in frames])
    report["input_distance_mean"] = float(np.nanmean(np.linalg.norm(inputs[:, 0] - inputs[:, 1], axis=1)))
    for mode in a.modes.split(","):
        cfg = load_runtime_config(identity_per_track=mode == "auto", identity_seed=a.seed,
                                  identity_match=tuple(a.match))
        eng = build_engine(cfg, video=True)
        t0 = time.time()
        outs = [eng.process(f, i / 25).image for i, f in enumerate(frames)]
        secs = time.time() - t0
        if mode == "auto":
            report["identities"] = {str(k): st.identity.name for k, st in eng._states.items() if st.identity}
        eng.close()
        e = np.stack([[_embed_half(rec, o[:, :384]), _embed_half(rec, o[:, 384:])] for o in outs])
        d = np.linalg.norm(e[:, 0] - e[:, 1], axis=1)
        ok = np.isfinite(d)
        cons = [identity_consistency(e[:, k]) for k in (0, 1)]
        report[mode] = {
            "frames_both_embedded": int(ok.sum()),
            "distance_between_outputs": {"mean": float(d[ok].mean()), "min": float(d[ok].min()),
                                         "p1": float(np.percentile(d[ok], 1))},
            "share_above_threshold": float((d[ok] > MATCH_THRESHOLD).mean()),
            "identity_consistency": [float(np.nanmean(c)) for c in cons],
            "identity_consistency_min": [float(np.nanmin(c)) for c in cons],
            "output_to_own_input_mean": [float(np.nanmean(np.linalg.norm(e[:, k] - inputs[:, k], axis=1)))
                                         for k in (0, 1)],
            "seconds": round(secs, 1)}
        print(mode, json.dumps(report[mode]))
        if a.save_video:
            from safefm.media import VideoWriter

            with VideoWriter(OUT / f"pair_{a.left}_{a.right}_{mode}.mp4", 25.0, (768, 384)) as w:
                for o in outs:
                    w.write(o)
    return report


def lfw(a) -> dict:
    from safefm.attributes import AGE_CLASSES, GENDER_CLASSES, load_attributes
    from safefm.media import read_image
    from safefm.train.data import eval_identities

    clf = load_attributes()
    people = sorted(eval_identities())
    rng = np.random.default_rng(a.seed)
    people = [people[i] for i in sorted(rng.choice(len(people), size=min(a.people, len(people)), replace=False))]
    photos = [sorted((shared_data_dir() / "lfw" / p).glob("*.jpg"))[0] for p in people]
    rec = FaceRecognizer(upsample=1)
    report = {"people": len(photos), "photos": "first photo of each of a seeded random subset of the LFW "
                                                 "evaluation people (never trained on)"}
    imgs = [read_image(p) for p in photos]
    e_in = [rec.embed(im) for im in imgs]
    chosen = _LogLines()
    logging.getLogger("safefm.engine").addHandler(chosen)
    logging.getLogger("safefm.engine").setLevel(logging.INFO)
    for match in (("gender", "age"), ()):
        cfg = load_runtime_config(identity_per_track=True, identity_seed=a.seed, identity_match=match)
        eng = build_engine(cfg, video=False)
        rows, people_rows = [], []
        t0 = time.time()
        for name, im, ei in zip(people, imgs, e_in):
            eng.reset()
            chosen.lines.clear()
            res = eng.process(im)
            if ei is None or not res.faces:
                continue
            eo = rec.embed(res.image)
            if eo is None:
                continue
            pred = clf.predict_indices(np.stack([ei, eo]))   # row 0: input, row 1: output
            prob = clf.probabilities(np.stack([ei, eo]))["gender"][:, 1]
            rows.append((pred["gender"][0], pred["gender"][1], pred["age"][0], pred["age"][1]))
            people_rows.append({"person": name, "input": f"{GENDER_CLASSES[pred['gender'][0]]} {AGE_CLASSES[pred['age'][0]]}",
                                "output": f"{GENDER_CLASSES[pred['gender'][1]]} {AGE_CLASSES[pred['age'][1]]}",
                                "p_female_in_out": [round(float(prob[0]), 2), round(float(prob[1]), 2)],
                                "gender_kept": bool(pred["gender"][0] == pred["gender"][1]),
                                "chosen": " | ".join(chosen.lines)})
        eng.close()
        r = np.array(rows)
        key = ",".join(match) or "none"
        report[key] = {"people_measured": len(r), "gender_kept": float((r[:, 0] == r[:, 1]).mean()),
                       "age_group_same": float((r[:, 2] == r[:, 3]).mean()),
                       "age_group_within_one": float((np.abs(r[:, 2] - r[:, 3]) <= 1).mean()),
                       "input_age_groups": {AGE_CLASSES[k]: int((r[:, 2] == k).sum()) for k in range(4)},
                       "input_female_share": float(r[:, 0].mean()),
                       "seconds": round(time.time() - t0, 1),
                       "gender_lost": [p for p in people_rows if not p["gender_kept"]],
                       "per_person": people_rows}
        print(key, json.dumps({k: v for k, v in report[key].items() if k != "per_person"}))
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=("pair", "lfw"))
    ap.add_argument("--left", default="d3")
    ap.add_argument("--right", default="d11")
    ap.add_argument("--frames", type=int, default=150)
    ap.add_argument("--people", type=int, default=200)
    ap.add_argument("--match", default="gender,age")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modes", default="auto,file", help="pair: auto, file or both (comma list)")
    ap.add_argument("--save-video", action="store_true")
    a = ap.parse_args()
    from safefm.identity_assign import parse_match

    a.match = parse_match(a.match)
    OUT.mkdir(parents=True, exist_ok=True)
    rep = pair(a) if a.what == "pair" else lfw(a)
    name = f"pair_{a.left}_{a.right}.json" if a.what == "pair" else "lfw.json"
    (OUT / name).write_text(json.dumps(rep, indent=2) + "\n")
    print(f"wrote {OUT / name}")


if __name__ == "__main__":
    main()
