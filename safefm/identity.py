"""Synthetic identity files (``id.pt``).

An identity is what the anonymized face *is*: never computed from the user's face.

- ``embedding``: (D,) float32, drawn from a model of the training identities' embedding
  distribution (:mod:`safefm.identity_sampler`), fed to the generator as cross-attention tokens.
- ``shape``: (478, 3) float32, the identity's own neutral face shape in canonical crop
  coordinates (see :func:`safefm.face.alignment.load_template`); the user's expression is re-applied
  to it (:mod:`safefm.face.retarget`), so the user's face geometry never reaches the generator.
  Kept upright (:func:`safefm.face.retarget.upright_shape`, applied on creation and on load): a
  tilted rest shape would tilt every output head by as much.
- ``seed``: the fixed noise seed, so the face does not "boil" from frame to frame.

Stored with ``torch.save`` as a dict of tensors, ints and strings; loaded with
``torch.load(weights_only=True)``, so a file can never run code, then validated.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import IdentityFileError, first_line
from .face.retarget import upright_shape

FORMAT = "safefm-identity"
FORMAT_VERSION = 1
N_LANDMARKS = 478


@dataclass(frozen=True)
class Identity:
    embedding: np.ndarray                 # (D,) float32
    shape: np.ndarray                     # (478, 3) float32, canonical crop coordinates
    seed: int                             # noise seed of this identity
    name: str = "identity"
    attributes: dict = field(default_factory=dict)  # e.g. {"gender": "female", "age": "adult"}
    version: int = FORMAT_VERSION

    def noise(self, latent_shape: tuple[int, int, int]) -> torch.Tensor:
        """The identity's fixed starting noise (1, C, h, w), the same on every call."""
        g = torch.Generator().manual_seed(int(self.seed))
        return torch.randn((1, *latent_shape), generator=g)


def save_identity(identity: Identity, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT, "version": int(identity.version), "name": str(identity.name),
        "seed": int(identity.seed),
        "embedding": torch.from_numpy(np.ascontiguousarray(identity.embedding, np.float32)),
        "shape": torch.from_numpy(np.ascontiguousarray(identity.shape, np.float32)),
        "attributes": {str(k): str(v) for k, v in identity.attributes.items()},
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_identity(path: str | Path, embedding_dim: int | None = None) -> Identity:
    """Read and validate an identity file; IdentityFileError (one line) on any problem."""
    path = Path(path)
    if not path.is_file():
        raise IdentityFileError(f"identity file not found: {path} (make one: safefm-identity new -o {path.name})")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = first_line(exc, filename=False)
        detail = first[:100] if any(c.isalpha() for c in first) else type(exc).__name__
        raise IdentityFileError(f"{path} is not a readable identity file: truncated, corrupt or not "
                                f"made by safefm-identity ({detail})") from None
    return identity_from_dict(data, str(path), embedding_dim)


def identity_from_dict(data, where: str = "identity", embedding_dim: int | None = None) -> Identity:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise IdentityFileError(f"{where} is not a SAFE-FM identity file (missing format tag)")
    version = data.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise IdentityFileError(f"{where} has unsupported identity format version {version!r}")
    emb, shape = data.get("embedding"), data.get("shape")
    for name, t in (("embedding", emb), ("shape", shape)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
            raise IdentityFileError(f"{where}: field '{name}' must be a float32 tensor")
        if not torch.isfinite(t).all():
            raise IdentityFileError(f"{where}: field '{name}' contains NaN or infinite values")
    if emb.dim() != 1 or (embedding_dim is not None and emb.shape[0] != embedding_dim):
        want = f"({embedding_dim},)" if embedding_dim else "(D,)"
        raise IdentityFileError(f"{where}: embedding has shape {tuple(emb.shape)}, expected {want}")
    if float(emb.norm()) < 1e-6:
        raise IdentityFileError(f"{where}: embedding is all zeros")
    if tuple(shape.shape) != (N_LANDMARKS, 3):
        raise IdentityFileError(f"{where}: shape has shape {tuple(shape.shape)}, expected ({N_LANDMARKS}, 3)")
    seed = data.get("seed")
    if not isinstance(seed, int) or seed < 0:
        raise IdentityFileError(f"{where}: seed must be a non-negative int")
    attrs = data.get("attributes", {})
    if not isinstance(attrs, dict):
        raise IdentityFileError(f"{where}: attributes must be a dict")
    try:
        shape = upright_shape(shape.numpy())
    except ValueError as exc:
        raise IdentityFileError(f"{where}: {exc}") from None
    return Identity(embedding=emb.numpy().copy(), shape=shape, seed=seed,
                    name=str(data.get("name", "identity")), attributes=dict(attrs), version=version)


def random_shape(template: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """A plausible new neutral face shape: the template under a seeded smooth deformation.

    template: (478, 3) canonical crop coordinates. Global width/length scales plus a few
    low-frequency displacement waves (about 1-3 % of the crop), so every feature moves
    consistently and the face stays a face. Returns (478, 3) float32.
    """
    t = np.asarray(template, np.float64)
    c = t[:, :2].mean(0)
    p = t[:, :2] - c
    sx, sy = 1 + strength * rng.normal(0, 0.035), 1 + strength * rng.normal(0, 0.035)
    out = t.copy()
    out[:, 0] = c[0] + p[:, 0] * sx
    out[:, 1] = c[1] + p[:, 1] * sy
    for _ in range(4):  # smooth waves over the face
        k = rng.normal(0, 6.0, size=2)
        phase = rng.uniform(0, 2 * np.pi)
        amp = strength * rng.normal(0, 0.006, size=2)
        wave = np.sin(p @ k + phase)
        out[:, :2] += wave[:, None] * amp[None, :]
    out[:, 2] = t[:, 2] * (1 + strength * rng.normal(0, 0.05))
    return upright_shape(out, template)


def describe(identity: Identity) -> str:
    e = identity.embedding
    attrs = ", ".join(f"{k}={v}" for k, v in sorted(identity.attributes.items())) or "-"
    lo, hi = identity.shape[:, :2].min(0), identity.shape[:, :2].max(0)
    return "\n".join([
        f"name:       {identity.name}",
        f"format:     {FORMAT} v{identity.version}",
        f"seed:       {identity.seed}",
        f"embedding:  {e.shape[0]}-d, norm {np.linalg.norm(e):.3f}, mean {e.mean():+.4f}",
        f"shape:      {identity.shape.shape[0]} landmarks, x {lo[0]:.3f}..{hi[0]:.3f}, y {lo[1]:.3f}..{hi[1]:.3f}",
        f"attributes: {attrs}",
    ])
