"""Capture stage: a camera, video file or stream feeding a one-slot mailbox.

A :class:`FrameSource` is the small interface every input implements (OpenCV here, fakes
in tests). :class:`CaptureWorker` runs in its own thread: it reads the source, stamps each
frame with an increasing id and ``time.monotonic()``, and keeps only the newest one. Read
failures close the source and reopen it with exponential back-off; a file's end stops it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import cv2
import numpy as np

from ..errors import DeviceError, InputError
from .mailbox import Mailbox, Pacer

log = logging.getLogger("safefm.live")


class EndOfStream(Exception):
    """A finite source (video file) has no more frames."""


@dataclass(frozen=True)
class SourceInfo:
    width: int
    height: int
    fps: float
    live: bool          # a camera or live stream (never paced, read failures are faults)
    name: str


@dataclass(frozen=True)
class Packet:
    frame_id: int       # 0, 1, 2, ... across reconnects
    t_capture: float    # time.monotonic() when the frame was read
    timestamp: float    # seconds for the engine: media time for files, t_capture for live
    image: np.ndarray   # (H, W, 3) uint8 RGB
    session: int        # increases each time the source is (re)opened


class FrameSource(Protocol):
    info: SourceInfo

    def read(self) -> tuple[np.ndarray | None, float | None]:
        """(RGB frame, media time or None); frame None on a read failure.
        Raises EndOfStream at the end of a finite source."""

    def close(self) -> None: ...


@contextlib.contextmanager
def _quiet_opencv():
    get, set_ = getattr(cv2, "getLogLevel", None), getattr(cv2, "setLogLevel", None)
    old = get() if get and set_ else None
    if old is not None:
        set_(0)   # LOG_LEVEL_SILENT
    try:
        yield
    finally:
        if old is not None:
            set_(old)


class CvSource:
    """cv2.VideoCapture on a camera index, a video file or a URL. ``loop``: a file starts
    again at its end (its media time keeps increasing, one frame period across the seam)."""

    def __init__(self, spec: int | str, width: int = 0, height: int = 0, fps: float = 0,
                 loop: bool = False) -> None:
        is_cam = isinstance(spec, int)
        if not is_cam and "://" not in spec and not Path(spec).is_file():
            raise InputError(f"video source not found: {spec}")
        with _quiet_opencv():   # our own one-line messages replace OpenCV's per-attempt log
            cap = cv2.VideoCapture(spec)
        if not cap.isOpened():
            cap.release()
            if is_cam:
                raise DeviceError(f"camera {spec} could not be opened (in use or unplugged?)")
            raise InputError(f"cannot open video source {spec}")
        if is_cam:
            if width and height:
                cap.set(cv2.CAP_PROP_FRAME_WIDTH, width)
                cap.set(cv2.CAP_PROP_FRAME_HEIGHT, height)
            if fps:
                cap.set(cv2.CAP_PROP_FPS, fps)
        self._cap, self._spec = cap, spec
        native_fps = cap.get(cv2.CAP_PROP_FPS)
        live = is_cam or cap.get(cv2.CAP_PROP_FRAME_COUNT) <= 0
        self.info = SourceInfo(
            width=int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), height=int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)),
            fps=native_fps if 1 <= native_fps <= 240 else 30.0, live=live,
            name=f"camera {spec}" if is_cam else str(spec))
        self.loop = loop and not live
        self._offset, self._last_t = 0.0, None   # media time added by earlier passes; last returned

    def read(self) -> tuple[np.ndarray | None, float | None]:
        ok, bgr = self._cap.read()
        if (not ok or bgr is None) and self.loop and self._last_t is not None:
            self._cap.release()                   # the end of a looped file: start it again
            with _quiet_opencv():
                self._cap = cv2.VideoCapture(self._spec)
            self._offset = self._last_t + 1.0 / self.info.fps
            ok, bgr = self._cap.read()
        if not ok or bgr is None:
            if not self.info.live:
                raise EndOfStream()
            return None, None
        if self.info.live:
            return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), None
        media_t = self._offset + self._cap.get(cv2.CAP_PROP_POS_MSEC) / 1000.0
        if self._last_t is not None and media_t <= self._last_t:   # never backwards
            media_t = self._last_t + 1e-6
        self._last_t = media_t
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), media_t

    def close(self) -> None:
        self._cap.release()


def open_source(camera: int = 0, source: str | None = None, width: int = 0, height: int = 0,
                fps: float = 0, loop: bool = False) -> CvSource:
    """The CLI's source: ``source`` (file or URL) when given, else camera index ``camera``;
    ``loop``: a file plays again and again."""
    return CvSource(source if source else int(camera), width, height, fps, loop)


def _valid(frame) -> bool:
    return (isinstance(frame, np.ndarray) and frame.dtype == np.uint8 and frame.ndim == 3
            and frame.shape[2] == 3 and frame.shape[0] > 0 and frame.shape[1] > 0)


class CaptureWorker:
    """Reads a source in a thread into a one-slot mailbox, reconnecting on faults.

    A camera is read as fast as it delivers (the newest frame wins); a file is read at its
    own fps when ``pace``, else one frame at a time, each once the last has been taken: a file
    played unpaced is decoded on demand, every frame anonymized, no work spent on frames that
    would be dropped (decoding them took a core's worth of CPU from the engine)."""

    FAILS_BEFORE_REOPEN = 5   # consecutive empty reads before the source is reopened

    def __init__(self, open_fn: Callable[[], FrameSource], out: Mailbox[Packet], *,
                 pace: bool = True, backoff: tuple[float, float] = (0.25, 4.0),
                 first: FrameSource | None = None, ready: threading.Event | None = None) -> None:
        self._open_fn, self._out, self._pace = open_fn, out, pace
        # A finite source (a file) is not read until ``ready`` is set (the engine is warm), so
        # its first frames are anonymized instead of played past under the starting card.
        # A live camera is read at once (its frames are dropped until then).
        self._ready = ready
        self._backoff = backoff
        self._src = first
        self.info: SourceInfo | None = first.info if first is not None else None
        self.healthy = first is not None   # False while the source is lost
        self.fault = ""                    # last fault, one line
        self.ended = False                 # a finite source reached its end
        self.captured = 0
        self.session = 0 if first is not None else -1

    def _lost(self, why: str) -> None:
        if self.healthy or (why != self.fault and self.session >= 0):   # the CLI reports start-up
            log.warning("camera lost: %s; retrying", why)
        self.healthy, self.fault = False, why

    def _close_src(self) -> None:
        if self._src is not None:
            try:
                self._src.close()
            except Exception:   # a broken device may fail to close; it is dropped anyway
                pass
            self._src = None

    def run(self, stop: threading.Event) -> None:
        delay, fails, frame_id, pacer = self._backoff[0], 0, 0, None
        try:
            while not stop.is_set():
                if self._src is None:
                    try:
                        self._src = self._open_fn()
                    except Exception as exc:
                        self._lost(str(exc) or type(exc).__name__)
                        stop.wait(delay)
                        delay = min(delay * 2, self._backoff[1])
                        continue
                    self.info, self.session, pacer = self._src.info, self.session + 1, None
                if self._ready is not None and not self._src.info.live and not self._ready.is_set():
                    self._ready.wait(0.05)
                    continue
                if self._pace and not self._src.info.live:
                    pacer = pacer or Pacer(self._src.info.fps)
                    pacer.wait(stop)
                elif not self._src.info.live and not self._out.wait_taken(0.1):
                    if self._out.closed:
                        break
                    continue   # an unpaced file: the next frame is read once the last was taken
                why = "no frames"
                try:
                    frame, media_t = self._src.read()
                except EndOfStream:
                    self.ended = True
                    return
                except Exception as exc:
                    frame, fails, why = None, self.FAILS_BEFORE_REOPEN - 1, f"read error: {exc}"
                if not _valid(frame):
                    fails += 1
                    if fails >= self.FAILS_BEFORE_REOPEN:
                        self._lost(why)
                        self._close_src()
                        fails = 0
                        stop.wait(delay)
                        delay = min(delay * 2, self._backoff[1])
                    else:
                        stop.wait(0.02)
                    continue
                if self.fault:
                    log.warning("camera back: %s", self._src.info.name)
                fails, delay, self.healthy, self.fault = 0, self._backoff[0], True, ""
                now = time.monotonic()
                self._out.put(Packet(frame_id, now, now if media_t is None else media_t,
                                     frame, self.session))
                frame_id += 1
                self.captured += 1
        finally:
            self._close_src()
            self._out.close()
