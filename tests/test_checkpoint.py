"""Self-describing weights: config + checksum stored with the file; corrupt files are refused."""

import json

import pytest
import torch

from safefm.checkpoint import load_model, read_metadata, save_model
from safefm.errors import WeightsError
from safefm.tiny import tiny_model, tiny_model_config


def test_round_trip_keeps_config_and_weights(tmp_path):
    m = tiny_model(seed=1)
    p = save_model(m, tmp_path / "m.safetensors", extra_meta={"trained_on": "nothing"}, dtype=torch.float32)
    side = json.loads((tmp_path / "m.json").read_text())
    assert side["config"]["image_size"] == 32 and len(side["sha256"]) == 64
    back, meta = load_model(p)
    assert back.cfg == tiny_model_config() and meta["trained_on"] == "nothing"
    for (k, a), (_, b) in zip(sorted(m.state_dict().items()), sorted(back.state_dict().items())):
        assert torch.equal(a, b), k


def test_fp16_storage_is_close(tmp_path):
    m = tiny_model(seed=2)
    back, _ = load_model(save_model(m, tmp_path / "m.safetensors"))
    w0, w1 = m.unet.conv_in.weight, back.unet.conv_in.weight
    assert w1.dtype == torch.float32 and torch.allclose(w0, w1, atol=1e-3)


def test_checksum_mismatch_and_foreign_files_are_refused(tmp_path):
    p = save_model(tiny_model(), tmp_path / "m.safetensors")
    raw = bytearray(p.read_bytes())
    raw[-10] ^= 0xFF
    p.write_bytes(bytes(raw))
    with pytest.raises(WeightsError, match="corrupt"):
        load_model(p)
    with pytest.raises(WeightsError, match="not found"):
        load_model(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(WeightsError, match="not a valid safetensors"):
        read_metadata(tmp_path / "junk.safetensors")
