"""What the engine returns for one frame (the contract between the engine and its users:
``safefm-anonymize``, ``safefm-cam``, ``safefm-eval``, ``safefm-bench``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Per-face status after the fail-closed policy (see safefm/engine.py):
ANONYMIZED = "anonymized"    # a fresh synthetic face was pasted this frame
HELD = "held"                # face not anonymizable this frame: the track's last synthetic face covers it
PLACEHOLDER = "placeholder"  # no synthetic face available: an opaque placeholder covers the region
STATUSES = (ANONYMIZED, HELD, PLACEHOLDER)


@dataclass
class FaceResult:
    track_id: int
    box: tuple[int, int, int, int]      # (x0, y0, x1, y1) frame pixels of the covered region
    status: str                         # one of STATUSES
    landmarks: np.ndarray | None = None  # (478, 3) input landmarks in frame pixels, None if lost
    reason: str = ""                    # why the face was not anonymized (for HELD / PLACEHOLDER)


@dataclass
class FrameResult:
    image: np.ndarray                   # (H, W, 3) uint8 RGB: safe to send (no raw face pixels)
    faces: list[FaceResult] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, see STAGES
    anonymized: bool = True             # False only when the caller paused anonymization


STAGES = ("landmarks", "retarget_heatmaps", "generator", "decode", "composite")
