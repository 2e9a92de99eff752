"""The heatmap-conditioned decoder: it starts as the given decoder, learns to draw what the
heatmaps say where the latent lost it, resumes, ships, and runs the same in onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from safefm.face.alignment import load_template
from safefm.checkpoint import load_model, save_model
from safefm.config import load_runtime_config
from safefm.generator import Generator
from safefm.tiny import tiny_model
from safefm.train.heat_decoder import (HeatDecoderTrainConfig, apply_checkpoint, eye_boxes, swap_eye_cells,
                                       train_heat_decoder, with_heat_decoder)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    torch.set_num_threads(1)


def _data(n=40, size=32, seed=0):
    """Crops whose eye regions are dark exactly where the landmarks say (lids open or shut):
    the eye state is in the landmarks, so a decoder can read it from the heatmaps."""
    rng = np.random.default_rng(seed)
    t = load_template()
    crops = np.full((n, size, size, 3), 170, np.uint8)
    lms = np.repeat((t * size)[None].astype(np.float32), n, axis=0)
    lms[..., :2] += rng.normal(0, 0.3, (n, 1, 2)).astype(np.float32)
    for i in range(n):
        for x0, y0, x1, y1 in eye_boxes(lms[i:i + 1], margin=0.0)[0]:
            crops[i, max(0, y0):y1 + 1, max(0, x0):x1 + 1] = 40
    return {"crops": crops, "landmarks": lms}


def test_the_new_branch_starts_at_zero_and_then_reads_the_heatmaps():
    base = tiny_model(0)
    model = with_heat_decoder(base)
    assert model.cfg.decoder_heat and not base.cfg.decoder_heat
    z, heat = torch.randn(2, *base.cfg.latent_shape), torch.rand(2, 9, 16, 16)
    with torch.no_grad():
        assert torch.equal(model.decode(z, heat), base.decode(z))     # untrained branch: same image
        for p in model.autoencoder.decoder.heat.parameters():
            p.normal_(0, 0.5)
        a, b = model.decode(z, heat), model.decode(z, torch.zeros_like(heat))
        assert (a - b).abs().max() > 1e-3                               # now the heatmaps matter
        assert torch.equal(model.decode(z), base.decode(z))            # no heatmaps: the latent alone


def test_eye_cell_swap_moves_only_the_eye_cells():
    z = torch.arange(2 * 4 * 8 * 8, dtype=torch.float32).reshape(2, 4, 8, 8)
    boxes = np.array([[[4, 8, 10, 12], [20, 8, 26, 12]]] * 2)
    out = swap_eye_cells(z, boxes, 32, np.array([True, False]), np.array([1, 0]))
    changed = (out != z).any(dim=1)
    assert changed[0].sum() > 0 and changed[1].sum() == 0
    assert torch.equal(out[0][:, changed[0]], z[1][:, changed[0]])
    assert not changed[0][:, 0].any() and not changed[0][0].any()       # far from the eyes: untouched


def test_training_lowers_the_eye_error_resumes_and_ships(tmp_path):
    base = tiny_model(0)
    data = _data()
    tcfg = HeatDecoderTrainConfig(batch=8, lr=3e-3, warmup=1, max_steps=40, ckpt_every=20, eval_every=1000,
                                  holdout=8, swap_prob=0.5)
    ck = train_heat_decoder(base, "abc", tcfg, data, run_dir=tmp_path / "run", max_minutes=0, log=lambda *_: None)
    m = ck["metrics"]
    assert ck["step"] == 40
    assert m["holdout"]["eye_l1_swapped"] < 0.8 * m["start"]["eye_l1_swapped"], m
    # resumes where it stopped; other source weights are refused
    more = train_heat_decoder(base, "abc", tcfg.__class__(**{**tcfg.__dict__, "max_steps": 45}), data,
                              run_dir=tmp_path / "run", max_minutes=0, log=lambda *_: None)
    assert more["step"] == 45
    again = train_heat_decoder(base, "abc", tcfg.__class__(**{**tcfg.__dict__, "max_steps": 45}), data,
                               run_dir=tmp_path / "run", max_minutes=0, log=lambda *_: None)
    assert again["step"] == 45 and again["metrics"]["sec_per_step"] == more["metrics"]["sec_per_step"]
    with pytest.raises(ValueError, match="other weights"):
        train_heat_decoder(base, "xyz", tcfg, data, run_dir=tmp_path / "run", max_minutes=0, log=lambda *_: None)
    # the shipped file is self-describing: it loads back as a heatmap decoder with the same output
    model = apply_checkpoint(base, more)
    path = save_model(model, tmp_path / "m.safetensors", dtype=torch.float32)
    loaded, _ = load_model(path)
    assert loaded.cfg.decoder_heat
    z, heat = torch.randn(1, *base.cfg.latent_shape), torch.rand(1, 9, 16, 16)
    with torch.no_grad():
        assert torch.allclose(loaded.decode(z, heat), model.decode(z, heat), atol=1e-6)


def test_generator_feeds_the_heatmaps_to_the_decoder_in_both_runtimes(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("SAFEFM_CACHE", str(tmp_path))
    model = with_heat_decoder(tiny_model(0))
    with torch.no_grad():
        for p in model.autoencoder.decoder.heat.parameters():
            p.normal_(0, 0.5)
    z = torch.randn(1, *model.cfg.latent_shape)
    heat = np.random.default_rng(0).random((9, 16, 16)).astype(np.float32)
    twin = with_heat_decoder(model)   # a copy: Generator fuses LoRA and splits the ControlNet in place
    g_t = Generator(model, load_runtime_config(runtime="torch"))
    g_o = Generator(twin, load_runtime_config(runtime="onnx"))
    a, b = g_t.decode(z, heat), g_o.decode(z, heat)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    assert np.abs(a.astype(int) - g_t.decode(z, np.zeros_like(heat)).astype(int)).max() > 2


def test_adversarial_fine_tuning_on_sampled_latents_runs_resumes_and_keeps_their_colours(tmp_path):
    """adv > 0: a patch discriminator joins (saved with the run, resumed with it); latents the
    sampler drew (no target) are decoded too and kept near the given decoder's colours."""
    from safefm.train.common import load_checkpoint

    base = with_heat_decoder(tiny_model(0))
    data = _data(n=24)
    z = torch.randn(6, *base.cfg.latent_shape)
    heat = torch.rand(6, 9, 16, 16)
    with torch.no_grad():
        ref = ((base.decode(z, heat) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    sampled = {"z": z.numpy(), "heat": heat.numpy().astype(np.float16), "ref": ref.numpy()}
    tcfg = HeatDecoderTrainConfig(batch=4, lr=1e-3, warmup=1, max_steps=6, ckpt_every=3, eval_every=1000,
                                  holdout=4, adv=0.1, fm=1.0, gan_warmup=2, sampled_batch=2)
    ck = train_heat_decoder(base, "abc", tcfg, data, run_dir=tmp_path / "run", max_minutes=0,
                            log=lambda *_: None, sampled=sampled)
    assert ck["step"] == 6 and ck["disc"] and ck["d_opt"]["state"]
    hist = ck["history"]
    assert len(hist["loss_d"]) == 6 and np.isfinite(hist["loss_d"]).all()
    assert max(hist["sampled_color"]) < 0.2             # 8x-pooled colours stay the given decoder's (images in [-1, 1])
    more = train_heat_decoder(base, "abc", HeatDecoderTrainConfig(**{**tcfg.__dict__, "max_steps": 6}), data,
                              run_dir=tmp_path / "run", max_minutes=0, log=lambda *_: None, sampled=sampled)
    saved = load_checkpoint(tmp_path / "run" / "last.pt")
    assert all(torch.equal(saved["disc"][k], ck["disc"][k]) for k in ck["disc"])   # resumed, not re-initialised
    assert more["step"] == 6
