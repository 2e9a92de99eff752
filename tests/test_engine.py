"""The per-frame pipeline on real frames with tiny random models, and its fail-closed policy.

Every check on privacy compares output pixels with the input's: inside the real face's oval,
(almost) no pixel may leave unchanged while anonymizing.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch

from safefm.config import load_runtime_config
from safefm.face.composite import face_mask
from safefm.face.landmarks import FaceMeshDetector
from safefm.results import ANONYMIZED, HELD, PLACEHOLDER
from safefm.tiny import tiny_engine

from conftest import needs_data


def face_region(frame: np.ndarray) -> np.ndarray:
    """(H, W) bool: the face oval of the (first) face MediaPipe finds on the clean input."""
    with FaceMeshDetector(max_faces=1, static_image=True) as det:
        faces = det.detect(frame)
    assert faces, "test clip should show a face"
    return face_mask([faces[0]], frame.shape[:2], 0.0, 0.0) > 0.99


def raw_fraction(out: np.ndarray, inp: np.ndarray, region: np.ndarray) -> float:
    """Share of region pixels whose colour left (nearly) unchanged: the raw-face leak."""
    same = np.abs(out.astype(int) - inp.astype(int)).max(axis=2) <= 2
    return float(same[region].mean()) if region.any() else 0.0


@pytest.fixture(scope="module")
def regions(clip_frames):
    return [face_region(f) for f in clip_frames[:1]] * len(clip_frames)


@needs_data
def test_every_frame_is_anonymized_and_the_face_replaced(clip_frames):
    eng = tiny_engine(seed=0)
    region = face_region(clip_frames[0])
    tracks = set()
    for i, f in enumerate(clip_frames[:12]):
        res = eng.process(f, i / 25)
        assert res.image.shape == f.shape and res.image.dtype == np.uint8
        assert [x.status for x in res.faces] == [ANONYMIZED]
        tracks.add(res.faces[0].track_id)
        assert raw_fraction(res.image, f, face_region(f) if i % 6 == 0 else region) < 0.05
    assert len(tracks) == 1  # one face, one track id across the clip
    # far from the face, the frame is untouched
    assert np.array_equal(res.image[:8, :8], clip_frames[11][:8, :8])
    eng.close()


def _slowed(fn, seconds):
    def slow(*args, **kwargs):
        time.sleep(seconds)
        return fn(*args, **kwargs)
    return slow


@needs_data
@pytest.mark.parametrize("stage, method", [("generator", "generate"), ("decode", "decode")])
def test_timings_name_the_slow_stage_and_add_up_to_the_frame(clip_frames, monkeypatch, stage, method):
    """A stubbed slow generator (decoder) shows up under its own name, and the stages reported
    account for the frame's time without counting any twice."""
    eng = tiny_engine(load_runtime_config(runtime="torch", identity_repel=0.0), seed=0)
    eng.process(clip_frames[0], 0.0)                       # lazy set-up out of the way
    monkeypatch.setattr(eng.gen, method, _slowed(getattr(eng.gen, method), 0.25))
    t = time.perf_counter()
    res = eng.process(clip_frames[1], 0.04)
    wall = time.perf_counter() - t
    stages = {k: v for k, v in res.timings.items() if k != "generator_steps"}
    assert stages[stage] >= 0.25 and max(stages, key=stages.get) == stage
    assert 0.8 * wall <= sum(stages.values()) <= wall
    eng.close()


@needs_data
def test_warm_start_takes_fewer_steps_from_the_previous_face(clip_frames, monkeypatch):
    """warm_start: a track's first frame is cold (4 network calls); the next starts from the
    previous latent at t0 = 0.5 (2 calls): another previous face, another output."""
    cfg = load_runtime_config(runtime="torch", identity_repel=0.0, steps=4, warm_t0=0.5)
    warm = tiny_engine(dataclasses.replace(cfg, warm_start=True), seed=0)
    cold = tiny_engine(dataclasses.replace(cfg, warm_start=False), seed=0)
    calls, velocity = [], warm.gen.backend.velocity

    def counted(cond, tokens):
        v = velocity(cond, tokens)
        return lambda z, t: calls.append(t) or v(z, t)
    monkeypatch.setattr(warm.gen.backend, "velocity", counted)

    f0, f1 = clip_frames[:2]
    w0, c0 = warm.process(f0, 0.0), cold.process(f0, 0.0)
    assert np.array_equal(w0.image, c0.image)          # first frame of a track: a cold start
    assert w0.timings["generator_steps"] == len(calls) == 4
    (st,) = warm._states.values()
    st.z_prev = -st.z_prev                              # a very different previous face
    calls.clear()
    w1, c1 = warm.process(f1, 0.04), cold.process(f1, 0.04)
    assert w1.timings["generator_steps"] == len(calls) == 2
    region = face_region(f1)
    assert np.abs(w1.image.astype(int) - c1.image.astype(int))[region].mean() > 3  # ignored: 0
    warm.close()
    cold.close()


class Faults:
    """Injects faults into the engine's generator stage on chosen frames."""

    def __init__(self, raise_on=(), nan_on=()):
        self.frame, self.raise_on, self.nan_on = 0, set(raise_on), set(nan_on)

    def __call__(self, stage, track_id, value):
        if stage == "generate" and self.frame in self.raise_on:
            raise RuntimeError("injected generator failure")
        if stage == "latent" and self.frame in self.nan_on:
            return torch.full_like(value, float("nan"))
        return value


@needs_data
@pytest.mark.parametrize("kind", ["raise", "nan"])
def test_generator_faults_never_leak_the_face(clip_frames, kind):
    faults = Faults(raise_on={3, 4, 5} if kind == "raise" else (), nan_on={3, 4, 5} if kind == "nan" else ())
    eng = tiny_engine(seed=1)
    eng.fault_injector = faults
    region = face_region(clip_frames[0])
    statuses = []
    for i, f in enumerate(clip_frames[:8]):
        faults.frame = i
        res = eng.process(f, i / 25)
        statuses.append(res.faces[0].status)
        assert raw_fraction(res.image, f, region) < 0.05, f"frame {i} leaked the raw face"
    assert statuses[:3] == [ANONYMIZED] * 3
    assert statuses[3:6] == [HELD] * 3           # covered by the last synthetic face
    assert statuses[6:] == [ANONYMIZED] * 2      # and back to normal


@needs_data
def test_failure_before_the_first_good_frame_gives_the_placeholder(clip_frames):
    eng = tiny_engine(seed=2)
    eng.fault_injector = Faults(raise_on={0, 1})
    region = face_region(clip_frames[0])
    for i in range(2):
        eng.fault_injector.frame = i
        res = eng.process(clip_frames[i], i / 25)
        assert res.faces[0].status == PLACEHOLDER and "injected" in res.faces[0].reason
        assert raw_fraction(res.image, clip_frames[i], region) < 0.02


@needs_data
def test_occluded_and_leaving_face_never_leaves_raw(clip_frames):
    """The face is progressively covered by a bar, then slides out of the frame."""
    eng = tiny_engine(seed=3)
    base = clip_frames[0]
    region0 = face_region(base)
    ys, xs = np.nonzero(region0)
    y0, y1 = ys.min(), ys.max()
    for i in range(30):
        f = clip_frames[i % len(clip_frames)].copy()
        region = region0.copy()
        if 8 <= i < 18:  # a hand-like bar covers more and more of the face
            cover = y0 + int((y1 - y0) * (i - 7) / 10)
            f[y0:cover] = (40, 30, 20)
            region[y0:cover] = False
        elif i >= 18:  # the face slides out to the left
            shift = int((i - 17) * base.shape[1] / 12)
            f = np.roll(f, -shift, axis=1)
            f[:, f.shape[1] - shift:] = 0
            region = np.roll(region0, -shift, axis=1)
            region[:, region.shape[1] - shift:] = False
        res = eng.process(f, i / 25)
        assert raw_fraction(res.image, f, region) < 0.05, f"frame {i}: raw face pixels left ({[x.status for x in res.faces]})"


@needs_data
def test_reset_forgets_tracks(clip_frames):
    eng = tiny_engine(seed=0)
    for i in range(3):
        eng.process(clip_frames[i], i / 25)
    (state,) = eng._states.values()
    assert state.good_frames == 3 and state.z_prev is not None
    eng.reset()
    eng.process(clip_frames[3])
    (state,) = eng._states.values()
    assert state.good_frames == 1  # nothing from before the reset is kept


def test_frame_without_face_is_returned_unchanged():
    eng = tiny_engine(seed=0, video=False)
    blank = np.full((120, 160, 3), 90, np.uint8)
    res = eng.process(blank)
    assert res.faces == [] and np.array_equal(res.image, blank)


def test_warmup_runs_the_model_without_touching_the_stream(clip_frames):
    warm, cold = tiny_engine(seed=0), tiny_engine(seed=0)
    assert warm.warmup() > 0 and not warm._states and warm._frame_index == 0
    for i, f in enumerate(clip_frames[:3]):            # same frames out as an engine never warmed
        assert np.array_equal(warm.process(f, i / 25).image, cold.process(f, i / 25).image)


@needs_data
def test_real_hair_over_the_forehead_stays_and_nothing_below_the_brows_does():
    """keep_hair: a fringe hanging over the face stays the person's own hair (no straight cut of
    painted forehead across it); the face below the brows is replaced exactly as without it."""
    from conftest import VIDEOS, read_frames
    from safefm.face.retarget import BROWS

    frames = read_frames(VIDEOS / "liveportrait_d9.mp4", 3, step=10)    # a man with a fringe down to his brows
    with FaceMeshDetector(max_faces=1, static_image=True) as det:
        lm = det.detect(frames[-1])[0]
    below = np.zeros(frames[-1].shape[:2], bool)
    below[int(lm[list(BROWS), 1].max()):] = True
    outs = {}
    for keep in (False, True):
        eng = tiny_engine(dataclasses.replace(load_runtime_config(runtime="torch"), keep_hair=keep), seed=0)
        for i, f in enumerate(frames):
            outs[keep] = eng.process(f, i / 25).image
        eng.close()
    raw = {k: np.abs(o.astype(int) - frames[-1].astype(int)).max(axis=2) <= 2 for k, o in outs.items()}
    region = face_mask([lm], frames[-1].shape[:2], 0.05, 0.0) > 0.99
    above = region & ~below
    assert (raw[True] & above).sum() > 5 * max((raw[False] & above).sum(), 100)   # the fringe: ~1,000 px
    # below the brows, raw-looking pixels are chance matches only, as many as without keep_hair
    # (~0.8 %: the synthetic face takes the real face's smooth light, match_light)
    assert raw[True][below & region].mean() <= raw[False][below & region].mean() + 0.002 < 0.015
