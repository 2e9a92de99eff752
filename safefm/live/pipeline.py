"""Live pipeline: capture -> process -> output, threads joined by one-slot mailboxes.

- capture (:class:`~safefm.live.capture.CaptureWorker`) keeps only the newest camera frame;
- process runs the engine on the newest frame (or passes it through, badged, when paused);
- output sends frames to the sinks at the output fps on average: each result as soon as it
  arrives (a frame credit keeps the rate, :meth:`Pipeline._output_loop`), repeating the last
  result while processing lags and sending status cards while starting, on faults and on
  unsafe results.

Pipelined (``LiveConfig.pipelined``, an engine with ``prepare`` / ``generate`` / ``finish``
stages such as :class:`safefm.engine.Engine`): process is three threads, so consecutive frames
overlap on the cores: the landmarks, retargeting and heatmaps of frame n+1 (process) while the
networks run frame n (generate) and frame n-1 is pasted (composite). Each hand-off is a
one-slot mailbox; the process stage takes the next camera frame only when the generate stage
is about to want it (so the frame is as new as possible and no work is thrown away), and
frames leave in capture order (never an older one after a newer one).

Nothing the sinks receive is ever a raw camera frame unless the user paused anonymization.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import cv2
import numpy as np

from ..face.composite import badge, status_frame
from ..errors import ConfigError, SafeFMError, first_line
from ..results import ANONYMIZED, STATUSES
from .capture import CaptureWorker, FrameSource, Packet
from .identities import list_identities, next_identity
from .mailbox import Mailbox
from .stats import Stats

log = logging.getLogger("safefm.live")

# What an outgoing frame shows (OutFrame.kind).
OUT_ANONYMIZED = "anonymized"   # the engine's safe image (may hold no face at all)
OUT_PAUSED = "paused"           # the raw camera frame, by the user's choice, badged by default
OUT_STARTING = "starting"       # card: model warming up / no face anonymized yet / resuming
OUT_WITHHELD = "withheld"       # card: the engine raised or returned an unsafe result
OUT_CAMERA_LOST = "camera_lost"  # card: the source failed, reconnecting
CARD_TEXT = {
    OUT_STARTING: "SAFE-FM starting...",
    OUT_WITHHELD: "SAFE-FM: frame withheld",
    OUT_CAMERA_LOST: "SAFE-FM: camera unavailable, retrying...",
}


@dataclass(frozen=True)
class LiveConfig:
    """How the live pipeline runs (the engine has its own RuntimeConfig)."""
    width: int                     # output frame size
    height: int
    fps: float                     # output frame rate
    pace: bool = True              # pace finite sources (files) at their native fps; off: read on demand
    paused_badge: bool = True      # draw "NOT ANONYMIZED" on frames sent while paused
    backoff_min: float = 0.25      # first reconnect delay after a capture fault (s)
    backoff_max: float = 4.0       # longest reconnect delay (s)
    join_timeout: float = 2.0      # stop() waits this long for all threads
    stats_interval: float = 1.0    # seconds between on_stats calls
    pipelined: bool = False        # overlap consecutive frames' engine stages (engines with stages)

    def __post_init__(self) -> None:
        if self.width < 2 or self.height < 2:
            raise ConfigError(f"output size must be at least 2x2, got {self.width}x{self.height}")
        if not 0 < self.fps <= 240:
            raise ConfigError(f"output fps must be in (0, 240], got {self.fps}")


@dataclass(frozen=True)
class OutFrame:
    image: np.ndarray        # (height, width, 3) uint8 RGB, what the sinks send
    frame_id: int            # captured frame it shows (or replaces); -1 before the first
    kind: str                # one of the OUT_* values
    fresh: bool              # False when the content repeats an earlier tick
    t_capture: float | None  # time.monotonic() of the capture, None for cards without one


class Sink(Protocol):
    def send(self, frame: OutFrame) -> None: ...

    def close(self) -> None: ...


@dataclass
class _Result:
    frame_id: int
    t_capture: float
    kind: str                          # OUT_ANONYMIZED, OUT_PAUSED or OUT_WITHHELD
    image: np.ndarray | None = None    # None when withheld


@dataclass
class _Work:
    """A frame between the pipelined stages: an engine plan, or a result already decided."""
    pkt: Packet
    engine: Any = None
    plan: Any = None                   # the engine's FramePlan, None once ``result`` is set
    result: _Result | None = None
    busy: float = 0.0                  # seconds the stages have spent on it so far


STAGE_METHODS = ("prepare", "generate", "finish")
OUTPUT_BURST = 2.0        # the output's credit (frames) at which the last frame is repeated
OUTPUT_FORGIVE = 1.0      # seconds over which being ahead of the rate (credit < 0) relaxes to 0
OUTPUT_GRACE = 3.0        # most frames of being ahead that can be forgiven at once ...
OUTPUT_GRACE_RATE = 0.1   # ... refilled at this many a second: the most the output runs over its rate


def output_credit(credit: float, grace: float, dt: float, period: float,
                  forgive: bool = True) -> tuple[float, float]:
    """The output's (frame credit, grace) ``dt`` seconds on. The credit accrues one frame a
    ``period``, kept at most ``OUTPUT_BURST + 1`` (a repeat is due at :data:`OUTPUT_BURST`; the
    extra frame keeps a late wake-up's time, so repeats keep the rate). The grace, frames of
    being ahead that may still be forgiven, refills at :data:`OUTPUT_GRACE_RATE` a second up to
    :data:`OUTPUT_GRACE`. With ``forgive``, a negative credit relaxes towards 0 over
    :data:`OUTPUT_FORGIVE` seconds (exponentially), by at most the grace, which it spends."""
    grace = min(OUTPUT_GRACE, grace + dt * OUTPUT_GRACE_RATE)
    if credit < 0.0 and forgive:
        relief = min(-credit * (1.0 - math.exp(-dt / OUTPUT_FORGIVE)), grace)
        credit, grace = credit + relief, grace - relief
    return min(OUTPUT_BURST + 1.0, credit + dt / period), grace


def _ema(old: float, new: float) -> float:
    return new if old <= 0 else 0.8 * old + 0.2 * new


class UnsafeResult(Exception):
    """The engine returned something that cannot be proven safe to send."""


def check_result(res: Any, shape: tuple[int, ...]) -> np.ndarray:
    """The engine result's image (a private copy) if it is well-formed, else UnsafeResult."""
    img = getattr(res, "image", None)
    if not isinstance(img, np.ndarray):
        raise UnsafeResult("result has no image")
    if img.dtype != np.uint8:
        raise UnsafeResult(f"result image is {img.dtype}, not uint8")
    if img.shape != tuple(shape):
        raise UnsafeResult(f"result image is {img.shape}, frame is {tuple(shape)}")
    if getattr(res, "anonymized", True) is not True:
        raise UnsafeResult("result flagged unsafe")
    for f in getattr(res, "faces", None) or []:
        if getattr(f, "status", None) not in STATUSES:
            raise UnsafeResult(f"face status {getattr(f, 'status', None)!r} is unknown")
    return np.array(img, copy=True)   # the engine may reuse its buffer for the next frame


def _one_line(exc: BaseException) -> str:
    """``Type: first line of the message``, for logs and the withheld-frame reason."""
    return f"{type(exc).__name__}: {first_line(exc)}"


class Pipeline:
    """Capture, process and output threads around one engine and a list of sinks.

    ``engine`` is an engine object or a zero-argument factory (called in the processing
    thread, so the sinks show the starting card while the model loads). The pipeline owns
    the engine, the source and the sinks: each is closed by the thread that uses it.
    """

    def __init__(self, engine: Any, open_source: Callable[[], FrameSource], sinks: list[Sink],
                 cfg: LiveConfig, *, first_source: FrameSource | None = None,
                 identity_path: str | Path | None = None,
                 load_identity: Callable[[Path], Any] | None = None,
                 on_stats: Callable[[dict], None] | None = None) -> None:
        self.cfg = cfg
        self._engine_src = engine
        self._sinks = list(sinks)
        self._frames: Mailbox[Packet] = Mailbox()
        self._results: Mailbox[_Result] = Mailbox()
        self._plans: Mailbox[_Work] = Mailbox()       # pipelined: process -> generate
        self._made: Mailbox[_Work] = Mailbox()        # pipelined: generate -> composite
        self._reset_asked = threading.Event()        # a later stage failed: reset before the next frame
        self._t_prepare = self._t_generate = 0.0     # running means of the stages' seconds
        self._generate_free_at = 0.0                 # when the running generate stage should end
        self._generate_idle = threading.Event()      # set while the generate stage waits for work
        self._identity_box: Mailbox[Any] = Mailbox()
        self.engine_ready = threading.Event()   # set once the engine is built and warmed up
        self.capture = CaptureWorker(open_source, self._frames, pace=cfg.pace,
                                     backoff=(cfg.backoff_min, cfg.backoff_max), first=first_source,
                                     ready=self.engine_ready)
        self._stop = threading.Event()
        self.done = threading.Event()     # set when the output thread has finished
        self._paused = False
        self.identity_path = Path(identity_path).resolve() if identity_path else None
        self._active_identity = self.identity_path   # what the engine really uses
        self._load_identity = load_identity
        self._on_stats = on_stats
        self.stats = Stats()
        self.error: str | None = None     # fatal error that stopped the pipeline, one line
        self.started = False              # a face has been anonymized at least once
        self._last_faces = 0
        self._last_fault_t = -1e9
        self._fault_msg, self._fault_logged_t = "", -1e9
        self._cards: dict[str, np.ndarray] = {}
        self._threads: list[threading.Thread] = []
        self._t_start = 0.0               # time.monotonic() of start() (the start-up log lines)

    # ---- lifecycle -------------------------------------------------------------------
    def start(self) -> "Pipeline":
        self._t_start = time.monotonic()
        loops = [("capture", lambda: self.capture.run(self._stop)), ("process", self._process_loop)]
        if self.cfg.pipelined:
            loops += [("generate", self._generate_loop), ("composite", self._composite_loop)]
        for name, fn in loops + [("output", self._output_loop)]:
            t = threading.Thread(target=fn, name=f"safefm-{name}", daemon=True)
            self._threads.append(t)
            t.start()
        return self

    def stop(self, timeout: float | None = None) -> bool:
        """Stop all threads; True when every one joined within ``timeout`` (default cfg)."""
        self._stop.set()
        for box in (self._frames, self._plans, self._made, self._results):
            box.close()
        deadline = time.monotonic() + (self.cfg.join_timeout if timeout is None else timeout)
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive:
            log.warning("threads still running after stop: %s", ", ".join(alive))
        return not alive

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the output ends (source finished, stop or fatal error)."""
        return self.done.wait(timeout)

    def __enter__(self) -> "Pipeline":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _fail(self, msg: str) -> None:
        self.engine_ready.set()   # nothing waits for an engine that will not come
        if self.error is None:
            self.error = msg
            log.info("pipeline stopped: %s", msg)   # the caller reports self.error
        self._stop.set()
        self._frames.close()

    # ---- controls (any thread) -------------------------------------------------------
    @property
    def paused(self) -> bool:
        return self._paused

    def set_paused(self, paused: bool) -> None:
        if paused != self._paused:
            self._paused = paused
            log.warning("anonymization PAUSED: the raw camera is being sent" if paused
                        else "anonymization resumed")

    def toggle_pause(self) -> bool:
        self.set_paused(not self._paused)
        return self._paused

    def set_identity(self, path: str | Path) -> None:
        """Load ``path`` and hand it to the engine before its next frame (raises SafeFMError)."""
        loader = self._load_identity
        if loader is None:
            from ..identity import load_identity as loader
        identity = loader(Path(path))
        self.identity_path = Path(path).resolve()
        self._identity_box.put((self.identity_path, identity))
        log.info("identity: %s", self.identity_path.name)

    def next_identity(self, folder: str | Path) -> Path | None:
        """Switch to the identity after the current one in ``folder``; None when empty."""
        nxt = next_identity(list_identities(folder), self.identity_path)
        if nxt is None:
            log.warning("no identity files (*.pt) in %s", folder)
            return None
        self.set_identity(nxt)
        return nxt

    def status(self) -> str:
        """starting | anonymizing | noface | paused | error (for the tray icon)."""
        if self.error:
            return "error"
        if self._paused:
            return "paused"
        if (not self.capture.healthy and self.capture.fault) or \
                time.monotonic() - self._last_fault_t < 1.0:
            return "error"
        if not self.started:
            return "starting"
        return "anonymizing" if self._last_faces else "noface"

    def dropped(self) -> int:
        return self._frames.dropped + self._results.dropped

    # ---- processing thread -----------------------------------------------------------
    def _fault(self, msg: str) -> None:
        now = time.monotonic()
        self._last_fault_t = now
        if msg != self._fault_msg or now - self._fault_logged_t > 5:
            log.warning("frame withheld: %s", msg)
            self._fault_msg, self._fault_logged_t = msg, now

    @staticmethod
    def _reset(engine: Any) -> None:
        try:
            engine.reset()
        except Exception as exc:
            log.warning("engine reset failed: %s", _one_line(exc))

    def _process_loop(self) -> None:
        engine = None
        try:
            try:
                src = self._engine_src
                is_factory = isinstance(src, type) or not hasattr(src, "process")
                engine = src() if is_factory else src
            except SafeFMError as exc:      # one line a user can act on
                self._fail(first_line(exc))
                return
            except Exception as exc:
                self._fail(f"engine failed to start: {_one_line(exc)}")
                return
            warm = getattr(engine, "warmup", None)
            if callable(warm):
                try:
                    log.info("engine warm-up: %.2f s", warm())
                except Exception as exc:      # the first frames will pay for it instead
                    log.warning("engine warm-up failed: %s", _one_line(exc))
            staged = self.cfg.pipelined and all(callable(getattr(engine, m, None)) for m in STAGE_METHODS)
            if self.cfg.pipelined and not staged:
                log.info("the engine has no stages to overlap: frames run one after another")
            self.engine_ready.set()
            log.info("engine ready %.2f s after the pipeline started", time.monotonic() - self._t_start)
            session, was_paused = None, False
            while not self._stop.is_set():
                if staged:
                    self._wait_for_generate()
                pkt = self._frames.take(0.1)
                if pkt is None:
                    if self._frames.closed:
                        break
                    continue
                if self._reset_asked.is_set():   # a later stage failed on an earlier frame
                    self._reset_asked.clear()
                    self._reset(engine)
                switch = self._identity_box.take_nowait()
                if switch is not None:
                    try:
                        engine.set_identity(switch[1])
                        self._active_identity = switch[0]
                    except Exception as exc:   # keep the old identity
                        self.identity_path = self._active_identity
                        log.warning("identity switch failed: %s", _one_line(exc))
                if session is not None and pkt.session != session:
                    self._reset(engine)          # the camera reconnected: old tracks are stale
                session = pkt.session
                if self._paused:
                    was_paused = True
                    img = badge(pkt.image) if self.cfg.paused_badge else pkt.image
                    self._emit(_Result(pkt.frame_id, pkt.t_capture, OUT_PAUSED, img), pkt, staged)
                    continue
                if was_paused:
                    self._reset(engine)
                    was_paused = False
                if staged:
                    self._plans.put(self._prepare(engine, pkt))
                else:
                    self._results.put(self._run_engine(engine, pkt))
        finally:
            if self.cfg.pipelined:   # the frames in flight finish first (the composite stage closes the results)
                self._plans.close()
                for t in self._threads:
                    if t.name in ("safefm-generate", "safefm-composite"):
                        t.join(self.cfg.join_timeout)
            if engine is not None:
                try:
                    engine.close()
                except Exception as exc:
                    log.warning("engine close failed: %s", _one_line(exc))
            if not self.cfg.pipelined:
                self._results.close()

    def _emit(self, r: _Result, pkt: Packet, staged: bool) -> None:
        """A result decided here, sent behind the frames in flight (so the order holds)."""
        if staged:
            self._plans.put(_Work(pkt, result=r))
        else:
            self._results.put(r)

    def _accept(self, res: Any, pkt: Packet, busy: float) -> _Result:
        """The engine's result for ``pkt`` if it is safe to send (else UnsafeResult)."""
        img = check_result(res, pkt.image.shape)
        faces = list(res.faces or [])
        if any(f.status == ANONYMIZED for f in faces):
            self.started = True
        self._last_faces = len(faces)
        self.stats.processed(getattr(res, "timings", None), busy, False)
        return _Result(pkt.frame_id, pkt.t_capture, OUT_ANONYMIZED, img)

    def _withhold(self, pkt: Packet, exc: BaseException, busy: float) -> _Result:
        """Never let the raw frame through: a card instead, and fresh engine state after."""
        self._fault(_one_line(exc))
        self.stats.processed(None, busy, True)
        return _Result(pkt.frame_id, pkt.t_capture, OUT_WITHHELD)

    def _run_engine(self, engine: Any, pkt: Packet) -> _Result:
        t0 = time.monotonic()
        try:
            return self._accept(engine.process(pkt.image, pkt.timestamp), pkt, time.monotonic() - t0)
        except Exception as exc:
            r = self._withhold(pkt, exc, time.monotonic() - t0)
            self._reset(engine)
            return r

    # ---- pipelined stages ------------------------------------------------------------
    def _wait_for_generate(self) -> None:
        """Take the next camera frame only when the generate stage will want it: its slot is
        empty and it is due to finish in about the time the process stage takes (a frame
        taken earlier would wait in the slot, older; one taken later would keep it idle)."""
        while self._plans.pending and not self._stop.is_set():
            self._plans.wait_taken(0.1)
        delay = self._generate_free_at - time.monotonic() - self._t_prepare
        if delay > 0:
            self._generate_idle.wait(min(delay, 0.25))

    def _prepare(self, engine: Any, pkt: Packet) -> _Work:
        t0 = time.monotonic()
        try:
            plan = engine.prepare(pkt.image, pkt.timestamp)
        except Exception as exc:
            r = self._withhold(pkt, exc, time.monotonic() - t0)
            self._reset(engine)
            return _Work(pkt, result=r)
        busy = time.monotonic() - t0
        self._t_prepare = _ema(self._t_prepare, busy)
        return _Work(pkt, engine, plan, busy=busy)

    def _generate_loop(self) -> None:
        try:
            while not self._stop.is_set():
                w = self._plans.take(0.1)
                if w is None:
                    if self._plans.closed:
                        break
                    continue
                if w.plan is not None:
                    t0 = time.monotonic()
                    self._generate_idle.clear()
                    self._generate_free_at = t0 + self._t_generate
                    try:
                        w.engine.generate(w.plan)
                    except Exception as exc:
                        w.result, w.plan = self._withhold(w.pkt, exc, w.busy + time.monotonic() - t0), None
                        self._reset_asked.set()
                    dt = time.monotonic() - t0
                    self._t_generate, w.busy = _ema(self._t_generate, dt), w.busy + dt
                    self._generate_idle.set()
                self._made.put(w)
        except Exception as exc:
            self._fail(f"generate stage failed: {_one_line(exc)}")
        finally:
            self._made.close()

    def _composite_loop(self) -> None:
        last = -1
        try:
            while not self._stop.is_set():
                w = self._made.take(0.1)
                if w is None:
                    if self._made.closed:
                        break
                    continue
                r = w.result
                if w.plan is not None:
                    t0 = time.monotonic()
                    try:
                        res = w.engine.finish(w.plan)
                        r = self._accept(res, w.pkt, w.busy + time.monotonic() - t0)
                    except Exception as exc:
                        r = self._withhold(w.pkt, exc, w.busy + time.monotonic() - t0)
                        self._reset_asked.set()
                if r.frame_id > last:            # frames leave in capture order
                    last = r.frame_id
                    self._results.put(r)
        except Exception as exc:
            self._fail(f"composite stage failed: {_one_line(exc)}")
        finally:
            self._results.close()

    # ---- output thread ---------------------------------------------------------------
    def _card(self, kind: str, frame_id: int) -> OutFrame:
        if kind not in self._cards:
            self._cards[kind] = status_frame(self.cfg.width, self.cfg.height, CARD_TEXT[kind])
        return OutFrame(self._cards[kind], frame_id, kind, False, None)

    def _fit(self, img: np.ndarray) -> np.ndarray:
        if img.shape[:2] != (self.cfg.height, self.cfg.width):
            img = cv2.resize(img, (self.cfg.width, self.cfg.height), interpolation=cv2.INTER_AREA)
        return img

    def _compose(self, cur: _Result | None, fresh: bool) -> OutFrame:
        fid = cur.frame_id if cur is not None else -1
        if not self.capture.healthy and self.capture.fault:
            return self._card(OUT_CAMERA_LOST, fid)
        if cur is None:
            return self._card(OUT_STARTING, fid)
        if cur.kind == OUT_PAUSED:
            if self._paused:
                return OutFrame(self._fit(cur.image), fid, OUT_PAUSED, fresh, cur.t_capture)
            return self._card(OUT_STARTING, fid)     # resumed: never resend a raw frame
        if cur.kind == OUT_WITHHELD:
            return self._card(OUT_WITHHELD, fid)
        if not self.started:
            return self._card(OUT_STARTING, fid)
        return OutFrame(self._fit(cur.image), fid, OUT_ANONYMIZED, fresh, cur.t_capture)

    def _output_loop(self) -> None:
        """Frames go out at ``fps`` on average, each result the moment it arrives.

        The output keeps a credit of frames (:func:`output_credit`): one accrues every period
        and a frame sent spends one. A result is sent at once while the credit is above -1
        (else it waits in its one-slot box, and a newer result replaces it); when no result
        has come by the time the credit reaches :data:`OUTPUT_BURST`, the last frame (or a
        card) is repeated, so a stall is covered by repeats, one a period. A result arriving
        a little early or late against the output's own clock is not held back. Being ahead
        (credit below 0) is forgiven over :data:`OUTPUT_FORGIVE` seconds, from a grace of at
        most :data:`OUTPUT_GRACE` frames refilled at :data:`OUTPUT_GRACE_RATE` a second, and not
        while results are being replaced unsent (a source faster than the output: its rate
        then holds exactly). Why forgive: the latency falls in the first second as the stages
        warm up (and after a stall), so results arrive faster than ``fps`` for a while, and
        without it the output stayed behind them by that much for good (fixed ticks before
        session 14 locked the same way after jitter: measured 10-20 ms of the median latency).
        So over any stretch the sinks get ``fps`` frames a second, at most a few frames and
        ``OUTPUT_GRACE_RATE`` a second more (a recording keeps its timing to within that)."""
        period, cur, last_stats = 1.0 / self.cfg.fps, None, time.monotonic()
        first_sent = False
        credit, grace, t_credit = OUTPUT_BURST, OUTPUT_GRACE, time.monotonic()   # the first frame (a card) at once
        replaced, t_replaced = self._results.dropped, -math.inf   # results replaced unsent: count, when last seen

        def update(now: float) -> None:
            nonlocal credit, grace, t_credit, replaced, t_replaced
            if self._results.dropped != replaced:
                replaced, t_replaced = self._results.dropped, now
            credit, grace = output_credit(credit, grace, now - t_credit, period,
                                          forgive=now - t_replaced > OUTPUT_FORGIVE)
            t_credit = now

        try:
            while not self._stop.is_set():
                update(time.monotonic())
                if credit <= -1.0:              # frames went out early: let the credit grow back
                    self._stop.wait(0.25 * period)
                    continue
                r = self._results.take(max(0.0, (OUTPUT_BURST - credit) * period))
                if r is None and self._results.closed and not self._results.pending:
                    break                       # the source ended and every result was sent
                update(time.monotonic())
                if r is None and credit < OUTPUT_BURST - 1e-3:
                    continue                    # woken early (nothing to send yet)
                fresh = r is not None and (cur is None or r.frame_id >= cur.frame_id)
                if fresh:
                    cur = r
                out = self._compose(cur, fresh)
                for sink in self._sinks:
                    sink.send(out)
                credit -= 1.0
                now = time.monotonic()
                if not first_sent and out.kind == OUT_ANONYMIZED:
                    first_sent = True
                    log.info("first anonymized frame sent %.2f s after the pipeline started",
                             now - self._t_start)
                self.stats.sent(fresh=out.fresh, placeholder=out.kind not in
                                (OUT_ANONYMIZED, OUT_PAUSED),
                                latency=now - out.t_capture if out.t_capture else None)
                if self._on_stats and now - last_stats >= self.cfg.stats_interval:
                    last_stats = now
                    self._on_stats(self.stats.snapshot(self.dropped()))
            if self._on_stats:                  # the last (partial) interval
                self._on_stats(self.stats.snapshot(self.dropped()))
        except Exception as exc:
            self._fail(f"output failed: {_one_line(exc)}")
        finally:
            for sink in self._sinks:
                try:
                    sink.close()
                except Exception as exc:
                    log.warning("closing %s failed: %s", type(sink).__name__, _one_line(exc))
            self._stop.set()
            self._frames.close()
            self.done.set()
