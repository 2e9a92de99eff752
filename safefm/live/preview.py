"""Preview window (OpenCV): shows what the sinks receive; P pause/resume, I next identity, Q quit.

OpenCV windows must be driven from the main thread: :class:`PreviewSink` only keeps the
newest outgoing frame, and the main thread calls :meth:`PreviewWindow.tick`.
"""

from __future__ import annotations

import logging
import os
import platform
from typing import Callable

import cv2

from .mailbox import Mailbox
from .pipeline import OutFrame

log = logging.getLogger("safefm.live")
WINDOW = "SAFE-FM preview (P pause, I identity, Q quit)"


def display_available() -> bool:
    """False on Linux without an X11/Wayland display (headless servers, CI)."""
    if platform.system() != "Linux":
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


class PreviewSink:
    """A sink that keeps the newest outgoing frame for the preview window."""

    def __init__(self) -> None:
        self.box: Mailbox[OutFrame] = Mailbox()

    def send(self, frame: OutFrame) -> None:
        self.box.put(frame)

    def close(self) -> None:
        self.box.close()


def handle_key(key: int, *, toggle_pause: Callable[[], object], next_identity: Callable[[], object],
               quit: Callable[[], object]) -> bool:
    """Dispatch one cv2.waitKey code; True when it was a hotkey."""
    if key < 0:
        return False
    ch = chr(key & 0xFF).lower()
    actions = {"p": toggle_pause, "i": next_identity, "q": quit, "\x1b": quit}
    if ch in actions:
        actions[ch]()
        return True
    return False


class PreviewWindow:
    """The OpenCV window; call :meth:`tick` from the main thread every few milliseconds."""

    def __init__(self, sink: PreviewSink, **actions: Callable[[], object]) -> None:
        self._sink, self._actions, self.open = sink, actions, False

    def show(self) -> None:
        if not self.open:
            cv2.namedWindow(WINDOW, cv2.WINDOW_NORMAL)
            self.open = True

    def close(self) -> None:
        if self.open:
            cv2.destroyWindow(WINDOW)
            cv2.waitKey(1)
            self.open = False

    def tick(self, wait_ms: int = 15) -> None:
        if not self.open:
            return
        frame = self._sink.box.take_nowait()
        if frame is not None:
            cv2.imshow(WINDOW, cv2.cvtColor(frame.image, cv2.COLOR_RGB2BGR))
        key = cv2.waitKey(wait_ms)
        try:
            handle_key(key, **self._actions)
        except Exception as exc:   # e.g. a broken identity file: log, keep running
            log.warning("%s", exc)
        if cv2.getWindowProperty(WINDOW, cv2.WND_PROP_VISIBLE) < 1:
            log.info("preview closed (the virtual camera keeps running; Ctrl+C to quit)")
            self.open = False
