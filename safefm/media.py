"""Image and video input/output (OpenCV for images, PyAV for videos).

Images are ``uint8`` RGB ``(H, W, 3)`` everywhere. Every writer is atomic: it writes a hidden
temporary file in the destination folder and renames it over the destination only once the
file is complete, so an error or Ctrl-C never leaves a half-written output.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import av
import cv2
import numpy as np

from .errors import InputError, first_line

log = logging.getLogger(__name__)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
VIDEO_EXTS = (".mp4", ".mov", ".m4v", ".mkv", ".avi", ".webm")
# Output video codec per container: (preferred encoder, fallback encoder).
_VIDEO_CODECS = {".mp4": ("libx264", "mpeg4"), ".mov": ("libx264", "mpeg4"),
                 ".m4v": ("libx264", "mpeg4"), ".mkv": ("libx264", "mpeg4"),
                 ".avi": ("libx264", "mpeg4"), ".webm": ("libvpx-vp9", "libvpx")}
_AUDIO_FALLBACK = {".webm": "libopus"}   # re-encode codec when the source audio can't be copied
_JPEG_QUALITY = 95


def is_image(path) -> bool:
    """True if ``path`` has an image extension (case-insensitive); the file is not opened."""
    return Path(path).suffix.lower() in IMAGE_EXTS


def is_video(path) -> bool:
    """True if ``path`` has a video extension (case-insensitive); the file is not opened."""
    return Path(path).suffix.lower() in VIDEO_EXTS


def _temp_path(path: Path) -> Path:
    """A fresh hidden file beside ``path`` with the same extension (so formats are guessed)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".part{path.suffix}",
                               dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())   # mkstemp makes 0600; outputs get normal permissions
    except (AttributeError, OSError):      # pragma: no cover - Windows
        pass
    os.close(fd)
    return Path(tmp)


def temp_files_for(path) -> list[Path]:
    """The temporary files :func:`_temp_path` may have left beside ``path`` (a process killed
    mid-write cannot remove its own); only this writer's naming matches, nothing else."""
    path = Path(path)
    pattern = re.compile(re.escape(f".{path.stem}.") + r"[a-z0-9_]{8}" + re.escape(f".part{path.suffix}"))
    try:
        return sorted(p for p in path.parent.iterdir() if pattern.fullmatch(p.name))
    except FileNotFoundError:
        return []


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:  # pragma: no cover - e.g. a vanished folder
        log.warning("could not remove temporary file %s: %s", path, exc)


# ---------------------------------------------------------------------------------- images

def read_image(path) -> np.ndarray:
    """Decode an image file to ``(H, W, 3) uint8`` RGB (alpha dropped, grey expanded,
    EXIF orientation applied). Raises :class:`InputError` if missing or undecodable."""
    path = Path(path)
    try:
        data = np.fromfile(path, np.uint8)
    except FileNotFoundError:
        raise InputError(f"image not found: {path}") from None
    except OSError as exc:
        raise InputError(f"cannot read image {path}: {first_line(exc, filename=False)}") from None
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if bgr is None:
        raise InputError(f"cannot read image {path}: not a valid image (corrupt or unsupported)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def write_image(path, rgb: np.ndarray) -> None:
    """Encode ``rgb`` ``(H, W, 3) uint8`` to ``path`` (format from the extension), atomically.

    Raises :class:`InputError` for an unsupported extension or a write failure."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in IMAGE_EXTS:
        raise InputError(f"cannot write {path}: unsupported image extension {path.suffix!r}")
    params = [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY] if ext in (".jpg", ".jpeg") else []
    ok, buf = cv2.imencode(ext, cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR),
                           params)
    if not ok:
        raise InputError(f"cannot encode image for {path}")
    write_bytes_atomic(path, buf.tobytes())


def write_bytes_atomic(path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder + rename."""
    path = Path(path)
    try:
        tmp = _temp_path(path)
    except OSError as exc:
        raise InputError(f"cannot write {path}: {first_line(exc, filename=False)}") from None
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException as exc:
        _remove_quietly(tmp)
        if isinstance(exc, OSError):
            raise InputError(f"cannot write {path}: {first_line(exc, filename=False)}") from None
        raise


def copy_file_atomic(src, dst) -> None:
    """Byte-for-byte copy of ``src`` to ``dst`` (atomic like :func:`write_bytes_atomic`)."""
    try:
        data = Path(src).read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {src}: {first_line(exc, filename=False)}") from None
    write_bytes_atomic(dst, data)


# ---------------------------------------------------------------------------------- videos

def _open_input(path: Path):
    if not path.exists():
        raise InputError(f"video not found: {path}")
    try:
        return av.open(str(path), "r")
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise InputError(f"cannot read video {path}: {first_line(exc, filename=False)}") from None


class VideoReader:
    """Decode a video's frames in order.

    Iterating yields ``(frame_rgb (H, W, 3) uint8, timestamp_s float)``, timestamps counted
    from the first frame. Attributes: ``fps`` (float), ``rate`` (exact Fraction), ``size``
    ``(W, H)``, ``frame_count`` (container's count or a duration-based estimate, may be 0),
    ``has_audio``. Raises :class:`InputError` if the file cannot be opened or decoded.
    Use as a context manager or call :meth:`close`.
    """

    def __init__(self, path):
        self.path = Path(path)
        self._c = _open_input(self.path)
        if not self._c.streams.video:
            self._c.close()
            raise InputError(f"cannot read video {self.path}: it has no video stream")
        vs = self._c.streams.video[0]
        vs.thread_type = "AUTO"
        self._vs = vs
        rate = vs.average_rate or vs.guessed_rate or vs.base_rate
        self.rate = Fraction(rate) if rate else Fraction(25)
        self.fps = float(self.rate)
        self.size = (vs.codec_context.width, vs.codec_context.height)
        if not all(self.size):
            self._c.close()
            raise InputError(f"cannot read video {self.path}: unknown frame size")
        self.has_audio = bool(self._c.streams.audio)
        self.frame_count = self._estimate_frames()

    def _estimate_frames(self) -> int:
        vs = self._vs
        if vs.frames:
            return int(vs.frames)
        if vs.duration and vs.time_base:
            return int(round(float(vs.duration * vs.time_base) * self.fps))
        if self._c.duration:
            return int(round(self._c.duration / av.time_base * self.fps))
        return 0

    def __iter__(self) -> Iterator[tuple[np.ndarray, float]]:
        t0 = None
        index = 0
        try:
            for frame in self._c.decode(self._vs):
                t = frame.time
                if t is None:
                    t = index / self.fps
                if t0 is None:
                    t0 = t
                index += 1
                yield frame.to_ndarray(format="rgb24"), float(t - t0)
        except av.FFmpegError as exc:
            raise InputError(
                f"cannot read video {self.path}: decoding failed after {index} frames "
                f"({first_line(exc, filename=False)})") from None
        if index == 0:
            raise InputError(f"cannot read video {self.path}: no decodable frames")

    def close(self) -> None:
        self._c.close()

    def __enter__(self) -> "VideoReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _encoder(names: tuple[str, ...]) -> str:
    for name in names:
        try:
            av.Codec(name, "w")
            return name
        except Exception:  # noqa: BLE001 - unknown/unbuilt codec
            continue
    raise InputError(f"no video encoder available (tried {', '.join(names)})")


# Audio codecs copied as-is per output container (others are re-encoded); None: any codec the
# muxer accepts. MP4 is limited to codecs common players decode.
_AUDIO_COPY = {".mp4": {"aac", "mp3", "ac3", "eac3", "alac"},
               ".m4v": {"aac", "mp3", "ac3", "eac3", "alac"},
               ".webm": {"opus", "vorbis"}}


class _AudioTrack:
    """Copies (or, when the output container can't hold its codec, re-encodes to AAC/Opus) the
    first audio stream of ``source`` into ``container``, interleaved with the video by time."""

    def __init__(self, container, source: Path, ext: str):
        self.done = True
        self._in = _open_input(source)
        if not self._in.streams.audio:
            self._in.close()
            return
        self.done = False
        src = self._in.streams.audio[0]
        vids = self._in.streams.video
        # Keep A/V sync: output time 0 is where the source's video started.
        v0 = vids[0] if vids else None
        self._offset = float(v0.start_time * v0.time_base) if v0 and v0.start_time else 0.0
        name = src.codec_context.name
        allowed = _AUDIO_COPY.get(ext, container.supported_codecs)
        self.copy = name in allowed and name in container.supported_codecs
        if self.copy:
            self._out = container.add_stream_from_template(src)
        else:
            codec = _AUDIO_FALLBACK.get(ext, "aac")
            rate = 48000 if codec == "libopus" else (src.codec_context.sample_rate or 48000)
            channels = src.codec_context.layout.nb_channels if src.codec_context.layout else 2
            layout = "mono" if channels == 1 else "stereo"
            self._out = container.add_stream(codec, rate=rate, layout=layout)
            fmts = self._out.codec_context.codec.audio_formats
            self._resampler = av.AudioResampler(format=fmts[0].name if fmts else "fltp",
                                                layout=layout, rate=rate)
            self._rate = rate
            self._next_pts = None
        self._packets = self._in.demux(src)
        self._pending = None

    def _encode(self, container, frame) -> None:
        for rf in self._resampler.resample(frame):
            if self._next_pts is None:
                start = 0.0
                if frame is not None and frame.time is not None:
                    start = max(0.0, frame.time - self._offset)
                self._next_pts = int(round(start * self._rate))
            rf.pts = self._next_pts
            rf.time_base = Fraction(1, self._rate)
            self._next_pts += rf.samples
            container.mux(self._out.encode(rf))

    def _emit(self, container, packet) -> None:
        if self.copy:
            if packet.dts is None:
                return
            if self._offset:
                shift = int(round(self._offset / packet.time_base))
                packet.dts -= shift
                if packet.pts is not None:
                    packet.pts -= shift
            packet.stream = self._out
            container.mux(packet)
        else:
            for frame in packet.decode():
                self._encode(container, frame)

    def pump(self, container, until_s: float | None) -> None:
        """Mux source audio up to ``until_s`` seconds of output time (None: all of it)."""
        if self.done:
            return
        try:
            while True:
                pkt = self._pending if self._pending is not None else next(self._packets, None)
                self._pending = None
                if pkt is None or (pkt.dts is None and pkt.size == 0):   # end of stream
                    self._finish(container)
                    return
                if until_s is not None and pkt.dts is not None:
                    if float(pkt.dts * pkt.time_base) - self._offset > until_s:
                        self._pending = pkt
                        return
                self._emit(container, pkt)
        except av.FFmpegError as exc:
            raise InputError(f"cannot copy audio from {self._in.name}: {first_line(exc, filename=False)}") from None

    def _finish(self, container) -> None:
        if not self.copy:
            if self._next_pts is not None:
                self._encode(container, None)
            container.mux(self._out.encode(None))
        self.close()

    def close(self) -> None:
        if not self.done:
            self.done = True
            self._in.close()


class VideoWriter:
    """Encode RGB frames to a video file at a constant frame rate, atomically.

    ``path``: destination (container from the extension; H.264 ``yuv420p`` with ``libx264``
    when built in, else MPEG-4 Part 2; VP9 for ``.webm``). ``fps``: float or Fraction.
    ``size``: ``(W, H)``. ``audio_from``: a media file whose first audio track is copied
    (re-encoded to AAC/Opus only if the container cannot hold its codec).
    Frames go to a hidden temporary file that :meth:`close` renames to ``path``; :meth:`abort`
    (or leaving a ``with`` block by an exception) deletes it. Raises :class:`InputError`.
    """

    def __init__(self, path, fps, size, audio_from=None, crf: int = 18,
                 preset: str = "veryfast"):
        self.path = Path(path)
        ext = self.path.suffix.lower()
        if ext not in _VIDEO_CODECS:
            raise InputError(f"cannot write {self.path}: unsupported video extension "
                             f"{self.path.suffix!r} (use one of {', '.join(_VIDEO_CODECS)})")
        self.size = (int(size[0]), int(size[1]))
        self.rate = fps if isinstance(fps, Fraction) else Fraction(fps).limit_denominator(1001)
        if self.rate <= 0 or min(self.size) <= 0:
            raise InputError(f"cannot write {self.path}: bad frame rate {fps} or size {size}")
        self.frames = 0
        self._audio = None
        self._closed = False
        try:
            self._tmp = _temp_path(self.path)
        except OSError as exc:
            raise InputError(f"cannot write {self.path}: {first_line(exc, filename=False)}") from None
        try:
            self._c = av.open(str(self._tmp), "w")
            codec = _encoder(_VIDEO_CODECS[ext])
            vs = self._c.add_stream(codec, rate=self.rate)
            vs.width, vs.height = self.size
            odd = self.size[0] % 2 or self.size[1] % 2
            # x264 cannot subsample odd sizes: keep the exact size with 4:4:4 instead.
            vs.pix_fmt = "yuv444p" if (odd and codec == "libx264") else "yuv420p"
            vs.codec_context.time_base = 1 / self.rate
            vs.thread_type = "AUTO"
            if codec == "libx264":
                vs.options = {"crf": str(crf), "preset": preset}
            elif codec == "mpeg4":
                pixels_per_s = self.size[0] * self.size[1] * float(self.rate)
                vs.bit_rate = max(2_000_000, int(pixels_per_s * 0.3))
                vs.options = {"qscale": "3"}
            else:
                vs.options = {"crf": str(crf + 14), "b": "0"}
            self._vs = vs
            if audio_from is not None:
                self._audio = _AudioTrack(self._c, Path(audio_from), ext)
        except BaseException as exc:
            self.abort()
            if isinstance(exc, (av.FFmpegError, OSError, ValueError)):
                raise InputError(f"cannot write {self.path}: {first_line(exc, filename=False)}") from None
            raise

    @property
    def has_audio(self) -> bool:
        return self._audio is not None and hasattr(self._audio, "_packets")

    def write(self, frame_rgb: np.ndarray) -> None:
        """Append one ``(H, W, 3) uint8`` RGB frame of exactly ``size``."""
        if self._closed:
            raise InputError(f"cannot write {self.path}: writer already closed")
        h, w = frame_rgb.shape[:2]
        if (w, h) != self.size or frame_rgb.ndim != 3 or frame_rgb.shape[2] != 3:
            raise ValueError(f"frame of shape {frame_rgb.shape} does not match video size "
                             f"{self.size}")
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame_rgb), format="rgb24")
        frame.pts = self.frames
        frame.time_base = self._vs.codec_context.time_base
        try:
            for packet in self._vs.encode(frame):
                self._c.mux(packet)
            self.frames += 1
            if self._audio is not None:
                self._audio.pump(self._c, float(self.frames / self.rate))
        except av.FFmpegError as exc:
            raise InputError(f"cannot write {self.path}: {first_line(exc, filename=False)}") from None

    def close(self) -> None:
        """Flush, finish the audio, and rename the temporary file to ``path``."""
        if self._closed:
            return
        try:
            if self.frames == 0:
                raise InputError(f"cannot write {self.path}: no frames were written")
            for packet in self._vs.encode(None):
                self._c.mux(packet)
            if self._audio is not None:
                self._audio.pump(self._c, None)
            self._c.close()
            self._closed = True
            os.replace(self._tmp, self.path)
        except BaseException as exc:
            self.abort()
            if isinstance(exc, (av.FFmpegError, OSError)):
                raise InputError(f"cannot write {self.path}: {first_line(exc, filename=False)}") from None
            raise

    def abort(self) -> None:
        """Stop writing and delete the temporary file; ``path`` is left untouched."""
        self._closed = True
        if self._audio is not None:
            self._audio.close()
        c = getattr(self, "_c", None)
        if c is not None:
            try:
                c.close()
            except Exception:  # noqa: BLE001 - closing a broken container
                pass
        _remove_quietly(self._tmp)

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __del__(self):
        if not getattr(self, "_closed", True):
            self.abort()
