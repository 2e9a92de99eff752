"""One-slot mailbox and a frame pacer: the only ways live stages hand frames to each other.

A :class:`Mailbox` holds at most one item. ``put`` replaces an unread item (counted in
``dropped``), so a slow consumer always gets the newest frame and nothing queues up.
"""

from __future__ import annotations

import threading
import time
from typing import Generic, TypeVar

T = TypeVar("T")


class Mailbox(Generic[T]):
    """Thread-safe slot keeping only the newest item."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: T | None = None
        self._fresh = False
        self._closed = False
        self.dropped = 0      # items replaced before anyone took them

    def put(self, item: T) -> None:
        with self._cond:
            if self._fresh:
                self.dropped += 1
            self._item, self._fresh = item, True
            self._cond.notify_all()

    def take(self, timeout: float | None = None) -> T | None:
        """Wait up to ``timeout`` s for an unread item and return it; None on timeout or close."""
        with self._cond:
            if not self._fresh and not self._closed:
                self._cond.wait_for(lambda: self._fresh or self._closed, timeout)
            if not self._fresh:
                return None
            self._fresh = False
            self._cond.notify_all()   # wakes wait_taken
            return self._item

    def take_nowait(self) -> T | None:
        return self.take(0)

    def wait_taken(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` s until no unread item is held (or the box is closed);
        True when the slot is free."""
        with self._cond:
            self._cond.wait_for(lambda: not self._fresh or self._closed, timeout)
            return not self._fresh

    def peek(self) -> T | None:
        """The newest item, read or not (does not mark it read)."""
        with self._cond:
            return self._item

    @property
    def pending(self) -> int:
        """Unread items held now: 0 or 1."""
        with self._cond:
            return int(self._fresh)

    def close(self) -> None:
        """Wake every waiter; later ``take`` calls return only an already unread item."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed


class Pacer:
    """Deadline pacing at ``fps`` on ``time.monotonic``; never bursts to catch up."""

    def __init__(self, fps: float) -> None:
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.period = 1.0 / fps
        self._next: float | None = None

    def wait(self, stop: threading.Event | None = None) -> None:
        """Sleep until the next tick (or until ``stop`` is set)."""
        now = time.monotonic()
        if self._next is None:
            self._next = now
        delay = self._next - now
        if delay > 0:
            if stop is not None:
                stop.wait(delay)
            else:
                time.sleep(delay)
        now = time.monotonic()
        # Keep the cadence; more than a period late restarts it from now (no catch-up burst).
        late = now - self._next >= self.period
        self._next = now + self.period if late else self._next + self.period
