"""Where weights, identities and the shared data live.

- Weights: ``$SAFEFM_WEIGHTS`` if set, else the repository's ``weights/`` folder.
- Shared data (tests, training, evaluation; never committed): ``$SAFEFM_SHARED_DATA`` if set,
  else ``../shared/data`` beside the repository.
- Cache (ONNX exports keyed by checksum): ``$SAFEFM_CACHE`` or ``~/.cache/safefm``.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_NAME = "safefm_default"
DEFAULT_IDENTITY_NAME = "default.pt"


def weights_dir() -> Path:
    return Path(os.environ.get("SAFEFM_WEIGHTS") or REPO_ROOT / "weights")


def identities_dir() -> Path:
    return weights_dir() / "identities"


def default_model_path() -> Path:
    return weights_dir() / f"{DEFAULT_MODEL_NAME}.safetensors"


def resolve_model_path(value: str | Path | None) -> Path:
    """``None`` -> the default model; a bare name such as ``large`` -> ``weights/safefm_large.safetensors``
    (the shipped alternatives); anything else is a path."""
    if value is None or str(value) == "":
        return default_model_path()
    p = Path(value)
    if not p.suffix and len(p.parts) == 1 and not p.exists():
        return weights_dir() / f"safefm_{p.name}.safetensors"
    return p


def default_identity_path() -> Path:
    return identities_dir() / DEFAULT_IDENTITY_NAME


def shared_data_dir() -> Path:
    return Path(os.environ.get("SAFEFM_SHARED_DATA") or REPO_ROOT.parent / "shared" / "data")


def cache_dir() -> Path:
    p = Path(os.environ.get("SAFEFM_CACHE") or Path.home() / ".cache" / "safefm")
    p.mkdir(parents=True, exist_ok=True)
    return p
