"""Capture: OpenCV sources, reconnect back-off, and the preview's hotkeys and sink."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from safefm.errors import DeviceError, InputError
from safefm.live.capture import CaptureWorker, EndOfStream, open_source
from safefm.live.mailbox import Mailbox
from safefm.live.pipeline import OutFrame
from safefm.live.preview import PreviewSink, handle_key
from safefm.paths import shared_data_dir

VIDEO = shared_data_dir() / "videos" / "liveportrait_d0.mp4"


def test_missing_file_is_one_line_input_error(tmp_path):
    with pytest.raises(InputError, match="video source not found"):
        open_source(source=str(tmp_path / "nope.mp4"))


@pytest.mark.skipif(not VIDEO.is_file(), reason="../shared/data videos absent")
def test_file_source_reads_rgb_then_ends():
    src = open_source(source=str(VIDEO))
    assert (src.info.width, src.info.height, src.info.fps, src.info.live) == (512, 512, 25.0, False)
    n, last_t = 0, -1.0
    with pytest.raises(EndOfStream):
        while True:
            f, t = src.read()
            assert f.shape == (512, 512, 3) and f.dtype == np.uint8 and t > last_t
            n, last_t = n + 1, t
    src.close()
    assert n == 78


def test_an_unpaced_file_is_decoded_on_demand_and_no_frame_is_dropped():
    from safefm.live.capture import SourceInfo

    class Counting:
        def __init__(self):
            self.info, self.reads = SourceInfo(8, 8, 30.0, False, "clip.mp4"), 0

        def read(self):
            if self.reads >= 20:
                raise EndOfStream()
            self.reads += 1
            return np.full((8, 8, 3), self.reads, np.uint8), None

        def close(self):
            pass

    src, box, stop = Counting(), Mailbox(), threading.Event()
    w = CaptureWorker(lambda: src, box, pace=False)
    t = threading.Thread(target=w.run, args=(stop,), daemon=True)
    t.start()
    got = []
    while True:
        time.sleep(0.01)                              # a consumer far slower than decoding
        pkt = box.take(1.0)
        if pkt is None:
            break
        got.append(int(pkt.image[0, 0, 0]))
        assert src.reads <= len(got) + 1              # never more than one frame read ahead
    stop.set()
    t.join(2)
    assert got == list(range(1, 21)) and box.dropped == 0 and w.ended


def test_unavailable_camera_backs_off_and_stops_promptly():
    opens = []

    def refuse():
        opens.append(time.monotonic())
        raise DeviceError("camera 3 could not be opened (in use or unplugged?)")

    box, stop = Mailbox(), threading.Event()
    w = CaptureWorker(refuse, box, backoff=(0.02, 0.08))
    t = threading.Thread(target=w.run, args=(stop,))
    t.start()
    time.sleep(0.4)
    stop.set()
    t0 = time.monotonic()
    t.join(1)
    assert not t.is_alive() and time.monotonic() - t0 < 0.2
    assert not w.healthy and "could not be opened" in w.fault and box.closed
    gaps = np.diff(opens)
    assert 3 <= len(opens) <= 12 and gaps[-1] >= 0.07       # 0.02, 0.04, 0.08, 0.08 ...
    assert box.take(0) is None


def test_preview_hotkeys_and_sink():
    calls = []
    acts = dict(toggle_pause=lambda: calls.append("p"), next_identity=lambda: calls.append("i"),
                quit=lambda: calls.append("q"))
    for key in (ord("p"), ord("I"), ord("x"), -1, 27, ord("q")):
        handle_key(key, **acts)
    assert calls == ["p", "i", "q", "q"]
    sink = PreviewSink()
    for i in range(3):
        sink.send(OutFrame(np.zeros((2, 2, 3), np.uint8), i, "anonymized", True, None))
    assert sink.box.take(0).frame_id == 2 and sink.box.dropped == 2
