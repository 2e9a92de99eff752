"""``safefm-batch`` on a local Ray instance (2 CPUs): a small corpus made from the shared clips
(one clip under several names, a corrupt file), a worker killed mid-file, and reruns."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import av
import numpy as np
import pytest

from safefm.paths import shared_data_dir

ray = pytest.importorskip("ray")

from safefm.batch.ledger import Ledger, default_ledger_path  # noqa: E402
from safefm.batch.manifest import plan_job  # noqa: E402
from safefm.batch.runner import BatchJob, BatchSettings  # noqa: E402
from safefm.batch.worker import EngineSpec  # noqa: E402
from safefm.cli.batch import main  # noqa: E402
from safefm.config import load_runtime_config  # noqa: E402
from safefm.media import VideoReader  # noqa: E402

VIDEOS = shared_data_dir() / "videos"
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not VIDEOS.is_dir(), reason="../shared/data not present")]
GOOD = ["a/talk.mp4", "a/talk_copy.mp4", "b/deep/other_again.mp4", "b/other.mp4"]


# ------------------------------------------------------------------------------ engine

class SlowEngine:
    """A tiny engine that takes ``delay`` s more a frame (so a file is still running when the test
    kills its worker)."""

    def __init__(self, engine, delay: float):
        self._engine, self._delay = engine, delay

    def process(self, frame, timestamp=None):
        time.sleep(self._delay)
        return self._engine.process(frame, timestamp=timestamp)

    def __getattr__(self, name):
        return getattr(self._engine, name)


def tiny_factory(cfg, model_path=None, identity_path=None, video=True, delay=0.0):
    """``build_engine``-shaped: the tiny seeded model (torch), wearing ``identity_path``."""
    from safefm.identity import load_identity
    from safefm.tiny import tiny_engine

    engine = tiny_engine(cfg, video=video)
    if identity_path:
        engine.set_identity(load_identity(identity_path, engine.mcfg.identity_dim))
    return SlowEngine(engine, delay) if delay else engine


# ------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    # The workers import this test module's factory by value (tests/ is not on their path).
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield ray
    ray.shutdown()


def make_clip(src: Path, dst: Path, frames: int) -> Path:
    """The first ``frames`` frames of ``src`` (H.264) plus a synthetic stereo AAC tone as long."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        vin = inp.streams.video[0]
        v = out.add_stream("libx264", rate=vin.average_rate)
        v.width, v.height, v.pix_fmt = vin.width, vin.height, "yuv420p"
        a = out.add_stream("aac", rate=44100, layout="stereo")
        for i, frame in enumerate(inp.decode(vin)):
            if i == frames:
                break
            out.mux(v.encode(av.VideoFrame.from_ndarray(frame.to_ndarray(format="rgb24"), format="rgb24")))
        out.mux(v.encode(None))
        n = int(44100 * frames / float(vin.average_rate))
        tone = (0.2 * np.sin(2 * np.pi * 330 * np.arange(n) / 44100)).astype(np.float32)
        af = av.AudioFrame.from_ndarray(np.stack([tone, tone]), format="fltp", layout="stereo")
        af.sample_rate, af.pts = 44100, 0
        out.mux(a.encode(af))
        out.mux(a.encode(None))
    return dst


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """in/a/talk.mp4 (+ a copy), in/b/other.mp4 (+ a copy deeper), a truncated in/broken.mp4, a
    text file; every video 20 frames at 25 fps with audio."""
    root = tmp_path_factory.mktemp("corpus") / "in"
    talk = make_clip(VIDEOS / "liveportrait_d11.mp4", root / "a" / "talk.mp4", 20)
    other = make_clip(VIDEOS / "liveportrait_d12.mp4", root / "b" / "other.mp4", 20)
    shutil.copy(talk, root / "a" / "talk_copy.mp4")
    (root / "b" / "deep").mkdir()
    shutil.copy(other, root / "b" / "deep" / "other_again.mp4")
    (root / "broken.mp4").write_bytes(talk.read_bytes()[:3000])
    (root / "notes.txt").write_text("not a video")
    return root


@pytest.fixture(scope="module")
def identity_file(tmp_path_factory) -> Path:
    from safefm.identity import save_identity
    from safefm.tiny import tiny_identity

    return save_identity(tiny_identity(3), tmp_path_factory.mktemp("id") / "tiny.pt")


def frames_and_audio(path: Path) -> tuple[int, bool]:
    with VideoReader(path) as r:
        return sum(1 for _ in r), r.has_audio


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files_under(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv] + ["-q"], engine_factory=tiny_factory)
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------ tests

def test_corpus_once_each_corrupt_failed_and_rerun_recomputes_nothing(tmp_path, capsys, local_ray, corpus,
                                                                      identity_file):
    out = tmp_path / "out"
    args = (corpus, "-o", out, "--workers", 2, "--runtime", "torch", "--identity", identity_file,
            "--identity-repel", 0)
    code, text, err = run_cli(capsys, *args)
    assert code == 1, err                                   # one input failed
    assert files_under(out) == GOOD                         # exactly one output each, nothing else
    for key in GOOD:
        assert frames_and_audio(out / key) == (20, True), key
    assert "4 done, 1 failed" in text and "broken.mp4: cannot read video" in text
    assert "skipped, not videos (1): notes.txt" in text

    ledger_path = default_ledger_path(out)
    with Ledger(ledger_path, create=False) as ledger:
        rows = {r["key"]: dict(r) for r in ledger.rows()}
        n_events = len(ledger.events())
    assert sorted(rows) == sorted(GOOD + ["broken.mp4"])
    for key in GOOD:
        r = rows[key]
        assert (r["state"], r["attempts"], r["frames"], r["audio"]) == ("done", 1, 20, 1)
        assert r["sha256"] == sha256(out / key) and r["faces"] == r["anonymized"] + r["held"] + r["placeholder"]
        assert r["faces"] + r["frames_without_faces"] >= 20
    bad = rows["broken.mp4"]
    assert bad["state"] == "failed" and "cannot read video" in bad["error"] and "\n" not in bad["error"]

    assert main(["status", str(ledger_path)]) == 0
    status = capsys.readouterr().out
    assert "5 inputs" in status and "4 done, 1 failed" in status and "cannot read video" in status

    # Rerun: the done files are not touched; the failed one is tried again (attempt 2 of 2).
    stamps = {k: (out / k).stat().st_mtime_ns for k in GOOD}
    code, text, err = run_cli(capsys, *args, "--max-attempts", 2)
    assert code == 1 and "0 done, 1 failed" in text and "4 done before" in text
    assert {k: (out / k).stat().st_mtime_ns for k in GOOD} == stamps
    with Ledger(ledger_path, create=False) as ledger:
        assert [ledger.row(k)["attempts"] for k in GOOD] == [1] * 4
        assert ledger.row("broken.mp4")["attempts"] == 2
        n_events2 = len(ledger.events())
    assert n_events2 == n_events + 2                         # broken.mp4: running, failed

    # Attempts used up: nothing at all is run.
    code, text, err = run_cli(capsys, *args, "--max-attempts", 2)
    assert code == 1 and "0 done, 0 failed" in text and "1 failed too often" in text
    with Ledger(ledger_path, create=False) as ledger:
        assert len(ledger.events()) == n_events2
    assert {k: (out / k).stat().st_mtime_ns for k in GOOD} == stamps


def test_worker_killed_mid_file_retried_and_never_half_written(tmp_path, local_ray, corpus, identity_file):
    out = tmp_path / "out"
    plan = plan_job(corpus, out)
    cfg = load_runtime_config(runtime="torch", identity_repel=0, threads=1)
    spec = EngineSpec(cfg, None, str(identity_file))
    seen: dict[str, set[str]] = {}     # every content ever seen under a final (non-hidden) name
    with Ledger(default_ledger_path(out), lock=True) as ledger:
        ledger.add(plan.items)
        job = BatchJob(plan, ledger, spec, BatchSettings(workers=2, progress=False),
                       functools.partial(tiny_factory, delay=0.05))
        job.start()
        errors: list[BaseException] = []

        def run():
            try:
                job.run()
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                errors.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        killed = None

        def look():
            if out.is_dir():
                for p in out.rglob("*"):
                    if p.is_file() and not p.name.startswith("."):
                        seen.setdefault(p.relative_to(out).as_posix(), set()).add(sha256(p))

        try:
            while thread.is_alive():
                look()
                if killed is None:
                    for slot in list(job.slots):
                        try:
                            prog = ray.get(slot.handle.progress.remote(), timeout=5)
                        except (ray.exceptions.RayError, TimeoutError):
                            continue
                        if prog["key"] and prog["frames"] >= 4:
                            os.kill(prog["pid"], signal.SIGKILL)
                            killed = prog["key"]
                            break
                time.sleep(0.02)
            thread.join()
            look()
        finally:
            job.close()
        assert not errors, errors
        outcome = job.outcome
        row = dict(ledger.row(killed))
        events = [dict(e) for e in ledger.events(killed)]

    assert killed in GOOD
    assert outcome.retried == [killed] and outcome.done == 4 and [k for k, _ in outcome.failed] == ["broken.mp4"]
    assert row["state"] == "done" and row["attempts"] == 2
    assert [e["state"] for e in events] == ["running", "pending", "running", "done"]
    assert "died" in events[1]["error"]
    assert files_under(out) == GOOD                         # no output, no temporary file left over
    for key in GOOD:
        assert frames_and_audio(out / key) == (20, True), key
        assert seen[key] == {sha256(out / key)}             # only ever the complete file
