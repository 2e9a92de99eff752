"""Fidelity, realism and stability on the video clips (the report's ``video`` part). One pass
over each input clip stores per-frame FaceMesh landmarks, expression features, face boxes,
dlib-68 features (:mod:`safefm.eval.dlib68`, every frame), frame-to-frame change and (every
``embed_stride``-th frame) dlib embeddings; each method's pass then compares its output against
that frame by frame: expression transfer read by FaceMesh and by dlib's 68-point predictor
(Pearson r and MAE per feature), realism (:mod:`safefm.eval.realism`: sharpness, tone gap,
chroma excess at the input's face), flicker, identity consistency across the clip and the
per-frame leak (output matching its own input under dlib's threshold). Clips are read through
:class:`safefm.media.VideoReader` and streamed: no clip is held in memory.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np

from . import metrics as M
from .dlib68 import FEATURES68
from .faces import DlibCache, mediapipe_faces, pick_face
from .options import EngineFactory, EvalOptions, variants
from .realism import aggregate, face_realism_or_none
from .resume import ResumeCache
from .timing import EngineTimer
from ..face.landmarks import FaceMeshDetector, face_box
from ..media import VideoReader
from ..recognition import MATCH_THRESHOLD


def video_clips(data_dir: Path, max_clips: int | None = None) -> list[Path]:
    """``videos/liveportrait_d*.mp4`` in numeric order (d0, d3, d6, ...), the first ``max_clips``."""
    clips = sorted((Path(data_dir) / "videos").glob("liveportrait_d*.mp4"),
                   key=lambda p: int("".join(c for c in p.stem.split("_d")[-1] if c.isdigit()) or 0))
    return clips[:max_clips] if max_clips else clips


@dataclass
class ClipInput:
    """What the input pass stores about one clip."""
    name: str
    fps: float
    frames: int
    boxes: list                  # per frame: FaceMesh box (margin 0.1) of the input face, or None
    landmarks: list              # per frame: (478, 3) float32 FaceMesh landmarks of that face, or None
    feats: np.ndarray            # (T, F) input features
    feats68: np.ndarray          # (T, len(FEATURES68)) input dlib-68 features (NaN: no dlib face)
    d_in: np.ndarray             # (T,) input change frame t-1 -> t in the face box (NaN at 0)
    dlib_boxes: dict             # sampled frame -> dlib box of the input face (or None)
    emb: dict                    # sampled frame -> (128,) input embedding


def _analyse_input(path: Path, opts: EvalOptions, dl: DlibCache) -> ClipInput:
    boxes, lms, feats, feats68, d_in, dboxes, embs = [], [], [], [], [], {}, {}
    prev = None
    with FaceMeshDetector(max_faces=2, static_image=False) as det, VideoReader(path) as reader:
        for t, (frame, _) in enumerate(islice(reader, opts.max_frames)):
            face = pick_face(mediapipe_faces(det, frame), None)
            box = face_box(face[0], frame.shape, 0.1) if face else None
            boxes.append(box)
            lms.append(face[0].astype(np.float32) if face else None)
            feats.append(M.expression_features(face[0] if face else None))
            feats68.append(_features68(dl, frame, box))
            d_in.append(M.mean_abs_diff(frame, prev, box) if prev is not None and box else np.nan)
            if t % opts.embed_stride == 0:
                hits = dl.detect(frame)
                hit = next((b for b in hits if box is None or M.same_face(b, box)), None)
                dboxes[t] = hit
                if hit is not None:
                    embs[t] = dl.embed(frame, hit)
            prev = frame
        fps = reader.fps
    return ClipInput(path.stem, fps, len(boxes), boxes, lms,
                     np.array(feats).reshape(-1, len(M.FEATURES)),
                     np.array(feats68).reshape(-1, len(FEATURES68)), np.array(d_in), dboxes, embs)


def _features68(dl: DlibCache, frame: np.ndarray, box) -> np.ndarray:
    """dlib-68 features of the face on the source ``box`` (all NaN without a source face)."""
    return dl.features68(frame, box) if box else np.full(len(FEATURES68), np.nan)


def _run_clip(engine, path: Path, ci: ClipInput, opts: EvalOptions, dl: DlibCache,
              timer: EngineTimer) -> dict:
    feats, feats68, d_out, real = [], [], [], []
    e_in, e_out, e_det = [], [], []
    prev = None
    engine.reset()
    with FaceMeshDetector(max_faces=2, static_image=False) as det, VideoReader(path) as reader:
        for t, (frame, _) in enumerate(islice(reader, opts.max_frames)):
            ta = time.perf_counter()
            r = engine.process(frame, t / ci.fps)
            timer.add(r, time.perf_counter() - ta)
            out = r.image
            box = ci.boxes[t]
            face = pick_face(mediapipe_faces(det, out), box) if box else None
            feats.append(M.expression_features(face[0] if face else None))
            feats68.append(_features68(dl, out, box))
            row = face_realism_or_none(frame, out, ci.landmarks[t])
            if row is not None:
                real.append(row)
            d_out.append(M.mean_abs_diff(out, prev, box) if prev is not None and box else np.nan)
            if t in ci.emb:
                emb, detected = dl.output(out, ci.dlib_boxes[t])
                e_in.append(ci.emb[t])
                e_out.append(emb)
                e_det.append(emb if detected else None)
            prev = out
    feats = np.array(feats).reshape(-1, len(M.FEATURES))
    feats68 = np.array(feats68).reshape(-1, len(FEATURES68))
    e_in, e_out, e_det = (M.embedding_stack(e) for e in (e_in, e_out, e_det))
    has_in = np.isfinite(ci.feats).all(axis=1)
    has_out = np.isfinite(feats).all(axis=1)
    cons = M.identity_consistency(e_out)
    dist = M.distances_to_mean(e_out)
    return {
        "frames": ci.frames, "frames_with_input_face": int(has_in.sum()),
        "output_face_found": float((has_in & has_out).sum() / max(has_in.sum(), 1)),
        "fidelity": M.compare_series(ci.feats, feats),
        "fidelity_dlib68": M.compare_series(ci.feats68, feats68, FEATURES68),
        **_found68(ci.feats68, feats68),
        "realism": aggregate(real),
        "flicker": M.flicker_ratio(d_out, ci.d_in),
        "output_change_mean": float(np.nanmean(d_out)) if np.isfinite(d_out).any() else float("nan"),
        "input_change_mean": float(np.nanmean(ci.d_in)) if np.isfinite(ci.d_in).any() else float("nan"),
        "identity_consistency": M.nan_stats(cons),
        "identity_distance": M.nan_stats(dist),
        "leak_rate": M.match_rate(e_out, e_in, MATCH_THRESHOLD),
        "leak_rate_detected_only": M.match_rate(e_det, e_in, MATCH_THRESHOLD),
        "embedded_frames": len(e_in),
        "_feats": feats, "_feats68": feats68, "_realism": real, "_d_out": np.array(d_out),
        "_e_out": e_out, "_e_in": e_in, "_e_det": e_det, "_cons": cons, "_dist": dist,
    }


def _found68(f_in: np.ndarray, f_out: np.ndarray) -> dict:
    """How many frames dlib read the input face in (``(T, F)`` dlib-68 features, NaN rows: no
    face), and the share of them where it also read the output face there."""
    has_in, has_out = np.isfinite(f_in).all(axis=1), np.isfinite(f_out).all(axis=1)
    return {"dlib68_input_frames": int(has_in.sum()),
            "dlib68_output_face_found": float((has_in & has_out).sum() / max(has_in.sum(), 1))}


def _clip_mean(clips: dict, key: str, features) -> dict:
    """{feature: {pearson, mae}}: the mean over clips (NaN clips left out) of ``clips[*][key]``."""
    def mean(vals):
        vals = [v for v in vals if np.isfinite(v)]
        return float(np.mean(vals)) if vals else float("nan")
    return {f: {k: mean([c[key][f][k] for c in clips.values()]) for k in ("pearson", "mae")}
            for f in features}


def _mean_pearson(fid: dict) -> float:
    pear = [v["pearson"] for v in fid.values() if np.isfinite(v["pearson"])]
    return float(np.mean(pear)) if pear else float("nan")


def _overall(clips: dict, inputs: dict) -> dict:
    names = list(clips)
    f_in = np.concatenate([inputs[n].feats for n in names])
    f_out = np.concatenate([clips[n]["_feats"] for n in names])
    fid = M.compare_series(f_in, f_out)
    f68_in = np.concatenate([inputs[n].feats68 for n in names])
    f68_out = np.concatenate([clips[n]["_feats68"] for n in names])
    fid68 = M.compare_series(f68_in, f68_out, FEATURES68)
    # within-clip: both sides demeaned over the frames where both were read, clip by clip
    pairs = [(inputs[n].feats68, clips[n]["_feats68"]) for n in names]
    both = [np.where(np.isfinite(a) & np.isfinite(b), 1.0, np.nan) for a, b in pairs]
    fid68_within = M.compare_series(M.demean_within([a * m for (a, _), m in zip(pairs, both)]),
                                    M.demean_within([b * m for (_, b), m in zip(pairs, both)]), FEATURES68)
    cat = lambda key: np.concatenate([clips[n][key] for n in names])  # noqa: E731
    e_in, e_out, e_det = cat("_e_in"), cat("_e_out"), cat("_e_det")
    has_in = sum(clips[n]["frames_with_input_face"] for n in names)
    found = sum(clips[n]["output_face_found"] * clips[n]["frames_with_input_face"] for n in names)
    return {
        "frames": sum(clips[n]["frames"] for n in names),
        "output_face_found": found / max(has_in, 1),
        "fidelity": fid, "fidelity_clip_mean": _clip_mean(clips, "fidelity", M.FEATURES),
        "fidelity_mean_pearson": _mean_pearson(fid),
        "fidelity_dlib68": fid68, "fidelity_dlib68_clip_mean": _clip_mean(clips, "fidelity_dlib68", FEATURES68),
        "fidelity_dlib68_mean_pearson": _mean_pearson(fid68),
        "fidelity_dlib68_within": fid68_within,
        **_found68(f68_in, f68_out),
        "realism": aggregate(r for n in names for r in clips[n]["_realism"]),
        "flicker": M.flicker_ratio(cat("_d_out"), np.concatenate([inputs[n].d_in for n in names])),
        "identity_consistency": M.nan_stats(cat("_cons")),
        "identity_distance": M.nan_stats(cat("_dist")),
        "leak_rate": M.match_rate(e_out, e_in, MATCH_THRESHOLD),
        "leak_rate_detected_only": M.match_rate(e_det, e_in, MATCH_THRESHOLD),
        "embedded_frames": int(len(e_in)),
    }


def run_video(opts: EvalOptions, factory: EngineFactory, data_dir: Path,
              cache: ResumeCache | None = None) -> tuple[dict, dict]:
    """-> (report["video"], plot data {label: {clip: (input feats, output feats)}})."""
    log = opts.log
    cache = cache or ResumeCache(Path(opts.out) / "partial", {}, False, log)
    clips = video_clips(data_dir, opts.max_clips)
    dl = DlibCache(upsample=0)
    inputs = {}
    t0 = time.perf_counter()
    for p in clips:
        inputs[p.stem] = cache.get_or(f"video_input_{p.stem}", lambda: _analyse_input(p, opts, dl))
        log(f"video: input {p.stem} analysed ({time.perf_counter() - t0:.0f}s)")
    res = {"clips": {n: {"frames": c.frames, "fps": c.fps} for n, c in inputs.items()},
           "embed_stride": opts.embed_stride, "features": list(M.FEATURES),
           "features68": list(FEATURES68), "dlib68_frame_stride": 1, "methods": {}}
    plot = {}
    for label, method, steps in variants(opts):
        def compute():
            timer, per, engine = EngineTimer(), {}, None

            def one_clip(p: Path) -> dict:   # each clip is its own resumable piece
                nonlocal engine
                t1 = time.perf_counter()
                if engine is None:
                    engine = factory(method, steps, True)
                clip_timer = EngineTimer()
                r = _run_clip(engine, p, inputs[p.stem], opts, dl, clip_timer)
                return {**r, "_timer": clip_timer, "_seconds": time.perf_counter() - t1}
            try:
                for p in clips:
                    per[p.stem] = cache.get_or(cache.key(f"video_clip_{p.stem}", method, steps),
                                               lambda p=p: one_clip(p))
                    timer.merge(per[p.stem]["_timer"])
                    log(f"video {label}: {p.stem} done ({per[p.stem]['_seconds']:.0f}s)")
            finally:
                if engine is not None:
                    engine.close()
            return {"overall": _overall(per, inputs),
                    "clips": {n: {k: v for k, v in c.items() if not k.startswith("_")} for n, c in per.items()},
                    "engine": timer.summary(), "seconds": sum(c["_seconds"] for c in per.values()),
                    "_plot": {n: c["_feats"] for n, c in per.items()}}
        m = dict(cache.get_or(cache.key("video", method, steps), compute))
        plot[label] = {n: (inputs[n].feats, f) for n, f in m.pop("_plot").items()}
        res["methods"][label] = {"method": method, "steps": steps if method == "safefm" else None, **m}
        o = m["overall"]
        log(f"video {label}: mean r {o['fidelity_mean_pearson']:.3f} (dlib-68 "
            f"{o['fidelity_dlib68_mean_pearson']:.3f}) sharpness {o['realism']['sharpness']:.2f} "
            f"tone gap {o['realism']['tone_gap']:.1f} flicker {o['flicker']:.2f} "
            f"id-cons {o['identity_consistency']['mean']:.3f} leak {o['leak_rate']:.3f} ({m['seconds']:.0f}s)")
    return res, plot
