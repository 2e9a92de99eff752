"""``safefm-audit`` and ``safefm-anonymize --audit``: raw frames pasted back into an anonymized
video are found (all of them, nothing else), a clean output passes, and the exit status says so."""

from __future__ import annotations

import json
from itertools import islice

import numpy as np
import pytest

from safefm.audit import AuditConfig, audit_paths, placeholder_share, report_path
from safefm.cli import anonymize as anonymize_cli
from safefm.cli import audit as audit_cli
from safefm.errors import ConfigError
from safefm.eval.baselines import PixelateEngine
from safefm.face.composite import cover_placeholder
from safefm.media import VideoReader, VideoWriter, read_image, write_image
from safefm.results import HELD

from conftest import DATA, needs_data, needs_dlib

CLIP = DATA / "videos" / "liveportrait_d0.mp4"
N_FRAMES = 10
PLANTED = (2, 7, 8)


def _write(path, frames, rate):
    with VideoWriter(path, rate, (frames[0].shape[1], frames[0].shape[0])) as w:
        for f in frames:
            w.write(f)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """(original.mp4, its pixelated video, the same with original frames pasted at PLANTED)."""
    if not CLIP.is_file():
        pytest.skip("../shared/data not present")
    d = tmp_path_factory.mktemp("audit")
    with VideoReader(CLIP) as r:
        frames, rate = [f for f, _ in islice(r, N_FRAMES)], r.rate
    orig = d / "original.mp4"
    _write(orig, frames, rate)
    with VideoReader(orig) as r, PixelateEngine(video=True) as eng:
        decoded, anon = zip(*[(f, eng.process(f, t).image) for f, t in r])
    _write(d / "clean.mp4", list(anon), rate)
    _write(d / "planted.mp4", [decoded[i] if i in PLANTED else a for i, a in enumerate(anon)], rate)
    return orig, d / "clean.mp4", d / "planted.mp4"


@needs_data
@needs_dlib
def test_planted_raw_frames_are_flagged_and_nothing_else(clip, capsys):
    orig, clean, planted = clip
    assert audit_cli.main([str(orig), str(planted)]) == 3
    out = capsys.readouterr().out
    assert out.startswith(f"{len(PLANTED)} of {N_FRAMES} frames match the original person") and "FAIL" in out
    rep = json.loads(report_path(planted).read_text())
    item = rep["items"][0]
    assert [r["frame"] for r in item["uncovered_frames"]] == list(PLANTED)
    assert [r["frame"] for r in item["matched_frames"]] == list(PLANTED)
    assert item["frames_with_face"] == N_FRAMES and rep["passed"] is False
    assert all(r["t"] == pytest.approx(r["frame"] / 25, abs=1e-3) for r in item["uncovered_frames"])
    assert len(item["tracks"]) == 1 and item["tracks"][0]["uncovered"] == len(PLANTED)

    assert audit_cli.main([str(orig), str(clean), "--json", str(clean.with_suffix(".json"))]) == 0
    assert "PASS" in capsys.readouterr().out
    rep = json.loads(clean.with_suffix(".json").read_text())
    assert rep["passed"] and rep["totals"]["matched_frames"] == rep["totals"]["uncovered_frames"] == 0
    assert rep["totals"]["embedded_faces"] == N_FRAMES


class _Leaky:
    """Pixelates every face, but reports frame 3 as held and passes frame 5 through raw."""

    def __init__(self, cfg, video):
        self.eng, self.n = PixelateEngine(video=video), 0

    def process(self, frame, timestamp=None):
        res = self.eng.process(frame, timestamp)
        if self.n == 3:
            res.faces[0].status = HELD
        if self.n == 5:
            res.image = frame.copy()
        self.n += 1
        return res

    def reset(self):
        self.eng.reset()

    def close(self):
        self.eng.close()


@needs_data
@needs_dlib
def test_anonymize_audit_counts_holds_and_finds_the_raw_frame(clip, tmp_path, capsys):
    orig, _, _ = clip
    out = tmp_path / "anon.mp4"
    code = anonymize_cli.main([str(orig), "-o", str(out), "--audit", "-q"],
                              engine_factory=lambda cfg, video=True, **kw: _Leaky(cfg, video))
    assert code == 3
    assert "1 held" in capsys.readouterr().out
    rep = json.loads(report_path(out).read_text())
    assert rep["statuses"] == "engine" and rep["totals"]["held_frames"] == 1
    assert [r["frame"] for r in rep["items"][0]["uncovered_frames"]] == [5]


@needs_data
@needs_dlib
def test_photo_folder_placeholder_passes_and_missing_output_is_listed(tmp_path):
    src, dst = tmp_path / "in", tmp_path / "out"
    src.mkdir(), dst.mkdir()
    people = sorted(p for p in (DATA / "lfw").iterdir() if p.is_dir())[:2]
    a, b = (read_image(next(p.glob("*.jpg"))) for p in people)
    write_image(src / "a.png", a)
    write_image(src / "b.png", b)
    covered = cover_placeholder(a, (60, 60, 190, 200))
    write_image(dst / "a.png", covered)
    rep = audit_paths(src, dst)
    assert rep["passed"] and rep["totals"]["placeholder_frames"] == 1
    assert rep["totals"]["missing_outputs"] == ["b.png"] and rep["totals"]["frames"] == 1
    assert placeholder_share(covered, (100, 100, 150, 150)) > 0.5 and placeholder_share(a, (100, 100, 150, 150)) < 0.5


def test_bad_settings_are_one_error_line(tmp_path, capsys):
    with pytest.raises(ConfigError):
        AuditConfig(stride=0)
    assert audit_cli.main([str(tmp_path / "nope.mp4"), str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: original not found") and err.count("\n") == 1
    write_image(tmp_path / "a.png", np.zeros((8, 8, 3), np.uint8))
    assert audit_cli.main([str(tmp_path / "a.png"), str(tmp_path / "a.png"), "--stride", "0"]) == 1
    assert "stride" in capsys.readouterr().err


@needs_data
def test_videos_of_different_length_are_refused(clip, tmp_path, capsys):
    orig, clean, _ = clip
    with VideoReader(clean) as r:
        frames, rate = [f for f, _ in r][:-1], r.rate
    short = tmp_path / "short.mp4"
    _write(short, frames, rate)
    assert audit_cli.main([str(orig), str(short), "--stride", "50"]) == 1
    assert "differ in length" in capsys.readouterr().err
