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
