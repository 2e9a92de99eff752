"""Output sinks: the virtual camera (pyvirtualcam) and the recorder (PyAV).

Device discovery is per platform:

- Linux: the v4l2loopback device whose card label is ``SAFE-FM Camera``
  (``/sys/class/video4linux/videoN/name``); ``--device /dev/videoN`` overrides.
- Windows: the Unity Capture device named ``SAFE-FM Camera`` when present, else OBS.
- macOS: the OBS virtual camera.
"""

from __future__ import annotations

import logging
import os
import platform
import re
from fractions import Fraction
from pathlib import Path

import numpy as np

from ..errors import DeviceError, InputError
from .pipeline import OutFrame

log = logging.getLogger("safefm.live")

CARD_LABEL = "SAFE-FM Camera"
SYSFS_V4L2 = Path("/sys/class/video4linux")
MODPROBE_CMD = ('sudo modprobe v4l2loopback devices=1 video_nr=10 '
                'card_label="SAFE-FM Camera" exclusive_caps=1')


def find_loopback_device(label: str = CARD_LABEL, sysfs: Path | None = None) -> str | None:
    """``/dev/videoN`` of the first video4linux device whose card label is ``label``."""
    root = Path(sysfs) if sysfs is not None else SYSFS_V4L2
    if not root.is_dir():
        return None

    def number(p: Path) -> int:
        m = re.search(r"(\d+)$", p.name)
        return int(m.group(1)) if m else 1 << 30

    for dev in sorted(root.glob("video*"), key=number):
        try:
            name = (dev / "name").read_text().strip()
        except OSError:
            continue
        if name == label:
            return f"/dev/{dev.name}"
    return None


def missing_vcam_message(system: str) -> str:
    """The one-line error when no virtual camera exists on ``system``."""
    alt = "or run with --preview and/or --record out.mp4 (--no-vcam skips the virtual camera)"
    if system == "Linux":
        return (f'no "{CARD_LABEL}" virtual camera (v4l2loopback) found; create it with: '
                f"{MODPROBE_CMD} -- {alt}")
    if system == "Windows":
        return ("no virtual camera found; install OBS Studio (Virtual Camera) or Unity Capture "
                f'registered as "{CARD_LABEL}" -- {alt}')
    return f"no virtual camera found; install OBS Studio 27+ and start its Virtual Camera once -- {alt}"


def vcam_candidates(system: str | None = None, device: str | None = None,
                    sysfs: Path | None = None) -> list[tuple[str, str | None]]:
    """(pyvirtualcam backend, device) pairs to try in order; raises DeviceError when none."""
    system = system or platform.system()
    if system == "Linux":
        dev = device or find_loopback_device(sysfs=sysfs)
        if dev is None:
            raise DeviceError(missing_vcam_message(system))
        return [("v4l2loopback", dev)]
    if system == "Windows":
        if device:
            return [("obs", device)] if "obs" in device.lower() else [("unitycapture", device)]
        return [("unitycapture", CARD_LABEL), ("obs", None)]
    if system == "Darwin":
        return [("obs", device)]
    raise DeviceError(f"virtual cameras are not supported on {system}; use --preview or --record")


class VirtualCamSink:
    """Sends RGB frames to a pyvirtualcam.Camera; the first candidate that opens wins."""

    def __init__(self, width: int, height: int, fps: float,
                 candidates: list[tuple[str, str | None]], system: str | None = None) -> None:
        try:
            import pyvirtualcam
        except Exception as exc:   # pragma: no cover - pyvirtualcam is a dependency
            raise DeviceError(f"pyvirtualcam is not usable: {exc}") from None
        errors = []
        self.cam = None
        from pyvirtualcam.camera import BACKENDS
        for backend, device in candidates:
            if backend not in BACKENDS:
                errors.append(f"{backend}: backend not available on this system")
                continue
            try:
                self.cam = pyvirtualcam.Camera(width, height, fps, fmt=pyvirtualcam.PixelFormat.RGB,
                                               device=device, backend=backend)
                break
            except Exception as exc:
                errors.append(f"{backend}: {' '.join(str(exc).split())}")
        if self.cam is None:
            detail = "; ".join(errors)
            system = system or platform.system()
            if system == "Linux":
                raise DeviceError(f"cannot open virtual camera {candidates[0][1]} ({detail}); "
                                  f"if it is missing or busy, (re)create it with: {MODPROBE_CMD}")
            raise DeviceError(f"{missing_vcam_message(system)} ({detail})")
        log.info("virtual camera: %s (%s) %dx%d @ %.1f fps", self.cam.device, self.cam.backend,
                 width, height, fps)

    @property
    def device(self) -> str:
        return self.cam.device

    def send(self, frame: OutFrame) -> None:
        self.cam.send(frame.image)

    def close(self) -> None:
        if self.cam is not None:
            self.cam.close()
            self.cam = None


class RecorderSink:
    """Writes the output stream to a video file with PyAV (H.264 yuv420p)."""

    def __init__(self, path: str | Path, width: int, height: int, fps: float) -> None:
        import av
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise InputError(f"cannot record to {self.path}: folder does not exist")
        rate = Fraction(fps).limit_denominator(1001)
        try:
            self._box = av.open(str(self.path), "w")
        except Exception as exc:
            raise InputError(f"cannot record to {self.path}: {exc}") from None
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        self._stream = self._box.add_stream(codec, rate=rate)
        self._w, self._h = width - width % 2, height - height % 2   # yuv420p needs even sizes
        self._stream.width, self._stream.height = self._w, self._h
        self._stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            self._stream.options = {"preset": "veryfast", "crf": "20"}
        self._av, self._time_base = av, 1 / rate
        self.frames = 0

    def send(self, frame: OutFrame) -> None:
        img = np.ascontiguousarray(frame.image[: self._h, : self._w])
        vf = self._av.VideoFrame.from_ndarray(img, format="rgb24")
        vf.pts, vf.time_base = self.frames, self._time_base
        for packet in self._stream.encode(vf):
            self._box.mux(packet)
        self.frames += 1

    def close(self) -> None:
        if self._box is None:
            return
        try:
            for packet in self._stream.encode():
                self._box.mux(packet)
        finally:
            self._box.close()
            self._box = None
            log.info("recorded %d frames to %s", self.frames, self.path)


class NullSink:
    """Counts and discards the output stream (``--record /dev/null``: soak runs, benchmarks)."""

    path = Path(os.devnull)

    def __init__(self) -> None:
        self.frames = 0

    def send(self, frame: OutFrame) -> None:
        self.frames += 1

    def close(self) -> None:
        pass
