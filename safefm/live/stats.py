"""Once-a-second counters for ``--stats``: output FPS, per-stage latency, dropped frames."""

from __future__ import annotations

import threading
import time
from collections import defaultdict

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
        self._e2e_sum = 0.0

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
                self._e2e_sum += latency

    def snapshot(self, dropped_total: int) -> dict:
        with self._lock:
            now = time.monotonic()
            dt = max(now - self._t0, 1e-6)
            snap = {
                "fps_out": self._sent / dt,
                "fps_processed": self._processed / dt,
                "latency_ms": 1000 * self._e2e_sum / self._fresh if self._fresh else None,
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
        parts.append(f"e2e {s['latency_ms']:.0f} ms")
    parts += [f"{k} {v:.1f} ms" for k, v in s["stages_ms"].items()]
    parts.append(f"dropped {s['dropped']}")
    parts.append(f"repeated {s['repeated']}")
    if s["placeholders"]:
        parts.append(f"placeholders {s['placeholders']}")
    if s["errors"]:
        parts.append(f"errors {s['errors']}")
    return " | ".join(parts)
