"""The tray under PYSTRAY_BACKEND=dummy: state colours and every menu action, driven by hand."""

from __future__ import annotations

import logging

import pytest

from safefm.live.pipeline import LiveConfig, Pipeline
from safefm.live.tray import STATE_RGB, STATE_TITLE, Tray, icon_image, make_tray


@pytest.fixture(autouse=True)
def dummy_backend(monkeypatch):
    monkeypatch.setenv("PYSTRAY_BACKEND", "dummy")


def colour(img):
    return img.convert("RGB").getpixel((32, 12))


def test_icon_colours():
    assert colour(icon_image("anonymizing")) == STATE_RGB["anonymizing"] == (40, 170, 70)
    assert colour(icon_image("paused")) == STATE_RGB["paused"]
    assert colour(icon_image("noface")) == STATE_RGB["noface"]
    assert colour(icon_image("error")) == STATE_RGB["error"]
    assert icon_image("paused").size == (64, 64)


class Ctl:
    def __init__(self):
        self.paused, self.identity_path, self.state = False, None, "anonymizing"

    def status(self):
        return "paused" if self.paused else self.state

    def set_paused(self, v):
        self.paused = v

    def set_identity(self, path):
        raise RuntimeError("bad identity file")


def test_icon_follows_the_pipeline_state(tmp_path):
    ctl = Ctl()
    tray = Tray(ctl, tmp_path, on_quit=lambda: None)
    assert colour(tray.icon.icon) == STATE_RGB["anonymizing"]
    for state in ("noface", "error", "anonymizing"):
        ctl.state = state
        tray.refresh()
        assert tray.state == state and colour(tray.icon.icon) == STATE_RGB[state]
        assert tray.icon.title == "SAFE-FM: " + STATE_TITLE[state]
    items = list(tray.item("Identity").submenu)
    assert len(items) == 1 and not items[0].enabled            # no identity files
    assert not tray.item("Show preview").visible               # no preview callback given


def test_menu_drives_the_pipeline(tmp_path):
    for n in ("alice", "bob"):
        (tmp_path / f"{n}.pt").write_bytes(b"")
    (tmp_path / "broken.pt").write_bytes(b"")
    loaded = []

    def loader(path):
        if path.stem == "broken":
            raise RuntimeError("not an identity file")
        loaded.append(path.stem)
        return path.stem

    pipe = Pipeline(object(), lambda: None, [], LiveConfig(64, 48, 30.0), load_identity=loader,
                    identity_path=tmp_path / "alice.pt")
    quits, previews = [], []
    tray = Tray(pipe, tmp_path, on_quit=lambda: quits.append(1),
                on_show_preview=lambda: previews.append(1))
    assert tray.state == "starting" and colour(tray.icon.icon) == STATE_RGB["noface"]

    pause = tray.item("Pause anonymization")
    assert pause.checked is False
    pause(tray.icon)
    assert pipe.paused and tray.state == "paused" and colour(tray.icon.icon) == STATE_RGB["paused"]
    resume = tray.item("Resume anonymization")
    assert resume.checked is True
    resume(tray.icon)
    assert not pipe.paused and tray.state == "starting"

    ids = list(tray.item("Identity").submenu)
    assert [i.text for i in ids] == ["alice", "bob", "broken"]
    assert all(i.radio for i in ids) and [i.checked for i in ids] == [True, False, False]
    ids[1](tray.icon)
    assert loaded == ["bob"] and pipe.identity_path == (tmp_path / "bob.pt").resolve()
    assert [i.checked for i in tray.item("Identity").submenu] == [False, True, False]
    ids[2](tray.icon)                                        # logged, the tray survives
    assert pipe.identity_path == (tmp_path / "bob.pt").resolve()

    tray.item("Show preview")(tray.icon)
    tray.item("Quit")(tray.icon)
    assert previews == [1] and quits == [1]
    assert tray.start() is False                              # dummy backend: no event loop
    tray.stop()


def test_no_display_skips_the_tray_with_one_log_line(monkeypatch, caplog):
    for var in ("PYSTRAY_BACKEND", "DISPLAY", "WAYLAND_DISPLAY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr("platform.system", lambda: "Linux")
    with caplog.at_level(logging.INFO, logger="safefm.live"):
        assert make_tray(Ctl(), ".", on_quit=lambda: None) is None
    assert [r.getMessage() for r in caplog.records] == [
        "tray skipped: no display (use --no-tray to skip it on purpose)"]
