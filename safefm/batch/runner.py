"""The driver of a batch job: Ray workers, one task per video, the ledger, progress, retries.

:class:`BatchJob` takes the plan (:mod:`.manifest`), the open ledger (:mod:`.ledger`) and the
engine spec; :meth:`BatchJob.start` connects to Ray (a local instance by default, or
``settings.address``) and starts the workers (:mod:`.actor`), each loading the model once;
:meth:`BatchJob.run` hands one video at a time to each idle worker until none is left.

- A file the worker reports failed (unreadable, corrupt, an engine error) is ``failed`` with a
  one-line reason; the job goes on. A rerun tries it again, up to ``max_attempts`` in all.
- A worker that dies mid-file (killed, out of memory, its node lost): Ray starts it again and
  the file goes back to the queue, to whichever worker is free first, while attempts are left.
  Its temporary output is removed before the next attempt; the final name never sees it.
- Inputs ``done`` in the ledger (output present) are skipped: a rerun recomputes nothing.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field

from tqdm import tqdm

from ..errors import ConfigError, InputError, SafeFMError, first_line
from ..media import VideoReader, temp_files_for
from .ledger import DONE, FAILED, Ledger
from .manifest import Item, Plan
from .worker import EngineFactory, EngineSpec

log = logging.getLogger("safefm.batch")

INSTALL_HINT = "safefm-batch needs Ray, which is not installed: pip install 'safefm[scale]'"
_POLL_S = 0.5
_MAX_LISTED = 5


def import_ray():
    """The ``ray`` module, or a one-line error that says how to install it."""
    try:
        import ray
    except ImportError:
        raise SafeFMError(INSTALL_HINT) from None
    return ray


@dataclass(frozen=True)
class BatchSettings:
    """How the job runs. ``workers``: None = the local CPUs (or the cluster's) / cpus_per_worker;
    ``address``: an existing Ray cluster (``auto``, ``HOST:6379``, ``ray://HOST:10001``), None =
    a local instance; ``max_attempts``: per input, over all runs."""
    workers: int | None = None
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    address: str | None = None
    max_attempts: int = 3
    progress: bool = True
    verbose: int = 0

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {self.workers}")
        if self.cpus_per_worker <= 0 or self.gpus_per_worker < 0:
            raise ConfigError(f"--cpus-per-worker must be > 0 and --gpus-per-worker >= 0, got "
                              f"{self.cpus_per_worker} and {self.gpus_per_worker}")
        if self.max_attempts < 1:
            raise ConfigError(f"--max-attempts must be at least 1, got {self.max_attempts}")


@dataclass
class Outcome:
    """What a run did (the end-of-run summary)."""
    output: str
    ledger: str
    inputs: int = 0
    done_before: int = 0
    gave_up: list[tuple[str, str]] = field(default_factory=list)   # (key, last error), not tried
    done: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)    # (key, error) this run
    retried: list[str] = field(default_factory=list)               # keys re-queued: worker died
    skipped: list[str] = field(default_factory=list)               # not videos
    workers: int = 0
    frames: int = 0
    faces: int = 0
    anonymized: int = 0
    held: int = 0
    placeholder: int = 0
    frames_without_faces: int = 0
    engine_seconds: float = 0.0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed and not self.gave_up

    def add(self, fig: dict) -> None:
        self.done += 1
        for k in ("frames", "faces", "anonymized", "held", "placeholder", "frames_without_faces"):
            setattr(self, k, getattr(self, k) + int(fig.get(k) or 0))
        self.engine_seconds += float(fig.get("seconds") or 0.0)

    def lines(self) -> list[str]:
        def names(pairs):
            shown = "; ".join(f"{k}: {e}" for k, e in pairs[:_MAX_LISTED])
            return shown + (f"; and {len(pairs) - _MAX_LISTED} more" if len(pairs) > _MAX_LISTED else "")

        fps = self.frames / self.seconds if self.seconds > 0 else 0.0
        engine_fps = self.frames / self.engine_seconds if self.engine_seconds > 0 else 0.0
        out = [f"safefm-batch: {self.inputs} inputs -> {self.output} (ledger {self.ledger})",
               f"  this run: {self.done} done, {len(self.failed)} failed, {len(self.retried)} retried "
               f"after a worker died; skipped: {self.done_before} done before, "
               f"{len(self.gave_up)} failed too often"]
        if self.done:
            out += [f"  frames: {self.frames} in {self.seconds:.1f} s: {fps:.1f} frames/s across "
                    f"{self.workers} worker{'s' * (self.workers != 1)} (engine {engine_fps:.1f} FPS a worker)",
                    f"  faces: {self.faces} ({self.anonymized} anonymized, {self.held + self.placeholder} "
                    f"covered: {self.held} held, {self.placeholder} placeholder); no face in "
                    f"{self.frames_without_faces} frames"]
        if self.failed:
            out.append(f"  failed ({len(self.failed)}): {names(self.failed)}")
        if self.gave_up:
            out.append(f"  not retried, attempts used up ({len(self.gave_up)}): {names(self.gave_up)}")
        if self.skipped:
            shown = ", ".join(self.skipped[:_MAX_LISTED])
            more = f" and {len(self.skipped) - _MAX_LISTED} more" if len(self.skipped) > _MAX_LISTED else ""
            out.append(f"  skipped, not videos ({len(self.skipped)}): {shown}{more}")
        return out


@dataclass
class _Slot:
    """One worker as the driver sees it."""
    handle: object
    name: str = "?"
    pid: int = 0


def _reason(exc: BaseException) -> str:
    """One line from a Ray error: the innermost cause's message where there is one."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException) and cause is not exc:
        return _reason(cause)
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    errs = [ln for ln in lines if ln.split(":", 1)[0].endswith(("Error", "Exception"))]
    return (errs[-1] if errs else first_line(exc))[:300]


class BatchJob:
    def __init__(self, plan: Plan, ledger: Ledger, spec: EngineSpec, settings: BatchSettings,
                 factory: EngineFactory | None = None):
        self.plan, self.ledger, self.spec, self.settings, self.factory = plan, ledger, spec, settings, factory
        self.ray = None
        self.slots: list[_Slot] = []
        self._started_ray = False
        self.outcome = Outcome(str(plan.output), str(ledger.path), inputs=len(plan.items),
                               skipped=list(plan.skipped))
        self.todo = self._todo()

    # -- what to do ----------------------------------------------------------------------
    def _todo(self) -> list[Item]:
        todo = []
        for it in self.plan.items:
            row = self.ledger.row(it.key)
            if row["state"] == DONE:
                if it.dst.is_file():
                    self.outcome.done_before += 1
                    continue
                self.ledger.fail(it.key, "output missing: done again", retry=True)
            elif row["state"] == FAILED and row["attempts"] >= self.settings.max_attempts:
                self.outcome.gave_up.append((it.key, row["error"] or "failed"))
                continue
            todo.append(it)
        return todo

    # -- workers -------------------------------------------------------------------------
    def start(self) -> None:
        """Connect to Ray and start the workers (nothing when there is nothing to do)."""
        if not self.todo:
            return
        ray = self.ray = import_ray()
        s = self.settings
        if not ray.is_initialized():
            kw = dict(include_dashboard=False, log_to_driver=s.verbose > 0,
                      logging_level=logging.INFO if s.verbose else logging.WARNING)
            try:
                if s.address:
                    ray.init(address=s.address, **kw)
                else:
                    local = s.workers or max(1, int((os.cpu_count() or 1) // s.cpus_per_worker))
                    ray.init(num_cpus=max(os.cpu_count() or 1, int(local * s.cpus_per_worker + 0.999)), **kw)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise SafeFMError(f"cannot start or reach Ray ({s.address or 'local'}): {first_line(exc)}") from None
            self._started_ray = True
        n = s.workers or self._cluster_workers()
        n = max(1, min(n, len(self.todo)))
        from .actor import actor_class

        cls = actor_class(ray, s.cpus_per_worker, s.gpus_per_worker)
        self.slots = [_Slot(cls.remote(self.spec, self.factory)) for _ in range(n)]
        pending = {slot.handle.ready.remote(): slot for slot in self.slots}
        t0 = time.monotonic()
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=30)
            for ref in ready:
                slot = pending.pop(ref)
                try:
                    info = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    raise SafeFMError(f"a worker could not start: {_reason(exc)}") from None
                slot.name, slot.pid = info["worker"], info["pid"]
            if pending:
                log.warning("waiting %.0f s for %d of %d workers (%s CPU, %s GPU each): does the "
                            "cluster have room?", time.monotonic() - t0, len(pending), n,
                            s.cpus_per_worker, s.gpus_per_worker)
        self.outcome.workers = n

    def _cluster_workers(self) -> int:
        res = self.ray.cluster_resources()
        s = self.settings
        if s.gpus_per_worker > 0:
            return int(res.get("GPU", 0) // s.gpus_per_worker)
        return int(res.get("CPU", 1) // s.cpus_per_worker)

    # -- the loop ------------------------------------------------------------------------
    def run(self) -> Outcome:
        """Process every input still to do; returns the outcome (also in ``self.outcome``)."""
        out = self.outcome
        if not self.todo:
            return out
        if not self.slots:
            self.start()
        ray = self.ray
        queue = deque(self.todo)
        idle = deque(self.slots)
        inflight: dict[object, tuple[_Slot, Item]] = {}
        restarting: dict[object, _Slot] = {}
        bar = self._bar()
        t0 = time.perf_counter()
        try:
            while queue or inflight:
                while queue and idle:
                    slot, item = idle.popleft(), queue.popleft()
                    self.ledger.start(item.key, slot.name)
                    inflight[slot.handle.process.remote(item)] = (slot, item)
                if not inflight and not restarting:
                    raise SafeFMError(f"every worker died; {len(queue)} inputs left pending "
                                      f"(see the ledger: safefm-batch status {self.ledger.path})")
                ready, _ = ray.wait([*inflight, *restarting], num_returns=1, timeout=_POLL_S)
                for ref in ready:
                    if ref in restarting:
                        self._restarted(restarting.pop(ref), ref, idle)
                    else:
                        slot, item = inflight.pop(ref)
                        if self._finished(ref, slot, item, queue):
                            idle.append(slot)
                        else:
                            restarting[slot.handle.ready.remote()] = slot
                out.seconds = time.perf_counter() - t0
                self._show(bar, inflight)
        except BaseException:
            for _, item in inflight.values():
                self.ledger.release(item.key)
            raise
        finally:
            bar.close()
        for item in self.todo:   # files that ended failed: no temporary file of theirs is left
            for stale in temp_files_for(item.dst):
                stale.unlink(missing_ok=True)
        return out

    def _finished(self, ref, slot: _Slot, item: Item, queue: deque) -> bool:
        """Record a returned task; False when its worker died (the item is re-queued while
        attempts are left)."""
        ray, out = self.ray, self.outcome
        try:
            res = ray.get(ref)
        except ray.exceptions.RayTaskError as exc:   # raised inside the worker, not caught there
            res = {"state": "failed", "error": _reason(exc), "worker": slot.name}
        except ray.exceptions.RayError as exc:       # the worker process or its node is gone
            why = f"worker {slot.name} died: {_reason(exc)}"
            retry = self.ledger.row(item.key)["attempts"] < self.settings.max_attempts
            self.ledger.fail(item.key, why, slot.name, retry=retry)
            log.warning("%s: %s%s", item.key, why, "; retrying" if retry else "")
            if retry:
                queue.appendleft(item)
                out.retried.append(item.key)
            else:
                out.failed.append((item.key, why))
            return False
        if res["state"] == DONE:
            self.ledger.done(item.key, res, res.get("worker"))
            out.add(res)
        else:
            self.ledger.fail(item.key, res["error"], res.get("worker"))
            out.failed.append((item.key, res["error"]))
        return True

    def _restarted(self, slot: _Slot, ref, idle: deque) -> None:
        try:
            info = self.ray.get(ref)
        except self.ray.exceptions.RayError as exc:
            log.warning("worker %s is gone for good: %s", slot.name, _reason(exc))
            self.slots.remove(slot)
            return
        slot.name, slot.pid = info["worker"], info["pid"]
        idle.append(slot)

    # -- progress ------------------------------------------------------------------------
    def _bar(self) -> tqdm:
        """Frames across all workers (rate = cluster frames/s, ETA from the frame total)."""
        hide = not self.settings.progress
        total = 0
        if not hide:
            for it in self.todo:   # the containers' frame counts: headers only
                try:
                    with VideoReader(it.src) as r:
                        total += r.frame_count
                except SafeFMError:
                    pass
        return tqdm(total=total or None, unit="frame", disable=True if hide else None,
                    leave=False, dynamic_ncols=True)

    def _show(self, bar: tqdm, inflight: dict) -> None:
        if bar.disable:
            return
        live = 0
        refs = [slot.handle.progress.remote() for slot, _ in inflight.values()]
        if refs:
            ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=0.2)
            for ref in ready:
                try:
                    live += int(self.ray.get(ref)["frames"])
                except self.ray.exceptions.RayError:
                    pass
        out = self.outcome
        bar.update(out.frames + live - bar.n)
        bar.set_postfix_str(f"files {out.done + out.done_before}/{out.inputs}, {len(out.failed)} failed, "
                            f"{len(self.slots)} workers", refresh=True)

    def close(self) -> None:
        """Stop the workers, and Ray when this job started it."""
        if self.ray is None:
            return
        for slot in self.slots:
            try:
                self.ray.kill(slot.handle)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.slots = []
        if self._started_ray:
            self.ray.shutdown()
            self._started_ray = False


def check_overwrite(plan: Plan, ledger: Ledger, overwrite: bool) -> None:
    """Refuse to replace existing files the ledger does not know as this job's (``--overwrite``)."""
    existing = [it.dst for it in plan.items if ledger.row(it.key) is None and it.dst.exists()]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise InputError(f"output exists: {existing[0]}{more}; pass --overwrite to replace")

