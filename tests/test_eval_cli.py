"""``safefm-eval`` end to end on a tiny subset, SAFE-FM = the tiny seeded model (CI speed)."""

from __future__ import annotations

import json

import pytest

from safefm.cli import eval as eval_cli
from safefm.eval.options import EvalOptions, variants
from safefm.eval.plots import figure_caption
from safefm.eval.report import jsonable
from safefm.eval.run import tiny_engine_factory
from safefm.eval.dlib68 import FEATURES68
from safefm.eval.metrics import FEATURES
from safefm.paths import shared_data_dir

DATA = shared_data_dir()
needs_data = pytest.mark.skipif(not (DATA / "lfw").is_dir() or not (DATA / "videos").is_dir(),
                                reason="../shared/data not present")

PRIVACY_FIELDS = {"method", "steps", "photos", "rank1", "rank1_detected_only", "verification",
                  "verification_detected_only", "face_detected_dlib", "face_detected_mediapipe",
                  "located_fallback", "realism", "engine", "seconds"}
CLIP_FIELDS = {"frames", "frames_with_input_face", "output_face_found", "fidelity", "flicker",
               "output_change_mean", "input_change_mean", "identity_consistency", "identity_distance",
               "leak_rate", "leak_rate_detected_only", "embedded_frames", "fidelity_dlib68",
               "dlib68_input_frames", "dlib68_output_face_found", "realism"}
OVERALL_FIELDS = {"frames", "output_face_found", "fidelity", "fidelity_clip_mean",
                  "fidelity_mean_pearson", "flicker", "identity_consistency", "identity_distance",
                  "leak_rate", "leak_rate_detected_only", "embedded_frames", "fidelity_dlib68",
                  "fidelity_dlib68_clip_mean", "fidelity_dlib68_mean_pearson", "dlib68_input_frames",
                  "dlib68_output_face_found", "realism"}
REALISM_FIELDS = {"sharpness", "tone_gap", "chroma_excess", "faces"}
ENGINE_FIELDS = {"frames", "ms_per_frame", "fps", "stage_ms", "generator_steps",
                 "face_status_counts", "frames_without_engine_face"}


def test_variants_and_caption():
    o = EvalOptions(steps=(2, 4), methods=("safefm", "blur"))
    assert variants(o) == [("safefm@2", "safefm", 2), ("safefm@4", "safefm", 4), ("blur", "blur", 2)]
    assert variants(EvalOptions(methods=("safefm",)))[0][0] == "safefm"
    meta = {"data": {"max_people": 3, "max_clips": None, "max_frames": 10}, "model": "m.safetensors",
            "identity": "id", "steps": [4], "seed": 7}
    cap = figure_caption(meta)
    for word in ("data:", "model: m.safetensors", "identity: id", "steps: 4", "seed: 7"):
        assert word in cap
    assert jsonable({"a": float("nan"), "b": (1, 2)}) == {"a": None, "b": [1, 2]}


def test_bad_method_is_one_error_line(capsys):
    assert eval_cli.main(["--methods", "safefm,bogus", "--out", "/nonexistent/x"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: unknown method") and err.count("\n") == 1


@needs_data
@pytest.mark.shared
@pytest.mark.slow
def test_quick_eval_writes_every_field(tmp_path):
    out = tmp_path / "eval"
    opts_for_factory = EvalOptions(seed=0)
    argv = ["--quick", "--out", str(out), "--max-people", "2", "--max-clips", "1",
            "--max-frames", "6", "--embed-stride", "3", "--seed", "0", "--tiny-model", "-q"]
    assert eval_cli.main(argv, engine_factory=tiny_engine_factory(opts_for_factory)) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["meta"]["resumed"] == []

    # An interrupted run continues: every finished piece is reused, with the same numbers.
    def no_engine(*a):
        raise AssertionError("a resumed run must not rebuild finished methods")
    assert eval_cli.main(argv + ["--resume"], engine_factory=no_engine) == 0
    again = json.loads((out / "report.json").read_text())
    assert len(again["meta"]["resumed"]) == 1 + 4 + 1 + 4       # gallery, 4 methods, 1 clip, 4 methods
    assert again["privacy"] == rep["privacy"] and again["video"] == rep["video"]
    assert again["meta"]["identity"] == "tiny-0" and again["meta"]["seed"] == 0
    # A different model (here: another seed) re-runs SAFE-FM only; data and baselines are reused.
    calls = []

    def only_safefm(method, steps, video):
        calls.append(method)
        return tiny_engine_factory(EvalOptions(seed=1))(method, steps, video)
    assert eval_cli.main([a if a != "0" else "1" for a in argv] + ["--resume"], engine_factory=only_safefm) == 0
    assert set(calls) == {"safefm"}
    third = json.loads((out / "report.json").read_text())
    assert third["meta"]["seed"] == 1 and len(third["meta"]["resumed"]) == 1 + 3 + 1 + 3
    # A run stopped between clips keeps each finished clip: no engine is built to resume it.
    dropped = list((out / "partial").glob("video_safefm_*.pkl"))
    assert dropped and all(f.unlink() is None for f in dropped)
    assert eval_cli.main([a if a != "0" else "1" for a in argv] + ["--resume"], engine_factory=no_engine) == 0
    assert json.loads((out / "report.json").read_text())["video"] == third["video"]

    (out / "privacy.png").unlink()
    assert eval_cli.main(["--replot", "--out", str(out)]) == 0      # re-render from report.json
    assert (out / "privacy.png").is_file()
    meta = rep["meta"]
    assert meta["schema"] == "safefm-eval/1" and meta["quick"] is True
    assert meta["methods"] == ["safefm", "none", "blur", "pixelate"]
    assert meta["steps"] == [2] and meta["seed"] == 0 and meta["identity"] == "tiny-0"
    assert meta["command"].startswith("safefm-eval --quick")
    assert {"privacy", "video", "total", "total_with_report"} <= set(meta["seconds"])
    assert {"cpu_count", "platform"} <= set(meta["machine"])

    priv = rep["privacy"]
    assert priv["gallery"]["photos"] >= 3 and priv["gallery"]["threshold"] == 0.6
    assert set(priv["methods"]) == {"safefm", "none", "blur", "pixelate"}
    for m in priv["methods"].values():
        assert PRIVACY_FIELDS <= set(m)
        assert ENGINE_FIELDS <= set(m["engine"])
    none = priv["methods"]["none"]
    assert none["rank1"] == 1.0 and none["verification"] == 1.0     # the same images
    assert none["face_detected_dlib"] == 1.0
    # Realism on the photos: colour ones and grey-scale ones apart; the input itself is the ceiling.
    assert priv["gallery"]["grey_copies"] >= 1
    for m in priv["methods"].values():
        assert set(m["realism"]) == {"colour", "grey"}
        assert all(REALISM_FIELDS <= set(r) for r in m["realism"].values())
        assert m["realism"]["colour"]["faces"] >= 2 and m["realism"]["grey"]["faces"] >= 1
    for part in ("colour", "grey"):
        assert {k: none["realism"][part][k] for k in ("sharpness", "tone_gap", "chroma_excess")} == \
            {"sharpness": 1.0, "tone_gap": 0.0, "chroma_excess": 0.0}
        assert priv["methods"]["blur"]["realism"][part]["sharpness"] < 0.1     # blur wipes the detail
    assert priv["methods"]["blur"]["realism"]["grey"]["chroma_excess"] < 0.5   # a blurred grey face stays grey
    assert priv["methods"]["safefm"]["realism"]["grey"]["chroma_excess"] < 1.0  # grey photos stay grey

    vid = rep["video"]
    assert vid["features"] == list(FEATURES)
    assert set(vid["methods"]) == {"safefm", "none", "blur", "pixelate"}
    for m in vid["methods"].values():
        assert OVERALL_FIELDS <= set(m["overall"])
        assert set(m["overall"]["fidelity"]) == set(FEATURES)
        assert {"pearson", "mae", "n"} <= set(m["overall"]["fidelity"]["mouth_open"])
        assert {"mean", "median", "p5", "min", "n"} <= set(m["overall"]["identity_consistency"])
        for c in m["clips"].values():
            assert CLIP_FIELDS <= set(c)
    assert vid["features68"] == list(FEATURES68) and vid["dlib68_frame_stride"] == 1
    for m in vid["methods"].values():
        assert set(m["overall"]["fidelity_dlib68"]) == set(FEATURES68)
        assert REALISM_FIELDS <= set(m["overall"]["realism"])
        assert m["overall"]["realism"]["faces"] == m["overall"]["frames"]       # every frame measured
        for c in m["clips"].values():
            assert set(c["fidelity_dlib68"]) == set(FEATURES68) and REALISM_FIELDS <= set(c["realism"])
    vn = vid["methods"]["none"]["overall"]
    assert vn["flicker"] == pytest.approx(1.0) and vn["leak_rate"] == 1.0
    assert vn["fidelity"]["yaw"]["mae"] == 0.0
    # dlib reads the input face in every frame; the same image reads the same (and the series move).
    assert vn["dlib68_input_frames"] == vn["frames"] and vn["dlib68_output_face_found"] == 1.0
    assert all(vn["fidelity_dlib68"][f]["mae"] == 0.0 for f in FEATURES68)
    assert sum(vn["fidelity_dlib68"][f]["pearson"] == pytest.approx(1.0) for f in FEATURES68) >= 3
    assert {k: vn["realism"][k] for k in ("sharpness", "tone_gap", "chroma_excess")} == \
        {"sharpness": 1.0, "tone_gap": 0.0, "chroma_excess": 0.0}
    assert vid["methods"]["blur"]["overall"]["realism"]["sharpness"] < 0.1
    assert vid["methods"]["blur"]["overall"]["dlib68_output_face_found"] < 0.5   # no face left to read
    assert vid["methods"]["safefm"]["engine"]["generator_steps"] == 2   # the runtime default

    for name in ("report.md", "privacy.png", "fidelity.png", "stability.png"):
        assert (out / name).is_file(), name
    assert set(meta["plots"]) >= {"privacy.png", "fidelity.png", "stability.png"}
    md = (out / "report.md").read_text()
    assert "rank-1" in md and "flicker" in md and "model: tiny random model" in md
    assert "## Realism" in md and "photos, grey-scale" in md and "clips, all frames" in md
    assert "dlib's 68-point predictor" in md


def test_runtime_config_file_reaches_the_engines(tmp_path):
    from safefm.config import CONFIG_DIR

    text = (CONFIG_DIR / "runtime_default.toml").read_text()
    assert "warm_start = false" in text
    cfg = tmp_path / "warm.toml"
    cfg.write_text(text.replace("warm_start = false", "warm_start = true"))
    make = tiny_engine_factory(EvalOptions(out=tmp_path, runtime_config=cfg))
    assert make("safefm", 3, True).cfg.warm_start is True and make("safefm", 3, True).cfg.steps == 3
    assert make("blur", 3, True) is not None
    assert tiny_engine_factory(EvalOptions(out=tmp_path))("safefm", 3, True).cfg.warm_start is False
    assert eval_cli.build_parser().parse_args(["--config", str(cfg)]).config == cfg
