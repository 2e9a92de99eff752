"""Identity repel: the generator is guided away from the real person's own face.

Engine tests use tiny random models and a recogniser stand-in that embeds every face as a given
vector (counted), so what the generator was pushed away from is checked on the output pixels.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
from conftest import needs_data

from safefm.config import ConfigError, RuntimeConfig, load_runtime_config
from safefm.engine import Engine
from safefm.guard import IdentityGuard
from safefm.results import ANONYMIZED
from safefm.tiny import tiny_generator, tiny_identity


class _Recognizer:
    def __init__(self, user):
        self.user, self.calls = np.asarray(user, np.float32), 0

    def detect(self, rgb):
        return [(0, 0, rgb.shape[1], rgb.shape[0])]

    def embed(self, rgb, box):
        self.calls += 1
        return self.user


class _Broken(_Recognizer):
    def detect(self, rgb):
        raise RuntimeError("dlib is not installed")


@pytest.fixture()
def setup():
    cfg = load_runtime_config(runtime="torch", identity_repel=0.0)
    return cfg, tiny_generator(cfg), tiny_identity(1, name="a")


def test_files_and_the_live_camera_repel_by_default_on_the_first_step():
    from safefm.cli.cam import _engine_factory, build_parser

    assert load_runtime_config().identity_repel == 1.5
    seen = {}

    def factory(cfg, **kw):
        seen["cfg"] = cfg

    _engine_factory(build_parser().parse_args([]), factory)()
    assert (seen["cfg"].identity_repel, seen["cfg"].repel_until) == (1.5, 0.5)   # one call a frame more
    _engine_factory(build_parser().parse_args(["--identity-repel", "0"]), factory)()
    assert seen["cfg"].identity_repel == 0.0


def _run(engine, frames):
    engine.reset()
    return [engine.process(f, i / 30) for i, f in enumerate(frames)]


def test_repel_and_null_guidance_are_exclusive_and_bounded():
    with pytest.raises(ConfigError, match="one of them"):
        RuntimeConfig(identity_repel=1.0, identity_guidance=2.0)
    with pytest.raises(ConfigError):
        RuntimeConfig(identity_repel=-1.0)
    assert RuntimeConfig(identity_repel=1.0, repel_until=0.5).identity_repel == 1.0


@needs_data
def test_each_face_is_embedded_once_and_pushed_away_from_itself(setup, clip_frames):
    cfg, gen, a = setup
    frames = clip_frames[:4]
    rcfg = dataclasses.replace(cfg, identity_repel=1.0)
    rec_1, rec_2 = _Recognizer(np.full(128, 0.3)), _Recognizer(np.full(128, -0.3))
    out_1 = _run(Engine(gen, a, rcfg, video=True, recognizer=rec_1), frames)
    out_2 = _run(Engine(gen, a, rcfg, video=True, recognizer=rec_2), frames)
    plain = _run(Engine(gen, a, cfg, video=True), frames)
    assert rec_1.calls == 1                                  # once per track, not per frame
    # a scene cut may put someone else on the track: the face is embedded again
    cut = dataclasses.replace(rcfg, scene_cut_threshold=0.05)
    engine = Engine(gen, a, cut, video=True, recognizer=rec_1)
    res = _run(engine, [frames[1], frames[1], (frames[1] * 0.6).astype(np.uint8)])
    assert len({f.track_id for r in res for f in r.faces}) == 1   # one track throughout
    assert rec_1.calls == 3
    assert all(f.status == ANONYMIZED for r in out_1 for f in r.faces)
    # the push depends on whose face it is, and repel 0 is the plain output
    assert not np.array_equal(out_1[0].image, out_2[0].image)
    assert not np.array_equal(out_1[0].image, plain[0].image)
    off = _run(Engine(gen, a, dataclasses.replace(cfg, identity_repel=0.0), video=True, recognizer=rec_1), frames)
    assert all(np.array_equal(x.image, y.image) for x, y in zip(off, plain))
    # single images: every photo is its own person
    rec = _Recognizer(np.full(128, 0.3))
    engine = Engine(gen, a, rcfg, video=False, recognizer=rec)
    for f in frames[:3]:
        engine.reset()
        engine.process(f, 0.0)
    assert rec.calls == 3


@needs_data
def test_without_a_recogniser_the_face_is_still_anonymized_without_the_push(setup, clip_frames, caplog):
    cfg, gen, a = setup
    engine = Engine(gen, a, dataclasses.replace(cfg, identity_repel=1.0), video=True, recognizer=_Broken(0))
    with caplog.at_level(logging.WARNING, logger="safefm.engine"):
        out = _run(engine, clip_frames[:2])
    assert "identity repel unavailable" in caplog.text
    assert all(f.status == ANONYMIZED for r in out for f in r.faces)
    plain = _run(Engine(gen, a, cfg, video=True), clip_frames[:2])
    assert all(np.array_equal(x.image, y.image) for x, y in zip(out, plain))


@needs_data
def test_the_guard_and_the_repel_share_the_engines_recogniser(setup, clip_frames):
    """One recogniser (dlib loaded once) embeds the guard's references, the face it checks and
    the face the repel pushes away from."""
    cfg, gen, a = setup
    rec = _Recognizer(np.full(128, 0.3))
    guard = IdentityGuard([a, tiny_identity(2, name="b")], 0.5)
    engine = Engine(gen, a, dataclasses.replace(cfg, identity_repel=1.0), video=True, guard=guard, recognizer=rec)
    out = _run(engine, clip_frames[:2])
    assert engine.guard is guard and all(f.status == ANONYMIZED for r in out for f in r.faces)
    assert rec.calls == 2 + 1 + 1        # two references, the guard's look at the face, the repel's


@needs_data
def test_the_default_repel_pushes_on_the_first_of_two_steps_only(setup, clip_frames):
    """Repel on every step painted brown marbling over the face (session 17): the default pushes
    on the first of its 2 Euler steps only, so a frame costs 3 velocities, not 4 (the pushed
    step's two in one call of twice the batch)."""
    cfg, gen, a = setup
    shipped = RuntimeConfig()
    rcfg = dataclasses.replace(cfg, identity_repel=shipped.identity_repel, repel_until=shipped.repel_until)
    assert rcfg.steps == 2 and rcfg.identity_repel > 0
    times, pairs, plain, paired = [], [], gen.backend.velocity, gen.backend.velocity_pair

    def counted(cond, tokens):
        v = plain(cond, tokens)
        return lambda z, t: (times.append(round(float(t), 3)), v(z, t))[1]

    def counted_pair(cond, tokens, other):
        v = paired(cond, tokens, other)
        return lambda z, t: (pairs.append(round(float(t), 3)), v(z, t))[1]
    gen.backend.velocity, gen.backend.velocity_pair = counted, counted_pair
    out = _run(Engine(gen, a, rcfg, video=True, recognizer=_Recognizer(np.full(128, 0.3))), clip_frames[:2])
    assert all(r.faces and r.faces[0].status == ANONYMIZED for r in out)
    assert pairs == [0.0, 0.0] and times == [0.5, 0.5]    # t = 0 pushed (one paired call), t = 0.5 plain
