"""``safefm-anonymize`` end to end: images, folders and videos come out the way a user expects,
and every error is one line, a non-zero exit, and no output file."""

from __future__ import annotations

import shutil
from pathlib import Path

import av
import numpy as np
import pytest

from safefm.face import composite
from safefm.cli.anonymize import main
from safefm.media import VideoReader, VideoWriter, read_image, write_image
from safefm.paths import shared_data_dir
from safefm.results import ANONYMIZED, FaceResult, FrameResult

DATA = shared_data_dir()
LFW, CLIP = DATA / "lfw", DATA / "videos" / "liveportrait_d0.mp4"
needs_data = pytest.mark.skipif(not (LFW.is_dir() and CLIP.is_file()),
                                reason="../shared/data not present")
PAINT = np.array([60, 200, 60], np.uint8)   # what the fake engine puts over a face


class FakeEngine:
    """Follows the engine contract (process / reset / close -> FrameResult): every face MediaPipe
    FaceMesh finds is covered by a flat green crop through ``safefm.face.composite``."""

    def __init__(self, cfg, video: bool, fail_at: int | None = None, interrupt_at=None):
        import mediapipe as mp

        self.cfg, self.video = cfg, video
        self.fail_at, self.interrupt_at = fail_at, interrupt_at
        self.mesh = mp.solutions.face_mesh.FaceMesh(static_image_mode=not video, max_num_faces=4)
        self.timestamps, self.resets, self.closed = [], 0, False

    def process(self, frame, timestamp=None):
        n = len(self.timestamps)
        if n == self.fail_at:
            raise RuntimeError("generator exploded")
        if n == self.interrupt_at:
            raise KeyboardInterrupt
        self.timestamps.append(timestamp)
        h, w = frame.shape[:2]
        found = self.mesh.process(frame).multi_face_landmarks or []
        out, faces = frame.copy(), []
        crop = np.empty((16, 16, 3), np.uint8)
        crop[:] = PAINT
        for i, face in enumerate(found):
            lm = np.array([[p.x * w, p.y * h, p.z * w] for p in face.landmark], np.float32)
            x0, y0 = lm[:, :2].min(0) - 40
            x1, y1 = lm[:, :2].max(0) + 40
            M_inv = np.array([[(x1 - x0) / 16, 0, x0], [0, (y1 - y0) / 16, y0]])
            composite.paste(out, crop, M_inv, composite.face_mask([lm], frame.shape, 0.08, 0.06),
                            out=out)
            faces.append(FaceResult(i, (int(x0), int(y0), int(x1), int(y1)), ANONYMIZED, lm))
        return FrameResult(out, faces, {})

    def reset(self):
        self.resets += 1

    def close(self):
        self.mesh.close()
        self.closed = True


class Factory:
    """``build_engine``-shaped factory that remembers what it was asked for."""

    def __init__(self, **engine_kw):
        self.engine_kw, self.calls, self.engines = engine_kw, [], []

    def __call__(self, cfg, model_path=None, identity_path=None, video=True):
        self.calls.append(dict(cfg=cfg, model_path=model_path, identity_path=identity_path,
                               video=video))
        self.engines.append(FakeEngine(cfg, video, **self.engine_kw))
        return self.engines[-1]


def run_cli(capsys, *argv, factory=None):
    code = main([str(a) for a in argv] + ["-q"], engine_factory=factory or Factory())
    out, err = capsys.readouterr()
    return code, out, err


def painted(img: np.ndarray, tol: int = 25) -> float:
    """Fraction of pixels that got the fake engine's paint."""
    return float((np.abs(img.astype(int) - PAINT).max(axis=2) <= tol).mean())


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> list[Path]:
    """Two LFW photos with one face each (copied to a tmp folder, never into the repo)."""
    if not LFW.is_dir():
        pytest.skip("../shared/data not present")
    folder = tmp_path_factory.mktemp("faces")
    photos = [next(iter(sorted(d.glob("*.jpg")))) for d in sorted(LFW.iterdir())[:2]]
    return [Path(shutil.copy(p, folder / f"face{i}.jpg")) for i, p in enumerate(photos)]


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """The first second (25 frames) of liveportrait_d0 plus a 1 s synthetic tone track."""
    if not CLIP.is_file():
        pytest.skip("../shared/data not present")
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    with av.open(str(CLIP)) as src, av.open(str(path), "w") as dst:
        vin = src.streams.video[0]
        v = dst.add_stream("libx264", rate=vin.average_rate)
        v.width, v.height, v.pix_fmt = vin.width, vin.height, "yuv420p"
        a = dst.add_stream("aac", rate=44100, layout="stereo")
        for i, frame in enumerate(src.decode(vin)):
            if i == 25:
                break
            for p in v.encode(av.VideoFrame.from_ndarray(frame.to_ndarray(format="rgb24"),
                                                         format="rgb24")):
                dst.mux(p)
        for p in v.encode(None):
            dst.mux(p)
        tone = (0.2 * np.sin(2 * np.pi * 330 * np.arange(44100) / 44100)).astype(np.float32)
        af = av.AudioFrame.from_ndarray(np.stack([tone, tone]), format="fltp", layout="stereo")
        af.sample_rate, af.pts = 44100, 0
        for p in a.encode(af):
            dst.mux(p)
        for p in a.encode(None):
            dst.mux(p)
    return path


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ------------------------------------------------------------------------------ success

@needs_data
def test_image(tmp_path, capsys, faces):
    factory = Factory()
    ident = tmp_path / "id.pt"
    ident.write_bytes(b"identity")
    code, out, err = run_cli(capsys, faces[0], "-o", tmp_path / "anon.png", "--identity", ident,
                             "--steps", 3, factory=factory)
    assert code == 0, err
    src, res = read_image(faces[0]), read_image(tmp_path / "anon.png")
    assert res.shape == src.shape
    assert painted(src) < 0.01 < 0.1 < painted(res)
    call, engine = factory.calls[0], factory.engines[0]
    assert call["video"] is False and call["identity_path"] == str(ident)
    assert call["cfg"].steps == 3 and engine.resets == 1 and engine.closed
    assert "1 image" in out and "1 anonymized, 0 failed" in out
    # An existing OUTPUT folder receives the input's file name.
    (tmp_path / "dir").mkdir()
    assert run_cli(capsys, faces[0], "-o", tmp_path / "dir")[0] == 0
    assert files_in(tmp_path / "dir") == ["face0.jpg"]


@needs_data
def test_folder_same_names_no_face_copied_others_skipped(tmp_path, capsys, faces):
    src = tmp_path / "in"
    src.mkdir()
    for p in faces:
        shutil.copy(p, src / p.name)
    write_image(src / "wall.png", np.tile(np.linspace(40, 220, 120, dtype=np.uint8)[None, :, None],
                                          (90, 1, 3)))
    (src / "notes.txt").write_text("not an image")
    (src / "sub").mkdir()
    factory = Factory()
    code, out, err = run_cli(capsys, src, "-o", tmp_path / "out", factory=factory)
    assert code == 0, err
    assert files_in(tmp_path / "out") == ["face0.jpg", "face1.jpg", "wall.png"]
    assert (tmp_path / "out" / "wall.png").read_bytes() == (src / "wall.png").read_bytes()
    for p in faces:
        assert painted(read_image(tmp_path / "out" / p.name)) > 0.1
    assert factory.engines[0].resets == 3          # reset between unrelated images
    assert "3 images" in out and "2 anonymized" in out
    assert "no faces, copied unchanged (1): wall.png" in out
    assert "skipped, not images (2): notes.txt, sub/" in out


@needs_data
def test_video_keeps_frames_rate_size_and_audio(tmp_path, capsys, clip):
    factory = Factory()
    code, out, err = run_cli(capsys, clip, "-o", tmp_path / "anon.mp4", factory=factory)
    assert code == 0, err
    assert factory.calls[0]["video"] is True
    stamps = factory.engines[0].timestamps
    assert np.allclose(stamps, np.arange(25) / 25)      # in order, with their timestamps
    with VideoReader(clip) as a, VideoReader(tmp_path / "anon.mp4") as b:
        assert (b.size, b.rate, b.has_audio) == (a.size, a.rate, True)
        frames = [f for f, _ in b]
    assert len(frames) == 25 and all(painted(f) > 0.05 for f in frames)
    with av.open(str(tmp_path / "anon.mp4")) as c:
        audio = c.streams.audio[0]
        assert audio.codec_context.name == "aac"
        assert float(audio.duration * audio.time_base) == pytest.approx(1.0, abs=0.05)
    assert "frames: 25 (0 without faces)" in out and "25 anonymized, 0 failed" in out
    assert files_in(tmp_path) == ["anon.mp4"]


@pytest.mark.slow
@needs_data
def test_tiny_engine_image_and_video(tmp_path, capsys, faces, clip):
    try:
        from safefm.tiny import tiny_engine
    except ImportError as exc:   # the engine is not in this checkout yet
        pytest.skip(f"safefm.tiny not importable: {exc}")

    def factory(cfg, model_path=None, identity_path=None, video=True):
        return tiny_engine(cfg, video=video)

    code, out, err = run_cli(capsys, faces[0], "-o", tmp_path / "a.jpg", "--runtime", "torch",
                             factory=factory)
    assert code == 0, err
    src, res = read_image(faces[0]), read_image(tmp_path / "a.jpg")
    assert res.shape == src.shape and np.abs(res.astype(int) - src).mean() > 3
    short = tmp_path / "short.mp4"
    with VideoReader(clip) as r, VideoWriter(short, r.rate, r.size, audio_from=clip) as w:
        for i, (f, _) in enumerate(r):
            if i == 6:
                break
            w.write(f)
    code, out, err = run_cli(capsys, short, "-o", tmp_path / "b.mp4", "--runtime", "torch",
                             factory=factory)
    assert code == 0, err
    with VideoReader(tmp_path / "b.mp4") as b:
        assert b.size == (512, 512) and b.has_audio and len(list(b)) == 6
    assert "failed" in out


# ------------------------------------------------------------------------------ errors

def test_unreadable_inputs(tmp_path, capsys):
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 broken")
    (tmp_path / "bad.mp4").write_bytes(b"\x00 junk " * 64)
    factory = Factory()
    for name, out_name, words in [("bad.jpg", "o.jpg", "not a valid image"),
                                  ("bad.mp4", "o.mp4", "cannot read video"),
                                  ("missing.png", "o.png", "input not found"),
                                  ("bad.mp4", "o.jpg", "must be a video file")]:
        code, _, err = run_cli(capsys, tmp_path / name, "-o", tmp_path / out_name,
                               factory=factory)
        assert code != 0 and words in one_error_line(err)
        assert not (tmp_path / out_name).exists()
    assert factory.calls == []                      # failed before loading anything
    assert files_in(tmp_path) == ["bad.jpg", "bad.mp4"]


def test_missing_identity_or_model(tmp_path, capsys):
    write_image(tmp_path / "in.png", np.zeros((32, 32, 3), np.uint8))
    for flag, words in [("--identity", "identity file not found"),
                        ("--model", "model file not found")]:
        code, _, err = run_cli(capsys, tmp_path / "in.png", "-o", tmp_path / "out.png", flag,
                               tmp_path / "nope.pt")
        assert code != 0 and words in one_error_line(err)
    assert files_in(tmp_path) == ["in.png"]


def test_bad_runtime_option_is_one_line(tmp_path, capsys):
    write_image(tmp_path / "in.png", np.zeros((32, 32, 3), np.uint8))
    code, _, err = run_cli(capsys, tmp_path / "in.png", "-o", tmp_path / "out.png",
                           "--steps", 0)
    assert code != 0 and "steps must be in 1..50" in one_error_line(err)
    assert files_in(tmp_path) == ["in.png"]


def test_output_must_not_replace_input_or_existing_files(tmp_path, capsys):
    img = np.full((40, 40, 3), 90, np.uint8)
    write_image(tmp_path / "in.png", img)
    before = (tmp_path / "in.png").read_bytes()
    for argv, words in [(("in.png", "-o", "in.png", "--overwrite"), "is the input file"),
                        ((".", "-o", ".", "--overwrite"), "is the input folder")]:
        code, _, err = run_cli(capsys, *[tmp_path / a if a != "-o" and not a.startswith("--")
                                         else a for a in argv])
        assert code != 0 and words in one_error_line(err)
    assert (tmp_path / "in.png").read_bytes() == before
    (tmp_path / "out.png").write_bytes(b"keep me")
    code, _, err = run_cli(capsys, tmp_path / "in.png", "-o", tmp_path / "out.png")
    assert code != 0 and "--overwrite" in one_error_line(err)
    assert (tmp_path / "out.png").read_bytes() == b"keep me"
    code, out, err = run_cli(capsys, tmp_path / "in.png", "-o", tmp_path / "out.png",
                             "--overwrite")
    assert code == 0, err
    assert np.array_equal(read_image(tmp_path / "out.png"), img)   # no face: unchanged
    # Folder into a folder that already holds one of the names.
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "in.png").write_bytes(b"old")
    code, _, err = run_cli(capsys, tmp_path, "-o", tmp_path / "o")
    assert code != 0 and "output exists" in one_error_line(err)
    assert (tmp_path / "o" / "in.png").read_bytes() == b"old"


@needs_data
def test_engine_failure_or_ctrl_c_mid_video_leaves_no_output(tmp_path, capsys, clip):
    code, _, err = run_cli(capsys, clip, "-o", tmp_path / "x.mp4",
                           factory=Factory(fail_at=5))
    assert code == 1 and "generator exploded" in one_error_line(err)
    code, _, err = run_cli(capsys, clip, "-o", tmp_path / "x.mp4",
                           factory=Factory(interrupt_at=3))
    assert code == 130 and one_error_line(err) == "error: interrupted"
    assert files_in(tmp_path) == []


@needs_data
def test_unreadable_image_in_folder_is_reported_and_others_written(tmp_path, capsys, faces):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(faces[0], src / "a.jpg")
    (src / "b.jpg").write_bytes(b"garbage")
    code, out, err = run_cli(capsys, src, "-o", tmp_path / "out")
    assert code == 1
    assert err.strip().splitlines()[-1] == "error: 1 of 2 images could not be read: b.jpg"
    assert files_in(tmp_path / "out") == ["a.jpg"]
    assert "unreadable, not written (1): b.jpg" in out
