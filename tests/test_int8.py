"""int8 (``RuntimeConfig.int8``): onnxruntime with quantized convolutions, calibrated once."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from safefm.config import load_runtime_config
from safefm.generator import Generator
from safefm.tiny import tiny_model

pytest.importorskip("onnxruntime")


@pytest.fixture
def heat():
    return torch.rand(1, 9, 16, 16, generator=torch.Generator().manual_seed(0))


def _gen(tmp_path, monkeypatch, int8, runtime="onnx"):
    monkeypatch.setenv("SAFEFM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SAFEFM_WEIGHTS", str(tmp_path / "no_weights"))   # no shipped identity: a seeded one
    return Generator(tiny_model(0), load_runtime_config(runtime=runtime, steps=4, int8=int8))


def _draw(gen, heat):
    tokens = gen.identity_tokens(np.ones(128, np.float32))
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    return gen.decode(gen.generate(heat, tokens, noise), heat)


def test_int8_draws_the_same_face_and_is_calibrated_once(tmp_path, monkeypatch, heat):
    ref = _draw(_gen(tmp_path, monkeypatch, False), heat)
    g8 = _gen(tmp_path, monkeypatch, True)          # a switch before session 15: true = "all"
    assert g8.int8 and g8.cfg.int8 == "all"
    files = sorted(p.name for p in (tmp_path / "cache").glob("onnx/*/*.int8v2.onnx"))
    assert files == ["decoder.int8v2.onnx", "velocity.int8v2.onnx"]
    got = _draw(g8, heat)
    assert got.shape == ref.shape and not np.array_equal(got, ref)           # it is another graph ...
    assert np.abs(got.astype(int) - ref.astype(int)).mean() < 1.5            # ... drawing the same face
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("onnx/*/*.int8v2.onnx")}
    monkeypatch.setattr("safefm.quantize.calibration_feeds",
                        lambda *a: pytest.fail("calibrated again although the int8 graphs are cached"))
    again = _gen(tmp_path, monkeypatch, True)
    np.testing.assert_array_equal(_draw(again, heat), got)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert not [p for p in (tmp_path / "cache").rglob("*") if ".tmp." in p.name or ".pre." in p.name]


def test_int8_decoder_only_keeps_the_generator_float(tmp_path, monkeypatch, heat):
    """``int8 = "decoder"`` (the camera's default): only the image decoder is quantized, so the
    latents are the float ones exactly and the image differs by the decoder's rounding only."""
    g32 = _gen(tmp_path, monkeypatch, "off")
    g8 = _gen(tmp_path, monkeypatch, "decoder")
    assert sorted(p.name for p in (tmp_path / "cache").glob("onnx/*/*.int8v2.onnx")) == ["decoder.int8v2.onnx"]
    tokens = g32.identity_tokens(np.ones(128, np.float32))
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    z32, z8 = g32.generate(heat, tokens, noise), g8.generate(heat, tokens, noise)
    torch.testing.assert_close(z8, z32, rtol=0, atol=0)
    img32, img8 = g32.decode(z32, heat), g8.decode(z8, heat)
    assert not np.array_equal(img8, img32)
    assert np.abs(img8.astype(int) - img32.astype(int)).mean() < 1.0     # under a level of 255 on average


def test_int8_decoder_keeps_the_convolutions_at_the_latent_and_the_pixels_float(tmp_path, monkeypatch):
    """The decoder's convolution reading the latent and the one writing the pixels stay float
    (quantizing the latent's one raised flicker by 30 % on a still clip); every other is int8.
    A decoder with the heatmap branch, whose convolutions come first in the graph's order."""
    import dataclasses

    from safefm.tiny import tiny_model_config

    onnx = pytest.importorskip("onnx")
    monkeypatch.setenv("SAFEFM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SAFEFM_WEIGHTS", str(tmp_path / "no_weights"))
    cfg = dataclasses.replace(tiny_model_config(), decoder_heat=True)
    Generator(tiny_model(0, cfg), load_runtime_config(runtime="onnx", steps=4, int8="decoder"))
    folder = next((tmp_path / "cache").glob("onnx/*/"))
    float_names = [n.name for n in onnx.load(str(folder / "decoder.onnx")).graph.node if n.op_type == "Conv"]
    graph = onnx.load(str(folder / "decoder.int8v2.onnx")).graph
    producers = {o: n for n in graph.node for o in n.output}
    in_int8 = {n.name: producers.get(n.input[0]) is not None and producers[n.input[0]].op_type == "DequantizeLinear"
               for n in graph.node if n.op_type == "Conv"}
    assert any("heat" in name for name in in_int8)             # the heatmap branch is there ...
    latent, pixels = float_names[0], float_names[-1]          # the export is in forward order
    assert not in_int8[latent] and not in_int8[pixels]
    assert all(v for k, v in in_int8.items() if k not in (latent, pixels))   # ... and quantized


@pytest.mark.parametrize("runtime", ["torch", "auto"])
def test_int8_without_onnxruntime_runs_float_and_says_so(tmp_path, monkeypatch, caplog, runtime):
    monkeypatch.setattr("safefm.generator._onnx_available", lambda: False)
    with caplog.at_level(logging.WARNING):
        gen = _gen(tmp_path, monkeypatch, True, runtime=runtime)
    assert gen.runtime == "torch" and not gen.int8
    assert "int8 needs onnxruntime" in caplog.text


def test_the_cameras_int8_decoder_default_is_quiet_on_torch(tmp_path, monkeypatch, caplog):
    """``int8 = "decoder"`` is the camera's default, not a request: with the torch runtime the
    camera runs float without a warning on every start."""
    with caplog.at_level(logging.WARNING):
        gen = _gen(tmp_path, monkeypatch, "decoder", runtime="torch")
    assert gen.runtime == "torch" and not gen.int8
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]

