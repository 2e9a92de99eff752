import dataclasses
from pathlib import Path

import pytest

from safefm.config import (ModelConfig, RuntimeConfig, load_model_config, load_runtime_config,
                           model_config_from_dict, to_dict)
from safefm.errors import ConfigError


def test_shipped_configs_match_the_dataclass_defaults():
    assert load_model_config() == ModelConfig()
    assert load_runtime_config() == RuntimeConfig()


def test_every_config_field_is_commented_in_the_toml():
    from safefm.config import CONFIG_DIR
    for name, cls in (("model_default.toml", ModelConfig), ("runtime_default.toml", RuntimeConfig)):
        lines = (CONFIG_DIR / name).read_text().splitlines()
        for f in dataclasses.fields(cls):
            line = next(line for line in lines if line.split("=")[0].strip() == f.name)
            assert "#" in line, f"{name}: field {f.name} has no comment"


def test_configs_are_frozen_and_round_trip():
    cfg = load_model_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.image_size = 64
    assert model_config_from_dict(to_dict(cfg)) == cfg
    assert cfg.latent_shape == (4, 16, 16)


def test_bad_values_get_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown"):
        model_config_from_dict({"image_sise": 128})
    with pytest.raises(ConfigError, match="steps"):
        load_runtime_config(steps=0)
    with pytest.raises(ConfigError, match="identity_guidance"):
        load_runtime_config(identity_guidance=-1.0)
    p = tmp_path / "bad.toml"
    p.write_text("[runtime]\nsteps = ")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_runtime_config(p)
    assert load_runtime_config(steps=3, runtime=None).steps == 3


def test_a_shipped_model_is_found_by_name(tmp_path, monkeypatch):
    from safefm.paths import default_model_path, resolve_model_path

    monkeypatch.setenv("SAFEFM_WEIGHTS", str(tmp_path))
    assert resolve_model_path(None) == default_model_path() == tmp_path / "safefm_default.safetensors"
    assert resolve_model_path("large") == tmp_path / "safefm_large.safetensors"
    assert resolve_model_path("my/model.safetensors") == Path("my/model.safetensors")


def test_runtime_precedence_builtin_then_command_defaults_then_file_then_flags(tmp_path):
    """Each layer overrides the one before; a flag left out (None) does not."""
    builtin = load_runtime_config()
    cam = {"identity_repel": 0.0, "steps": 2}
    assert load_runtime_config(defaults=cam).identity_repel == 0.0
    assert load_runtime_config(defaults=cam).hold_frames == builtin.hold_frames
    f = tmp_path / "mine.toml"
    f.write_text("[runtime]\nsteps = 3\n")
    cfg = load_runtime_config(f, defaults=cam)
    assert (cfg.steps, cfg.identity_repel) == (3, 0.0)   # the file wins over the command's defaults
    f.write_text("[runtime]\nsteps = 3\nidentity_repel = 1.5\n")
    assert load_runtime_config(f, defaults=cam).identity_repel == 1.5
    cfg = load_runtime_config(f, defaults=cam, steps=5, identity_repel=None)
    assert (cfg.steps, cfg.identity_repel) == (5, 1.5)   # flags win; an absent flag changes nothing


def test_a_missing_or_unreadable_config_file_is_an_error_not_the_defaults(tmp_path):
    with pytest.raises(ConfigError, match="not found: .*typo.toml"):
        load_runtime_config(tmp_path / "typo.toml")
    with pytest.raises(ConfigError, match="cannot be read"):
        load_runtime_config(tmp_path)                      # a folder
    (tmp_path / "other.toml").write_text("[model]\nimage_size = 64\n")
    with pytest.raises(ConfigError, match=r"no \[runtime\] table"):
        load_runtime_config(tmp_path / "other.toml")


@pytest.mark.parametrize("command", ["cam", "anonymize"])
def test_the_commands_refuse_a_missing_config_with_one_line(command, tmp_path, capsys):
    """``--config typo.toml`` used to run on the built-in defaults without a word."""
    import importlib

    import cv2
    import numpy as np

    cli = importlib.import_module(f"safefm.cli.{command}")
    src = tmp_path / "in"
    src.mkdir()
    cv2.imwrite(str(src / "in.jpg"), np.full((64, 64, 3), 128, np.uint8))
    calls = []
    args = {"cam": ["--source", str(src / "in.jpg"), "--no-vcam", "--record", str(tmp_path / "o.mp4"),
                    "--no-tray"],
            "anonymize": [str(src / "in.jpg"), "-o", str(tmp_path / "out.jpg")]}[command]
    code = cli.main(args + ["--config", str(tmp_path / "typo.toml")],
                    engine_factory=lambda *a, **k: calls.append(1))
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and not calls
    assert err == [f"error: config file not found: {tmp_path / 'typo.toml'}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]   # nothing written


def test_the_live_camera_repels_as_files_do_unless_the_file_or_a_flag_says_otherwise(tmp_path):
    from safefm.cli.cam import _engine_factory, build_parser

    seen = []

    def factory(cfg, **kw):
        seen.append(cfg.identity_repel)

    f = tmp_path / "steps.toml"
    f.write_text("[runtime]\nsteps = 3\n")
    on = tmp_path / "repel.toml"
    on.write_text("[runtime]\nidentity_repel = 1.0\n")
    for argv in ([], ["--config", str(f)], ["--config", str(on)], ["--config", str(on), "--identity-repel", "0"]):
        _engine_factory(build_parser().parse_args(argv), factory)()
    assert seen == [1.5, 1.5, 1.0, 0.0]


def test_the_live_camera_keeps_the_detail_stage_off_unless_asked(tmp_path):
    from safefm.cli.cam import _engine_factory, build_parser

    seen = []
    on = tmp_path / "detail.toml"
    on.write_text("[runtime]\ndetail_min_px = 200\n")
    for argv in ([], ["--config", str(on)], ["--detail-min-px", "160"]):
        _engine_factory(build_parser().parse_args(argv), lambda cfg, **kw: seen.append(cfg.detail_min_px))()
    assert seen == [0, 200, 160]
    assert load_runtime_config().detail_min_px == 160          # files and images: on for large faces


def test_face_inner_out_of_range_is_one_line():
    with pytest.raises(ConfigError, match="face_inner"):
        RuntimeConfig(face_inner=0.5)
    with pytest.raises(ConfigError, match="even_skin"):
        RuntimeConfig(even_skin=-1.0)


def test_int8_decoder_is_the_cameras_default_and_files_stay_float():
    from safefm.cli.cam import _engine_factory, build_parser

    seen = []
    for argv in ([], ["--int8", "all"], ["--int8", "off"], ["--no-int8"], ["--int8", "decoder"]):
        _engine_factory(build_parser().parse_args(argv), lambda cfg, **kw: seen.append(cfg.int8))()
    assert seen == ["decoder", "all", "off", "off", "decoder"]
    assert load_runtime_config().int8 == "off"
    from safefm.cli.anonymize import build_parser as files_parser
    args = files_parser().parse_args(["--int8", "decoder", "photo.jpg", "-o", "out.jpg"])   # never eats the input
    assert args.int8 == "decoder" and files_parser().parse_args(["photo.jpg", "-o", "o.jpg"]).int8 is None
    assert load_runtime_config(int8=True).int8 == "all"       # a TOML of before session 15
    with pytest.raises(ConfigError, match="int8 must be one of off, decoder, all"):
        load_runtime_config(int8="fast")


def test_the_camera_paints_over_the_hair_and_files_keep_it():
    from safefm.cli.cam import _engine_factory, build_parser

    seen = []
    _engine_factory(build_parser().parse_args([]), lambda cfg, **kw: seen.append(cfg.keep_hair))()
    assert seen == [False] and load_runtime_config().keep_hair is True
