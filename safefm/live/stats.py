"""Once-a-second counters for ``--stats``: output FPS, per-stage latency, dropped frames;
and :class:`StatsLog`, the same numbers with the resident memory, one row a second to a file
(``--stats-log``, the soak test's record)."""

from __future__ import annotations

import csv
import json
import os
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..results import STAGES


class Stats:
    """Thread-safe counters; :meth:`snapshot` returns the rates since the last snapshot."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._t0 = time.monotonic()
        self._reset()
        self.total_sent = 0
        self.total_dropped = 0

    def _reset(self) -> None:
        self._sent = self._fresh = self._repeated = self._placeholders = 0
        self._processed = self._errors = 0
        self._stage: dict[str, float] = defaultdict(float)
        self._stage_n: dict[str, int] = defaultdict(int)
        self._e2e: list[float] = []

    def processed(self, timings: dict[str, float] | None, seconds: float, error: bool) -> None:
        with self._lock:
            self._processed += 1
            self._errors += int(error)
            for k, v in (timings or {}).items():
                if k not in STAGES:
                    continue
                try:
                    self._stage[k] += float(v)
                    self._stage_n[k] += 1
                except (TypeError, ValueError):
                    pass
            self._stage["process"] += seconds
            self._stage_n["process"] += 1

    def sent(self, *, fresh: bool, placeholder: bool, latency: float | None) -> None:
        with self._lock:
            self._sent += 1
            self.total_sent += 1
            self._fresh += int(fresh)
            self._repeated += int(not fresh)
            self._placeholders += int(placeholder)
            if fresh and latency is not None:
                self._e2e.append(latency)

    def snapshot(self, dropped_total: int) -> dict:
        with self._lock:
            now = time.monotonic()
            dt = max(now - self._t0, 1e-6)
            e2e = np.asarray(self._e2e) * 1000
            snap = {
                "fps_out": self._sent / dt,
                "fps_fresh": self._fresh / dt,     # new frames reaching the sinks (end-to-end FPS)
                "fps_processed": self._processed / dt,
                # capture timestamp -> handed to the sinks, fresh frames only
                "latency_ms": float(e2e.mean()) if e2e.size else None,
                "latency_p50_ms": float(np.percentile(e2e, 50)) if e2e.size else None,
                "latency_p95_ms": float(np.percentile(e2e, 95)) if e2e.size else None,
                "stages_ms": {k: 1000 * self._stage[k] / self._stage_n[k] for k in self._stage},
                "dropped": dropped_total - self.total_dropped,
                "repeated": self._repeated,
                "placeholders": self._placeholders,
                "errors": self._errors,
            }
            self.total_dropped = dropped_total
            self._t0 = now
            self._reset()
            return snap


def format_stats(s: dict) -> str:
    """One line, e.g. ``out 30.0 fps | proc 12.1 fps | e2e 84 ms | generator 61.0 ms ...``."""
    parts = [f"out {s['fps_out']:.1f} fps", f"proc {s['fps_processed']:.1f} fps"]
    if s["latency_ms"] is not None:
        parts.append(f"e2e {s['latency_ms']:.0f} ms (p50 {s['latency_p50_ms']:.0f}, p95 {s['latency_p95_ms']:.0f})")
    parts += [f"{k} {v:.1f} ms" for k, v in s["stages_ms"].items()]
    parts.append(f"dropped {s['dropped']}")
    parts.append(f"repeated {s['repeated']}")
    if s["placeholders"]:
        parts.append(f"placeholders {s['placeholders']}")
    if s["errors"]:
        parts.append(f"errors {s['errors']}")
    return " | ".join(parts)


def rss_mb() -> float | None:
    """This process's resident memory in MiB (None where it cannot be read)."""
    try:
        import psutil
        return psutil.Process().memory_info().rss / 2 ** 20
    except Exception:   # psutil missing: Linux's own count
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
        except (OSError, ValueError, IndexError):
            return None


LOG_FIELDS = ("t", "fps_out", "fps_fresh", "fps_processed", "latency_p50_ms", "latency_p95_ms",
              "rss_mb", "dropped", "repeated", "placeholders", "errors")


class StatsLog:
    """Writes one row per :meth:`write` (a Stats snapshot + seconds since start + RSS) to
    ``path``: CSV for ``.csv``, else JSON lines. Flushed every row, so a killed run keeps its log."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._csv = self.path.suffix.lower() == ".csv"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "w", newline="")
        except OSError as exc:
            raise ConfigError(f"--stats-log {path}: cannot write ({exc.strerror or exc})") from None
        self._writer = csv.DictWriter(self._f, LOG_FIELDS) if self._csv else None
        if self._writer:
            self._writer.writeheader()
        self._t0 = time.monotonic()
        self._lock = threading.Lock()

    def write(self, snap: dict) -> dict:
        row = {k: snap.get(k) for k in LOG_FIELDS}
        row["t"] = round(time.monotonic() - self._t0, 3)
        row["rss_mb"] = rss_mb()
        row = {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}
        with self._lock:
            if self._f.closed:
                return row
            if self._writer:
                self._writer.writerow(row)
            else:
                self._f.write(json.dumps(row) + "\n")
            self._f.flush()
        return row

    def close(self) -> None:
        with self._lock:
            self._f.close()


def read_stats_log(path: str | Path) -> list[dict]:
    """The rows of a :class:`StatsLog` file (numbers as floats, empty cells as None)."""
    path = Path(path)
    text = path.read_text()
    if path.suffix.lower() != ".csv":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    rows = list(csv.DictReader(text.splitlines()))
    return [{k: (float(v) if v not in ("", None) else None) for k, v in r.items()} for r in rows]


def soak_summary(rows: list[dict], warmup_s: float = 10.0) -> dict:
    """Memory and speed drift of a :class:`StatsLog` run, over the rows ``warmup_s`` seconds
    after the first fresh frame (the model loads before it):
    resident memory at the start (median of the first rows), at the end, and its largest
    departure from the start as a fraction (``rss_spread``: the soak's "flat within 5 %");
    end-to-end FPS of the first and last quarter and their ratio (``fps_ratio``: drift);
    the medians of the per-second latency p50 / p95."""
    live = [r for r in rows if r["fps_fresh"]]
    if not live:
        raise ValueError("no fresh frame in the stats log: nothing was anonymized")
    kept = [r for r in rows if r["t"] >= live[0]["t"] + warmup_s] or live
    q = max(1, len(kept) // 4)

    def med(vals):
        vals = [v for v in vals if v is not None]
        return float(np.median(vals)) if vals else None

    rss = [r["rss_mb"] for r in kept if r.get("rss_mb") is not None]
    rss0 = med(rss[:q])
    fps0, fps1 = med(r["fps_fresh"] for r in kept[:q]), med(r["fps_fresh"] for r in kept[-q:])
    return {
        "seconds": kept[-1]["t"] - kept[0]["t"], "rows": len(kept), "warmup_s": warmup_s,
        "first_fresh_s": live[0]["t"],     # start-up: seconds to the first anonymized frame (+ <= 1 s)
        "rss_start_mb": rss0, "rss_end_mb": med(rss[-q:]), "rss_max_mb": max(rss) if rss else None,
        "rss_spread": max(abs(v - rss0) for v in rss) / rss0 if rss0 else None,
        "fps_start": fps0, "fps_end": fps1, "fps_mean": med(r["fps_fresh"] for r in kept),
        "fps_ratio": fps1 / fps0 if fps0 else None,
        "latency_p50_ms": med(r.get("latency_p50_ms") for r in kept),
        "latency_p95_ms": med(r.get("latency_p95_ms") for r in kept),
    }
