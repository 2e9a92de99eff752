"""The Ray actor around :class:`~safefm.batch.worker.FileWorker`: one long-lived process a worker,
its engine loaded once. Two calls may run at once (``max_concurrency=2``) so the driver can ask
for :meth:`EngineActor.progress` while :meth:`EngineActor.process` runs."""

from __future__ import annotations

import os

from .worker import EngineFactory, EngineSpec, FileWorker, worker_name


class EngineActor:
    def __init__(self, spec: EngineSpec, factory: EngineFactory | None = None):
        self.worker = FileWorker(spec, factory)

    def ready(self) -> dict:
        """Called once the engine is loaded: where this worker runs."""
        return {"worker": worker_name(), "pid": os.getpid()}

    def process(self, item) -> dict:
        return self.worker.process(item)

    def progress(self) -> dict:
        """The file in progress (key or None), its frames so far, and this process's pid."""
        return {"key": self.worker.current, "frames": self.worker.frames_done, "pid": os.getpid()}


MAX_RESTARTS = 3   # a worker that died this often more is dropped (e.g. it is OOM-killed at start)


def actor_class(ray, cpus: float, gpus: float):
    """``EngineActor`` as a Ray actor class: ``cpus`` / ``gpus`` reserved per actor; Ray
    restarts a dead actor (a new process, the engine loaded again) up to MAX_RESTARTS times, and
    the driver, not Ray, retries the file it was processing (so the ledger counts the attempt)."""
    return ray.remote(EngineActor).options(num_cpus=cpus, num_gpus=gpus, max_restarts=MAX_RESTARTS,
                                           max_task_retries=0, max_concurrency=2)
