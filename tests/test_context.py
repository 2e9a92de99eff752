"""Context-aware generation (issue 14 item 1): the generator sees the frame around the face,
never the face itself."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from safefm.config import ConfigError, ModelConfig, load_runtime_config
from safefm.face import context as ctx
from safefm.face.alignment import load_template
from safefm.face.composite import oval_distance


def _face(size: int = 32) -> np.ndarray:
    return (load_template() * size).astype(np.float32)


def test_context_hides_the_face_and_its_outline_and_keeps_the_surroundings():
    s, lm = 64, _face(64)
    rng = np.random.default_rng(0)
    crop = rng.integers(0, 256, (s, s, 3), dtype=np.uint8)
    c = ctx.face_context(crop, [lm], grow=0.1)
    assert c.shape == (4, s, s) and c.dtype == np.float32
    hidden = c[3] == 1
    assert set(np.unique(c[3])) == {0.0, 1.0}
    assert hidden[oval_distance(lm, s) < 0.1].all()                      # the face and a margin around it
    assert 0.5 < hidden.mean() < 0.95                                     # the surroundings stay
    assert (c[:3][:, hidden] == 0).all()                                  # no pixel of the face, nor of its edge
    np.testing.assert_allclose(c[:3][:, ~hidden], crop.transpose(2, 0, 1)[:, ~hidden] / 127.5 - 1, atol=1e-6)
    # whatever the face looks like, the context is the same: the person's face cannot reach the model
    other = crop.copy()
    other[hidden] = rng.integers(0, 256, (int(hidden.sum()), 3), dtype=np.uint8)
    np.testing.assert_array_equal(ctx.face_context(other, [lm], grow=0.1), c)
    # nor its outline: a face with another jaw inside the same reach gets exactly the same mask
    jaw = lm.copy()
    low = jaw[:, 1] > np.median(jaw[:, 1])
    jaw[low, 0] = lm[low, 0].mean() + 0.9 * (lm[low, 0] - lm[low, 0].mean())   # a narrower jaw
    np.testing.assert_array_equal(ctx.context_mask([jaw], s, 0.1), ctx.context_mask([lm], s, 0.1))
    # a second face (the identity's shape) is covered too; a bigger grow hides more
    wide = lm.copy()
    wide[:, 0] = lm[:, 0].mean() + 1.15 * (lm[:, 0] - lm[:, 0].mean())
    both = ctx.context_mask([lm, wide], s, 0.1)
    assert both.sum() > c[3].sum() and (both[oval_distance(wide, s) < 0.1] == 1).all()
    assert ctx.context_mask([lm], s, 0.3).sum() > ctx.context_mask([lm], s, 0.1).sum()


def test_covering_scale_is_exact_for_a_square():
    sq = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64)
    assert ctx.covering_scale(np.array([[0.5, 0.2]]), sq, np.zeros(2)) == 1.0
    assert ctx.covering_scale(np.array([[0.5, 1.5], [-1.2, 0]]), sq, np.zeros(2)) == pytest.approx(1.5)
    assert ctx.covering_scale(np.array([[2.0, 0.0]]), sq, np.array([0.5, 0.0])) == pytest.approx(3.0)


def test_context_at_another_size_and_the_null_context():
    crop = np.full((64, 64, 3), 200, np.uint8)
    c = ctx.face_context(crop, [_face(64)], 0.1, size=32)
    np.testing.assert_array_equal(c[3], ctx.context_mask([_face(32)], 32, 0.1))
    n = ctx.null_context(16)
    assert n.shape == (4, 16, 16) and (n[:3] == 0).all() and (n[3] == 1).all()
    with pytest.raises(ValueError):
        ctx.render_context(crop, np.zeros((32, 32), np.float32))


def test_config_rejects_other_context_sizes():
    with pytest.raises(ConfigError, match="context_channels"):
        ModelConfig(context_channels=3)
    with pytest.raises(ConfigError, match="context_grow"):
        load_runtime_config(context_grow=0.9)


def _context_model(seed: int = 0):
    from safefm.tiny import tiny_model
    from safefm.train.context import context_model

    return tiny_model(seed), context_model(tiny_model(seed))


def test_a_widened_model_draws_what_the_source_drew_until_trained():
    from safefm.generator import Generator
    from safefm.tiny import tiny_identity

    src, model = _context_model()
    assert model.cfg.context_channels == 4
    cfg = load_runtime_config(runtime="torch")
    g0, g1 = Generator(src, cfg), Generator(model, cfg)
    ident = tiny_identity(0)
    heat = np.random.default_rng(1).random((9, 16, 16), dtype=np.float32)
    noise = ident.noise(src.cfg.latent_shape)
    crop = np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    context = ctx.face_context(crop, [_face(32)], 0.15, size=16)
    z0 = g0.generate(heat, g0.identity_tokens(ident.embedding), noise, steps=2)
    z1 = g1.generate(heat, g1.identity_tokens(ident.embedding), noise, steps=2, context=context)
    torch.testing.assert_close(z1, z0)
    # a model without context ignores one; the widened input is heatmaps then context
    torch.testing.assert_close(g0.generate(heat, g0.identity_tokens(ident.embedding), noise, steps=2,
                                           context=context), z0)
    cond = g1.cond_input(heat, context)
    assert cond.shape == (1, 13, 16, 16)
    torch.testing.assert_close(cond[0, 9:], torch.from_numpy(context))
    torch.testing.assert_close(g1.cond_input(heat)[0, 9:], torch.from_numpy(ctx.null_context(16)))
    off = Generator(model, dataclasses.replace(cfg, context=False))
    assert g1.reads_context and not off.reads_context
    torch.testing.assert_close(off.cond_input(heat, context), g1.cond_input(heat))


def test_context_training_learns_to_read_the_frame(tmp_path):
    from safefm.generator import Generator
    from safefm.train.base import FlowTrainConfig
    from safefm.train.context import train_context
    from safefm.train.data import ContextDraw, LatentCache

    _, model = _context_model()
    cfg = model.cfg
    rng = np.random.default_rng(0)
    n = 8
    lms = np.tile(_face(cfg.image_size)[None].astype(np.float16), (n, 1, 1))
    cache = LatentCache(arrays={"z": rng.normal(size=(n, *cfg.latent_shape)).astype(np.float16),
                                "landmarks": lms, "embeddings": rng.normal(size=(n, 128)).astype(np.float32),
                                "image_size": np.int64(cfg.image_size), "index": np.arange(n)[::-1].copy(),
                                "flipped": np.arange(n) % 2 == 0})
    with pytest.raises(ValueError, match="crops"):
        train_context(model, cache, FlowTrainConfig(max_steps=1), run_dir=tmp_path, max_minutes=0)
    crops = rng.integers(0, 256, (n, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    cache.attach_crops(crops)
    np.testing.assert_array_equal(cache.crops[1], crops[n - 2])                 # index
    np.testing.assert_array_equal(cache.crops[0], crops[n - 1][:, ::-1])        # mirrored with its latent
    b = cache.batch([0, 1, 2, 3], heat_size=cfg.heatmap_size, context=ContextDraw(drop=0.0),
                    rng=np.random.default_rng(0))
    assert b["heat"].shape == (4, 13, 16, 16)
    hidden = b["heat"][:, 12] > 0
    assert hidden.any() and (b["heat"][:, 9:12][hidden[:, None].expand(-1, 3, -1, -1)] == 0).all()
    dropped = cache.batch([0, 1], heat_size=cfg.heatmap_size, context=ContextDraw(drop=1.0),
                          rng=np.random.default_rng(0))["heat"]
    assert (dropped[:, 12] == 1).all() and (dropped[:, 9:12] == 0).all()
    ck = train_context(model, cache, FlowTrainConfig(batch=4, lr=3e-3, warmup=1, max_steps=30, ckpt_every=30),
                       run_dir=tmp_path / "ctx", max_minutes=0, log=lambda *_: None)
    assert ck["step"] == 30
    assert all(k.startswith("controlnet.") or "lora_" in k for k in ck["state"]["model"])   # base frozen
    model.load_state_dict(ck["state"]["model"], strict=False)
    g = Generator(model.eval(), load_runtime_config(runtime="torch"))
    heat = np.zeros((9, 16, 16), np.float32)
    tokens, noise = g.null_tokens(), torch.zeros(1, *cfg.latent_shape)
    ca = ctx.face_context(np.zeros((32, 32, 3), np.uint8), [_face(32)], 0.15, size=16)
    cb = ctx.face_context(np.full((32, 32, 3), 255, np.uint8), [_face(32)], 0.15, size=16)
    za, zb = (g.generate(heat, tokens, noise, steps=2, context=c) for c in (ca, cb))
    assert (za - zb).abs().max() > 1e-4     # the trained adapters read the surroundings


def test_engine_feeds_a_context_model_the_frame_around_each_face():
    from safefm.engine import Engine
    from safefm.face.alignment import invert_affine, transform_points
    from safefm.face.landmarks import Track
    from safefm.generator import Generator
    from safefm.tiny import tiny_identity

    _, model = _context_model()
    cfg = load_runtime_config(runtime="torch")
    eng = Engine(Generator(model, cfg), tiny_identity(0), cfg, video=True)
    frame = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    M = np.float32([[0.5, 0, 4], [0, 0.5, 6]])
    lm = _face(32)
    smoothed = transform_points(lm, invert_affine(M))
    tr = Track(0, smoothed, smoothed.copy(), (0, 0, 96, 96))
    c = eng._context(frame, M, tr, lm, lm)
    assert c.shape == (4, 16, 16) and c[3].any() and not c[3].all()
    # the face has moved on while the smoothed track lags: the mask follows the raw landmarks too
    moved = Track(0, smoothed, smoothed + np.float32([14, 0, 0]), (0, 0, 96, 96))
    lag = eng._context(frame, M, moved, lm, lm)
    hidden = ctx.context_mask([transform_points(moved.raw, M) * 0.5], 16, cfg.context_grow)   # heatmaps: 16 px
    assert (lag[3][hidden == 1] == 1).all() and lag[3].sum() > c[3].sum()
    off = Engine(Generator(model, dataclasses.replace(cfg, context=False)), tiny_identity(0), cfg, video=False)
    assert off._context(frame, M, tr, lm, lm) is None


def test_reflow_pairs_of_a_context_model_keep_each_pairs_context():
    from safefm.sampler import sample
    from safefm.train.data import LatentCache
    from safefm.train.reflow import ReflowPairs, make_pairs

    _, model = _context_model()
    cfg = model.cfg
    with torch.no_grad():   # let the context channels matter
        w = model.controlnet.controlnet_cond_embedding.conv_in.weight
        w[:, 9:] = torch.randn_like(w[:, 9:]) * 0.5
    rng = np.random.default_rng(0)
    n = 8
    lms = np.tile(_face(cfg.image_size)[None].astype(np.float16), (n, 1, 1))
    cache = LatentCache(arrays={"z": rng.normal(size=(n, *cfg.latent_shape)).astype(np.float16),
                                "landmarks": lms, "embeddings": rng.normal(size=(n, 128)).astype(np.float32),
                                "image_size": np.int64(cfg.image_size), "index": np.arange(n),
                                "flipped": np.zeros(n, bool)})
    cache.attach_crops(rng.integers(0, 256, (n, cfg.image_size, cfg.image_size, 3), dtype=np.uint8))
    arrays = make_pairs(model, cache, 6, teacher_steps=3, batch=4, log=lambda *_: None)
    assert arrays["grow"].shape == (6,)
    pairs = ReflowPairs(cache, arrays)
    b = pairs.batch(np.arange(6), heat_size=cfg.heatmap_size)
    assert b["heat"].shape[1] == 13
    again = pairs.batch(np.arange(6), heat_size=cfg.heatmap_size)["heat"]
    torch.testing.assert_close(again, b["heat"])                       # the same context every time
    with torch.no_grad():   # x1 is the model's own solution under exactly that context
        tokens = model.identity(b["emb"])
        v = lambda z, t: model.velocity(z, torch.full((z.shape[0],), t), b["heat"], tokens)   # noqa: E731
        torch.testing.assert_close(sample(v, b["x0"], 3), b["z"], atol=2e-3, rtol=1e-2)
