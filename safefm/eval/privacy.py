"""Privacy on LFW photos (the report's ``privacy`` part). Each ``EVAL_IDENTITIES`` photo
whose original dlib detects a face joins the gallery and is anonymized by every method (the
engine is reset between photos). Its output is embedded with dlib at the detected face that
lies on the source face (:func:`safefm.eval.metrics.same_face`), or, when none does, at the
source face's box ("located": the attacker knows where the face was); rank-1 re-identification
and verification against the gallery follow. Metrics with ``_detected_only`` count undetected
outputs as misses instead.

Realism (:mod:`safefm.eval.realism`) is measured on every output at the original's FaceMesh
face, colour and grey-scale photos apart: LFW's own black-and-white photos
(:func:`~safefm.eval.realism.is_grey`) and, for that set to have a size, a grey-scale copy of every
:data:`GREY_EVERY`-th colour photo, anonymized once more for realism only (privacy figures use
the originals).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from . import metrics as M
from .faces import DlibCache, mediapipe_faces, pick_face
from .options import EngineFactory, EvalOptions, variants
from .realism import aggregate, face_realism_or_none, is_grey, to_grey
from .resume import ResumeCache
from .timing import EngineTimer
from ..face.landmarks import FaceMeshDetector
from ..media import read_image
from ..recognition import MATCH_THRESHOLD

GREY_EVERY = 4   # a grey-scale copy of the 1st, 5th, 9th, ... colour photo joins the grey set


def eval_people(data_dir: Path, max_people: int | None = None) -> list[tuple[str, list[Path]]]:
    """[(person, photos)] of ``lfw/EVAL_IDENTITIES.txt`` in file order; with ``max_people``,
    that many spread evenly over the list (deterministic)."""
    lfw = Path(data_dir) / "lfw"
    names = (lfw / "EVAL_IDENTITIES.txt").read_text().split()
    if max_people is not None and max_people < len(names):
        idx = np.linspace(0, len(names) - 1, max(1, max_people)).round().astype(int)
        names = [names[i] for i in sorted(set(idx))]
    return [(n, sorted((lfw / n).glob("*.jpg"))) for n in names]


def _gallery(people, dl: DlibCache, mp_det, log) -> dict:
    """Original photos with a dlib face: paths, labels, (N, 128) embeddings, dlib and
    FaceMesh boxes of the source face, its FaceMesh landmarks (None if FaceMesh missed it),
    whether the photo is grey-scale, and how many photos were skipped."""
    g = {"photos": [], "labels": [], "emb": [], "boxes": [], "mp_boxes": [], "landmarks": [],
         "grey": [], "skipped": 0}
    t0 = time.perf_counter()
    for i_person, (person, paths) in enumerate(people):
        if i_person and i_person % 50 == 0:
            log(f"privacy: gallery {i_person}/{len(people)} people ({time.perf_counter() - t0:.0f}s)")
        for p in paths:
            img = read_image(p)
            boxes = dl.detect(img)
            if not boxes:
                g["skipped"] += 1
                continue
            g["photos"].append(str(p))
            g["labels"].append(person)
            g["boxes"].append(boxes[0])
            g["emb"].append(dl.embed(img, boxes[0]))
            face = pick_face(mediapipe_faces(mp_det, img), boxes[0])
            g["mp_boxes"].append(face[1] if face else boxes[0])
            g["landmarks"].append(face[0].astype(np.float32) if face else None)
            g["grey"].append(is_grey(img))
    g["emb"] = M.embedding_stack(g["emb"])
    log(f"privacy: gallery of {len(g['photos'])} photos of {len(set(g['labels']))} people "
        f"({g['skipped']} skipped: no dlib face) in {time.perf_counter() - t0:.0f}s")
    return g


def grey_copies(g: dict) -> list[int]:
    """Gallery indices of the colour photos (with a FaceMesh face) whose grey-scale copy joins
    the grey realism set: every :data:`GREY_EVERY`-th, from the first."""
    colour = [i for i, (grey, lm) in enumerate(zip(g["grey"], g["landmarks"])) if not grey and lm is not None]
    return colour[::GREY_EVERY]


def _privacy_method(engine, g: dict, dl: DlibCache, mp_det, label: str, log) -> dict:
    t1 = time.perf_counter()
    timer = EngineTimer()
    outs, det_only, det_dlib, det_mp = [], [], 0, 0
    realism = {"colour": [], "grey": []}
    copies = set(grey_copies(g))
    n_photos = len(g["photos"])
    for i, (p, box, mbox) in enumerate(zip(g["photos"], g["boxes"], g["mp_boxes"])):
        if i and i % 200 == 0:
            log(f"privacy {label}: {i}/{n_photos} photos ({time.perf_counter() - t1:.0f}s)")
        img = read_image(p)
        engine.reset()
        ta = time.perf_counter()
        r = engine.process(img, 0.0)
        timer.add(r, time.perf_counter() - ta)
        emb, detected = dl.output(r.image, box)
        outs.append(emb)
        det_only.append(emb if detected else None)
        det_dlib += detected
        det_mp += any(M.same_face(b, mbox) for _, b in mediapipe_faces(mp_det, r.image))
        lm = g["landmarks"][i]
        row = face_realism_or_none(img, r.image, lm)
        if row is not None:
            realism["grey" if g["grey"][i] else "colour"].append(row)
        if i in copies:                 # realism only: the photo made grey-scale
            grey = to_grey(img)
            engine.reset()
            row = face_realism_or_none(grey, engine.process(grey, 0.0).image, lm)
            if row is not None:
                realism["grey"].append(row)
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
        "realism": {k: aggregate(rows) for k, rows in realism.items()},
        "engine": timer.summary(),
        "seconds": time.perf_counter() - t1,
    }


def run_privacy(opts: EvalOptions, factory: EngineFactory, data_dir: Path,
                cache: ResumeCache | None = None) -> dict:
    """-> report["privacy"]: the gallery summary and one entry per :func:`variants` label."""
    log = opts.log
    cache = cache or ResumeCache(Path(opts.out) / "partial", {}, False, log)
    people = eval_people(data_dir, opts.max_people)
    dl = DlibCache(upsample=1)
    with FaceMeshDetector(max_faces=4, static_image=True) as mp_det:
        g = cache.get_or("privacy_gallery", lambda: _gallery(people, dl, mp_det, log))
        res = {"gallery": {"people": len(set(g["labels"])), "photos": len(g["photos"]),
                           "skipped_no_dlib_face": g["skipped"], "threshold": MATCH_THRESHOLD,
                           "grey_photos": int(sum(g["grey"])), "grey_copies": len(grey_copies(g)),
                           "no_facemesh_face": sum(lm is None for lm in g["landmarks"])},
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
                f"sharpness {m['realism']['colour']['sharpness']:.2f} "
                f"tone gap {m['realism']['colour']['tone_gap']:.1f} "
                f"grey chroma {m['realism']['grey']['chroma_excess']:.2f} "
                f"({m['seconds']:.0f}s)")
    return res
