"""System-tray icon (pystray): state colour, Pause/Resume, Identity, Show preview, Quit.

The icon shows the pipeline state: anonymizing green, paused red, no face (or starting)
grey, error orange. ``controller`` is the :class:`~safefm.live.pipeline.Pipeline` (or any
object with ``paused``, ``set_paused``, ``identity_path``, ``set_identity``, ``status``).
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import threading
from pathlib import Path
from typing import Any, Callable

from PIL import Image, ImageDraw

from .identities import list_identities

log = logging.getLogger("safefm.live")

STATE_RGB = {
    "anonymizing": (40, 170, 70),
    "paused": (210, 40, 40),
    "noface": (140, 140, 140),
    "starting": (140, 140, 140),
    "error": (240, 140, 20),
}
STATE_TITLE = {
    "anonymizing": "anonymizing", "paused": "PAUSED - raw camera is sent",
    "noface": "no face", "starting": "starting", "error": "error",
}


def icon_image(state: str, size: int = 64) -> Image.Image:
    """A filled disc in the state's colour with a white ring (drawn with PIL)."""
    img = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    m = size // 16
    d.ellipse((m, m, size - m - 1, size - m - 1), fill=STATE_RGB.get(state, STATE_RGB["error"]),
              outline=(255, 255, 255), width=max(1, size // 16))
    if state == "paused":   # a pause sign, so the state does not rely on colour alone
        w, h = size // 8, size // 3
        for x in (size // 2 - w - w // 2, size // 2 + w // 2):
            d.rectangle((x, (size - h) // 2, x + w, (size + h) // 2), fill=(255, 255, 255))
    return img


def tray_unavailable_reason() -> str | None:
    """Why a tray cannot be shown here, or None."""
    if os.environ.get("PYSTRAY_BACKEND"):
        return None
    if platform.system() == "Linux" and not (os.environ.get("DISPLAY")
                                             or os.environ.get("WAYLAND_DISPLAY")):
        return "no display"
    return None


class Tray:
    """Builds the pystray icon; :meth:`start` runs it in a thread (or :meth:`run` blocks)."""

    POLL_S = 0.25

    def __init__(self, controller: Any, identities_dir: str | Path, on_quit: Callable[[], None],
                 on_show_preview: Callable[[], None] | None = None) -> None:
        import pystray   # raises on systems without a usable backend
        self._pystray = pystray
        self.ctl, self._dir = controller, Path(identities_dir)
        self._on_quit, self._on_show_preview = on_quit, on_show_preview
        self.state = controller.status()
        self._seen = (self.state, controller.paused, controller.identity_path)
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self.icon = pystray.Icon("safefm", icon_image(self.state), self._title(self.state),
                                 menu=self._menu())

    @staticmethod
    def _title(state: str) -> str:
        return f"SAFE-FM: {STATE_TITLE.get(state, state)}"

    # ---- menu ------------------------------------------------------------------------
    def _menu(self):
        Menu, Item = self._pystray.Menu, self._pystray.MenuItem
        return Menu(
            Item(lambda item: "Resume anonymization" if self.ctl.paused else "Pause anonymization",
                 self._toggle_pause, checked=lambda item: self.ctl.paused),
            Item("Identity", Menu(self._identity_items)),
            Item("Show preview", self._show_preview, visible=self._on_show_preview is not None),
            Menu.SEPARATOR,
            Item("Quit", self._quit),
        )

    def _identity_items(self):
        Item = self._pystray.MenuItem
        paths = list_identities(self._dir)
        if not paths:
            yield Item(f"(no .pt files in {self._dir})", None, enabled=False)
        for p in paths:
            yield Item(p.stem, functools.partial(self._choose_identity, p),
                       checked=functools.partial(self._is_current, p), radio=True)

    def _is_current(self, path: Path, _item=None) -> bool:
        cur = self.ctl.identity_path
        return cur is not None and Path(cur).resolve() == path

    def _toggle_pause(self, icon=None, item=None) -> None:
        self.ctl.set_paused(not self.ctl.paused)
        self.refresh()

    def _choose_identity(self, path: Path, icon=None, item=None) -> None:
        try:
            self.ctl.set_identity(path)
        except Exception as exc:   # a broken file must not kill the tray
            log.warning("identity %s: %s", path.name, exc)
        self.refresh()

    def _show_preview(self, icon=None, item=None) -> None:
        if self._on_show_preview is not None:
            self._on_show_preview()

    def _quit(self, icon=None, item=None) -> None:
        self._on_quit()

    def item(self, text_start: str):
        """The top-level menu item whose text starts with ``text_start`` (for tests)."""
        return next(i for i in self.icon.menu.items if i.text.startswith(text_start))

    # ---- state -----------------------------------------------------------------------
    def refresh(self) -> None:
        """Update the icon and menu when the pipeline state changed."""
        seen = (self.ctl.status(), self.ctl.paused, self.ctl.identity_path)
        if seen == self._seen:
            return
        if seen[0] != self.state:
            self.state = seen[0]
            self.icon.icon = icon_image(self.state)
            self.icon.title = self._title(self.state)
        self._seen = seen
        try:
            self.icon.update_menu()
        except NotImplementedError:   # the dummy backend has no native menu
            pass

    def _setup(self, icon) -> None:
        icon.visible = True
        while not self._stopped.wait(self.POLL_S):
            try:
                self.refresh()
            except Exception as exc:   # pragma: no cover - backend hiccups are not fatal
                log.warning("tray update failed: %s", exc)

    def run(self) -> None:
        """Run the icon's event loop in this thread until :meth:`stop` (macOS: main thread)."""
        self.icon.run(setup=self._setup)

    def start(self) -> bool:
        """Run the icon in a daemon thread; False (and one log line) when it cannot run."""
        if type(self.icon).__module__.endswith("_dummy"):
            log.warning("tray skipped: pystray dummy backend has no event loop")
            return False
        started = threading.Event()
        failed: list[str] = []

        def body() -> None:
            try:
                self.icon.run(setup=lambda icon: (started.set(), self._setup(icon)))
            except Exception as exc:
                failed.append(str(exc) or type(exc).__name__)
                started.set()

        self._thread = threading.Thread(target=body, name="safefm-tray", daemon=True)
        self._thread.start()
        started.wait(2.0)
        if failed:
            log.warning("tray skipped: %s", failed[0])
            return False
        return True

    def stop(self) -> None:
        self._stopped.set()
        try:
            self.icon.stop()
        except Exception:   # pragma: no cover - not running or backend already gone
            pass
        if self._thread is not None:
            self._thread.join(1.0)


def make_tray(controller: Any, identities_dir: str | Path, on_quit: Callable[[], None],
              on_show_preview: Callable[[], None] | None = None) -> Tray | None:
    """A :class:`Tray`, or None with one log line when no tray can be shown here."""
    why = tray_unavailable_reason()
    if why is None:
        try:
            return Tray(controller, identities_dir, on_quit, on_show_preview)
        except Exception as exc:   # pystray raises more than ImportError without a backend
            why = " ".join(str(exc).split()) or type(exc).__name__
    log.warning("tray skipped: %s (use --no-tray to skip it on purpose)", why)
    return None
