"""Image/video I/O: round trips keep what a viewer notices; failures leave no file behind."""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest

from safefm.errors import InputError
from safefm.media import VideoReader, VideoWriter, is_image, is_video, read_image, write_image


def pattern(i: int, w: int, h: int) -> np.ndarray:
    """A smooth moving test pattern (H, W, 3) uint8 that survives lossy coding."""
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    img = np.stack([128 + 100 * np.sin((xx + 3 * i) / 9), 128 + 100 * np.cos((yy - 2 * i) / 11),
                    np.full_like(xx, 40 + 10 * i)], -1)
    return img.clip(0, 255).astype(np.uint8)


def make_video(path, n=12, fps=12, size=(96, 64), audio="aac", rate=44100) -> None:
    """Write a test clip with PyAV directly: ``n`` frames + ``n / fps`` s of a 440 Hz tone."""
    c = av.open(str(path), "w")
    v = c.add_stream("libx264", rate=fps)
    v.width, v.height = size
    v.pix_fmt = "yuv420p"
    layout = "mono" if audio and audio.startswith("pcm") else "stereo"
    a = c.add_stream(audio, rate=rate, layout=layout) if audio else None
    for i in range(n):
        for p in v.encode(av.VideoFrame.from_ndarray(pattern(i, *size), format="rgb24")):
            c.mux(p)
    for p in v.encode(None):
        c.mux(p)
    if a is not None:
        t = np.arange(int(rate * n / fps)) / rate
        tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
        fmt = a.codec_context.codec.audio_formats[0].name
        if fmt == "s16":   # packed PCM
            data = (tone * 32767).astype(np.int16)[None]
            frame = av.AudioFrame.from_ndarray(data, format="s16", layout="mono")
        else:
            frame = av.AudioFrame.from_ndarray(np.stack([tone, tone]), format=fmt, layout="stereo")
        frame.sample_rate, frame.pts = rate, 0
        for p in a.encode(frame):
            c.mux(p)
        for p in a.encode(None):
            c.mux(p)
    c.close()


def probe(path) -> dict:
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        info = {"size": (v.width, v.height), "rate": v.average_rate,
                "frames": [f.to_ndarray(format="rgb24") for f in c.decode(v)]}
    with av.open(str(path)) as c:
        info["audio"] = [(s.codec_context.name, s.codec_context.sample_rate,
                          float(s.duration * s.time_base) if s.duration else None)
                         for s in c.streams.audio]
    return info


def psnr(a, b) -> float:
    mse = np.mean((a.astype(np.float64) - b) ** 2)
    return 99.0 if mse == 0 else 10 * np.log10(255 ** 2 / mse)


def leftovers(folder, keep=()) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


def test_kinds_by_extension():
    assert is_image("a/B.JPG") and is_image("x.png") and not is_image("x.mp4")
    assert is_video("clip.MOV") and is_video("c.mp4") and not is_video("c.txt")


def test_image_round_trip_is_atomic(tmp_path):
    img = pattern(3, 80, 60)
    write_image(tmp_path / "a.png", img)
    assert np.array_equal(read_image(tmp_path / "a.png"), img)      # PNG is lossless
    write_image(tmp_path / "b.jpg", img)
    back = read_image(tmp_path / "b.jpg")
    assert back.shape == img.shape and psnr(back, img) > 30
    write_image(tmp_path / "a.png", img[::-1].copy())                # replaces the old file
    assert np.array_equal(read_image(tmp_path / "a.png"), img[::-1])
    assert leftovers(tmp_path) == ["a.png", "b.jpg"]                 # no temp files remain


def test_image_errors_are_one_line(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    for path, words in [(tmp_path / "bad.jpg", "not a valid image"),
                        (tmp_path / "missing.png", "not found")]:
        with pytest.raises(InputError, match=words) as info:
            read_image(path)
        assert "\n" not in str(info.value) and path.name in str(info.value)
    with pytest.raises(InputError, match="unsupported image extension"):
        write_image(tmp_path / "out.xyz", pattern(0, 8, 8))
    assert leftovers(tmp_path) == ["bad.jpg"]


def test_video_round_trip_keeps_size_rate_frames_and_audio(tmp_path):
    src, dst = tmp_path / "in.mp4", tmp_path / "out.mp4"
    make_video(src)
    with VideoReader(src) as r:
        assert (r.size, r.fps, r.rate, r.frame_count, r.has_audio) == ((96, 64), 12.0, 12, 12, True)
        with VideoWriter(dst, r.rate, r.size, audio_from=src) as w:
            stamps = []
            for frame, t in r:
                w.write(frame)
                stamps.append(t)
    assert np.allclose(stamps, np.arange(12) / 12)
    a, b = probe(src), probe(dst)
    assert b["size"] == (96, 64) and b["rate"] == 12 and len(b["frames"]) == 12
    assert min(psnr(x, y) for x, y in zip(a["frames"], b["frames"])) > 30
    assert b["audio"] == a["audio"] and b["audio"][0][0] == "aac"
    assert b["audio"][0][2] == pytest.approx(1.0, abs=0.05)
    assert leftovers(tmp_path) == ["in.mp4", "out.mp4"]


def test_audio_the_container_cannot_hold_is_reencoded(tmp_path):
    src, dst = tmp_path / "in.mov", tmp_path / "out.mp4"
    make_video(src, audio="pcm_s16le", rate=16000)
    with VideoReader(src) as r, VideoWriter(dst, r.fps, r.size, audio_from=src) as w:
        for frame, _ in r:
            w.write(frame)
    out = probe(dst)
    assert len(out["frames"]) == 12 and out["rate"] == 12
    (codec, rate, duration), = out["audio"]
    assert codec == "aac" and rate == 16000 and duration == pytest.approx(1.0, abs=0.1)


def test_odd_size_and_ntsc_rate_are_kept(tmp_path):
    dst = tmp_path / "odd.mp4"
    with VideoWriter(dst, 30000 / 1001, (65, 49)) as w:
        for i in range(5):
            w.write(pattern(i, 65, 49))
    with VideoReader(dst) as r:
        assert r.size == (65, 49) and r.rate == Fraction(30000, 1001) and not r.has_audio
        assert len(list(r)) == 5


def test_unreadable_videos_raise_input_error(tmp_path):
    (tmp_path / "junk.mp4").write_bytes(b"\x00\x01 definitely not a video " * 100)
    (tmp_path / "empty.mp4").write_bytes(b"")
    for name in ("junk.mp4", "empty.mp4", "missing.mp4"):
        with pytest.raises(InputError) as info:
            VideoReader(tmp_path / name)
        assert str(info.value).count(name) == 1 and "\n" not in str(info.value)   # the reason does not repeat it


def test_aborted_or_empty_write_leaves_nothing(tmp_path):
    dst = tmp_path / "out.mp4"
    with pytest.raises(RuntimeError):
        with VideoWriter(dst, 12, (96, 64)) as w:
            for i in range(3):
                w.write(pattern(i, 96, 64))
            raise RuntimeError("engine failed")
    assert leftovers(tmp_path) == []
    with pytest.raises(InputError, match="no frames"):
        VideoWriter(dst, 12, (96, 64)).close()
    assert leftovers(tmp_path) == []
    # An existing file is only replaced by a complete one.
    dst.write_bytes(b"old")
    w = VideoWriter(dst, 12, (96, 64))
    w.write(pattern(0, 96, 64))
    with pytest.raises(ValueError):
        w.write(pattern(0, 32, 32))                 # wrong size: refused
    w.abort()
    assert dst.read_bytes() == b"old" and leftovers(tmp_path) == ["out.mp4"]
    with pytest.raises(InputError, match="unsupported video extension"):
        VideoWriter(tmp_path / "x.gif", 12, (96, 64))
