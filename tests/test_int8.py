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
    g8 = _gen(tmp_path, monkeypatch, True)
    assert g8.int8
    files = sorted(p.name for p in (tmp_path / "cache").glob("onnx/*/*.int8.onnx"))
    assert files == ["decoder.int8.onnx", "velocity.int8.onnx"]
    got = _draw(g8, heat)
    assert got.shape == ref.shape and not np.array_equal(got, ref)           # it is another graph ...
    assert np.abs(got.astype(int) - ref.astype(int)).mean() < 1.5            # ... drawing the same face
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("onnx/*/*.int8.onnx")}
    monkeypatch.setattr("safefm.quantize.calibration_feeds",
                        lambda *a: pytest.fail("calibrated again although the int8 graphs are cached"))
    again = _gen(tmp_path, monkeypatch, True)
    np.testing.assert_array_equal(_draw(again, heat), got)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert not [p for p in (tmp_path / "cache").rglob("*") if ".tmp." in p.name or ".pre." in p.name]


@pytest.mark.parametrize("runtime", ["torch", "auto"])
def test_int8_without_onnxruntime_runs_float_and_says_so(tmp_path, monkeypatch, caplog, runtime):
    monkeypatch.setattr("safefm.generator._onnx_available", lambda: False)
    with caplog.at_level(logging.WARNING):
        gen = _gen(tmp_path, monkeypatch, True, runtime=runtime)
    assert gen.runtime == "torch" and not gen.int8
    assert "int8 needs onnxruntime" in caplog.text
