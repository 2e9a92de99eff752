"""Synthetic identity embeddings: Gaussians over the training identities' dlib descriptors.

:meth:`IdentitySampler.fit` takes the training embeddings (N, 128) with their attributes
(gender 0/1/-1, age in years or -1, person name or ''), averages the photos of each named
person into one identity, and fits a full-covariance Gaussian (with a little shrinkage) to
all identities and to each (gender, age group) with enough members.

:meth:`IdentitySampler.sample` draws from the matching Gaussian and REJECTS any draw whose
dlib distance to ANY training embedding (every photo, not just the identity means) is below
``threshold`` (default :data:`safefm.recognition.MATCH_THRESHOLD` = 0.6): a sampled
identity never matches a real training person.

Saved as ``NAME.safetensors`` (tensors) + ``NAME.json`` (groups, counts, threshold); no
pickle. By default the file contains every training photo's embedding (float16) for the
rejection test; ``save(include_reference=False, bank_size=N)`` ships N pre-vetted samples per
group instead and no descriptor of a real face.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .recognition import EMBED_DIM, MATCH_THRESHOLD

FORMAT = "safefm-identity-sampler"
AGE_GROUPS = {"child": (0, 17), "young": (18, 34), "adult": (35, 59), "senior": (60, 200)}
GENDERS = {"male": 0, "female": 1}
MIN_GROUP = 200           # identities needed for a group's own Gaussian (else the pooled one)


class SamplingError(RuntimeError):
    """No acceptable sample within ``max_tries``."""


def _gender_code(g) -> int | None:
    if g is None:
        return None
    if isinstance(g, str):
        if g.lower() not in GENDERS:
            raise ValueError(f"gender must be one of {sorted(GENDERS)} or 0/1, got {g!r}")
        return GENDERS[g.lower()]
    if int(g) not in (0, 1):
        raise ValueError(f"gender must be 0 (male) or 1 (female), got {g!r}")
    return int(g)


def _age_group(a) -> str | None:
    if a is None:
        return None
    if isinstance(a, str):
        if a not in AGE_GROUPS:
            raise ValueError(f"age must be one of {sorted(AGE_GROUPS)} or years, got {a!r}")
        return a
    for name, (lo, hi) in AGE_GROUPS.items():
        if lo <= int(a) <= hi:
            return name
    raise ValueError(f"age out of range: {a}")


def group_name(gender: int | None, age: str | None) -> str:
    g = {None: "any", 0: "male", 1: "female"}[gender]
    return f"{g}/{age or 'any'}"


def identity_table(embs: np.ndarray, gender: np.ndarray, age: np.ndarray, person: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One row per identity: photos of one named person are averaged (their attributes are
    unknown for LFW: -1); unnamed photos (UTKFace) are each an identity.
    Returns (E (M, 128), gender (M,), age (M,))."""
    person = np.asarray(person).astype(str)
    named = person != ""
    rows_e, rows_g, rows_a = [embs[~named]], [gender[~named]], [age[~named]]
    if named.any():
        names, inv = np.unique(person[named], return_inverse=True)
        sums = np.zeros((len(names), embs.shape[1]), np.float64)
        np.add.at(sums, inv, embs[named])
        counts = np.bincount(inv, minlength=len(names))[:, None]
        rows_e.append((sums / counts).astype(np.float32))
        rows_g.append(np.full(len(names), -1, np.int64))
        rows_a.append(np.full(len(names), -1, np.int64))
    return (np.concatenate(rows_e).astype(np.float32), np.concatenate(rows_g).astype(np.int64),
            np.concatenate(rows_a).astype(np.int64))


def _distance_to(x: np.ndarray, avoid: np.ndarray | None) -> np.ndarray:
    """(N,) distance from each row of x (N, D) to its nearest row of ``avoid`` (M, D); inf when
    there is none."""
    if avoid is None or not len(avoid):
        return np.full(len(x), np.inf)
    d = np.linalg.norm(np.asarray(x, np.float32)[:, None, :] - np.asarray(avoid, np.float32)[None], axis=2)
    return d.min(axis=1)


@dataclass
class _Gaussian:
    mean: np.ndarray     # (D,) float64
    chol: np.ndarray     # (D, D) lower-triangular float64
    count: int


def _fit_gaussian(x: np.ndarray, shrink: float) -> _Gaussian:
    x = np.asarray(x, np.float64)
    mean = x.mean(0)
    cov = np.cov(x, rowvar=False)
    cov = (1 - shrink) * cov + shrink * np.eye(x.shape[1]) * np.trace(cov) / x.shape[1]
    return _Gaussian(mean, np.linalg.cholesky(cov + 1e-8 * np.eye(x.shape[1])), len(x))


class IdentitySampler:
    """Per-(gender, age group) Gaussians over identity embeddings + the rejection set."""

    def __init__(self, groups: dict[str, _Gaussian], reference: np.ndarray | None,
                 threshold: float = MATCH_THRESHOLD, info: dict | None = None,
                 banks: dict[str, np.ndarray] | None = None):
        if "any/any" not in groups:
            raise ValueError("an IdentitySampler needs the pooled 'any/any' group")
        if reference is None and not banks:
            raise ValueError("an IdentitySampler needs the reference embeddings or pre-vetted banks")
        self.groups = groups
        # (N, D) every training photo, or None for a file saved without them (bank mode)
        self.reference = None if reference is None else np.ascontiguousarray(reference, np.float32)
        self._ref_sq = None if reference is None else (self.reference ** 2).sum(1)
        self.banks = banks or {}   # group -> (M, D) samples already vetted against the reference
        self.threshold = float(threshold)
        self.info = info or {}

    # -- fitting ---------------------------------------------------------------------------

    @classmethod
    def fit(cls, embs: np.ndarray, attrs: dict | None = None, *, threshold: float = MATCH_THRESHOLD,
            shrink: float = 0.05, min_group: int = MIN_GROUP) -> "IdentitySampler":
        """embs: (N, 128) training embeddings; attrs: optional arrays ``gender`` (N,) 0/1/-1,
        ``age`` (N,) years/-1, ``person`` (N,) names ('' = its own identity)."""
        embs = np.asarray(embs, np.float32)
        if embs.ndim != 2 or embs.shape[1] != EMBED_DIM:
            raise ValueError(f"embs must be (N, {EMBED_DIM}), got {embs.shape}")
        n = len(embs)
        attrs = attrs or {}
        gender = np.asarray(attrs.get("gender", np.full(n, -1)), np.int64)
        age = np.asarray(attrs.get("age", np.full(n, -1)), np.int64)
        person = np.asarray(attrs.get("person", np.full(n, "")), str)
        e, g, a = identity_table(embs, gender, age, person)
        if len(e) <= EMBED_DIM:
            raise ValueError(f"need more than {EMBED_DIM} identities to fit a Gaussian, got {len(e)}")
        groups = {"any/any": _fit_gaussian(e, shrink)}
        agegrp = np.array([_age_group(x) if x >= 0 else "" for x in a])
        for gc in (None, 0, 1):
            gsel = np.ones(len(e), bool) if gc is None else g == gc
            for ag in (None, *AGE_GROUPS):
                key = group_name(gc, ag)
                s = gsel if ag is None else gsel & (agegrp == ag)
                if key != "any/any" and s.sum() >= min_group:
                    groups[key] = _fit_gaussian(e[s], shrink)
        info = {"photos": int(n), "identities": int(len(e)), "shrink": shrink,
                "groups": {k: v.count for k, v in groups.items()}}
        return cls(groups, embs, threshold, info)

    # -- sampling --------------------------------------------------------------------------

    def resolve_group(self, gender=None, age=None) -> str:
        """The most specific fitted group for (gender, age); falls back to coarser ones."""
        g, a = _gender_code(gender), _age_group(age)
        for key in (group_name(g, a), group_name(g, None), group_name(None, a), "any/any"):
            if key in self.groups:
                return key
        return "any/any"  # pragma: no cover

    def nearest_distance(self, x: np.ndarray) -> np.ndarray:
        """Distance from each row of x (M, D) to its nearest reference embedding: (M,)."""
        if self.reference is None:
            raise SamplingError("this sampler was saved without its reference embeddings")
        x = np.atleast_2d(np.asarray(x, np.float32))
        d2 = (x ** 2).sum(1)[:, None] + self._ref_sq[None] - 2 * x @ self.reference.T
        return np.sqrt(np.maximum(d2.min(1), 0))

    def sample(self, rng: np.random.Generator, gender=None, age=None, max_tries: int = 4000,
               temperature: float = 1.0, escalate_every: int = 512, avoid: np.ndarray | None = None,
               min_distance: float = 0.0) -> np.ndarray:
        """One (128,) float32 embedding of a new identity, at distance >= threshold from
        every training embedding. gender: None/'male'/'female'/0/1; age: None, a group name
        (child/young/adult/senior) or years.

        ``avoid`` (M, 128): identities already worn (e.g. by the other people in a video); the
        draw is also at distance >= ``min_distance`` from each of them. A file saved with banks
        picks at random among the bank samples far enough from ``avoid``, or the farthest one
        when none is (logged by the caller if it matters).

        ``temperature`` scales the Gaussian's spread (> 1: more distinctive, less average
        identities, fewer rejections). Dense groups reject almost every draw at 1.0 (measured
        on the default sampler: children ~0 %, women ~1 %, men ~4 %), so after every
        ``escalate_every`` rejected draws the temperature grows by 10 %; the distance test
        itself is never relaxed. Raises SamplingError after ``max_tries`` rejections.
        """
        key = self.resolve_group(gender, age)
        if self.reference is None:   # bank mode: draw one of the pre-vetted samples
            bank = self.banks.get(key)
            if bank is None or not len(bank):
                raise SamplingError(f"no pre-vetted bank for group {key}")
            far = _distance_to(bank, avoid)
            ok = np.nonzero(far >= min_distance)[0]
            i = ok[rng.integers(len(ok))] if len(ok) else int(np.argmax(far))
            return np.asarray(bank[i], np.float32).copy()
        gauss = self.groups[key]
        tries = 0
        while tries < max_tries:
            temp = temperature * 1.1 ** (tries // max(1, escalate_every))
            k = min(64, max_tries - tries)
            z = rng.standard_normal((k, gauss.mean.shape[0])) * temp
            x = (gauss.mean + z @ gauss.chol.T).astype(np.float32)
            ok = np.nonzero((self.nearest_distance(x) >= self.threshold)
                            & (_distance_to(x, avoid) >= min_distance))[0]
            if len(ok):
                return x[ok[0]]
            tries += k
        raise SamplingError(f"no sample at distance >= {self.threshold} from all training embeddings "
                            f"in {max_tries} tries")

    def acceptance_rate(self, rng: np.random.Generator, n: int = 1000, gender=None, age=None,
                        temperature: float = 1.0) -> float:
        """Share of raw Gaussian draws that pass the rejection test."""
        gauss = self.groups[self.resolve_group(gender, age)]
        x = gauss.mean + (rng.standard_normal((n, gauss.mean.shape[0])) * temperature) @ gauss.chol.T
        return float((self.nearest_distance(x) >= self.threshold).mean())

    # -- files -----------------------------------------------------------------------------

    def save(self, path: str | Path, include_reference: bool = True, bank_size: int = 0,
             seed: int = 0) -> Path:
        """Write ``path`` (.safetensors) and its ``.json`` sidecar.

        ``include_reference`` keeps every training photo's embedding (float16) in the file,
        so :meth:`sample` can vet fresh draws. ``include_reference=False`` ships no data
        derived from real people's faces; then ``bank_size`` (> 0) vetted samples per group
        are drawn now (``seed``) and stored, and the loaded sampler picks among them.
        """
        import torch
        from safetensors.torch import save_file

        if not include_reference and bank_size <= 0 and not self.banks:
            raise ValueError("without the reference embeddings a sampler needs bank_size > 0")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        names = sorted(self.groups)
        banks = dict(self.banks)
        if bank_size > 0:
            rng = np.random.default_rng(seed)
            for k in names:
                g, a = k.split("/")
                banks[k] = np.stack([self.sample(rng, None if g == "any" else g, None if a == "any" else a)
                                     for _ in range(bank_size)])
        tensors = {}
        if include_reference and self.reference is not None:
            tensors["reference"] = torch.from_numpy(self.reference.astype(np.float16))
        for i, k in enumerate(names):
            tensors[f"group{i}.mean"] = torch.from_numpy(self.groups[k].mean.astype(np.float32))
            tensors[f"group{i}.chol"] = torch.from_numpy(self.groups[k].chol.astype(np.float32))
            if k in banks:
                tensors[f"group{i}.bank"] = torch.from_numpy(np.asarray(banks[k], np.float32))
        meta = {"format": FORMAT, "groups": json.dumps(names), "threshold": str(self.threshold)}
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(path)
        side = {"format": FORMAT, "groups": {k: self.groups[k].count for k in names},
                "threshold": self.threshold,
                "reference_photos": int(len(self.reference)) if "reference" in tensors else 0,
                "bank_per_group": {k: int(len(v)) for k, v in banks.items()},
                "note": "fitted on UTKFace + LFW (non-eval people) dlib descriptors: research-only terms"
                        + ("; contains every training photo's descriptor (float16)" if "reference" in tensors else ""),
                **{k: v for k, v in self.info.items() if k != "groups"}}
        path.with_suffix(".json").write_text(json.dumps(side, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "IdentitySampler":
        from safetensors import safe_open

        path = Path(path)
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path} is not an identity sampler file")
            names = json.loads(meta["groups"])
            keys = set(f.keys())
            ref = f.get_tensor("reference").astype(np.float32) if "reference" in keys else None
            groups, banks = {}, {}
            side = path.with_suffix(".json")
            counts = json.loads(side.read_text())["groups"] if side.is_file() else {}
            for i, k in enumerate(names):
                groups[k] = _Gaussian(f.get_tensor(f"group{i}.mean").astype(np.float64),
                                      f.get_tensor(f"group{i}.chol").astype(np.float64), int(counts.get(k, 0)))
                if f"group{i}.bank" in keys:
                    banks[k] = f.get_tensor(f"group{i}.bank").astype(np.float32)
        return cls(groups, ref, float(meta["threshold"]), banks=banks)


# ---------------------------------------------------------------------------------------
# Identities drawn from the sampler (safefm-identity new, the engine's per-track identities)

SAMPLER_NAME = "identity_sampler.safetensors"


def sampler_path() -> Path:
    """The shipped sampler: ``weights/identity_sampler.safetensors`` (or under ``$SAFEFM_WEIGHTS``)."""
    from .paths import weights_dir

    return weights_dir() / SAMPLER_NAME


def load_default_sampler() -> "IdentitySampler":
    """The shipped sampler; a one-line SafeFMError when it is missing."""
    from .errors import SafeFMError

    p = sampler_path()
    if not p.is_file():
        raise SafeFMError(f"no identity sampler at {p}: train it (scripts/train.py --stage sampler) "
                          "or set SAFEFM_WEIGHTS")
    return IdentitySampler.load(p)


def new_identity(seed: int, gender: str | None = None, age: str | None = None, name: str | None = None,
                 sampler: IdentitySampler | None = None, avoid: np.ndarray | None = None,
                 min_distance: float = 0.0):
    """Draw a synthetic identity (:class:`safefm.identity.Identity`): its embedding from the
    sampler's (gender, age) group, at least ``min_distance`` from each row of ``avoid`` (M, 128);
    its rest shape the canonical template under a deformation seeded by ``seed``, which is also
    its noise seed. Nothing of it comes from anyone's face."""
    from .face.alignment import load_template
    from .identity import Identity, random_shape

    sampler = sampler or load_default_sampler()
    rng = np.random.default_rng(seed)
    emb = np.asarray(sampler.sample(rng, gender=gender, age=age, avoid=avoid, min_distance=min_distance),
                     np.float32)
    attrs = {k: v for k, v in (("gender", gender), ("age", age)) if v}
    return Identity(embedding=emb, shape=random_shape(load_template(), rng), seed=int(seed),
                    name=name or f"synthetic-{seed}", attributes=attrs)
