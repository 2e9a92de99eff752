"""research/probe_privacy_knobs.py: each variant changes exactly what it names; the merged
scripts (scripts/identities.py, scripts/recon_report.py) keep each former script's options."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import cv2
import numpy as np
import pytest

from safefm.config import RuntimeConfig
from safefm.face.alignment import load_template
from safefm.identity import Identity

ROOT = Path(__file__).resolve().parents[1]


def _load(rel: str):
    spec = importlib.util.spec_from_file_location(Path(rel).stem, ROOT / rel)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


probe = _load("research/probe_privacy_knobs.py")


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


def test_identity_subcommands_keep_their_own_defaults():
    ap = _load("scripts/identities.py").parser()
    sel = ap.parse_args(["select", "--fidelity", "--identity-files", "a.pt,b.pt"])
    assert (sel.candidates, sel.seed_base, sel.photos, sel.out_dir) == (16, 1000, 120, Path("runs/identity_select"))
    assert sel.fidelity and sel.identity_files == "a.pt,b.pt"
    scr = ap.parse_args(["screen", "--groups", "female:adult"])
    assert (scr.candidates, scr.seed_base, scr.drivers, scr.out_dir) == (64, 2000, 8, Path("runs/identity_screen"))
    assert scr.population == Path("runs/population.npz") and scr.groups == "female:adult"
    with pytest.raises(SystemExit):
        ap.parse_args(["screen", "--photos", "5"])      # a select option
    with pytest.raises(SystemExit):
        ap.parse_args([])                               # a subcommand is required


def test_recon_report_subcommands():
    ap = _load("scripts/recon_report.py").parser()
    dec = ap.parse_args(["decoders", "--runs", "runs/lean", "--json", "docs/ae_report.json"])
    assert (dec.command, dec.runs, dec.rows, dec.json) == ("decoders", Path("runs/lean"), 256, Path("docs/ae_report.json"))
    mod = ap.parse_args(["models", "--rows", "64"])
    assert (mod.command, mod.models, mod.rows) == ("models", "large,default", 64)
    with pytest.raises(SystemExit):
        ap.parse_args(["decoders", "--models", "default"])  # a models option


def test_forehead_step_reads_the_step_across_the_mask_s_top_and_skips_hair():
    step = _load("research/probe_forehead_step.py").forehead_step
    frame = np.full((120, 100, 3), (200, 160, 140), np.uint8)          # one forehead, no step
    mask = np.zeros((120, 100), np.float32)
    mask[40:, 20:80] = 1.0
    output = frame.copy()
    output[40:] = (180, 140, 120)                                       # the pasted face, darker
    lab = lambda rgb: cv2.cvtColor(np.uint8([[rgb]]), cv2.COLOR_RGB2Lab)[0, 0].astype(float) * (100 / 255, 1, 1)
    real, out, n = step(output, frame, mask)
    assert real == 0.0 and n == 30                                      # the middle half of 60 columns
    assert out == pytest.approx(np.linalg.norm(lab((200, 160, 140)) - lab((180, 140, 120))), abs=1e-3)
    frame[:40] = (40, 30, 25)                                           # hair above the mask: not a forehead
    assert step(output, frame, mask)[2] == 0
