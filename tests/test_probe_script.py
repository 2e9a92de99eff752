"""scripts/probe_privacy_knobs.py: each variant changes exactly what it names."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from safefm.face.alignment import load_template
from safefm.config import RuntimeConfig
from safefm.identity import Identity

_spec = importlib.util.spec_from_file_location(
    "probe_privacy_knobs", Path(__file__).resolve().parents[1] / "scripts" / "probe_privacy_knobs.py")
probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(probe)


def _identity():
    t = load_template()
    return Identity(embedding=np.full(128, 0.5, np.float32), shape=(t + 0.01).astype(np.float32), seed=3)


def test_variants_change_only_what_they_name():
    cfg, ident, mean, t = RuntimeConfig(), _identity(), np.zeros(128, np.float32), load_template()
    assert probe.apply_variant("base", cfg, ident, mean, t) == (cfg, ident)
    c, i = probe.apply_variant("color_match=false", cfg, ident, mean, t)
    assert c.color_match is False and c.mask_dilate == cfg.mask_dilate and i is ident
    c, i = probe.apply_variant("mask_dilate=0.25", cfg, ident, mean, t)
    assert c.mask_dilate == 0.25
    c, i = probe.apply_variant("emb_scale=2", cfg, ident, mean, t)
    assert c is cfg and np.allclose(i.embedding, 1.0) and np.array_equal(i.shape, ident.shape)
    c, i = probe.apply_variant("shape_scale=3", cfg, ident, mean, t)
    assert np.allclose(i.shape - t, 0.03, atol=1e-6) and np.array_equal(i.embedding, ident.embedding)
    for bad in ("nonsense=1", "mask_dilate"):
        with pytest.raises(ValueError):
            probe.apply_variant(bad, cfg, ident, mean, t)
