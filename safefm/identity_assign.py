"""One synthetic identity per real person (``RuntimeConfig.identity_per_track``).

Each new face track gets its own identity, drawn from the identity sampler
(:func:`safefm.identity_sampler.new_identity`: a pre-vetted sample of the training identities'
distribution, a seeded rest shape and noise seed), never derived from the person:

- **Distinct**: :data:`CANDIDATES` identities are drawn, each at least :data:`DISTINCT` (dlib
  descriptor distance) from every identity worn by another track or remembered; each is rendered
  by the model on its own rest shape and embedded with dlib (``render``; the identity guard's
  references), and the one whose rendered face is farthest from the other worn identities'
  rendered faces *and from the person's own face* is worn. The model draws identities closer
  together than their embeddings are (rendered pairs: median dlib distance ~0.62 against ~0.95
  between the embeddings), so choosing by the rendered face is what keeps two people in one
  frame apart; it doubles as a per-person identity guard. Without a recogniser the first
  candidate is worn.
- **Stable**: a track keeps its identity for its whole life, including the tracker's short
  losses (a track survives ``hold_frames + placeholder_frames`` missing frames). A person whose
  face comes back as a *new* track (re-found elsewhere, or after the tracker forgot them) gets
  their identity back when their real descriptor is within dlib's match threshold of a track
  that is lost or was forgotten less than ``identity_memory`` frames ago. Without a descriptor
  (dlib missing, no face found by dlib) that re-identification cannot happen: a new identity.
- **Matched** (optional, ``identity_match``): the sampler's group is the one nearest the
  person's estimated coarse attributes (:mod:`safefm.attributes`: gender, age group), so those
  attributes survive anonymization; nothing else of the person does. The model follows the
  embedding only loosely (its rest shape and noise seed weigh more), so the candidates whose
  *rendered* face the classifier reads as those attributes (exactly, else within one age group)
  are preferred over the others.

The real descriptors are kept in memory only, for as long as the track or its memory lasts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .identity import Identity
from .recognition import MATCH_THRESHOLD

log = logging.getLogger(__name__)

DISTINCT = 0.8     # min dlib distance between two worn identities' embeddings (bank pairs: median ~1.0)
CANDIDATES = 16    # identities drawn and rendered for each new person (best of 16 rendered pairs: ~0.69)
MATCH_KEYS = ("gender", "age")


def parse_match(text: str | None) -> tuple[str, ...]:
    """``--match``: ``"gender,age"``, ``"gender"``, ``"age"`` or ``"none"`` -> the attributes kept.
    Raises ConfigError (one line) on anything else."""
    from .errors import ConfigError

    if text is None:
        return MATCH_KEYS
    names = [v.strip().lower() for v in str(text).split(",") if v.strip()]
    if names == ["none"]:
        return ()
    bad = [n for n in names if n not in MATCH_KEYS]
    if bad or not names or len(set(names)) != len(names):
        why = f"unknown attribute {bad[0]!r}" if bad else ("nothing given" if not names else "an attribute twice")
        raise ConfigError(f"--match: {why}; use a comma list of {', '.join(MATCH_KEYS)}, or none")
    return tuple(n for n in MATCH_KEYS if n in names)


@dataclass
class _Memory:
    """A retired (forgotten) track's identity and its real face's descriptor, in memory only."""
    identity: Identity
    real: np.ndarray | None     # (128,) dlib descriptor of the person who wore it
    frame: int                  # frame index at which it was retired


class IdentityAssigner:
    """Draws and remembers the per-track identities of one engine (one video or one image).

    ``sampler``: :class:`safefm.identity_sampler.IdentitySampler`; ``classifier``:
    :class:`safefm.attributes.AttributeClassifier` (needed when ``match`` is not empty);
    ``match``: the attributes kept; ``seed``: -1 draws differently on every run, >= 0 repeats;
    ``memory``: frames a forgotten track's identity is kept for its person's return."""

    def __init__(self, sampler, classifier=None, *, match: tuple[str, ...] = MATCH_KEYS, seed: int = -1,
                 memory: int = 150):
        if match and classifier is None:
            raise ValueError("attribute matching needs an attribute classifier")
        self.sampler, self.classifier, self.match = sampler, classifier, tuple(match)
        self.seed, self.memory = seed, int(memory)
        self._rng = np.random.default_rng(None if seed < 0 else seed)
        self._retired: list[_Memory] = []
        self._refs: dict[int, tuple[Identity, np.ndarray]] = {}   # id(identity) -> its rendered face's descriptor

    @classmethod
    def shipped(cls, cfg, embedding_dim: int) -> "IdentityAssigner":
        """The assigner of ``cfg`` with the shipped sampler and (when matching) classifier;
        a one-line SafeFMError when a file is missing or does not fit the model."""
        from .attributes import load_attributes
        from .errors import ConfigError
        from .identity_sampler import load_default_sampler

        sampler = load_default_sampler()
        dim = sampler.groups["any/any"].mean.shape[0]
        if dim != embedding_dim:
            raise ConfigError(f"identity_per_track: the identity sampler draws {dim}-d identities; "
                              f"this model needs {embedding_dim}")
        clf = load_attributes() if cfg.identity_match else None
        return cls(sampler, clf, match=cfg.identity_match, seed=cfg.identity_seed, memory=cfg.identity_memory)

    def reset(self) -> None:
        """Forget the retired identities (between unrelated files); the draws go on."""
        self._retired.clear()
        self._refs.clear()

    def attributes(self, real: np.ndarray | None) -> dict[str, str]:
        """The kept attributes estimated from a real descriptor ({} when unknown or not matching)."""
        if real is None or not self.match:
            return {}
        pred = self.classifier.predict(real)
        return {k: pred[k] for k in self.match}

    def retire(self, identity: Identity, real: np.ndarray | None, frame: int) -> None:
        """Remember a forgotten track's identity (and its person's descriptor) for ``memory`` frames."""
        self._retired.append(_Memory(identity, real, frame))

    def assign(self, real: np.ndarray | None, frame: int, worn: list[Identity],
               lost: list[tuple[Identity, np.ndarray | None]] = (), render=None) -> tuple[Identity, str]:
        """The identity of a new track (or a track whose person changed at a scene cut).

        real: (128,) the person's dlib descriptor or None; worn: identities of the tracks seen
        this frame (never shared); lost: (identity, descriptor) of tracks not seen this frame;
        render: ``render(identities) -> (N, 128)`` descriptors of the identities as the model
        draws them (None: choose by embedding only). Returns (identity, how it was chosen)."""
        self._retired = [m for m in self._retired if frame - m.frame <= self.memory]
        keep = {id(i) for i in worn} | {id(i) for i, _ in lost} | {id(m.identity) for m in self._retired}
        self._refs = {k: v for k, v in self._refs.items() if k in keep}
        if real is not None:   # the same person back as a new track: their identity back
            worn_ids = {id(i) for i in worn}
            cands = [(m.identity, m.real, m) for m in self._retired] + [(i, r, None) for i, r in lost]
            best, best_d = None, MATCH_THRESHOLD
            for ident, r, mem in cands:
                if r is None or id(ident) in worn_ids:
                    continue
                d = float(np.linalg.norm(np.asarray(r, np.float32) - real))
                if d < best_d:
                    best, best_d = (ident, mem), d
            if best is not None:
                if best[1] is not None:
                    self._retired.remove(best[1])
                return best[0], "returned"
        attrs = self.attributes(real)
        avoid = [i.embedding for i in worn] + [i.embedding for i, _ in lost] + [m.identity.embedding for m in self._retired]
        if real is not None:
            avoid.append(np.asarray(real, np.float32))
        from .identity_sampler import new_identity

        seeds = self._rng.integers(2 ** 31 - 1, size=CANDIDATES if render is not None else 1)
        cands = [new_identity(int(sd), attrs.get("gender"), attrs.get("age"), sampler=self.sampler,
                              avoid=np.stack(avoid) if avoid else None, min_distance=DISTINCT) for sd in seeds]
        how = "drawn from " + self.sampler.resolve_group(attrs.get("gender"), attrs.get("age"))
        if render is None:
            return cands[0], how
        try:
            missing = [i for i in [*worn, *(i for i, _ in lost)] if id(i) not in self._refs]
            refs = np.asarray(render(cands + missing), np.float32)
        except Exception as exc:   # e.g. dlib missing: the first candidate
            log.warning("per-track identities: cannot render candidates (%s); choosing by embedding", exc)
            return cands[0], how
        for i, r in zip(missing, refs[len(cands):]):
            self._refs[id(i)] = (i, r)
        others = [r for _, r in self._refs.values()] + ([np.asarray(real, np.float32)] if real is not None else [])
        d = (np.linalg.norm(refs[:len(cands), None, :] - np.stack(others)[None], axis=2).min(axis=1)
             if others else np.zeros(len(cands)))
        fit = self._fit(refs[:len(cands)], attrs)
        best = int(np.argmax(d + 10.0 * fit))     # the best fit first, then the farthest
        self._refs[id(cands[best])] = (cands[best], refs[best])
        return cands[best], f"{how}, rendered {d[best]:.2f} from the other faces and the person's own"

    def _fit(self, refs: np.ndarray, attrs: dict[str, str]) -> np.ndarray:
        """(K,) how well each rendered candidate (K, 128) reads as ``attrs``: 2 = every kept
        attribute as wanted, 1 = the age group one off, 0 = otherwise (or nothing to match)."""
        if not attrs:
            return np.zeros(len(refs))
        from .attributes import AGE_CLASSES

        pred = self.classifier.predict_indices(refs)
        ok = np.ones(len(refs), bool)
        if "gender" in attrs:
            ok &= np.array([self.classifier.heads["gender"].classes[i] for i in pred["gender"]]) == attrs["gender"]
        if "age" not in attrs:
            return 2.0 * ok
        off = np.abs(pred["age"] - AGE_CLASSES.index(attrs["age"]))
        return np.where(ok & (off == 0), 2.0, np.where(ok & (off == 1), 1.0, 0.0))
