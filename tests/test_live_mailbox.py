"""One-slot mailboxes, the pacer, identity cycling and the --stats line."""

from __future__ import annotations

import threading
import time

import pytest

from safefm.live.identities import list_identities, next_identity
from safefm.live.mailbox import Mailbox, Pacer
from safefm.live.stats import Stats, format_stats


def test_mailbox_keeps_only_the_newest():
    box = Mailbox()
    assert box.take(0) is None and box.pending == 0
    for i in range(5):
        box.put(i)
    assert box.pending == 1 and box.dropped == 4
    assert box.take(0) == 4 and box.take(0) is None
    assert box.peek() == 4


def test_a_slow_consumer_always_gets_the_newest_item_and_the_skipped_are_counted():
    box, got = Mailbox(), []

    def consume():                       # a reader ten times slower than the writer
        while (item := box.take(2)) is not None:
            got.append(item)
            time.sleep(0.01)

    reader = threading.Thread(target=consume)
    reader.start()
    for i in range(100):
        box.put(i)
        time.sleep(0.001)
    box.close()                          # an unread last item is still handed out
    reader.join(3)
    assert not reader.is_alive()
    assert got == sorted(set(got)) and got[-1] == 99     # never an older item, ends on the newest
    assert len(got) < 50 and len(got) + box.dropped == 100


def test_mailbox_take_waits_and_close_wakes():
    box = Mailbox()
    threading.Timer(0.05, box.put, args=("x",)).start()
    assert box.take(2) == "x"
    t0 = time.monotonic()
    threading.Timer(0.05, box.close).start()
    assert box.take(2) is None and box.closed
    assert time.monotonic() - t0 < 1


def test_pacer_keeps_the_rate_without_bursts():
    p = Pacer(100)
    t0 = time.monotonic()
    for _ in range(10):
        p.wait()
    assert 0.08 <= time.monotonic() - t0 < 0.3
    time.sleep(0.1)                  # far behind: no catch-up burst afterwards
    t1 = time.monotonic()
    p.wait()
    p.wait()
    assert time.monotonic() - t1 >= 0.009
    with pytest.raises(ValueError):
        Pacer(0)


def test_identity_cycling(tmp_path):
    assert list_identities(tmp_path / "none") == [] and next_identity([], None) is None
    for n in ("b", "a", "c"):
        (tmp_path / f"{n}.pt").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("x")
    ids = list_identities(tmp_path)
    assert [p.stem for p in ids] == ["a", "b", "c"]
    assert next_identity(ids, None).stem == "a"
    assert next_identity(ids, tmp_path / "b.pt").stem == "c"
    assert next_identity(ids, tmp_path / "c.pt").stem == "a"


def test_stats_line():
    s = Stats()
    s.processed({"landmarks": 0.01, "generator": 0.05, "generator_steps": 4}, 0.07, False)
    s.processed(None, 0.01, True)
    s.sent(fresh=True, placeholder=False, latency=0.09)
    s.sent(fresh=False, placeholder=True, latency=None)
    snap = s.snapshot(dropped_total=7)
    assert snap["dropped"] == 7 and snap["repeated"] == 1 and snap["errors"] == 1
    assert snap["stages_ms"]["generator"] == pytest.approx(50) and "generator_steps" not in snap["stages_ms"]
    line = format_stats(snap)
    assert "e2e 90 ms" in line and "generator 50.0 ms" in line and "dropped 7" in line
    assert s.snapshot(dropped_total=9)["dropped"] == 2


def test_wait_taken_returns_when_the_item_is_taken():
    box = Mailbox()
    assert box.wait_taken(0)                       # empty: free at once
    box.put(1)
    assert not box.wait_taken(0.02)                # nobody took it
    threading.Timer(0.05, box.take_nowait).start()
    t0 = time.monotonic()
    assert box.wait_taken(2.0) and time.monotonic() - t0 < 1.0


def test_stats_latency_percentiles():
    s = Stats()
    for ms in range(1, 101):
        s.sent(fresh=True, placeholder=False, latency=ms / 1000)
    snap = s.snapshot(0)
    assert snap["latency_p50_ms"] == pytest.approx(50.5) and snap["latency_p95_ms"] == pytest.approx(95.05)
    assert snap["fps_fresh"] > 0 and "p95 95" in format_stats(snap)
