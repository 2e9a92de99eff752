"""Training stages on a tiny config (built here, no downloads): losses fall on a fixed batch,
checkpoints resume, the export loads back, the identity sampler rejects real identities."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from safefm.config import ModelConfig
from safefm.models import SafeFMModel, Velocity

TINY = ModelConfig(image_size=32, latent_channels=4, latent_downscale=8, ae_width=8, ae_blocks=(1, 1, 1, 1),
                   unet_channels=(8, 16), unet_layers_per_block=1, unet_attention_head_dim=8,
                   identity_dim=128, identity_tokens=2, cross_attention_dim=16, heatmap_channels=9,
                   heatmap_size=32, controlnet_embedding_channels=(4, 8, 8, 16), lora_rank=2, lora_alpha=2,
                   decoder="tiny")   # AutoencoderTiny's decoder; the fast one is trained on top below


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    torch.set_num_threads(1)


def _crops(n=24, size=32, seed=0):
    """Smooth random 'faces': low-frequency colour fields (learnable by a tiny autoencoder)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (n, 4, 4, 3)).astype(np.float32)
    t = torch.nn.functional.interpolate(torch.from_numpy(small).permute(0, 3, 1, 2), size=size,
                                        mode="bilinear", align_corners=False)
    return t.permute(0, 2, 3, 1).clamp(0, 255).round().numpy().astype(np.uint8)


def _fixed_batch(n=8):
    g = torch.Generator().manual_seed(1)
    return {"z": torch.randn(n, *TINY.latent_shape, generator=g) * 0.5 + 0.3,
            "emb": torch.randn(n, 128, generator=g) * 0.1,
            "heat": torch.rand(n, 9, TINY.heatmap_size, TINY.heatmap_size, generator=g)}


def _descend(loss_fn, params, steps=12, lr=3e-3):
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_ae_loss_decreases_and_decode_raw_matches_decode():
    from safefm.train.data import to_tensor_image
    from safefm.train.autoencoder import AETrainConfig, ae_loss, ae_model, decode_raw

    m = ae_model(TINY)
    x = torch.stack([to_tensor_image(c) for c in _crops(8)])
    losses = _descend(lambda: ae_loss(m, x, AETrainConfig())[0], m.autoencoder.parameters(), 40, 3e-3)
    assert losses[-1] < 0.9 * losses[0]
    z = m.encode(x)
    torch.testing.assert_close(decode_raw(m, z).clamp(-1, 1), m.decode(z))


def test_base_flow_loss_decreases_on_fixed_batch():
    from safefm.train.base import FlowTrainConfig, base_model, flow_loss

    m = base_model(TINY)
    batch = _fixed_batch()
    tcfg = FlowTrainConfig(null_prob=0.25)
    v = Velocity(m.unet, None)
    params = list(m.unet.parameters()) + list(m.identity.parameters())
    losses = _descend(lambda: flow_loss(v, m.identity, batch, tcfg, torch.Generator().manual_seed(3)), params)
    assert losses[-1] < 0.8 * losses[0]


def test_lean_base_trains_and_exports_with_the_shared_decoder(tmp_path):
    """A base with configs/model_lean.toml's UNet on the same autoencoder: it learns, and the
    export combines its config with the decoder stage's."""
    import dataclasses

    from safefm.train.base import FlowTrainConfig, base_model, flow_loss
    from safefm.train.common import autoencoder_mismatch, with_decoder_of

    lean = dataclasses.replace(TINY, unet_cross_attention="mid", identity_film=True)
    assert autoencoder_mismatch(lean, TINY) == []
    assert autoencoder_mismatch(dataclasses.replace(TINY, ae_width=16), TINY) == ["ae_width"]
    m = base_model(lean)
    v = Velocity(m.unet, None)
    params = list(m.unet.parameters()) + list(m.identity.parameters())
    losses = _descend(lambda: flow_loss(v, m.identity, _fixed_batch(), FlowTrainConfig(null_prob=0.25),
                                        torch.Generator().manual_seed(3)), params)
    assert losses[-1] < 0.8 * losses[0]
    fast = dataclasses.replace(TINY, decoder="fast", decoder_widths=(8, 8, 8), decoder_blocks=(1, 1, 1))
    merged = with_decoder_of(lean, fast)
    assert merged.decoder == "fast" and merged.identity_film and merged.unet_cross_attention == "mid"
    # a shipped model's frozen parts (--stage from-weights) keep their heatmap decoder and detail
    # stage under a --config whose file has neither: else the export silently drops them
    shipped = dataclasses.replace(fast, decoder_heat=True, detail_width=8)
    merged = with_decoder_of(lean, shipped)
    assert merged.decoder_heat and merged.detail_width == 8 and merged.unet_cross_attention == "mid"


def test_adapters_train_only_controlnet_and_lora():
    from safefm.train.adapters import adapter_model, adapter_keys, freeze_for_adapters, trainable_report
    from safefm.train.base import FlowTrainConfig, flow_loss

    m = adapter_model(TINY)
    assert set(m.state_dict()) == set(SafeFMModel(TINY).state_dict())
    params = freeze_for_adapters(m)
    rep = trainable_report(m)
    assert 0 < rep["trainable_fraction"] < 1 and rep["lora"] > 0
    assert rep["trainable"] == sum(p.numel() for p in params)
    frozen = {k: v.clone() for k, v in m.state_dict().items() if k not in set(adapter_keys(m))}
    batch = _fixed_batch()
    tcfg = FlowTrainConfig(warm_prob=0.5)
    # untrained adapters change nothing: the ControlNet's zero convs and LoRA's B = 0
    with torch.no_grad():
        tok = m.identity(batch["emb"])
        t = torch.full((8,), 0.5)
        torch.testing.assert_close(m.velocity(batch["z"], t, batch["heat"], tok), Velocity(m.unet, None)(batch["z"], t, None, tok))
    losses = _descend(lambda: flow_loss(m.velocity, m.identity, batch, tcfg, torch.Generator().manual_seed(4)), params)
    assert losses[-1] < losses[0]
    after = m.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in frozen.items())


def test_stages_end_to_end_resume_and_export(tmp_path):
    from safefm.face.alignment import load_template
    from safefm.checkpoint import load_model
    from safefm.train.data import LatentCache
    from safefm.train.adapters import ADAPTER_DEFAULTS, train_adapters
    from safefm.train.autoencoder import AETrainConfig, build_latent_cache, load_autoencoder, train_autoencoder
    from safefm.train.base import FlowTrainConfig, train_base
    from safefm.train.export import export_default

    crops = _crops(24)
    quiet = lambda *a: None  # noqa: E731
    tc = AETrainConfig(batch=4, patch=16, max_steps=3, ckpt_every=2, eval_every=2, holdout=4)
    ck = train_autoencoder(TINY, tc, crops, run_dir=tmp_path / "ae", log=quiet)
    assert ck["step"] == 3 and (tmp_path / "ae" / "loss.png").exists()
    assert "psnr_holdout" in ck["metrics"] and ck["model_config"]["image_size"] == 32
    ck = train_autoencoder(TINY, AETrainConfig(**{**tc.__dict__, "max_steps": 5}), crops,
                           run_dir=tmp_path / "ae", log=quiet)
    assert ck["step"] == 5 and len(ck["history"]["loss"]) == 5
    model = load_autoencoder(ck)
    assert float(model.latent_std.min()) > 0 and not torch.all(model.latent_mean == 0)

    lm = np.stack([load_template() * 32] * len(crops)).astype(np.float16)
    arrays = {"crops": crops, "landmarks": lm, "embeddings": np.random.default_rng(0).normal(0, 0.1, (24, 128)).astype(np.float32),
              "gender": np.zeros(24, np.int8), "age": np.full(24, 30, np.int16), "person": np.array([""] * 24)}
    out = build_latent_cache(model, arrays, tmp_path / "latents.npz", ae_step=ck["step"], exclude=np.array([0, 1]))
    cache = LatentCache(out)
    assert len(cache) == 22 and cache.z.shape[1:] == TINY.latent_shape and 0 not in cache.a["index"]
    assert abs(float(cache.z.astype(np.float32).std()) - 1) < 0.5    # normalised by latent stats

    base = train_base(TINY, FlowTrainConfig(batch=4, max_steps=2, ckpt_every=1), cache, ae_ckpt=ck,
                      run_dir=tmp_path / "base", log=quiet)
    assert base["step"] == 2 and base["ema"]["num_updates"] == 2
    ad_cfg = FlowTrainConfig(**{**ADAPTER_DEFAULTS.__dict__, "batch": 2, "max_steps": 2})
    ad = train_adapters(TINY, ad_cfg, cache, ae_ckpt=ck, base_ckpt=base, run_dir=tmp_path / "adapters", log=quiet)
    assert ad["step"] == 2 and 0 < ad["metrics"]["trainable_fraction"] < 1
    assert all(k.startswith("controlnet.") or "lora_" in k for k in ad["state"]["model"])

    from safefm.train.adapters import adapter_model, load_adapters
    from safefm.train.preview import ae_preview, flow_preview

    full = load_adapters(ad, adapter_model(TINY, ck, base)).eval()
    heat = np.random.default_rng(0).random((2, 9, 32, 32)).astype(np.float32)
    assert flow_preview(full, arrays["embeddings"][:2], tmp_path / "p.png", heat=heat, steps=2).is_file()
    assert ae_preview(full, crops[:2], tmp_path / "a.png").is_file()

    path = export_default(tmp_path, tmp_path / "export" / "m.safetensors")
    loaded, meta = load_model(path)
    assert loaded.controlnet is not None and any("lora_" in k for k in loaded.state_dict())
    assert meta["sha256"] and "research" in meta["license"]
    torch.testing.assert_close(loaded.latent_std, model.latent_std, atol=1e-3, rtol=1e-3)
    assert loaded.cfg.decoder == "tiny"

    # stage 1b: a fast decoder on the same frozen latents replaces the old one at export,
    # leaving the encoder, latent statistics, base and adapters untouched
    from safefm.train.decoder import DecoderTrainConfig, train_decoder

    target = ModelConfig(**{**TINY.__dict__, "decoder": "fast", "decoder_widths": (8, 8, 8), "decoder_blocks": (1, 1, 1)})
    dc = DecoderTrainConfig(batch=4, max_steps=3, ckpt_every=2, eval_every=2, holdout=4)
    dk = train_decoder(ck, target, dc, cache, arrays, run_dir=tmp_path / "decoder", log=quiet)
    assert dk["step"] == 3 and dk["metrics"]["ae_step"] == ck["step"]
    assert all(k.startswith("autoencoder.decoder.") for k in dk["state"]["model"])
    assert {"psnr_holdout", "psnr_old_decoder"} <= set(dk["metrics"])
    dk = train_decoder(ck, target, DecoderTrainConfig(**{**dc.__dict__, "max_steps": 4}), cache, arrays,
                       run_dir=tmp_path / "decoder", log=quiet)
    assert dk["step"] == 4                                   # resumed, not restarted
    fast, meta = load_model(export_default(tmp_path, tmp_path / "export" / "f.safetensors"))
    assert fast.cfg.decoder == "fast" and '"decoder_steps": 4' in meta["training"]
    for k, v in loaded.state_dict().items():
        if not k.startswith("autoencoder.decoder."):
            torch.testing.assert_close(fast.state_dict()[k], v)
    z = torch.randn(2, *TINY.latent_shape)
    assert fast.decode(z).shape == (2, 3, 32, 32)


def test_stored_configs_without_a_decoder_field_mean_the_tiny_decoder():
    from safefm.config import load_model_config, stored_model_config, to_dict

    d = to_dict(load_model_config())
    assert stored_model_config(d).decoder == "fast"
    d.pop("decoder")
    assert stored_model_config(d).decoder == "tiny"           # weights from before the field


def _fake_embeddings(n, rng, scale=0.08):
    """Random 128-d vectors with dlib-like spacing (pairwise distances ~ 0.9-1.3)."""
    return (rng.standard_normal((n, 128)) * scale).astype(np.float32)


def test_identity_sampler_rejects_real_identities(tmp_path):
    from safefm.identity_sampler import IdentitySampler, SamplingError
    from safefm.recognition import distance

    rng = np.random.default_rng(0)
    embs = _fake_embeddings(600, rng)
    gender = np.where(np.arange(600) % 2 == 0, 0, 1)
    age = rng.integers(1, 90, 600)
    s = IdentitySampler.fit(embs, {"gender": gender, "age": age, "person": np.array([""] * 600)}, min_group=100)
    assert "male/any" in s.groups and "female/any" in s.groups
    for g in (None, "female", "male", 0):
        x = s.sample(np.random.default_rng(5), gender=g, age="adult")
        assert x.shape == (128,) and x.dtype == np.float32
        assert distance(embs, x).min() >= 0.6
    # a near-duplicate of a training embedding is rejected, a far one accepted
    assert s.nearest_distance(embs[:3] + 0.01)[0] < 0.6
    # a Gaussian that only produces near-duplicates must fail rather than return one
    tight = IdentitySampler.fit(np.repeat(embs[:1], 200, 0) + rng.normal(0, 0.001, (200, 128)).astype(np.float32))
    with pytest.raises(SamplingError):
        tight.sample(np.random.default_rng(0), max_tries=128)
    p = s.save(tmp_path / "sampler.safetensors")
    s2 = IdentitySampler.load(p)
    assert set(s2.groups) == set(s.groups) and p.with_suffix(".json").is_file()
    a, b = s.sample(np.random.default_rng(9)), s2.sample(np.random.default_rng(9))
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_identity_sampler_person_means():
    from safefm.identity_sampler import identity_table

    e = np.arange(4 * 128, dtype=np.float32).reshape(4, 128)
    out, g, a = identity_table(e, np.array([0, 1, -1, -1]), np.array([5, 6, -1, -1]), np.array(["", "", "X", "X"]))
    assert out.shape == (3, 128)
    np.testing.assert_allclose(out[2], e[2:].mean(0))


def test_export_refuses_mismatched_stages():
    from safefm.train.export import _check_lineage

    _check_lineage("base", {"metrics": {"ae_step": 5}}, ae_step=5)
    _check_lineage("base", {"metrics": {}}, ae_step=5)            # older checkpoint: unknown
    with pytest.raises(ValueError, match="retrain base"):
        _check_lineage("base", {"metrics": {"ae_step": 4}}, ae_step=5)


def test_identity_sampler_bank_mode_ships_no_reference(tmp_path):
    from safetensors import safe_open

    from safefm.identity_sampler import IdentitySampler
    from safefm.recognition import distance

    rng = np.random.default_rng(1)
    embs = _fake_embeddings(400, rng)
    s = IdentitySampler.fit(embs, {"gender": np.arange(400) % 2, "age": rng.integers(1, 90, 400)}, min_group=100)
    p = s.save(tmp_path / "bank.safetensors", include_reference=False, bank_size=8)
    with safe_open(str(p), framework="np") as f:
        assert "reference" not in set(f.keys())
    s2 = IdentitySampler.load(p)
    assert s2.reference is None
    x = s2.sample(np.random.default_rng(0), gender="female")
    assert x.shape == (128,) and distance(embs, x).min() >= 0.6
    with pytest.raises(ValueError):
        s.save(tmp_path / "x.safetensors", include_reference=False)
    # only the bank may be copied next to exported weights; the full sampler never is
    from safefm.train.export import shippable_sampler

    full = s.save(tmp_path / "full.safetensors")
    assert shippable_sampler(p) and not shippable_sampler(full)
    assert not shippable_sampler(tmp_path / "missing.safetensors")
