"""``safefm-eval``'s orchestration: :func:`run` evaluates SAFE-FM and the baselines
(:mod:`safefm.eval.baselines`) through one code path, privacy and realism on LFW photos
(:mod:`safefm.eval.privacy`) and fidelity, realism and stability on the video clips
(:mod:`safefm.eval.video`), resumable piece by piece (:mod:`safefm.eval.resume`), and writes
``report.json``, ``report.md`` and the plots (:mod:`safefm.eval.report`, :mod:`safefm.eval.plots`).

Every method is an *engine* (``process(frame, t) -> FrameResult``, ``reset()``, ``close()``)
made by an :data:`~safefm.eval.options.EngineFactory` ``(method, steps, video) -> engine``:
:func:`default_engine_factory` (the shipped or given weights) or :func:`tiny_engine_factory`
(the seeded tiny model); tests inject their own through it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

from .attacker import run_attacker
from .baselines import build_baseline
from .options import EngineFactory, EvalOptions, variants
from .privacy import run_privacy
from .provenance import file_label, machine_info, runtime_settings_changed
from .report import jsonable, write_report
from .resume import ResumeCache
from .video import run_video

SCHEMA = "safefm-eval/1"
PIECES = 2   # what a resumable piece holds; pieces saved by another version are not reused


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
    model_label = opts.model_label or file_label(resolve_model_path(opts.model), default_model_path())
    signature = {"data": str(data_dir), "max_people": opts.max_people, "max_clips": opts.max_clips,
                 "max_frames": opts.max_frames, "embed_stride": opts.embed_stride,
                 "pieces": PIECES}
    rt_label = file_label(opts.runtime_config, None) if opts.runtime_config else "configs/runtime_default.toml"
    rt_changed = runtime_settings_changed(opts.runtime_config)   # a new default re-runs SAFE-FM too
    tag = hashlib.sha1(json.dumps([model_label, str(opts.identity), opts.seed, opts.runtime]
                                  + ([rt_label] if opts.runtime_config else [])
                                  + ([rt_changed] if rt_changed else []), sort_keys=True).encode())
    cache = ResumeCache(out / "partial", signature, opts.resume, opts.log, tag.hexdigest()[:10])
    meta = {
        "schema": SCHEMA, "created": time.strftime("%Y-%m-%d %H:%M:%S"), "command": opts.command,
        "quick": opts.quick, "parts": list(opts.parts) + (["attacker"] if opts.attacker else []),
        "methods": [v[0] for v in variants(opts)],
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
    if opts.attacker:
        t1 = time.perf_counter()
        report["attacker"] = run_attacker(opts, factory, data_dir, cache)
        meta["seconds"]["attacker"] = time.perf_counter() - t1
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
