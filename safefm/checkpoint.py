"""Self-describing model weights: one safetensors file + a JSON sidecar.

``NAME.safetensors`` holds the :class:`~safefm.models.SafeFMModel` state dict (LoRA kept as
separate ``lora_`` keys) and, in its metadata, the format tag and the model config as JSON.
``NAME.json`` beside it repeats the config and adds the file's sha256, which loading checks.
safetensors holds tensors only, so loading a user-supplied file never runs code.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from .config import ModelConfig, stored_model_config, to_dict
from .errors import ConfigError, WeightsError

FORMAT = "safefm-model"
FORMAT_VERSION = "1"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sidecar_path(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


def save_model(model, path: str | Path, extra_meta: dict | None = None,
               dtype: torch.dtype = torch.float16) -> Path:
    """Write ``model`` (a SafeFMModel) to ``path`` (.safetensors) and its sidecar; returns path.

    Floating tensors are stored as ``dtype`` (float16 halves the size; loading upcasts).
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous().cpu()
             for k, v in model.state_dict().items()}
    cfg = to_dict(model.cfg)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": json.dumps(cfg),
            "has_controlnet": str(model.controlnet is not None),
            "has_lora": str(any("lora_" in k for k in state))}
    meta.update({k: str(v) for k, v in (extra_meta or {}).items()})
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata=meta)
    os.replace(tmp, path)
    side = {"format": FORMAT, "format_version": FORMAT_VERSION, "file": path.name,
            "sha256": sha256_file(path), "bytes": path.stat().st_size, "config": cfg,
            **{k: v for k, v in meta.items() if k not in ("config", "format", "format_version")}}
    sidecar_path(path).write_text(json.dumps(side, indent=2) + "\n")
    return path


def read_metadata(path: str | Path) -> dict:
    """The safetensors metadata of a model file; WeightsError if it is not one."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"model weights not found: {path} (train them, or set SAFEFM_WEIGHTS)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises several types for corrupt headers
        raise WeightsError(f"{path} is not a valid safetensors file ({exc})") from None
    if meta.get("format") != FORMAT:
        raise WeightsError(f"{path} is not a SAFE-FM model file (format={meta.get('format')!r})")
    return meta


def verify_checksum(path: str | Path) -> str | None:
    """Check the sidecar's sha256 if a sidecar exists; return the digest (None without sidecar)."""
    side = sidecar_path(path)
    if not side.is_file():
        return None
    try:
        expected = json.loads(side.read_text())["sha256"]
    except (ValueError, KeyError):
        raise WeightsError(f"{side} is not a valid weights sidecar (no sha256)") from None
    actual = sha256_file(path)
    if actual != expected:
        raise WeightsError(f"{path} is corrupt: sha256 {actual[:12]}… does not match {side.name} ({expected[:12]}…)")
    return actual


def read_model_header(path: str | Path) -> tuple[ModelConfig, dict, list[str]]:
    """(model config, metadata, tensor names) of ``path`` without reading its tensors; the
    metadata's ``sha256`` is the checksum the sidecar confirmed ("" without a sidecar).
    WeightsError with one line on a missing, corrupt or foreign file or a checksum mismatch."""
    from safetensors import safe_open

    meta = read_metadata(path)
    digest = verify_checksum(path)
    try:
        cfg: ModelConfig = stored_model_config(json.loads(meta["config"]))
    except (KeyError, ValueError, ConfigError) as exc:
        raise WeightsError(f"{path} has no usable model config ({exc})") from None
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    return cfg, dict(meta, sha256=digest or ""), keys


def load_model(path: str | Path, device: str = "cpu"):
    """Build the SafeFMModel described by ``path``'s metadata and load its weights (float32).

    Returns (model, metadata). Raises WeightsError with one line on a missing, corrupt or
    foreign file, a checksum mismatch, or weights that do not fit the stored config.
    """
    from safetensors.torch import load_file

    from .models import SafeFMModel

    cfg, meta, _ = read_model_header(path)
    state = load_file(str(path), device="cpu")
    model = SafeFMModel(cfg, with_controlnet=any(k.startswith("controlnet.") for k in state),
                        with_lora=any("lora_" in k for k in state))
    _load_state(model, state, path)
    return model.to(device).eval(), meta


def load_part(path: str | Path, prefix: str, module: torch.nn.Module) -> torch.nn.Module:
    """Load the ``prefix.*`` tensors of ``path`` into ``module`` (float32, eval mode): one part
    of the model (e.g. the identity projector) without building the others."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        state = {k[len(prefix) + 1:]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix + ".")}
    _load_state(module, state, path)
    return module.eval()


def _load_state(module: torch.nn.Module, state: dict, path) -> None:
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise WeightsError(f"{path} does not match its config: {len(missing)} missing "
                           f"(e.g. {missing[:1]}), {len(unexpected)} unexpected (e.g. {unexpected[:1]})")
