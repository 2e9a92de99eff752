"""Per-method engine statistics of a ``safefm-eval`` run: :class:`EngineTimer` adds up the
wall time and the per-stage timings of every :class:`~safefm.results.FrameResult` a method
returns, counts its face statuses (anonymized, held, placeholder) and the frames where the
engine found no face, and summarises them as the report's ``engine`` entry (ms per frame,
fps, stage ms). Timers of clips run in an earlier, resumed session are merged in.
"""

from __future__ import annotations

from ..results import ANONYMIZED, HELD, PLACEHOLDER, STAGES


class EngineTimer:
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

    def merge(self, other: "EngineTimer") -> None:
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
