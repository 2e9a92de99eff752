"""``safefm-bench``: how fast the live path is, per runtime and per number of Euler steps.

Two measurements per (runtime, steps):

- **stages** (synchronous loop over ``frames`` clip frames, after ``warmup`` frames that are
  not counted): per-frame ``engine.process`` time and each stage of ``FrameResult.timings``
  (landmarks, retarget_heatmaps, generator, generator per Euler step, decode, composite):
  mean, median and p95 in ms.
- **live** (the real :class:`safefm.live.pipeline.Pipeline`: capture thread -> one-slot
  mailbox -> processing thread -> output thread -> sink) fed by the clip looped for
  ``live_seconds``, as a camera would feed it:

  - pacing ``on``: frames captured at the clip's native fps, output ticking at that fps;
  - pacing ``off``: each frame decoded as soon as the last was taken (an unpaced file is
    read on demand: no frame is decoded only to be dropped), output at up to 240 Hz: the
    throughput ceiling. Its latency counts from the decode, and a decoded frame waits in the
    slot for about one engine period, so it is not a camera's latency (use pacing ``on``);
    before session 13 frames were decoded flat out and most dropped, so the two runs' figures
    do not compare.

  End-to-end FPS = fresh anonymized frames handed to the sink per second; added latency =
  sink time - capture timestamp of those frames (median, p95). The first ``live_warmup``
  fresh frames of each run are not counted (threads starting, caches filling).

The engine is warmed up with ``warmup`` frames before either measurement. Runtimes:
torch CPU and onnxruntime CPU always (when installed); torch CUDA, and onnxruntime with the
CUDA/TensorRT execution providers, only when present.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Callable

import numpy as np

from .provenance import file_label, machine_info
from .report import jsonable
from ..media import VideoReader
from ..config import LIVE_DEFAULTS
from ..results import ANONYMIZED, STAGES

SCHEMA = "safefm-bench/1"
EngineFactory = Callable[[object], object]
"""RuntimeConfig -> engine (process / reset / close)."""


@dataclass
class BenchOptions:
    source: Path | None = None             # default: shared videos/liveportrait_d3.mp4
    steps: tuple[int, ...] = (1, 2, 3, 4, 5)
    runtimes: tuple[str, ...] | None = None  # names from available_runtimes(); None = all present
    pacing: tuple[str, ...] = ("on", "off")
    frames: int = 30                       # synchronous frames measured per configuration
    warmup: int = 8                        # engine frames run (and not measured) first
    live_seconds: float = 6.0              # length of each live run
    live_warmup: int = 5                   # fresh frames not counted at the start of a live run
    model: Path | None = None
    identity: Path | None = None
    threads: int = 0
    path: str = "live"                     # "live": safefm-cam's runtime defaults; "files": safefm-anonymize's
    pipelined: bool = True                 # live runs overlap consecutive frames' stages (safefm-cam's default)
    solver: str | None = None              # ODE / diffusion solver (None: the runtime config's, "auto")
    model_label: str | None = None
    log: Callable[[str], None] = field(default=lambda msg: None)


def available_runtimes() -> list[dict]:
    """[{name, runtime, device}] of the runtimes present on this machine."""
    out = [{"name": "torch-cpu", "runtime": "torch", "device": "cpu"}]
    try:
        import onnxruntime as ort

        out.append({"name": "onnx-cpu", "runtime": "onnx", "device": "cpu"})
        out.append({"name": "onnx-cpu-float", "runtime": "onnx", "device": "cpu", "int8": "off"})
        out.append({"name": "onnx-cpu-int8", "runtime": "onnx", "device": "cpu", "int8": "all"})
        eps = set(ort.get_available_providers())
    except ImportError:
        eps = set()
    try:
        import torch

        if torch.cuda.is_available():
            out.append({"name": "torch-cuda", "runtime": "torch", "device": "cuda"})
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    if eps & {"CUDAExecutionProvider", "TensorrtExecutionProvider"}:
        name = "onnx-tensorrt" if "TensorrtExecutionProvider" in eps else "onnx-cuda"
        out.append({"name": name, "runtime": "onnx", "device": "cuda"})
    return out


def percentiles(x) -> dict:
    """{mean, median, p95, n} of a list of seconds, in milliseconds (None when empty)."""
    a = np.asarray([v for v in x if v is not None and np.isfinite(v)], dtype=np.float64) * 1e3
    if not a.size:
        return {"mean": None, "median": None, "p95": None, "n": 0}
    return {"mean": float(a.mean()), "median": float(np.median(a)), "p95": float(np.percentile(a, 95)),
            "n": int(a.size)}


def load_frames(path: Path, n: int) -> tuple[list[np.ndarray], float]:
    """The first ``n`` frames of a video as RGB (looping if it is shorter), and its fps."""
    with VideoReader(path) as reader:
        frames = [frame for frame, _ in islice(reader, n)]
        fps = reader.fps
    if not frames:
        raise FileNotFoundError(f"no frames in {path}")
    while len(frames) < n:
        frames += frames[: n - len(frames)]
    return frames, fps


# ---------------------------------------------------------------------------------------
# Synchronous stage timings


def bench_stages(engine, frames: list[np.ndarray], fps: float, warmup: int) -> dict:
    """Run ``warmup`` then ``len(frames) - warmup`` frames through ``engine.process``; timings."""
    engine.reset()
    per: dict[str, list] = {s: [] for s in STAGES}
    per["generator_per_step"], per["process"] = [], []
    steps, anonymized = 0, 0
    for i, frame in enumerate(frames):
        t0 = time.perf_counter()
        res = engine.process(frame, i / fps)
        dt = time.perf_counter() - t0
        if i < warmup:
            continue
        per["process"].append(dt)
        for s in STAGES:
            per[s].append(float(res.timings.get(s, 0.0)))
        n = int(res.timings.get("generator_steps", 0) or 0)
        steps = max(steps, n)
        if n:
            per["generator_per_step"].append(float(res.timings["generator"]) / n)
        anonymized += any(f.status == ANONYMIZED for f in res.faces)
    measured = max(len(frames) - warmup, 0)
    proc = percentiles(per["process"])
    return {"frames": measured, "warmup_frames": min(warmup, len(frames)),
            "frames_anonymized": anonymized, "generator_steps": steps,
            "fps": 1e3 / proc["mean"] if proc["mean"] else None,
            "ms": {k: percentiles(v) for k, v in per.items()}}


# ---------------------------------------------------------------------------------------
# Live path


class LoopingVideoSource:
    """A :class:`safefm.live.capture.FrameSource` playing a file in a loop for ``seconds``
    (from its first read), then ending. Frames are decoded (:class:`safefm.media.VideoReader`)
    on each read, as a camera driver would deliver them; the media time is the wall time since
    the first read. Pacing is the pipeline's job."""

    def __init__(self, path: Path, seconds: float):
        from ..live.capture import SourceInfo

        self._path = Path(path)
        self._reader = VideoReader(self._path)
        self._frames = iter(self._reader)
        fps = self._reader.fps
        width, height = self._reader.size
        self.info = SourceInfo(width=width, height=height, fps=fps if 1 <= fps <= 240 else 30.0,
                               live=False, name=str(path))
        self.seconds = seconds
        self._t0: float | None = None

    def read(self):
        from ..live.capture import EndOfStream

        now = time.monotonic()
        if self._t0 is None:
            self._t0 = now
        if now - self._t0 >= self.seconds:
            raise EndOfStream()
        frame = next(self._frames, None)
        if frame is None:   # end of the file: start it again
            self._reader.close()
            self._reader = VideoReader(self._path)
            self._frames = iter(self._reader)
            frame = next(self._frames, None)
            if frame is None:
                return None, None
        return frame[0], now - self._t0

    def close(self) -> None:
        self._reader.close()


class _RecordingSink:
    """Records (send time, latency) of every fresh anonymized frame handed to it."""

    def __init__(self):
        self.fresh: list[tuple[float, float]] = []
        self.sent = 0
        self._lock = threading.Lock()

    def send(self, frame) -> None:
        now = time.monotonic()
        with self._lock:
            self.sent += 1
            if frame.fresh and frame.kind == "anonymized" and frame.t_capture is not None:
                self.fresh.append((now, now - frame.t_capture))

    def close(self) -> None:
        pass


class _KeepOpen:
    """Engine proxy whose close() does nothing (the pipeline closes its engine; we reuse it)
    and that has no warmup (done once before every measurement)."""

    _FORWARD = ("process", "reset", "set_identity", "prepare", "generate", "finish")

    def __init__(self, engine):
        self._e = engine

    def __getattr__(self, name):
        if name not in self._FORWARD:
            raise AttributeError(name)
        return getattr(self._e, name)

    def close(self):
        pass


def _live_summary(fresh: list[tuple[float, float]], skip: int) -> dict:
    kept = fresh[skip:]
    fps = None
    if len(kept) >= 2 and kept[-1][0] > kept[0][0]:
        fps = (len(kept) - 1) / (kept[-1][0] - kept[0][0])
    return {"fresh_frames": len(kept), "excluded_warmup_frames": min(skip, len(fresh)),
            "e2e_fps": fps, "latency_ms": percentiles([lat for _, lat in kept])}


def bench_live(engine, source: Path, pace: bool, seconds: float, warmup_fresh: int,
               pipelined: bool = True) -> dict:
    """One live run of ``seconds`` through :class:`safefm.live.pipeline.Pipeline`."""
    from ..live.pipeline import LiveConfig, Pipeline

    engine.reset()
    probe = LoopingVideoSource(source, seconds)
    info = probe.info
    probe.close()
    sink = _RecordingSink()
    cfg = LiveConfig(width=info.width, height=info.height, fps=info.fps if pace else 240.0, pace=pace,
                     pipelined=pipelined)
    pipe = Pipeline(_KeepOpen(engine), lambda: LoopingVideoSource(source, seconds), [sink], cfg)
    pipe.start()
    pipe.wait(seconds + 60)
    pipe.stop()
    out = _live_summary(sink.fresh, warmup_fresh)
    out.update({"path": "safefm.live.pipeline.Pipeline", "pacing": "on" if pace else "off",
                "pipelined": pipelined,
                "source_fps": info.fps, "output_fps": cfg.fps, "seconds": seconds,
                "captured": pipe.capture.captured, "dropped": pipe.dropped(), "sent": sink.sent,
                "error": pipe.error})
    return out


# ---------------------------------------------------------------------------------------
# Orchestration


def default_engine_factory(opts: BenchOptions) -> EngineFactory:
    def make(cfg):
        from ..engine import build_engine

        return build_engine(cfg, model_path=opts.model, identity_path=opts.identity, video=True)
    return make


def run(opts: BenchOptions, engine_factory: EngineFactory | None = None) -> dict:
    """Benchmark every (runtime, steps); returns the JSON-ready result."""
    from ..config import load_runtime_config
    from ..paths import default_model_path, resolve_model_path, shared_data_dir

    source = Path(opts.source or shared_data_dir() / "videos" / "liveportrait_d3.mp4")
    if not source.is_file():
        raise FileNotFoundError(f"benchmark source not found: {source}")
    present = available_runtimes()
    names = [r["name"] for r in present]
    wanted = opts.runtimes or tuple(names)
    missing = [r for r in wanted if r not in names]
    runtimes = [r for r in present if r["name"] in wanted]
    factory = engine_factory or default_engine_factory(opts)
    frames, fps = load_frames(source, opts.warmup + opts.frames)
    result = {
        "schema": SCHEMA, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "source": {"path": str(source), "fps": fps, "size": list(frames[0].shape[:2][::-1])},
        "model": opts.model_label or file_label(resolve_model_path(opts.model), default_model_path()),
        "identity": str(opts.identity) if opts.identity else "default", "seed": None,
        "warmup": {"engine_frames": opts.warmup, "live_fresh_frames_excluded": opts.live_warmup,
                   "note": "warm-up frames are run but excluded from every number"},
        "pipelined": opts.pipelined, "solver": opts.solver or "auto",
        "runtimes_present": names, "runtimes_missing": missing,
        "machine": machine_info(),
        "path": {"name": opts.path, "runtime_defaults": dict(LIVE_DEFAULTS) if opts.path == "live" else {},
                 "note": "live: safefm-cam's runtime defaults (identity repel on the first step, no detail stage); "
                         "files: safefm-anonymize's (built-in defaults)"},
        "results": [],
    }
    for rt in runtimes:
        for steps in opts.steps:
            cfg = load_runtime_config(defaults=LIVE_DEFAULTS if opts.path == "live" else None,
                                      runtime=rt["runtime"], device=rt["device"], steps=steps,
                                      threads=opts.threads, int8=rt.get("int8"), solver=opts.solver)
            t0 = time.perf_counter()
            engine = factory(cfg)
            build_s = time.perf_counter() - t0
            try:
                ident = getattr(engine, "identity", None)
                if ident is not None:
                    result["identity"], result["seed"] = str(ident.name), int(ident.seed)
                gen = getattr(engine, "gen", None)
                entry = {"runtime": rt["name"], "steps": steps, "int8": cfg.int8, "build_seconds": build_s,
                         "engine_runtime": getattr(gen, "runtime", None),
                         "providers": getattr(gen, "providers", None)}
                entry["stages"] = bench_stages(engine, frames, fps, opts.warmup)
                entry["live"] = {}
                for p in opts.pacing:
                    entry["live"][p] = bench_live(engine, source, p == "on", opts.live_seconds,
                                                  opts.live_warmup, opts.pipelined)
            finally:
                engine.close()
            result["results"].append(entry)
            s = entry["stages"]
            opts.log(f"{rt['name']} steps {steps}: {s['fps'] or 0:.1f} fps sync; " + "; ".join(
                f"live pacing {p}: {v['e2e_fps'] or 0:.1f} fps, latency p50 "
                f"{v['latency_ms']['median'] or 0:.0f} ms" for p, v in entry["live"].items()))
    return jsonable(result)


def _f(v, nd=1) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def format_table(result: dict) -> str:
    """Human-readable table of a :func:`run` result."""
    rows = [f"source: {result['source']['path']} ({result['source']['fps']:.0f} fps)  model: "
            f"{result['model']}  warm-up: {result['warmup']['engine_frames']} engine frames + "
            f"{result['warmup']['live_fresh_frames_excluded']} live frames excluded  live stages: "
            f"{'pipelined' if result.get('pipelined', False) else 'one after another'}", ""]
    hdr = ("runtime", "steps", "proc fps", "proc ms p50/p95", "landmarks", "retarget+heat",
           "gen/step", "generator", "decode", "composite", "live on fps", "lat on p50/p95",
           "live off fps", "lat off p50/p95")
    rows.append(" | ".join(hdr))
    rows.append("-" * len(rows[-1]))
    for e in result["results"]:
        ms = e["stages"]["ms"]
        live = e["live"]
        cells = [e["runtime"], str(e["steps"]), _f(e["stages"]["fps"]),
                 f"{_f(ms['process']['median'])}/{_f(ms['process']['p95'])}"]
        cells += [_f(ms[k]["median"]) for k in ("landmarks", "retarget_heatmaps", "generator_per_step",
                                                "generator", "decode", "composite")]
        for p in ("on", "off"):
            v = live.get(p)
            lat = v["latency_ms"] if v else None
            cells += ([_f(v["e2e_fps"]), f"{_f(lat['median'], 0)}/{_f(lat['p95'], 0)}"] if v else ["-", "-"])
        rows.append(" | ".join(cells))
    rows.append("")
    rows.append("stage columns: median ms per frame; latency: capture timestamp -> frame handed to the sink")
    return "\n".join(rows)


def plot_fps(result: dict, path: Path) -> Path:
    """PNG of FPS (synchronous and live, pacing on/off) and generator ms vs Euler steps, one
    line per runtime, captioned with source, model, identity, steps and seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    runtimes = sorted({e["runtime"] for e in result["results"]})
    for rt in runtimes:
        es = sorted((e for e in result["results"] if e["runtime"] == rt), key=lambda e: e["steps"])
        x = [e["steps"] for e in es]
        line = axes[0].plot(x, [e["stages"]["fps"] or np.nan for e in es], marker="o",
                            label=f"{rt} engine only")[0]
        for p, style in (("on", "--"), ("off", ":")):
            y = [(e["live"].get(p) or {}).get("e2e_fps") or np.nan for e in es]
            if np.isfinite(y).any():
                axes[0].plot(x, y, style, marker=".", color=line.get_color(), label=f"{rt} live, pacing {p}")
        axes[1].plot(x, [e["stages"]["ms"]["process"]["median"] or np.nan for e in es], marker="o",
                     color=line.get_color(), label=f"{rt} whole frame")
        axes[1].plot(x, [e["stages"]["ms"]["generator"]["median"] or np.nan for e in es], "--", marker=".",
                     color=line.get_color(), label=f"{rt} generator")
    axes[0].axhline(result["source"]["fps"], color="grey", lw=0.8)
    axes[0].set(xlabel="Euler steps", ylabel="frames per second", title="Throughput vs steps")
    axes[1].set(xlabel="Euler steps", ylabel="ms per frame (median)", title="Time per frame vs steps")
    steps = sorted({e["steps"] for e in result["results"]})
    for ax in axes:
        ax.set_xticks(steps)
        ax.legend(fontsize=6.5)
        ax.grid(alpha=0.3)
    src = result["source"]
    cap = (f"data: {Path(src['path']).name} ({src['size'][0]}x{src['size'][1]}, {src['fps']:.0f} fps) | "
           f"model: {result['model']} | identity: {result['identity']} | "
           f"steps: {','.join(map(str, steps))} | seed: {result['seed']} | "
           f"{result['machine'].get('cpu', '')}, {result['machine'].get('cpu_count')} cores")
    fig.text(0.01, 0.005, cap, fontsize=6.5, ha="left", va="bottom")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
