"""Privacy audit of an anonymized output against its original (``safefm-audit``,
``safefm-anonymize --audit``).

Pairs: a photo and its anonymized photo, a folder and its anonymized folder (same file names),
or a video and its anonymized video (same size, same number of frames). Every frame is checked:

- the original's faces are found with MediaPipe FaceMesh (the engine's detector; tracked across
  video frames with the engine's :class:`~safefm.face.landmarks.FaceTracker`) and, on embedded
  frames, with dlib's HOG detector (a face only dlib sees is checked too);
- *uncovered*: the output's inner face (the box of brows, eyes, nose and mouth) is the
  original's: mean absolute pixel difference under ``pixel_threshold`` (0-255 scale), i.e.
  no synthetic face, hold or placeholder was pasted there;
- *placeholder*: the inner face is mostly the fail-closed placeholder grey;
- on every ``stride``-th frame the recogniser (dlib, :mod:`safefm.recognition`): the output is
  embedded at the detected face on the original's dlib box, or located at that box when dlib
  finds none there (:meth:`safefm.eval.faces.DlibCache.output`, as ``safefm-eval``), and its
  distance is taken to the original person (the mean embedding of the face's track, a photo's
  own face for photos) and to the same frame's original face (``safefm-eval``'s per-frame leak);
  the frame *matches* when either is under ``threshold``.

Held / placeholder statuses are the engine's own when the audit runs inside
``safefm-anonymize --audit``; from files alone, placeholders are recognised by their colour
and holds are unknown. The audit passes when no frame matches and none is uncovered.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .errors import ConfigError, InputError
from .eval import metrics as M
from .face.composite import PLACEHOLDER_RGB
from .face.landmarks import FaceMeshDetector, FaceTracker, clip_box, face_box
from .media import VideoReader, is_image, is_video, read_image
from .recognition import MATCH_THRESHOLD
from .results import HELD, PLACEHOLDER

SCHEMA = "safefm-audit/1"
EXIT_FOUND = 3   # exit status when a frame matches the original person or is uncovered
INNER = (70, 300, 33, 263, 1, 61, 291, 17)   # FaceMesh: outer brows, outer eye corners, nose tip, mouth corners, lower lip
_LISTED = 20     # frames listed in the human summary at most


@dataclass(frozen=True)
class AuditConfig:
    threshold: float = MATCH_THRESHOLD   # dlib distance under which the output is the original person
    pixel_threshold: float = 5.0         # inner-face mean |output - original| (0-255) under which it is uncovered
    stride: int = 1                      # recogniser on every n-th video frame (pixels: every frame)
    upsample: int | None = None          # dlib HOG upsampling (None: 1 for photos, 0 for video, as safefm-eval)
    max_faces: int = 4

    def __post_init__(self):
        if not 0 < self.threshold < 2:
            raise ConfigError(f"audit threshold must be in (0, 2), got {self.threshold}")
        if not self.pixel_threshold > 0:
            raise ConfigError(f"audit pixel threshold must be > 0, got {self.pixel_threshold}")
        if self.stride < 1:
            raise ConfigError(f"audit stride must be >= 1, got {self.stride}")
        if self.upsample is not None and not 0 <= self.upsample <= 3:
            raise ConfigError(f"audit upsample must be 0..3, got {self.upsample}")
        if self.max_faces < 1:
            raise ConfigError(f"audit max faces must be >= 1, got {self.max_faces}")


def inner_box(landmarks: np.ndarray, shape) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) box of a (478, 3) FaceMesh face's brows, eyes, nose and mouth, clipped
    to an image of ``shape``: the region every cover (synthetic face, hold, placeholder) replaces."""
    return face_box(np.asarray(landmarks)[list(INNER)], shape)


def placeholder_share(image: np.ndarray, box) -> float:
    """Share of the pixels of ``box`` in an (H, W, 3) uint8 image within 12 levels of the
    placeholder grey (each channel); 0 for an empty box."""
    x0, y0, x1, y1 = clip_box(box, image.shape)
    roi = image[y0:y1, x0:x1].astype(np.int16)
    if roi.size == 0:
        return 0.0
    return float((np.abs(roi - np.array(PLACEHOLDER_RGB, np.int16)).max(axis=2) <= 12).mean())


def report_path(anonymized) -> Path:
    """Where the JSON report goes by default: ``NAME.audit.json`` beside the anonymized file or folder."""
    p = Path(anonymized)
    return p.with_name(p.name + ".audit.json")


# ------------------------------------------------------------------------------ one item


class _Item:
    """The faces of one photo or video, frame by frame (records are JSON-ready dicts)."""

    def __init__(self, name: str, kind: str):
        self.name, self.kind = name, kind
        self.frames: list[dict] = []
        self.emb: list[tuple[dict, int | None, np.ndarray, np.ndarray]] = []   # (face, track, original, output)

    def finish(self, cfg: AuditConfig, statuses_known: bool) -> dict:
        tracks: dict = {}
        for _, track, orig, _ in self.emb:
            if track is not None:
                tracks.setdefault(track, []).append(orig)
        means = {k: np.mean(v, axis=0) for k, v in tracks.items()}
        for face, track, orig, out in self.emb:
            ref = means.get(track, orig)
            face["distance"] = float(np.linalg.norm(out - ref))
            face["distance_frame"] = float(np.linalg.norm(out - orig))
            face["match"] = min(face["distance"], face["distance_frame"]) < cfg.threshold
        matched, uncovered, held, placeholder = [], [], [], []
        per_track: dict = {}
        for fr in self.frames:
            faces = fr["faces"]
            if any(f.get("match") for f in faces):
                matched.append({"frame": fr["frame"], "t": fr["t"],
                                "distance": min(min(f["distance"], f["distance_frame"]) for f in faces if f.get("match"))})
            if any(f["uncovered"] for f in faces):
                uncovered.append({"frame": fr["frame"], "t": fr["t"],
                                  "pixel_diff": min(f["pixel_diff"] for f in faces if f["uncovered"])})
            if any(f["status"] == HELD for f in faces):
                held.append(fr["frame"])
            if any(f["status"] == PLACEHOLDER if statuses_known else f["placeholder"] for f in faces):
                placeholder.append(fr["frame"])
            for f in faces:
                if f["track"] is not None:
                    per_track.setdefault(f["track"], []).append((fr, f))
        with_face = [fr for fr in self.frames if fr["faces"]]
        embedded = [f for fr in self.frames for f in fr["faces"] if "distance" in f]
        return {
            "name": self.name, "kind": self.kind, "frames": len(self.frames),
            "frames_with_face": len(with_face),
            "embedded_faces": len(embedded),
            "output_face_found": _share([f["output_face"] for f in embedded]),
            "distance": M.nan_stats([f["distance"] for f in embedded]),
            "matched_frames": matched, "uncovered_frames": uncovered,
            "held_frames": len(held) if statuses_known else None,
            "placeholder_frames": len(placeholder),
            "tracks": [_track_summary(k, rows, statuses_known) for k, rows in sorted(per_track.items())],
            "per_frame": self.frames,
        }


def _share(flags: Sequence[bool]) -> float | None:
    return float(np.mean(flags)) if len(flags) else None


def _track_summary(track: int, rows: list, statuses_known: bool) -> dict:
    faces = [f for _, f in rows]
    emb = [f for f in faces if "distance" in f]
    return {"track": track, "frames": len(rows), "first_t": rows[0][0]["t"], "last_t": rows[-1][0]["t"],
            "embedded": len(emb), "distance": M.nan_stats([f["distance"] for f in emb]),
            "matched": sum(bool(f["match"]) for f in emb),
            "uncovered": sum(f["uncovered"] for f in faces),
            "held": sum(f["status"] == HELD for f in faces) if statuses_known else None,
            "placeholder": sum(f["status"] == PLACEHOLDER if statuses_known else f["placeholder"]
                               for f in faces),
            "output_face_found": _share([f["output_face"] for f in emb])}


# ------------------------------------------------------------------------------ the audit


class Auditor:
    """Audits (original, output) pairs; the detectors are shared by every item."""

    def __init__(self, cfg: AuditConfig | None = None):
        self.cfg = cfg or AuditConfig()
        self._dlib: dict = {}

    def _dl(self, video: bool):
        from .eval.faces import DlibCache

        up = self.cfg.upsample if self.cfg.upsample is not None else (0 if video else 1)
        if up not in self._dlib:
            self._dlib[up] = DlibCache(upsample=up)
        return self._dlib[up]

    def _frame(self, item: _Item, det, tracker, dl, i: int, t: float, orig: np.ndarray,
               out: np.ndarray, statuses) -> None:
        if orig.shape != out.shape:
            raise InputError(f"{item.name}: frame {i} is {out.shape[1]}x{out.shape[0]} in the anonymized "
                             f"output but {orig.shape[1]}x{orig.shape[0]} in the original")
        lms = det.detect(orig)
        ids = [tr.id for tr in tracker.update(lms, t)[0]] if tracker is not None else list(range(len(lms)))
        faces = [(tid, inner_box(lm, orig.shape), face_box(lm, orig.shape)) for tid, lm in zip(ids, lms)]
        embed = i % self.cfg.stride == 0
        if embed:
            dboxes = dl.detect(orig)
            mesh_boxes = [fb for _, _, fb in faces]
            faces += [(None, b, b) for b in dboxes if not any(M.same_face(b, fb) for fb in mesh_boxes)]
        records = []
        for tid, ibox, fbox in faces:
            diff = M.mean_abs_diff(orig, out, ibox)
            rec = {"track": tid, "box": list(fbox), "pixel_diff": round(diff, 3),
                   "uncovered": bool(diff < self.cfg.pixel_threshold),
                   "placeholder": placeholder_share(out, ibox) > 0.5,
                   "status": _status(statuses, fbox)}
            if embed:
                dbox = next((b for b in dboxes if M.same_face(b, fbox)), None)
                if dbox is not None:
                    emb_out, found = dl.output(out, dbox)
                    rec["output_face"] = bool(found)
                    item.emb.append((rec, tid, dl.embed(orig, dbox), emb_out))
            records.append(rec)
        item.frames.append({"frame": i, "t": round(float(t), 3), "faces": records})

    def video(self, name: str, pairs: Iterable[tuple[np.ndarray, np.ndarray, float]],
              statuses: list | None = None) -> dict:
        """Audit one video given its (original frame, output frame, time s) pairs;
        ``statuses``: per frame, the engine's [(box, status)] (None: unknown)."""
        from .config import RuntimeConfig

        item, dl = _Item(name, "video"), self._dl(True)
        tracker = FaceTracker(RuntimeConfig())
        with FaceMeshDetector(max_faces=self.cfg.max_faces, static_image=False) as det:
            for i, (orig, out, t) in enumerate(pairs):
                st = statuses[i] if statuses is not None and i < len(statuses) else None
                self._frame(item, det, tracker, dl, i, t, orig, out, st)
        return item.finish(self.cfg, statuses is not None)

    def photos(self, pairs: Iterable[tuple[str, np.ndarray, np.ndarray]],
               statuses: dict | None = None) -> list[dict]:
        """Audit photos given their (name, original, output); ``statuses``: name -> the
        engine's [(box, status)] (None: unknown)."""
        dl, items = self._dl(False), []
        with FaceMeshDetector(max_faces=self.cfg.max_faces, static_image=True) as det:
            for name, orig, out in pairs:
                item = _Item(name, "photo")
                st = statuses.get(name) if statuses is not None else None
                self._frame(item, det, None, dl, 0, 0.0, orig, out, st)
                items.append(item.finish(self.cfg, statuses is not None))
        return items


def _status(statuses, box) -> str | None:
    """The engine's status of the face on ``box`` (None: unknown or no engine face there)."""
    if statuses is None:
        return None
    return next((s for b, s in statuses if M.same_face(b, box)), None)


# ------------------------------------------------------------------------------ files


def _video_pairs(original: Path, anonymized: Path):
    with VideoReader(original) as a, VideoReader(anonymized) as b:
        if a.size != b.size:
            raise InputError(f"{anonymized} is {b.size[0]}x{b.size[1]} but {original} is {a.size[0]}x{a.size[1]}")
        ia, ib = iter(a), iter(b)
        n = 0
        while True:
            fa, fb = next(ia, None), next(ib, None)
            if fa is None or fb is None:
                if fa is not None or fb is not None:
                    longer = original if fa is not None else anonymized
                    raise InputError(f"the videos differ in length: {longer} has more than {n} frames")
                return
            n += 1
            yield fa[0], fb[0], fa[1]


def plan_pairs(original, anonymized) -> tuple[str, list[tuple[Path, Path]], list[str]]:
    """-> (kind "video" | "photos", [(original, anonymized)], names with no anonymized file).
    A folder pairs its images by file name; an anonymized folder for a file input holds the
    file of the same name. Raises :class:`InputError` with one line."""
    a, b = Path(original), Path(anonymized)
    if not a.exists():
        raise InputError(f"original not found: {a}")
    if not b.exists():
        raise InputError(f"anonymized output not found: {b}")
    if a.is_dir():
        if not b.is_dir():
            raise InputError(f"{a} is a folder, so {b} must be the anonymized folder")
        names = sorted(p.name for p in a.iterdir() if p.is_file() and is_image(p) and not p.name.startswith("."))
        if not names:
            raise InputError(f"no images in folder {a}")
        pairs = [(a / n, b / n) for n in names if (b / n).is_file()]
        return "photos", pairs, [n for n in names if not (b / n).is_file()]
    if b.is_dir():
        b = b / a.name
        if not b.is_file():
            raise InputError(f"no {a.name} in the anonymized folder {b.parent}")
    if is_video(a) and is_video(b):
        return "video", [(a, b)], []
    if is_image(a) and is_image(b):
        return "photos", [(a, b)], []
    raise InputError(f"cannot pair {a} with {b}: expected two photos, two videos or two folders")


def audit_paths(original, anonymized, cfg: AuditConfig | None = None,
                statuses: dict | None = None) -> dict:
    """Audit an anonymized file or folder against its original -> the report dict (see
    :func:`summary_lines`). ``statuses``: original file name -> per frame the engine's
    [(box, status)] (video) or that photo's [(box, status)]; None: unknown."""
    cfg = cfg or AuditConfig()
    kind, pairs, missing = plan_pairs(original, anonymized)
    auditor = Auditor(cfg)
    if kind == "video":
        (a, b), = pairs
        items = [auditor.video(a.name, _video_pairs(a, b), None if statuses is None else statuses.get(a.name))]
    else:
        items = auditor.photos(((a.name, read_image(a), read_image(b)) for a, b in pairs), statuses)
    return build_report(str(original), str(anonymized), cfg, items, missing, statuses is not None)


def build_report(original: str, anonymized: str, cfg: AuditConfig, items: list[dict],
                 missing: Sequence[str] = (), statuses_known: bool = False) -> dict:
    """The report of a finished audit: totals over ``items`` and the verdict."""
    tot = {"items": len(items), "frames": sum(it["frames"] for it in items),
           "frames_with_face": sum(it["frames_with_face"] for it in items),
           "embedded_faces": sum(it["embedded_faces"] for it in items),
           "matched_frames": sum(len(it["matched_frames"]) for it in items),
           "uncovered_frames": sum(len(it["uncovered_frames"]) for it in items),
           "held_frames": sum(it["held_frames"] for it in items) if statuses_known else None,
           "placeholder_frames": sum(it["placeholder_frames"] for it in items),
           "missing_outputs": list(missing)}
    rep = {"schema": SCHEMA, "original": original, "anonymized": anonymized, "config": asdict(cfg),
           "statuses": "engine" if statuses_known else "from pixels (holds unknown)",
           "totals": tot, "passed": tot["matched_frames"] == 0 and tot["uncovered_frames"] == 0,
           "items": items}
    rep["summary"] = summary_lines(rep)
    return rep


def _ts(t: float) -> str:
    m, s = divmod(float(t), 60.0)
    return f"{int(m)}:{s:06.3f}"


def summary_lines(rep: dict) -> list[str]:
    """The short human summary of a report, e.g. ``0 of 1,812 frames match the original
    person; 2 frames held, 0 raw``, then the flagged frames."""
    tot, items = rep["totals"], rep["items"]
    video = any(it["kind"] == "video" for it in items)
    unit = "frames" if video else "photos"
    held = "held unknown" if tot["held_frames"] is None else f"{tot['held_frames']:,} held"
    lines = [f"{tot['matched_frames']:,} of {tot['frames']:,} {unit} match the original person; "
             f"{held}, {tot['placeholder_frames']:,} placeholder, {tot['uncovered_frames']:,} raw (uncovered)",
             f"  {tot['frames_with_face']:,} {unit} with an original face, {tot['embedded_faces']:,} faces "
             f"compared by the recogniser (dlib, threshold {rep['config']['threshold']})"]
    for it in items:
        where = (lambda r: f"frame {r['frame']} ({_ts(r['t'])})") if it["kind"] == "video" \
            else (lambda r, n=it["name"]: n)
        for key, what in (("matched_frames", "matches the original person"), ("uncovered_frames", "RAW face (uncovered)")):
            rows = it[key]
            for r in rows[:_LISTED]:
                val = f"distance {r['distance']:.3f}" if "distance" in r else f"pixel diff {r['pixel_diff']:.2f}"
                lines.append(f"  {where(r)}: {what}, {val}")
            if len(rows) > _LISTED:
                lines.append(f"  ... and {len(rows) - _LISTED} more ({what})")
    if tot["missing_outputs"]:
        lines.append(f"  no anonymized file for {len(tot['missing_outputs'])}: "
                     + ", ".join(tot["missing_outputs"][:5]) + (" ..." if len(tot["missing_outputs"]) > 5 else ""))
    lines.append("PASS: no frame matches the original person and none is uncovered" if rep["passed"]
                 else "FAIL: the anonymized output still shows the original person")
    return lines


def write_report(rep: dict, path) -> Path:
    """Write the report as JSON (NaN as null) to ``path``."""
    from .eval.report import jsonable
    from .media import write_bytes_atomic

    path = Path(path)
    write_bytes_atomic(path, json.dumps(jsonable(rep), indent=1, allow_nan=False).encode())
    return path


# ------------------------------------------------------------------------------ safefm-anonymize --audit


class StatusRecorder:
    """Wraps an engine (``process`` / ``reset`` / ``close``) and remembers, for every processed
    frame, the engine's [(box, status)] of its faces (``safefm-anonymize --audit``)."""

    def __init__(self, engine):
        self.engine = engine
        self.frames: list[list[tuple[tuple, str]]] = []

    def process(self, frame, timestamp=None):
        res = self.engine.process(frame, timestamp)
        self.frames.append([(tuple(f.box), f.status) for f in res.faces])
        return res

    def reset(self) -> None:
        self.engine.reset()

    def close(self) -> None:
        self.engine.close()

    def __getattr__(self, name):
        return getattr(self.engine, name)


def audit_anonymized(kind: str, input_path, output_path, done: Sequence[Path], frames: list,
                     cfg: AuditConfig | None = None) -> dict:
    """The audit at the end of ``safefm-anonymize --audit``: ``kind`` is the job's (image,
    folder, video), ``done`` the input files anonymized in order and ``frames`` the
    :class:`StatusRecorder`'s records (one per video frame, one per photo)."""
    if kind == "video":
        statuses = {Path(input_path).name: frames}
    else:
        statuses = {Path(p).name: f for p, f in zip(done, frames)}
    return audit_paths(input_path, output_path, cfg, statuses)
