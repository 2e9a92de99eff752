"""Coarse attributes (gender, age group) of a face from its dlib descriptor.

A small classifier over the 128-d dlib ResNet descriptor the engine already takes of each
tracked face (:func:`safefm.guard.embed_real_faces`): one tiny MLP per attribute (input
standardised, ``hidden`` ReLU units, softmax over the classes; ``hidden = 0`` is plain
logistic regression). Trained on UTKFace's file-name labels by ``scripts/train_attributes.py``.

It only says which of the identity sampler's groups (:data:`safefm.identity_sampler.AGE_GROUPS`,
:data:`safefm.identity_sampler.GENDERS`) a synthetic identity is drawn from when attribute
matching is on (``RuntimeConfig.identity_match``): the identity itself is still a sample of the
sampler, never derived from the person. Descriptors and predictions live in memory only.

File: ``NAME.safetensors`` (tensors ``input.mean``, ``input.std``, ``HEAD.N.weight``,
``HEAD.N.bias``; metadata: format tag, version, the heads and their classes as JSON) and a
``NAME.json`` sidecar (the same, the sha256 that loading checks, and the measured accuracy).
Tensors only: loading a file never runs code.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import WeightsError

FORMAT = "safefm-attributes"
FORMAT_VERSION = "1"
FILE_NAME = "attributes.safetensors"
GENDER_CLASSES = ("male", "female")               # safefm.identity_sampler.GENDERS order (0, 1)
AGE_CLASSES = ("child", "young", "adult", "senior")   # safefm.identity_sampler.AGE_GROUPS order


def default_attributes_path() -> Path:
    """``weights/attributes.safetensors`` (or under ``$SAFEFM_WEIGHTS``)."""
    from .paths import weights_dir

    return weights_dir() / FILE_NAME


@dataclass(frozen=True)
class Head:
    """One attribute: ``classes`` and the MLP layers [(W (out, in), b (out,))], ReLU between."""
    classes: tuple[str, ...]
    layers: tuple[tuple[np.ndarray, np.ndarray], ...]

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """x: (N, D) standardised descriptors -> (N, len(classes)) softmax probabilities."""
        h = x
        for i, (w, b) in enumerate(self.layers):
            h = h @ w.T + b
            if i < len(self.layers) - 1:
                h = np.maximum(h, 0.0)
        h = h - h.max(axis=1, keepdims=True)
        e = np.exp(h)
        return e / e.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class AttributeClassifier:
    """Predicts ``{attribute: class}`` (e.g. ``{"gender": "female", "age": "adult"}``)."""
    mean: np.ndarray                  # (D,) input standardisation
    std: np.ndarray                   # (D,)
    heads: dict[str, Head]
    info: dict = field(default_factory=dict)   # training figures from the sidecar

    def probabilities(self, embeddings: np.ndarray) -> dict[str, np.ndarray]:
        """embeddings: (N, D) or (D,) -> {attribute: (N, classes) probabilities}."""
        x = (np.atleast_2d(np.asarray(embeddings, np.float32)) - self.mean) / self.std
        return {k: h.probabilities(x) for k, h in self.heads.items()}

    def predict(self, embedding: np.ndarray) -> dict[str, str]:
        """One (D,) descriptor -> {attribute: most probable class}."""
        return {k: self.heads[k].classes[int(np.argmax(p[0]))]
                for k, p in self.probabilities(embedding).items()}

    def predict_indices(self, embeddings: np.ndarray) -> dict[str, np.ndarray]:
        """(N, D) descriptors -> {attribute: (N,) class indices}."""
        return {k: p.argmax(axis=1) for k, p in self.probabilities(embeddings).items()}


def save_attributes(clf: AttributeClassifier, path: str | Path) -> Path:
    """Write ``path`` (.safetensors) and its sidecar (with sha256 and ``clf.info``); returns path."""
    import torch
    from safetensors.torch import save_file

    from .checkpoint import sha256_file, sidecar_path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"input.mean": torch.from_numpy(np.ascontiguousarray(clf.mean, np.float32)),
               "input.std": torch.from_numpy(np.ascontiguousarray(clf.std, np.float32))}
    heads = {}
    for name, head in clf.heads.items():
        heads[name] = {"classes": list(head.classes), "layers": len(head.layers)}
        for i, (w, b) in enumerate(head.layers):
            tensors[f"{name}.{i}.weight"] = torch.from_numpy(np.ascontiguousarray(w, np.float32))
            tensors[f"{name}.{i}.bias"] = torch.from_numpy(np.ascontiguousarray(b, np.float32))
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "heads": json.dumps(heads),
            "input": "dlib ResNet face descriptor (128-d)"}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    side = {"format": FORMAT, "format_version": FORMAT_VERSION, "file": path.name,
            "sha256": sha256_file(path), "bytes": path.stat().st_size, "input": meta["input"],
            "heads": heads, **clf.info}
    sidecar_path(path).write_text(json.dumps(side, indent=2) + "\n")
    return path


def load_attributes(path: str | Path | None = None) -> AttributeClassifier:
    """Read and check an attribute classifier file; WeightsError (one line) on any problem."""
    from safetensors import safe_open

    from .checkpoint import sidecar_path, verify_checksum

    path = Path(path or default_attributes_path())
    if not path.is_file():
        raise WeightsError(f"attribute classifier not found: {path} (build it: scripts/train_attributes.py)")
    try:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise WeightsError(f"{path} is not an attribute classifier file (format={meta.get('format')!r})")
            if meta.get("format_version") != FORMAT_VERSION:
                raise WeightsError(f"{path} has unsupported format version {meta.get('format_version')!r}")
            verify_checksum(path)
            spec = json.loads(meta["heads"])
            mean, std = f.get_tensor("input.mean"), f.get_tensor("input.std")
            heads = {name: Head(tuple(h["classes"]),
                                tuple((f.get_tensor(f"{name}.{i}.weight"), f.get_tensor(f"{name}.{i}.bias"))
                                      for i in range(int(h["layers"]))))
                     for name, h in spec.items()}
    except WeightsError:
        raise
    except Exception as exc:   # safetensors raises several types for corrupt headers
        raise WeightsError(f"{path} is not a readable attribute classifier ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    for name, h in heads.items():
        w_out = h.layers[-1][0].shape[0] if h.layers else 0
        if not h.layers or w_out != len(h.classes) or h.layers[0][0].shape[1] != mean.shape[0]:
            raise WeightsError(f"{path}: head '{name}' does not fit its classes or the input size")
    side = sidecar_path(path)
    info = {}
    if side.is_file():
        info = {k: v for k, v in json.loads(side.read_text()).items()
                if k not in ("format", "format_version", "file", "sha256", "bytes", "input", "heads")}
    return AttributeClassifier(mean.astype(np.float32), np.maximum(std.astype(np.float32), 1e-6), heads, info)


# ---------------------------------------------------------------------------------------
# Training (scripts/train_attributes.py): full-batch Adam on softmax cross-entropy, in torch


def fit_head(x: np.ndarray, y: np.ndarray, classes: tuple[str, ...], *, hidden: int = 64,
             weight_decay: float = 1e-3, epochs: int = 600, lr: float = 1e-2, seed: int = 0,
             balanced: bool = True) -> Head:
    """Fit one head. x: (N, D) standardised descriptors; y: (N,) class indices in
    ``range(len(classes))``. ``hidden`` 0: logistic regression. ``balanced``: classes weighted
    by inverse frequency (UTKFace has ~2x more young adults than children or seniors)."""
    import torch

    torch.manual_seed(seed)
    k, d = len(classes), x.shape[1]
    dims = [d, hidden, k] if hidden > 0 else [d, k]
    mods = []
    for i in range(len(dims) - 1):
        mods.append(torch.nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            mods.append(torch.nn.ReLU())
    net = torch.nn.Sequential(*mods)
    xt, yt = torch.from_numpy(np.asarray(x, np.float32)), torch.from_numpy(np.asarray(y, np.int64))
    counts = np.bincount(y, minlength=k).astype(np.float64)
    w = torch.tensor(len(y) / (k * np.maximum(counts, 1)), dtype=torch.float32) if balanced else None
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(xt), yt, weight=w)
        loss.backward()
        opt.step()
    linears = [m for m in net if isinstance(m, torch.nn.Linear)]
    return Head(tuple(classes), tuple((m.weight.detach().numpy().copy(), m.bias.detach().numpy().copy())
                                      for m in linears))


def age_group_index(age_years: np.ndarray) -> np.ndarray:
    """(N,) years -> (N,) index into :data:`AGE_CLASSES` (the sampler's age groups)."""
    from .identity_sampler import AGE_GROUPS

    edges = [hi for _, hi in list(AGE_GROUPS.values())[:-1]]   # 17, 34, 59
    return np.searchsorted(np.asarray(edges), np.asarray(age_years), side="left").astype(np.int64)
