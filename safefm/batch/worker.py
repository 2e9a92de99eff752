"""One batch worker's job without Ray: a warm engine, and one input video -> one output video.

:class:`FileWorker` builds its engine once (the model stays loaded across files) and runs
:func:`safefm.cli.anonymize.anonymize_video`, the same per-file path as ``safefm-anonymize``:
the output is written to a hidden temporary name and renamed when complete. A worker killed
mid-file can leave that temporary file behind, never a file under the final name; the next
attempt removes it first. An unreadable or corrupt input is returned as ``failed`` with a
one-line reason, never raised.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import socket
from pathlib import Path
from typing import Callable

from ..cli.anonymize import Summary, anonymize_video
from ..config import RuntimeConfig
from ..errors import SafeFMError, first_line
from ..media import VideoReader, temp_files_for
from .manifest import Item

log = logging.getLogger(__name__)

EngineFactory = Callable[..., object]
"""``factory(runtime_cfg, model_path=None, identity_path=None, video=True) -> Engine``
(:func:`safefm.engine.build_engine`)."""


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    """What every worker builds its engine from (the same for the whole job). ``identity``:
    ``"auto"`` (one identity per person) or an identity file; ``model``: a weights file or None."""
    cfg: RuntimeConfig
    model: str | None = None
    identity: str = "auto"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class FileWorker:
    """Holds warm engines (one per identity mode a job uses: the run's, and at most one other
    for manifest rows that ask for ``auto`` / a file) and anonymizes one video per call."""

    def __init__(self, spec: EngineSpec, factory: EngineFactory | None = None):
        if factory is None:
            from ..engine import build_engine as factory
        self.spec, self.factory = spec, factory
        self._engines: dict[bool, object] = {}   # identity_per_track -> engine
        self._worn: dict[bool, str | None] = {}    # identity_per_track -> identity file it wears
        self.current: str | None = None       # key of the file being processed
        self.frames_done = 0                  # frames of that file so far (for progress)
        self._engine(spec.identity)           # the model is loaded once, now

    def _engine(self, identity: str):
        """The warm engine for ``identity`` (``auto`` or a file), wearing it."""
        auto = identity == "auto"
        engine = self._engines.get(auto)
        if engine is None:
            cfg = dataclasses.replace(self.spec.cfg, identity_per_track=auto)
            first_file = None if auto else identity
            engine = self.factory(cfg, model_path=self.spec.model, identity_path=first_file, video=True)
            warmup = getattr(engine, "warmup", None)
            if warmup is not None:
                warmup()
            self._engines[auto], self._worn[auto] = engine, first_file
        if not auto and self._worn[auto] != identity:
            from ..identity import load_identity

            engine.set_identity(load_identity(identity, engine.mcfg.identity_dim))
            self._worn[auto] = identity
        return engine

    def process(self, item: Item) -> dict:
        """Anonymize ``item.src`` into ``item.dst``. Returns ``{"state": "done", figures...}`` or
        ``{"state": "failed", "error": one line}``; ``worker`` (host:pid) in both."""
        self.current, self.frames_done = item.key, 0
        try:
            for stale in temp_files_for(item.dst):   # left by a worker killed mid-file
                stale.unlink(missing_ok=True)
            engine = self._engine(item.identity or self.spec.identity)
            engine.reset()    # an unrelated video: no tracks, landmarker state or warm start carried over
            summary = Summary("video", item.dst)
            with VideoReader(item.src) as reader:
                audio = reader.has_audio
                anonymize_video(engine, reader, item.dst, summary, on_frame=self._count)
            return {"state": "done", "worker": worker_name(), "sha256": sha256_file(item.dst),
                    "bytes": item.dst.stat().st_size, "frames": summary.frames, "audio": int(audio),
                    "faces": summary.faces, "anonymized": summary.anonymized, "held": summary.held,
                    "placeholder": summary.placeholder,
                    "frames_without_faces": summary.frames_without_faces, "seconds": summary.seconds}
        except Exception as exc:  # noqa: BLE001 - one file's failure must not stop the job
            why = first_line(exc) if isinstance(exc, (SafeFMError, OSError)) \
                else f"{type(exc).__name__}: {first_line(exc)}"
            log.warning("%s failed: %s", item.key, why)
            return {"state": "failed", "worker": worker_name(), "error": why}
        finally:
            self.current = None

    def _count(self) -> None:
        self.frames_done += 1

    def close(self) -> None:
        for engine in self._engines.values():
            engine.close()
        self._engines.clear()
