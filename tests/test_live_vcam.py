"""Virtual camera discovery (v4l2loopback label, Windows/macOS backends), its one-line
error, the pyvirtualcam sink and the recorder sink."""

from __future__ import annotations

import numpy as np
import pytest
import pyvirtualcam

from safefm.errors import DeviceError, InputError
from safefm.live import vcam
from safefm.live.pipeline import OutFrame
from safefm.live.vcam import (MODPROBE_CMD, RecorderSink, VirtualCamSink, find_loopback_device,
                              vcam_candidates)

EXACT_CMD = 'sudo modprobe v4l2loopback devices=1 video_nr=10 card_label="SAFE-FM Camera" exclusive_caps=1'


def fake_sysfs(root, names):
    for dev, name in names.items():
        (root / dev).mkdir()
        (root / dev / "name").write_text(name + "\n")
    return root


def out(img, i=0):
    return OutFrame(img, i, "anonymized", True, None)


class Backend:
    made: list["Backend"] = []

    def __init__(self, *, width, height, fps, fourcc, device, **kw):
        if device == "missing":
            raise RuntimeError("device missing\nnot found")
        self.args, self.frames, self.closed = (width, height, fps, device), [], 0
        Backend.made.append(self)

    def send(self, frame):
        self.frames.append(frame.copy())

    def close(self):
        self.closed += 1

    def device(self):
        return self.args[3]

    def native_fourcc(self):
        return None


pyvirtualcam.register_backend("safefm-vcam-test", Backend)


def test_finds_the_labelled_loopback_device(tmp_path):
    root = fake_sysfs(tmp_path, {"video0": "Integrated Camera", "video2": "Dummy video device",
                                 "video10": "SAFE-FM Camera", "video11": "SAFE-FM Camera"})
    assert find_loopback_device(sysfs=root) == "/dev/video10"
    assert vcam_candidates("Linux", sysfs=root) == [("v4l2loopback", "/dev/video10")]
    assert vcam_candidates("Linux", device="/dev/video3", sysfs=root) == [("v4l2loopback", "/dev/video3")]


def test_missing_v4l2loopback_prints_the_modprobe_command(tmp_path):
    fake_sysfs(tmp_path, {"video0": "Integrated Camera"})
    assert MODPROBE_CMD == EXACT_CMD
    for root in (tmp_path, tmp_path / "absent"):
        with pytest.raises(DeviceError) as err:
            vcam_candidates("Linux", sysfs=root)
        msg = str(err.value)
        assert EXACT_CMD in msg and "--preview" in msg and "--record" in msg
        assert "\n" not in msg


def test_windows_and_macos_backends():
    assert vcam_candidates("Windows") == [("unitycapture", "SAFE-FM Camera"), ("obs", None)]
    assert vcam_candidates("Windows", device="My Cam") == [("unitycapture", "My Cam")]
    assert vcam_candidates("Windows", device="OBS Virtual Camera") == [("obs", "OBS Virtual Camera")]
    assert vcam_candidates("Darwin") == [("obs", None)]


def test_vcam_sink_drives_pyvirtualcam_and_falls_back():
    sink = VirtualCamSink(32, 24, 30.0, [("safefm-vcam-test", "missing"), ("not-registered", None),
                                         ("safefm-vcam-test", "SAFE-FM Camera")], system="Windows")
    b = Backend.made[-1]
    assert sink.device == "SAFE-FM Camera" and b.args == (32, 24, 30.0, "SAFE-FM Camera")
    img = np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8)
    sink.send(out(img))
    assert np.array_equal(b.frames[0].reshape(24, 32, 3), img)
    sink.close()
    sink.close()
    assert b.closed == 1


def test_vcam_sink_error_is_one_line():
    with pytest.raises(DeviceError) as err:
        VirtualCamSink(32, 24, 30.0, [("safefm-vcam-test", "missing")], system="Linux")
    msg = str(err.value)
    assert "\n" not in msg and "device missing not found" in msg and EXACT_CMD in msg


def test_recorder_writes_a_finished_file(tmp_path):
    import av
    path = tmp_path / "rec.mp4"
    rec = RecorderSink(path, 65, 48, 25.0)          # odd width: cropped to even for yuv420p
    for i in range(12):
        rec.send(out(np.full((48, 65, 3), 20 * i, np.uint8), i))
    rec.close()
    rec.close()
    with av.open(str(path)) as box:
        frames = [f.to_ndarray(format="rgb24") for f in box.decode(video=0)]
    assert len(frames) == 12 and frames[0].shape == (48, 64, 3)
    assert abs(int(frames[5].mean()) - 100) <= 3
    with pytest.raises(InputError):
        RecorderSink(tmp_path / "no" / "such" / "dir.mp4", 64, 48, 25.0)


def test_cli_without_v4l2loopback_prints_the_command(tmp_path, monkeypatch, capsys):
    from safefm.cli import cam
    monkeypatch.setattr(vcam, "SYSFS_V4L2", tmp_path)
    monkeypatch.setattr("platform.system", lambda: "Linux")
    built = []
    rc = cam.main(["--no-tray", "--camera", "7"], engine_factory=lambda *a, **k: built.append(1))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and not built
    assert len(err) == 1 and err[0].startswith("error: ")
    assert EXACT_CMD in err[0] and "--preview" in err[0] and "--record" in err[0]
