"""``safefm-batch`` without Ray: planning (folder, CSV/JSONL manifests), the ledger, one worker
on a short clip, the status command, and the one-line message when Ray is missing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from safefm.batch.ledger import Ledger, default_ledger_path, format_status
from safefm.batch.manifest import Item, plan_job
from safefm.cli.batch import main
from safefm.errors import ConfigError, InputError
from safefm.paths import shared_data_dir

CLIP = shared_data_dir() / "videos" / "liveportrait_d12.mp4"


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ------------------------------------------------------------------------------ planning

def test_folder_plan_mirrors_the_tree_and_lists_what_is_not_a_video(tmp_path):
    for rel in ("in/x.mp4", "in/sub/y.MOV", "in/sub/deeper/z.mkv", "in/readme.txt", "in/.hidden.mp4",
                "in/.cache/w.mp4"):
        touch(tmp_path / rel)
    plan = plan_job(tmp_path / "in", tmp_path / "out")
    assert [it.key for it in plan.items] == ["sub/deeper/z.mkv", "sub/y.MOV", "x.mp4"]
    assert plan.items[0].dst == (tmp_path / "out" / "sub" / "deeper" / "z.mkv").resolve()
    assert plan.skipped == ["readme.txt"]


def test_manifests_csv_and_jsonl(tmp_path):
    touch(tmp_path / "clips" / "a.mp4")
    touch(tmp_path / "clips" / "b" / "c.mp4")
    touch(tmp_path / "id.pt")
    (tmp_path / "list.csv").write_text("path,identity,output\nclips/a.mp4,id.pt,\nclips/b/c.mp4,auto,renamed.mp4\n")
    plan = plan_job(tmp_path / "list.csv", tmp_path / "out")
    assert [(it.key, it.identity) for it in plan.items] == [
        ("clips/a.mp4", str((tmp_path / "id.pt").resolve())), ("renamed.mp4", "auto")]
    (tmp_path / "list.jsonl").write_text(json.dumps({"path": str(tmp_path / "clips" / "b" / "c.mp4")}) + "\n\n")
    plan = plan_job(tmp_path / "list.jsonl", tmp_path / "out", root=tmp_path / "clips")
    assert [(it.key, it.identity) for it in plan.items] == [("b/c.mp4", None)]


@pytest.mark.parametrize("rows, words", [
    ("path,speed\nclips/a.mp4,2\n", "unknown column 'speed'"),
    ("path,identity\nclips/a.mp4,nope.pt\n", "identity file not found"),
    ("path\nclips/a.mp4\nclips/./a.mp4\n", "two inputs write clips/a.mp4"),
    ("path\n../elsewhere.mp4\n", "give --root or an output column"),
    ("path\nclips/a.txt\n", "is not a video file"),
    ("path,output\nclips/a.mp4,../x.mp4\n", "must be relative and inside the output folder"),
    ("path\n", "lists no videos"),
])
def test_bad_manifests_are_one_line_errors(tmp_path, rows, words):
    touch(tmp_path / "clips" / "a.mp4")
    (tmp_path / "list.csv").write_text(rows)
    with pytest.raises(ConfigError, match=words):
        plan_job(tmp_path / "list.csv", tmp_path / "out")


def test_output_and_input_folders_must_be_apart(tmp_path):
    touch(tmp_path / "in" / "a.mp4")
    for out, words in [(tmp_path / "in" / "out", "must not contain each other"),
                       (tmp_path, "must not contain each other"), (tmp_path / "in" / "a.mp4", "is a file")]:
        with pytest.raises(InputError, match=words):
            plan_job(tmp_path / "in", out)
    with pytest.raises(InputError, match="no videos"):
        plan_job(touch(tmp_path / "empty" / "x.txt").parent, tmp_path / "out")


# ------------------------------------------------------------------------------ ledger

def test_ledger_states_attempts_and_status(tmp_path):
    items = [Item("a.mp4", tmp_path / "a.mp4", tmp_path / "o" / "a.mp4"),
             Item("b.mp4", tmp_path / "b.mp4", tmp_path / "o" / "b.mp4")]
    path = default_ledger_path(tmp_path / "o")
    assert path == tmp_path / "o.ledger.sqlite"
    with Ledger(path, lock=True) as ledger:
        with pytest.raises(InputError, match="another safefm-batch job"):
            Ledger(path, lock=True)
        ledger.set_meta(output=tmp_path / "o")
        assert ledger.add(items) == 2 and ledger.add(items) == 0      # known items are kept
        assert ledger.start("a.mp4", "h:1") == 1
        ledger.fail("a.mp4", "worker h:1 died: killed", "h:1", retry=True)
        assert ledger.start("a.mp4", "h:2") == 2
        ledger.done("a.mp4", {"sha256": "ab" * 32, "bytes": 10, "frames": 20, "audio": 1, "faces": 19,
                              "anonymized": 17, "held": 2, "placeholder": 0, "frames_without_faces": 1,
                              "seconds": 2.0})
        ledger.start("b.mp4")
        ledger.fail("b.mp4", "cannot read video b.mp4: no decodable frames")
        assert [(r["key"], r["state"], r["attempts"]) for r in ledger.rows()] == [
            ("a.mp4", "done", 2), ("b.mp4", "failed", 1)]
        text = "\n".join(format_status(ledger, events=True))
    assert "2 inputs" in text and "1 done, 1 failed, 0 running, 0 pending (1 retried)" in text
    assert "frames 20 +audio, faces 19 (held 2, placeholder 0), no face in 1 frames, 10.0 FPS" in text
    assert "no decodable frames" in text and "attempt 1  pending  on h:1  worker h:1 died" in text
    with Ledger(path, lock=True):    # the lock went with the first job
        pass


def test_status_command(tmp_path, capsys):
    path = tmp_path / "o.ledger.sqlite"
    with Ledger(path) as ledger:
        ledger.add([Item("a.mp4", tmp_path / "a.mp4", tmp_path / "o" / "a.mp4")])
    assert main(["status", str(path)]) == 0
    assert "1 inputs" in capsys.readouterr().out
    assert main(["status", str(tmp_path / "nope.sqlite")]) == 1
    assert "ledger not found" in one_error_line(capsys.readouterr().err)
    (tmp_path / "junk.sqlite").write_bytes(b"not a database" * 100)
    assert main(["status", str(tmp_path / "junk.sqlite")]) == 1
    assert "not a safefm-batch ledger" in one_error_line(capsys.readouterr().err)


def test_without_ray_one_line_says_how_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)      # import ray -> ImportError
    touch(tmp_path / "in" / "a.mp4")
    code = main([str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-q"])
    assert code == 1
    assert "pip install 'safefm[scale]'" in one_error_line(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]     # nothing written


# ------------------------------------------------------------------------------ one worker

def _tiny_worker(ident: Path):
    """A FileWorker on the tiny seeded model (torch, no repel) wearing identity file ``ident``."""
    from safefm.batch.worker import EngineSpec, FileWorker
    from safefm.config import load_runtime_config
    from safefm.identity import load_identity
    from safefm.tiny import tiny_engine

    def factory(cfg, model_path=None, identity_path=None, video=True):
        engine = tiny_engine(cfg, video=video)
        engine.set_identity(load_identity(identity_path, engine.mcfg.identity_dim))
        return engine

    return FileWorker(EngineSpec(load_runtime_config(runtime="torch", identity_repel=0), None, str(ident)),
                      factory)


@pytest.mark.skipif(not CLIP.is_file(), reason="../shared/data not present")
def test_worker_writes_done_figures_and_reports_a_corrupt_file(tmp_path):
    from safefm.batch.worker import sha256_file
    from safefm.identity import save_identity
    from safefm.media import VideoReader, VideoWriter
    from safefm.tiny import tiny_identity

    src = tmp_path / "in" / "clip.mp4"
    src.parent.mkdir()
    with VideoReader(CLIP) as r, VideoWriter(src, r.rate, r.size) as w:
        for i, (f, _) in enumerate(r):
            if i == 6:
                break
            w.write(f)
    touch(tmp_path / "in" / "bad.mp4", b"\x00 junk " * 64)
    stale = touch(tmp_path / "out" / ".clip.abcd1234.part.mp4")     # left by a killed worker
    other = touch(tmp_path / "out" / ".clip.notours.part.mp4")

    ident = save_identity(tiny_identity(2), tmp_path / "id.pt")

    worker = _tiny_worker(ident)
    try:
        res = worker.process(Item("clip.mp4", src, tmp_path / "out" / "clip.mp4"))
        bad = worker.process(Item("bad.mp4", tmp_path / "in" / "bad.mp4", tmp_path / "out" / "bad.mp4"))
    finally:
        worker.close()
    assert res["state"] == "done" and res["frames"] == 6 and res["audio"] == 0
    assert res["sha256"] == sha256_file(tmp_path / "out" / "clip.mp4")
    assert res["faces"] == res["anonymized"] + res["held"] + res["placeholder"] and res["seconds"] > 0
    assert bad["state"] == "failed" and "cannot read video" in bad["error"] and "\n" not in bad["error"]
    assert not stale.exists() and other.exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [other.name, "clip.mp4"]


@pytest.mark.skipif(not CLIP.is_file(), reason="../shared/data not present")
def test_a_warm_worker_carries_no_face_into_the_next_video(tmp_path):
    """MediaPipe tracks across calls in video mode: without a fresh detector per file, the face
    at the end of one video is "found" again in the next one's first frames (a ghost track,
    held / placeholder-covered). The second video must come out as from a fresh worker."""
    from safefm.identity import save_identity
    from safefm.media import VideoReader, VideoWriter
    from safefm.tiny import tiny_identity

    def cut(name: str, start: int, stop: int, dst: Path) -> Path:
        dst.parent.mkdir(exist_ok=True)
        with VideoReader(CLIP.parent / f"{name}.mp4") as r, VideoWriter(dst, r.rate, r.size) as w:
            for i, (f, _) in enumerate(r):
                if i >= stop:
                    break
                if i >= start:
                    w.write(f)
        return dst

    first = cut("liveportrait_d18", 200, 216, tmp_path / "in" / "end_of_d18.mp4")
    second = cut("liveportrait_d20", 0, 8, tmp_path / "in" / "start_of_d20.mp4")
    ident = save_identity(tiny_identity(2), tmp_path / "id.pt")

    worker = _tiny_worker(ident)
    try:
        res = [worker.process(Item(p.name, p, tmp_path / "out" / p.name)) for p in (first, second)]
    finally:
        worker.close()
    assert [(r["frames"], r["faces"], r["held"], r["placeholder"]) for r in res] == [(16, 16, 0, 0), (8, 8, 0, 0)]
