"""Fidelity and stability on the video clips (the report's ``video`` part). One pass over
each input clip stores per-frame FaceMesh landmarks, expression features, face boxes,
frame-to-frame change and (every ``embed_stride``-th frame) dlib embeddings; each method's
pass then compares its output against that frame by frame: expression transfer (Pearson r and
MAE per feature), flicker, identity consistency across the clip and the per-frame leak
(output matching its own input under dlib's threshold). Clips are read through
:class:`safefm.media.VideoReader` and streamed: no clip is held in memory.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np

from . import metrics as M
from .faces import DlibCache, mediapipe_faces, pick_face
from .options import EngineFactory, EvalOptions, variants
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
    feats: np.ndarray            # (T, F) input features
    d_in: np.ndarray             # (T,) input change frame t-1 -> t in the face box (NaN at 0)
    dlib_boxes: dict             # sampled frame -> dlib box of the input face (or None)
    emb: dict                    # sampled frame -> (128,) input embedding


def _analyse_input(path: Path, opts: EvalOptions, dl: DlibCache) -> ClipInput:
    boxes, feats, d_in, dboxes, embs = [], [], [], {}, {}
    prev = None
    with FaceMeshDetector(max_faces=2, static_image=False) as det, VideoReader(path) as reader:
        for t, (frame, _) in enumerate(islice(reader, opts.max_frames)):
            face = pick_face(mediapipe_faces(det, frame), None)
            box = face_box(face[0], frame.shape, 0.1) if face else None
            boxes.append(box)
            feats.append(M.expression_features(face[0] if face else None))
            d_in.append(M.mean_abs_diff(frame, prev, box) if prev is not None and box else np.nan)
            if t % opts.embed_stride == 0:
                hits = dl.detect(frame)
                hit = next((b for b in hits if box is None or M.same_face(b, box)), None)
                dboxes[t] = hit
                if hit is not None:
                    embs[t] = dl.embed(frame, hit)
            prev = frame
        fps = reader.fps
    return ClipInput(path.stem, fps, len(boxes), boxes,
                     np.array(feats).reshape(-1, len(M.FEATURES)), np.array(d_in), dboxes, embs)


def _run_clip(engine, path: Path, ci: ClipInput, opts: EvalOptions, dl: DlibCache,
              timer: EngineTimer) -> dict:
    feats, d_out = [], []
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
            d_out.append(M.mean_abs_diff(out, prev, box) if prev is not None and box else np.nan)
            if t in ci.emb:
                emb, detected = dl.output(out, ci.dlib_boxes[t])
                e_in.append(ci.emb[t])
                e_out.append(emb)
                e_det.append(emb if detected else None)
            prev = out
    feats = np.array(feats).reshape(-1, len(M.FEATURES))
    e_in, e_out, e_det = (M.embedding_stack(e) for e in (e_in, e_out, e_det))
    has_in = np.isfinite(ci.feats).all(axis=1)
    has_out = np.isfinite(feats).all(axis=1)
    cons = M.identity_consistency(e_out)
    dist = M.distances_to_mean(e_out)
    return {
        "frames": ci.frames, "frames_with_input_face": int(has_in.sum()),
        "output_face_found": float((has_in & has_out).sum() / max(has_in.sum(), 1)),
        "fidelity": M.compare_series(ci.feats, feats),
        "flicker": M.flicker_ratio(d_out, ci.d_in),
        "output_change_mean": float(np.nanmean(d_out)) if np.isfinite(d_out).any() else float("nan"),
        "input_change_mean": float(np.nanmean(ci.d_in)) if np.isfinite(ci.d_in).any() else float("nan"),
        "identity_consistency": M.nan_stats(cons),
        "identity_distance": M.nan_stats(dist),
        "leak_rate": M.match_rate(e_out, e_in, MATCH_THRESHOLD),
        "leak_rate_detected_only": M.match_rate(e_det, e_in, MATCH_THRESHOLD),
        "embedded_frames": len(e_in),
        "_feats": feats, "_d_out": np.array(d_out), "_e_out": e_out, "_e_in": e_in, "_e_det": e_det,
        "_cons": cons, "_dist": dist,
    }


def _overall(clips: dict, inputs: dict) -> dict:
    names = list(clips)
    f_in = np.concatenate([inputs[n].feats for n in names])
    f_out = np.concatenate([clips[n]["_feats"] for n in names])
    fid = M.compare_series(f_in, f_out)
    per_clip = {f: {k: float(np.nanmean([clips[n]["fidelity"][f][k] for n in names]))
                    if any(np.isfinite(clips[n]["fidelity"][f][k]) for n in names) else float("nan")
                    for k in ("pearson", "mae")} for f in M.FEATURES}
    cat = lambda key: np.concatenate([clips[n][key] for n in names])  # noqa: E731
    e_in, e_out, e_det = cat("_e_in"), cat("_e_out"), cat("_e_det")
    has_in = sum(clips[n]["frames_with_input_face"] for n in names)
    found = sum(clips[n]["output_face_found"] * clips[n]["frames_with_input_face"] for n in names)
    pear = [fid[f]["pearson"] for f in M.FEATURES if np.isfinite(fid[f]["pearson"])]
    return {
        "frames": sum(clips[n]["frames"] for n in names),
        "output_face_found": found / max(has_in, 1),
        "fidelity": fid, "fidelity_clip_mean": per_clip,
        "fidelity_mean_pearson": float(np.mean(pear)) if pear else float("nan"),
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
           "embed_stride": opts.embed_stride, "features": list(M.FEATURES), "methods": {}}
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
        log(f"video {label}: mean r {o['fidelity_mean_pearson']:.3f} flicker {o['flicker']:.2f} "
            f"id-cons {o['identity_consistency']['mean']:.3f} leak {o['leak_rate']:.3f} ({m['seconds']:.0f}s)")
    return res, plot
