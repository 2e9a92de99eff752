"""``safefm-eval`` runners: privacy on LFW photos, fidelity and stability on the video clips,
for SAFE-FM and the baselines (:mod:`safefm.eval.baselines`) through one code path, and report
writing (``report.json``, ``report.md``, PNG plots: :func:`run`, :func:`write_report`).

Every method is an *engine* (``process(frame, t) -> FrameResult``, ``reset()``, ``close()``)
made by an :data:`EngineFactory` ``(method, steps, video) -> engine``; tests inject the tiny
seeded model through it.

Privacy (images): each EVAL_IDENTITIES photo whose original dlib detects a face is
anonymized (engine reset between photos). Its output is embedded with dlib at the detected
face that lies on the source face (:func:`safefm.eval.metrics.same_face`), or, when none does, at
the source face's box ("located": the attacker knows where the face was). Metrics with
``_detected_only`` count undetected outputs as misses instead.

Video: the input pass stores per-frame FaceMesh landmarks, features, face boxes, frame-to-frame
change and (every ``embed_stride``-th frame) dlib embeddings; each method's pass compares
against it frame by frame, streaming (no clip is held in memory).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import pickle
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from . import metrics as M
from .baselines import BASELINES, build_baseline
from ..results import ANONYMIZED, HELD, PLACEHOLDER, STAGES

SCHEMA = "safefm-eval/1"
METHODS = ("safefm",) + BASELINES
PARTS = ("privacy", "video")
QUICK = {"max_people": 5, "max_clips": 2, "max_frames": 20, "embed_stride": 4}
EngineFactory = Callable[[str, int, bool], object]
"""(method, steps, video) -> an engine with process(frame, t) / reset() / close()."""


@dataclass
class EvalOptions:
    out: Path = Path("runs/eval")
    methods: tuple[str, ...] = METHODS
    steps: tuple[int, ...] = (4,)
    seed: int | None = None          # identity noise seed override (None: the identity file's)
    model: Path | None = None
    identity: Path | None = None
    runtime: str = "auto"
    runtime_config: Path | None = None   # runtime TOML (None: configs/runtime_default.toml)
    max_people: int | None = None    # LFW eval people (None: all 400)
    max_clips: int | None = None     # video clips (None: all)
    max_frames: int | None = None    # frames per clip (None: all)
    embed_stride: int = 3            # dlib-embed every n-th video frame (identity metrics)
    parts: tuple[str, ...] = PARTS
    quick: bool = False
    resume: bool = False             # reuse finished pieces in out/partial/ (same settings only)
    data_dir: Path | None = None
    model_label: str | None = None   # how figures name the model (default: file name + sha256)
    command: str = ""
    log: Callable[[str], None] = field(default=lambda msg: print(msg, file=sys.stderr, flush=True))

    def __post_init__(self):
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"unknown method(s) {', '.join(bad)}; choose from {', '.join(METHODS)}")
        bad = [p for p in self.parts if p not in PARTS]
        if bad:
            raise ValueError(f"unknown part(s) {', '.join(bad)}; choose from {', '.join(PARTS)}")
        if not self.steps or any(not 1 <= s <= 50 for s in self.steps):
            raise ValueError("steps must be 1..50")
        if self.embed_stride < 1:
            raise ValueError("embed_stride must be >= 1")


def variants(opts: EvalOptions) -> list[tuple[str, str, int]]:
    """(label, method, steps) for every evaluated configuration: ``safefm`` once per steps
    value (labelled ``safefm@N`` when several are asked for), each baseline once."""
    out = []
    for m in opts.methods:
        if m == "safefm":
            out += [("safefm" if len(opts.steps) == 1 else f"safefm@{s}", m, s) for s in opts.steps]
        else:
            out.append((m, m, opts.steps[0]))
    return out


def default_engine_factory(opts: EvalOptions) -> EngineFactory:
    """SAFE-FM from ``opts.model``/``opts.identity`` (default weights), baselines by name."""
    from ..config import load_runtime_config

    def make(method: str, steps: int, video: bool):
        cfg = load_runtime_config(opts.runtime_config, steps=steps, runtime=opts.runtime)
        if method != "safefm":
            return build_baseline(method, cfg, video=video)
        from ..engine import build_engine

        engine = build_engine(cfg, model_path=opts.model, identity_path=opts.identity, video=video)
        if opts.seed is not None:
            engine.set_identity(dataclasses.replace(engine.identity, seed=int(opts.seed)))
        return engine

    return make


def tiny_engine_factory(opts: EvalOptions) -> EngineFactory:
    """SAFE-FM as :func:`safefm.tiny.tiny_engine` (random seeded model: CI, no weights)."""
    from ..config import load_runtime_config

    def make(method: str, steps: int, video: bool):
        cfg = load_runtime_config(opts.runtime_config, steps=steps,
                                  runtime="torch" if opts.runtime == "auto" else opts.runtime)
        if method != "safefm":
            return build_baseline(method, cfg, video=video)
        from ..tiny import tiny_engine

        return tiny_engine(cfg, seed=0 if opts.seed is None else int(opts.seed), video=video)

    return make


# ---------------------------------------------------------------------------------------
# Data


def eval_people(data_dir: Path, max_people: int | None = None) -> list[tuple[str, list[Path]]]:
    """[(person, photos)] of ``lfw/EVAL_IDENTITIES.txt`` in file order; with ``max_people``,
    that many spread evenly over the list (deterministic)."""
    lfw = Path(data_dir) / "lfw"
    names = (lfw / "EVAL_IDENTITIES.txt").read_text().split()
    if max_people is not None and max_people < len(names):
        idx = np.linspace(0, len(names) - 1, max(1, max_people)).round().astype(int)
        names = [names[i] for i in sorted(set(idx))]
    return [(n, sorted((lfw / n).glob("*.jpg"))) for n in names]


def video_clips(data_dir: Path, max_clips: int | None = None) -> list[Path]:
    """``videos/liveportrait_d*.mp4`` in numeric order (d0, d3, d6, ...), the first ``max_clips``."""
    clips = sorted((Path(data_dir) / "videos").glob("liveportrait_d*.mp4"),
                   key=lambda p: int("".join(c for c in p.stem.split("_d")[-1] if c.isdigit()) or 0))
    return clips[:max_clips] if max_clips else clips


def read_frames(path: Path, max_frames: int | None = None) -> Iterator[np.ndarray]:
    """RGB uint8 (H, W, 3) frames of a video file, at most ``max_frames``."""
    import cv2

    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise FileNotFoundError(f"cannot open video {path}")
    try:
        n = 0
        while max_frames is None or n < max_frames:
            ok, bgr = cap.read()
            if not ok:
                break
            n += 1
            yield cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    finally:
        cap.release()


def video_fps(path: Path) -> float:
    import cv2

    cap = cv2.VideoCapture(str(path))
    fps = cap.get(cv2.CAP_PROP_FPS)
    cap.release()
    return float(fps) if fps and fps > 0 else 30.0


# ---------------------------------------------------------------------------------------
# dlib with a cache (the "none" output is the input: no need to embed it twice)


class _Dlib:
    def __init__(self, upsample: int):
        from ..recognition import FaceRecognizer

        self.rec = FaceRecognizer(upsample=upsample)
        self._det: dict = {}
        self._emb: dict = {}
        self.calls = 0

    @staticmethod
    def _key(rgb: np.ndarray) -> bytes:
        return hashlib.sha1(np.ascontiguousarray(rgb).data).digest() + bytes(str(rgb.shape), "ascii")

    def detect(self, rgb: np.ndarray, key: bytes | None = None) -> list:
        key = key or self._key(rgb)
        if key not in self._det:
            self._det[key] = self.rec.detect(rgb)
        return self._det[key]

    def embed(self, rgb: np.ndarray, box, key: bytes | None = None) -> np.ndarray:
        k = (key or self._key(rgb), tuple(int(v) for v in box))
        if k not in self._emb:
            self.calls += 1
            self._emb[k] = self.rec.embed(rgb, tuple(int(v) for v in box))
        return self._emb[k]

    def output(self, rgb: np.ndarray, src_box) -> tuple[np.ndarray, bool]:
        """(embedding, detected): at the detected face on ``src_box``, else located at ``src_box``."""
        key = self._key(rgb)
        hit = next((b for b in self.detect(rgb, key) if M.same_face(b, src_box)), None)
        return self.embed(rgb, hit if hit is not None else src_box, key), hit is not None


def _mp_boxes(detector, rgb: np.ndarray) -> list[tuple[np.ndarray, tuple]]:
    return [(lm, M.landmark_box(lm, rgb.shape, 0.0)) for lm in detector.detect(rgb)]


def _pick_face(found, ref_box):
    """The (landmarks, box) in ``found`` on ``ref_box`` nearest its centre (None if none)."""
    if ref_box is None:
        return max(found, key=lambda f: (f[1][2] - f[1][0]) * (f[1][3] - f[1][1]), default=None)
    cx, cy = (ref_box[0] + ref_box[2]) / 2, (ref_box[1] + ref_box[3]) / 2
    ok = [f for f in found if M.same_face(f[1], ref_box)]
    return min(ok, key=lambda f: abs((f[1][0] + f[1][2]) / 2 - cx) + abs((f[1][1] + f[1][3]) / 2 - cy),
               default=None)


class _Timer:
    """Accumulates FrameResult timings and face statuses of one method."""

    def __init__(self):
        self.frames = 0
        self.total = 0.0
        self.stages = dict.fromkeys(STAGES, 0.0)
        self.steps = 0
        self.status = {ANONYMIZED: 0, HELD: 0, PLACEHOLDER: 0}
        self.no_face = 0

    def add(self, res, seconds: float) -> None:
        self.frames += 1
        self.total += seconds
        for s in STAGES:
            self.stages[s] += float(res.timings.get(s, 0.0))
        self.steps = max(self.steps, int(res.timings.get("generator_steps", 0) or 0))
        for f in res.faces:
            self.status[f.status] = self.status.get(f.status, 0) + 1
        self.no_face += not res.faces

    def merge(self, other: "_Timer") -> None:
        """Add another timer's frames (a clip run in an earlier, resumed session)."""
        self.frames += other.frames
        self.total += other.total
        for s in STAGES:
            self.stages[s] += other.stages[s]
        self.steps = max(self.steps, other.steps)
        for k, v in other.status.items():
            self.status[k] = self.status.get(k, 0) + v
        self.no_face += other.no_face

    def summary(self) -> dict:
        n = max(self.frames, 1)
        return {"frames": self.frames, "ms_per_frame": 1e3 * self.total / n,
                "fps": self.frames / self.total if self.total > 0 else None,
                "stage_ms": {s: 1e3 * v / n for s, v in self.stages.items()},
                "generator_steps": self.steps,
                "face_status_counts": dict(self.status), "frames_without_engine_face": self.no_face}


# ---------------------------------------------------------------------------------------
# Privacy


class _Cache:
    """Finished pieces of a run, pickled under ``out/partial/``. With ``resume`` they are
    reused when the run's data ``signature`` (subset sizes, stride) is unchanged, so a long
    run that was stopped continues where it was; otherwise they are cleared. SAFE-FM pieces
    are also keyed by ``safefm_tag`` (model, identity, seed, runtime): a new model re-runs
    SAFE-FM only, the gallery, the clip analyses and the baselines are kept."""

    def __init__(self, folder: Path, signature: dict, resume: bool, log: Callable[[str], None],
                 safefm_tag: str = ""):
        self.dir, self.log = Path(folder), log
        self.safefm_tag = safefm_tag
        self.reused: list[str] = []
        self.dir.mkdir(parents=True, exist_ok=True)
        sig_path = self.dir / "signature.json"
        old = json.loads(sig_path.read_text()) if sig_path.exists() else None
        sig = json.loads(json.dumps(jsonable(signature)))
        self.enabled = resume and old == sig
        if resume and old is not None and old != sig:
            log("resume: the run's settings differ from the saved ones; starting afresh")
        if not self.enabled:
            for f in [*self.dir.glob("*.pkl"), *self.dir.glob("*.note.json")]:
                f.unlink()
        sig_path.write_text(json.dumps(sig))

    def get_or(self, key: str, compute: Callable[[], object]):
        path = self.dir / (key.replace("@", "-").replace("/", "_") + ".pkl")
        if self.enabled and path.exists():
            with open(path, "rb") as f:
                self.log(f"resume: reusing {key}")
                self.reused.append(key)
                return pickle.load(f)
        value = compute()
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            pickle.dump(value, f)
        tmp.replace(path)
        return value

    def note(self, name: str, value=None):
        """Save a small JSON value (``value`` given) or read it back (None if absent)."""
        path = self.dir / f"{name}.note.json"
        if value is not None:
            path.write_text(json.dumps(value))
            return value
        return json.loads(path.read_text()) if path.exists() else None


    def key(self, part: str, method: str, steps: int) -> str:
        return f"{part}_{method}" + (f"_s{steps}_{self.safefm_tag}" if method == "safefm" else "")


def _gallery(people, dl: "_Dlib", mp_det, log) -> dict:
    """Original photos with a dlib face: paths, labels, (N, 128) embeddings, dlib and
    FaceMesh boxes of the source face, and how many photos were skipped."""
    from ..recognition import load_rgb

    g = {"photos": [], "labels": [], "emb": [], "boxes": [], "mp_boxes": [], "skipped": 0}
    t0 = time.perf_counter()
    for i_person, (person, paths) in enumerate(people):
        if i_person and i_person % 50 == 0:
            log(f"privacy: gallery {i_person}/{len(people)} people ({time.perf_counter() - t0:.0f}s)")
        for p in paths:
            img = load_rgb(p)
            boxes = dl.detect(img)
            if not boxes:
                g["skipped"] += 1
                continue
            g["photos"].append(str(p))
            g["labels"].append(person)
            g["boxes"].append(boxes[0])
            g["emb"].append(dl.embed(img, boxes[0]))
            face = _pick_face(_mp_boxes(mp_det, img), boxes[0])
            g["mp_boxes"].append(face[1] if face else boxes[0])
    g["emb"] = M.embedding_stack(g["emb"])
    log(f"privacy: gallery of {len(g['photos'])} photos of {len(set(g['labels']))} people "
        f"({g['skipped']} skipped: no dlib face) in {time.perf_counter() - t0:.0f}s")
    return g


def _privacy_method(engine, g: dict, dl: "_Dlib", mp_det, label: str, log) -> dict:
    from ..recognition import MATCH_THRESHOLD, load_rgb

    t1 = time.perf_counter()
    timer = _Timer()
    outs, det_only, det_dlib, det_mp = [], [], 0, 0
    n_photos = len(g["photos"])
    for i, (p, box, mbox) in enumerate(zip(g["photos"], g["boxes"], g["mp_boxes"])):
        if i and i % 200 == 0:
            log(f"privacy {label}: {i}/{n_photos} photos ({time.perf_counter() - t1:.0f}s)")
        img = load_rgb(p)
        engine.reset()
        ta = time.perf_counter()
        r = engine.process(img, 0.0)
        timer.add(r, time.perf_counter() - ta)
        emb, detected = dl.output(r.image, box)
        outs.append(emb)
        det_only.append(emb if detected else None)
        det_dlib += detected
        det_mp += any(M.same_face(b, mbox) for _, b in _mp_boxes(mp_det, r.image))
    outs, det_only = M.embedding_stack(outs), M.embedding_stack(det_only)
    n, labels, gallery = max(n_photos, 1), g["labels"], g["emb"]
    return {
        "photos": n_photos,
        "rank1": M.rank1_reid(outs, labels, gallery, labels),
        "rank1_detected_only": M.rank1_reid(det_only, labels, gallery, labels),
        "verification": M.match_rate(outs, gallery, MATCH_THRESHOLD),
        "verification_detected_only": M.match_rate(det_only, gallery, MATCH_THRESHOLD),
        "face_detected_dlib": det_dlib / n,
        "face_detected_mediapipe": det_mp / n,
        "located_fallback": 1 - det_dlib / n,
        "engine": timer.summary(),
        "seconds": time.perf_counter() - t1,
    }


def run_privacy(opts: EvalOptions, factory: EngineFactory, data_dir: Path,
                cache: _Cache | None = None) -> dict:
    """-> report["privacy"]: the gallery summary and one entry per :func:`variants` label."""
    from ..face.landmarks import FaceMeshDetector
    from ..recognition import MATCH_THRESHOLD

    log = opts.log
    cache = cache or _Cache(Path(opts.out) / "partial", {}, False, log)
    people = eval_people(data_dir, opts.max_people)
    dl = _Dlib(upsample=1)
    with FaceMeshDetector(max_faces=4, static_image=True) as mp_det:
        g = cache.get_or("privacy_gallery", lambda: _gallery(people, dl, mp_det, log))
        res = {"gallery": {"people": len(set(g["labels"])), "photos": len(g["photos"]),
                           "skipped_no_dlib_face": g["skipped"], "threshold": MATCH_THRESHOLD},
               "methods": {}}
        for label, method, steps in variants(opts):
            def compute():
                engine = factory(method, steps, False)
                try:
                    return _privacy_method(engine, g, dl, mp_det, label, log)
                finally:
                    engine.close()
            m = cache.get_or(cache.key("privacy", method, steps), compute)
            m = {"method": method, "steps": steps if method == "safefm" else None, **m}
            res["methods"][label] = m
            log(f"privacy {label}: rank1 {m['rank1']:.3f} verif {m['verification']:.3f} "
                f"dlib-det {m['face_detected_dlib']:.2f} mp-det {m['face_detected_mediapipe']:.2f} "
                f"({m['seconds']:.0f}s)")
    return res


# ---------------------------------------------------------------------------------------
# Video: fidelity and stability


@dataclass
class _ClipInput:
    name: str
    fps: float
    frames: int
    boxes: list                  # per frame: FaceMesh box (margin 0.1) of the input face, or None
    feats: np.ndarray            # (T, F) input features
    d_in: np.ndarray             # (T,) input change frame t-1 -> t in the face box (NaN at 0)
    dlib_boxes: dict             # sampled frame -> dlib box of the input face (or None)
    emb: dict                    # sampled frame -> (128,) input embedding


def _analyse_input(path: Path, opts: EvalOptions, dl: _Dlib) -> _ClipInput:
    from ..face.landmarks import FaceMeshDetector

    boxes, feats, d_in, dboxes, embs = [], [], [], {}, {}
    prev = None
    with FaceMeshDetector(max_faces=2, static_image=False) as det:
        for t, frame in enumerate(read_frames(path, opts.max_frames)):
            face = _pick_face(_mp_boxes(det, frame), None)
            box = M.landmark_box(face[0], frame.shape, 0.1) if face else None
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
    return _ClipInput(path.stem, video_fps(path), len(boxes), boxes,
                      np.array(feats).reshape(-1, len(M.FEATURES)), np.array(d_in), dboxes, embs)


def _run_clip(engine, path: Path, ci: _ClipInput, opts: EvalOptions, dl: _Dlib, timer: _Timer) -> dict:
    from ..face.landmarks import FaceMeshDetector
    from ..recognition import MATCH_THRESHOLD

    feats, d_out = [], []
    e_in, e_out, e_det = [], [], []
    prev = None
    engine.reset()
    with FaceMeshDetector(max_faces=2, static_image=False) as det:
        for t, frame in enumerate(read_frames(path, opts.max_frames)):
            ta = time.perf_counter()
            r = engine.process(frame, t / ci.fps)
            timer.add(r, time.perf_counter() - ta)
            out = r.image
            box = ci.boxes[t]
            face = _pick_face(_mp_boxes(det, out), box) if box else None
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
    from ..recognition import MATCH_THRESHOLD

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
              cache: _Cache | None = None) -> tuple[dict, dict]:
    """-> (report["video"], plot data {label: {clip: (input feats, output feats)}})."""
    log = opts.log
    cache = cache or _Cache(Path(opts.out) / "partial", {}, False, log)
    clips = video_clips(data_dir, opts.max_clips)
    dl = _Dlib(upsample=0)
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
            timer, per, engine = _Timer(), {}, None

            def one_clip(p: Path) -> dict:   # each clip is its own resumable piece
                nonlocal engine
                t1 = time.perf_counter()
                if engine is None:
                    engine = factory(method, steps, True)
                clip_timer = _Timer()
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


# ---------------------------------------------------------------------------------------
# Orchestration


def _file_label(path: Path | None, default: Path) -> str:
    p = Path(path or default)
    if not p.exists():
        return f"{p.name} (missing)"
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return f"{p.name} sha256:{h.hexdigest()[:12]}"


class _Recorder:
    """Wraps an engine factory; remembers the identity (name, seed) the SAFE-FM engine uses."""

    def __init__(self, factory: EngineFactory, opts: EvalOptions):
        self.factory, self.opts = factory, opts
        self.identity: str = "n/a"
        self.seed: int | None = opts.seed

    def __call__(self, method: str, steps: int, video: bool):
        engine = self.factory(method, steps, video)
        ident = getattr(engine, "identity", None) if method == "safefm" else None
        if ident is not None:
            src = Path(self.opts.identity).name if self.opts.identity else None
            self.identity = f"{ident.name} ({src})" if src and src != ident.name else str(ident.name)
            self.seed = int(ident.seed)
        elif method == "safefm" and self.identity == "n/a":
            self.identity = "unknown"
        return engine


def machine_info() -> dict:
    import os

    info = {"platform": platform.platform(), "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    for mod in ("torch", "onnxruntime", "mediapipe", "cv2", "dlib", "numpy"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional
            pass
    return info


def runtime_settings_changed(path: Path | None) -> dict:
    """The runtime settings of ``path`` (None: configs/runtime_default.toml) that differ from
    :class:`RuntimeConfig`'s built-in values, ``steps``/``runtime`` aside (set per run)."""
    from ..config import RuntimeConfig, load_runtime_config, to_dict

    base = to_dict(RuntimeConfig())
    return {k: v for k, v in to_dict(load_runtime_config(path)).items()
            if k not in ("steps", "runtime") and v != base[k]}


def run(opts: EvalOptions, engine_factory: EngineFactory | None = None) -> dict:
    """Run the evaluation and write report.json, report.md and plots to ``opts.out``.
    Returns the report dict (as written to report.json)."""
    from ..paths import default_model_path, resolve_model_path, shared_data_dir

    t0 = time.perf_counter()
    data_dir = Path(opts.data_dir or shared_data_dir())
    if not (data_dir / "lfw").is_dir() and "privacy" in opts.parts:
        raise FileNotFoundError(f"no LFW data under {data_dir} (set SAFEFM_SHARED_DATA)")
    factory = _Recorder(engine_factory or default_engine_factory(opts), opts)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    model_label = opts.model_label or _file_label(resolve_model_path(opts.model), default_model_path())
    signature = {"data": str(data_dir), "max_people": opts.max_people, "max_clips": opts.max_clips,
                 "max_frames": opts.max_frames, "embed_stride": opts.embed_stride}
    rt_label = _file_label(opts.runtime_config, None) if opts.runtime_config else "configs/runtime_default.toml"
    rt_changed = runtime_settings_changed(opts.runtime_config)   # a new default re-runs SAFE-FM too
    tag = hashlib.sha1(json.dumps([model_label, str(opts.identity), opts.seed, opts.runtime]
                                  + ([rt_label] if opts.runtime_config else [])
                                  + ([rt_changed] if rt_changed else []), sort_keys=True).encode())
    cache = _Cache(out / "partial", signature, opts.resume, opts.log, tag.hexdigest()[:10])
    meta = {
        "schema": SCHEMA, "created": time.strftime("%Y-%m-%d %H:%M:%S"), "command": opts.command,
        "quick": opts.quick, "parts": list(opts.parts), "methods": [v[0] for v in variants(opts)],
        "model": model_label,
        "identity": None, "seed": None, "steps": list(opts.steps), "runtime": opts.runtime,
        "runtime_config": rt_label,
        "data": {"dir": str(data_dir), "max_people": opts.max_people, "max_clips": opts.max_clips,
                 "max_frames": opts.max_frames, "embed_stride": opts.embed_stride},
        "baselines": {"blur": "Gaussian, sigma = 0.1 x face box side, box = FaceMesh box + 10 %",
                      "pixelate": "8 cells along the face box's longer side, box = FaceMesh box + 10 %",
                      "none": "output = input"},
        "machine": machine_info(), "seconds": {},
    }
    report: dict = {"meta": meta}
    plot: dict = {}
    if "privacy" in opts.parts:
        t1 = time.perf_counter()
        report["privacy"] = run_privacy(opts, factory, data_dir, cache)
        meta["seconds"]["privacy"] = time.perf_counter() - t1
    if "video" in opts.parts:
        t1 = time.perf_counter()
        report["video"], plot = run_video(opts, factory, data_dir, cache)
        meta["seconds"]["video"] = time.perf_counter() - t1
    meta["seconds"]["total"] = time.perf_counter() - t0
    meta["compute_seconds"] = {part: sum(float(m.get("seconds") or 0.0) for m in report[part]["methods"].values())
                               for part in ("privacy", "video") if part in report}
    note = cache.note(f"identity_{cache.safefm_tag}")
    if "safefm" in opts.methods and factory.identity == "n/a" and not note:
        factory("safefm", opts.steps[0], False).close()   # every piece was resumed: read the identity
    if factory.identity not in ("n/a", "unknown"):
        cache.note(f"identity_{cache.safefm_tag}", [factory.identity, factory.seed])
    elif "safefm" in opts.methods and note:
        factory.identity, factory.seed = note
    meta["identity"], meta["seed"] = factory.identity, factory.seed
    meta["resumed"] = cache.reused
    write_report(report, out, plot)
    meta["seconds"]["total_with_report"] = time.perf_counter() - t0
    (out / "report.json").write_text(json.dumps(jsonable(report), indent=1, allow_nan=False))
    return jsonable(report)


# ---------------------------------------------------------------------------------------
# Report


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


def _fmt(v, nd: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def write_markdown(report: dict) -> str:
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
        lines += ["", "### Per clip", "",
                  "| method | clip | frames | mean r | flicker | id consistency | leak | output face found |",
                  "|---|---|---|---|---|---|---|---|"]
        for k, m in v["methods"].items():
            for n, c in m["clips"].items():
                pr = [c["fidelity"][f]["pearson"] for f in v["features"]]
                pr = [x for x in pr if x is not None and math.isfinite(x)]
                lines.append(f"| {k} | {n} | {c['frames']} | {_fmt(float(np.mean(pr)) if pr else None)} | "
                             f"{_fmt(c['flicker'])} | {_fmt(c['identity_consistency']['mean'])} | "
                             f"{_fmt(c['leak_rate'])} | {_fmt(c['output_face_found'])} |")
    lines.append("")
    return "\n".join(lines)


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
    """report.md and the plots (report.json is written by :func:`run` last, with timings)."""
    rep = jsonable(report)
    report["meta"]["plots"] = [p.name for p in write_plots(rep, out, plot or {})]
    (out / "report.md").write_text(write_markdown(jsonable(report)))
