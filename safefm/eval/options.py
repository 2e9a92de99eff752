"""What a ``safefm-eval`` run is asked to do: :class:`EvalOptions` (methods, steps, model,
data subset, output folder), the method and part names it accepts (:data:`METHODS`,
:data:`PARTS`), the ``--quick`` subset (:data:`QUICK`), and :func:`variants`, the list of
(label, method, steps) configurations a run evaluates. Every method is an engine made by an
:data:`EngineFactory`; bad options are a ``ValueError`` with one line naming them.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .baselines import BASELINES

METHODS = ("safefm",) + BASELINES
PARTS = ("privacy", "video")
QUICK = {"max_people": 5, "max_clips": 2, "max_frames": 20, "embed_stride": 4, "attacker_photos": 40}
EngineFactory = Callable[[str, int, bool], object]
"""(method, steps, video) -> an engine with process(frame, t) / reset() / close()."""


@dataclass
class EvalOptions:
    out: Path = Path("runs/eval")
    methods: tuple[str, ...] = METHODS
    steps: tuple[int, ...] = (2,)   # the runtime default (RuntimeConfig.steps)
    seed: int | None = None          # identity noise seed override (None: the identity file's)
    model: Path | None = None
    identity: Path | None = None
    runtime: str = "auto"
    runtime_config: Path | None = None   # runtime TOML (None: configs/runtime_default.toml)
    max_people: int | None = None    # LFW eval people (None: all 400)
    max_clips: int | None = None     # video clips (None: all)
    max_frames: int | None = None    # frames per clip (None: all)
    embed_stride: int = 3            # dlib-embed every n-th video frame (identity metrics)
    attacker: bool = False           # also the trained attacker and clip linkage (safefm.eval.attacker)
    attacker_photos: int | None = None   # its training photos per method (None: attacker.TRAIN_PHOTOS)
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
        if self.attacker_photos is not None and self.attacker_photos < 2:
            raise ValueError("attacker_photos must be >= 2")


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
