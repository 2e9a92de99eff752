"""The 2x detail stage: the network, its training maths, its file, and the engine's use of it.

What a user would notice: large faces are pasted from a crop twice the generator's side (the
detail stage's), small ones are not; a held face keeps its place; the stage's training makes
a blurred half-size face sharper than the plain upsample; the shipped file says what it holds.
"""

from __future__ import annotations

import dataclasses
import json

import cv2
import numpy as np
import pytest
import torch
from torch.nn import functional as F

from safefm.config import ConfigError, ModelConfig, load_runtime_config
from safefm.engine import Engine
from safefm.face import alignment
from safefm.generator import Generator
from safefm.models import DetailNet
from safefm.results import ANONYMIZED, HELD
from safefm.tiny import tiny_identity, tiny_model, tiny_model_config
from safefm.train import detail as D

from conftest import needs_data


def detail_model(seed: int = 0):
    """A tiny model with a 2x detail stage whose residual is not zero (a visible effect)."""
    cfg = dataclasses.replace(tiny_model_config(), detail_width=8, detail_blocks=1)
    model = tiny_model(seed, cfg)
    with torch.no_grad():
        model.detail.tail.weight.normal_(0, 0.05)
    return model


def sharp_images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """(n, size, size, 3) uint8 with hard edges (rectangles on a background): detail to restore."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        img = np.full((size, size, 3), rng.integers(0, 255, 3), np.uint8)
        for _ in range(6):
            x0, y0 = rng.integers(0, size - 4, 2)
            w, h = rng.integers(2, 10, 2)
            img[y0:y0 + h, x0:x0 + w] = rng.integers(0, 255, 3)
        out[i] = img
    return out


def test_untrained_stage_is_the_plain_bilinear_upsample():
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    y = DetailNet(8, 2)(x)
    assert y.shape == (2, 3, 32, 32)
    assert torch.allclose(y, F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))


def test_bad_detail_settings_are_one_line_errors():
    with pytest.raises(ConfigError, match="detail_width"):
        ModelConfig(detail_width=-1)
    with pytest.raises(ConfigError, match="detail_min_px"):
        load_runtime_config(detail_min_px=-5)


def test_blur_and_degrade_keep_the_mean_and_remove_detail():
    x = torch.from_numpy(sharp_images(4)).permute(0, 3, 1, 2).float() / 127.5 - 1
    k = D.gaussian_kernels(torch.tensor([0.5, 1.0, 2.0]))
    assert torch.allclose(k.sum(1), torch.ones(3))
    y = D.degrade(x, torch.full((4,), 1.5), noise=0.0)
    assert y.shape == (4, 3, 16, 16)
    assert torch.allclose(y.mean((1, 2, 3)), x.mean((1, 2, 3)), atol=0.02)
    assert (D.laplacian_energy(D.blur(x, torch.full((4,), 1.5))) < 0.5 * D.laplacian_energy(x)).all()


def test_pack_round_trip(tmp_path):
    imgs = np.stack([cv2.GaussianBlur(im, (0, 0), 1.0) for im in sharp_images(5)])
    pack = D.encode_pack(imgs)
    back = D.decode_pack(pack["jpeg"], pack["offsets"])
    assert back.shape == imgs.shape and np.abs(back.astype(int) - imgs.astype(int)).mean() < 4


def test_training_makes_the_upsample_sharper_than_bilinear_and_resumes(tmp_path):
    """A few hundred steps on hard-edged pictures: the stage restores more of the target than
    the bilinear upsample of the same blurred half-size input (PSNR), and a second call
    continues the run instead of starting over."""
    imgs = sharp_images(96)
    tcfg = D.DetailTrainConfig(width=8, blocks=1, steps=300, batch=8, gan_start=250, holdout=16,
                               sampled_fraction=0.3, d_width=8, lr=2e-3, blur=(0.4, 0.8))
    torch.manual_seed(0)
    hold = D.to_tensor(imgs[:16], "cpu")
    before = D.evaluate(DetailNet(8, 1).eval(), hold, tcfg)     # untrained = bilinear
    ck = D.train_detail(imgs, imgs[:8], tcfg, tmp_path, log_every=50)
    assert ck["step"] == 300 and (tmp_path / "last.pt").exists()
    assert ck["eval"]["psnr"] > before["psnr"] + 0.5
    assert ck["eval"]["energy"] > before["energy"]
    more = D.train_detail(imgs, imgs[:8], dataclasses.replace(tcfg, steps=310), tmp_path, log_every=50)
    assert more["step"] == 310 and len(more["history"]) > len(ck["history"])


def test_export_adds_the_stage_and_says_so(tmp_path):
    from safefm.checkpoint import load_model, save_model

    src = save_model(tiny_model(0), tmp_path / "m.safetensors")
    stage = DetailNet(8, 1)
    with torch.no_grad():
        stage.tail.weight.normal_(0, 0.05)
    ck_path = tmp_path / "last.pt"
    torch.save({"detail": stage.state_dict(), "step": 7, "config": {"width": 8, "blocks": 1}, "eval": {"psnr": 1.0}},
               ck_path)
    out = D.export_detail(str(src), ck_path, tmp_path / "out.safetensors")
    model, meta = load_model(out)
    old, _ = load_model(src)
    assert model.cfg.detail_width == 8 and model.detail is not None
    assert torch.equal(model.detail.tail.weight, stage.tail.weight.half().float())
    assert torch.equal(model.unet.conv_in.weight, old.unet.conv_in.weight)
    assert json.loads(meta["training"])["detail"]["steps"] == 7


@pytest.mark.parametrize("runtime", ["torch", "onnx"])
def test_refine_doubles_the_crop_and_both_runtimes_agree(tmp_path, monkeypatch, runtime):
    if runtime == "onnx":
        pytest.importorskip("onnxruntime")
    monkeypatch.setenv("SAFEFM_CACHE", str(tmp_path))
    crops = sharp_images(2)
    ref = Generator(detail_model(), load_runtime_config(runtime="torch")).refine(crops)
    gen = Generator(detail_model(), load_runtime_config(runtime=runtime))
    out = gen.refine(crops)
    assert gen.has_detail and out.shape == (2, 64, 64, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - ref.astype(int)).max() <= 1
    plain = Generator(tiny_model(0), load_runtime_config(runtime="torch"))
    assert not plain.has_detail
    with pytest.raises(RuntimeError, match="no detail stage"):
        plain.refine(crops)


def test_resized_crop_affine_keeps_pixel_centres():
    """A crop resampled to twice its side and warped with the resized affine lands where the
    original crop lands with the original affine."""
    rng = np.random.default_rng(0)
    crop = cv2.GaussianBlur(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), (0, 0), 2)
    M_inv = np.array([[3.1, 0.4, 40.0], [-0.4, 3.1, 25.0]])
    big = cv2.resize(crop, (64, 64), interpolation=cv2.INTER_LINEAR)
    a = cv2.warpAffine(crop, M_inv, (180, 180), flags=cv2.INTER_LINEAR).astype(int)
    b = cv2.warpAffine(big, alignment.resized_crop_affine(M_inv, 32, 64), (180, 180),
                       flags=cv2.INTER_LINEAR).astype(int)
    inside = (a.sum(2) > 0) & (b.sum(2) > 0)
    inside = cv2.erode(inside.astype(np.uint8), np.ones((9, 9), np.uint8)) > 0
    assert inside.sum() > 5000 and np.abs(a - b)[inside].mean() < 2.0


@needs_data
def test_engine_pastes_large_faces_from_the_detail_stage(clip_frames, monkeypatch):
    """A face larger than detail_min_px goes through the stage (a 2S crop is pasted and held);
    with the threshold above the face's size, or 0, it does not; neither leaves raw pixels."""
    calls = []

    def engine(px):
        cfg = load_runtime_config(runtime="torch", identity_repel=0.0, detail_min_px=px)
        gen = Generator(detail_model(), cfg)
        refine = gen.refine
        monkeypatch.setattr(gen, "refine", lambda c: calls.append(px) or refine(c))
        return Engine(gen, tiny_identity(0), cfg, video=True)

    frames = clip_frames[:3]
    outs = {}
    for px in (1, 0, 100000):
        eng = engine(px)
        res = [eng.process(f, i / 25) for i, f in enumerate(frames[:2])]
        assert all(r.faces[0].status == ANONYMIZED for r in res)
        st = next(iter(eng._states.values()))
        assert st.last_crop.shape[0] == (64 if px == 1 else 32)
        if px == 1:   # a generator fault: the held 2S face is pasted where the face is now
            eng.fault_injector = lambda stage, tid, v: (_ for _ in ()).throw(RuntimeError("boom"))
            held = eng.process(frames[2], 2 / 25)
            assert held.faces[0].status == HELD
            assert np.abs(held.image.astype(int) - res[1].image.astype(int)).mean() < 8
        outs[px] = res[1].image
        eng.close()
    assert calls and set(calls) == {1}
    assert np.abs(outs[1].astype(int) - outs[0].astype(int)).max() > 20
    assert np.array_equal(outs[0], outs[100000])


def test_detail_strength_scales_the_learned_residual():
    crops = sharp_images(1)
    out = {s: Generator(detail_model(), load_runtime_config(runtime="torch", detail_strength=s)).refine(crops)
           .astype(float) for s in (0.0, 0.5, 1.0)}
    up = cv2.resize(crops[0], (64, 64), interpolation=cv2.INTER_LINEAR).astype(float)
    assert np.abs(out[0.0][0] - up).max() <= 1   # strength 0: the plain bilinear upsample
    half = np.abs(out[0.5] - out[0.0]).mean()
    full = np.abs(out[1.0] - out[0.0]).mean()
    assert full > 1 and half == pytest.approx(full / 2, rel=0.15)


@needs_data
def test_only_a_photos_face_without_the_detail_stage_is_sharpened(clip_frames, monkeypatch):
    """match_sharpness reads the real face's fine detail each frame: a photo's face gets it; a
    video's would shimmer with the reading, and the detail stage draws large faces, so neither does."""
    from safefm.face import composite

    asked = []
    paste = composite.paste
    monkeypatch.setattr(composite, "paste", lambda *a, **k: asked.append(k.get("sharpen")) or paste(*a, **k))
    for video, px, want in ((False, 0, True), (True, 0, False), (False, 1, False)):
        cfg = load_runtime_config(runtime="torch", identity_repel=0.0, detail_min_px=px)
        eng = Engine(Generator(detail_model(), cfg), tiny_identity(0), cfg, video=video)
        asked.clear()
        assert eng.process(clip_frames[0], 0.0).faces[0].status == ANONYMIZED
        assert asked and set(asked) == {want}
        eng.close()


def test_coarse_consistency_reads_layout_not_detail():
    """The product-scale loss: 0 for any output whose coarse averages match the input (detail
    added on top is free), > 0 once a feature moves."""
    torch.manual_seed(0)
    inp = D.to_tensor(sharp_images(2, size=32), "cpu")
    up = torch.nn.functional.interpolate(inp, scale_factor=2, mode="nearest")
    grain = up + 0.3 * torch.tensor([[1.0, -1.0], [-1.0, 1.0]]).repeat(32, 32)    # zero-mean in every 2x2
    assert D.coarse_consistency(up, inp, 4).item() < 1e-6
    assert D.coarse_consistency(grain, inp, 4).item() < 1e-6
    assert D.coarse_consistency(up.roll(8, -1), inp, 4).item() > 0.05


def test_product_scale_training_keeps_the_sampled_layout(tmp_path):
    """Sampled batches at the product's scale (coarse > 0): the run trains, resumes, and the
    stage, on a product output at full size, still gives back the input's layout."""
    imgs = sharp_images(64)
    tcfg = D.DetailTrainConfig(width=8, blocks=1, steps=120, batch=8, gan_start=40, holdout=16, sampled_fraction=0.5,
                               d_width=8, lr=2e-3, coarse=4, consistency=0.1, patch=16)
    ck = D.train_detail(imgs, imgs[:16], tcfg, tmp_path, log_every=40)
    assert ck["step"] == 120 and ck["config"]["coarse"] == 4
    stage = DetailNet(8, 1)
    stage.load_state_dict(ck["detail"])
    x = D.to_tensor(imgs[:4], "cpu")
    with torch.no_grad():
        y = stage(x)
    assert y.shape == (4, 3, 2 * x.shape[-2], 2 * x.shape[-1])
    assert D.coarse_consistency(y, x, 4).item() < 0.05
    more = D.train_detail(imgs, imgs[:16], dataclasses.replace(tcfg, steps=130), tmp_path, log_every=40)
    assert more["step"] == 130
