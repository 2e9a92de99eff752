"""One synthetic identity per real person (``RuntimeConfig.identity_per_track``).

Each new face track gets its own identity, drawn from the identity sampler
(:func:`safefm.identity_sampler.new_identity`: a pre-vetted sample of the training identities'
distribution, a seeded rest shape and noise seed), never derived from the person:

- **Distinct**: :data:`CANDIDATES` identities are drawn for each new person (:data:`ALONE`
  for a person with no one else around in a video, :data:`ALONE_PHOTO` in a still image), each
  at least :data:`DISTINCT` (dlib descriptor distance) from every identity worn by another track
  or remembered. Each is rendered *in the
  person's own frame* (the engine's ``render``: their expression and pose on the candidate's
  rest shape, the identity repel, colour match, detail stage and paste, embedded as the real
  face is) and the choice is by those faces: read as the person's gender (when matched), then
  at least :data:`FAR` from the other people's and :data:`OWN` from the person's own, then a
  mouth that reads as open as the person's in that frame (dlib's 68-point predictor, within
  :data:`MOUTH`: some identities draw parted, dark lips that read open all clip long) and that
  opens when theirs does (rendered again with the person's lower lip moved down by
  :data:`OPEN_BY`, its opening must grow by :data:`OPENS`: some stay shut), then a
  confident gender and an age group within one, then skin among the cleaner half of the
  candidates' (:func:`safefm.face.skin.uneven_skin`: no marbled dark patches, burnt
  highlights or patches of another hue), then (a
  person alone) the most typical-looking render or (with others) the farthest. People who
  appear in the same frame are chosen together (every pair of their candidates), not the second
  against the first's fixed choice; when no choice is far enough (FAR from the others, OWN from
  the person's own; a person alone too, except in a still image), :data:`MORE` batches of
  candidates are drawn, and if still none is, the choice whose mouth follows that is farthest
  from every face is worn, or one within :data:`SLACK` of it whose skin is cleaner (never the
  best fit or most typical of the near ones: on one evaluation clip that choice matched the
  person in 40 % of the frames). The model draws identities much closer together than their embeddings
  are (rendered pairs: median dlib distance ~0.64 against ~0.95 between the embeddings), so
  choosing by the rendered face in context is what keeps two people in one frame apart; it
  doubles as a per-person identity guard. Guiding the sampling away from the other people's
  identity tokens was measured and does not help (it moved faces *closer*: 0.79 -> 0.75).
  Without a recogniser the first candidate is worn.
- **Stable**: a track keeps its identity for its whole life, including the tracker's short
  losses (a track survives ``hold_frames + placeholder_frames`` missing frames). A person whose
  face comes back as a *new* track (re-found elsewhere, or after the tracker forgot them) gets
  their identity back when their real descriptor is within dlib's match threshold of a track
  that is lost or was forgotten less than ``identity_memory`` frames ago. Without a descriptor
  (dlib missing, no face found by dlib) that re-identification cannot happen: a new identity.
- **Matched** (optional, ``identity_match``): the sampler's group is the one nearest the
  person's estimated coarse attributes (:mod:`safefm.attributes`: gender, age group), so those
  attributes survive anonymization; nothing else of the person does. The model follows the
  embedding only loosely (its rest shape and noise seed weigh more), so among the candidates
  those whose face *as rendered in context* the classifier reads as the person's gender come
  first (confidently, probability >= :data:`SURE`, before barely, once the distances are met),
  then those whose age group is within one of the person's.

The real descriptors are kept in memory only, for as long as the track or its memory lasts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .identity import Identity
from .recognition import MATCH_THRESHOLD

log = logging.getLogger(__name__)

DISTINCT = 0.8     # min dlib distance between two worn identities' embeddings (bank pairs: median ~1.0)
CANDIDATES = 32    # identities drawn and rendered in context for a new person among others (~0.2 s each on a 2-core CPU)
ALONE = 32         # ... for a person alone (no one else worn or remembered) in a video: only gender, age and their own face to fit (16 before session 17: at OWN 0.8 too few far ones left, dlib mouth r 0.82 -> 0.75 on the clips)
ALONE_PHOTO = 16   # ... for a person alone in a still image, with no second batch: one output is worth fewer renders than a whole track (~0.2 s each)
ROUNDS = 3         # revisions of the choices of people who appear together
MORE = 1           # extra batches of candidates drawn when no choice is far enough (FAR apart, OWN from the person's own)
FAR = 0.9          # wanted dlib distance between a new person's rendered face and the other people's (first frame; over the clip it dips 0.1-0.3 below: 0.85 left one draw in ten under 0.6 in 4 % of frames)
OWN = 0.8          # wanted dlib distance between a new person's rendered face and their own real face (first frame; 0.7 left a clip matching its person in 8 % of its frames, session 17)
SURE = 0.8         # classifier probability of the kept gender that counts as a confident reading
OPEN_BY = 0.09     # the candidate renders' test of a mouth that opens: the person's lower lip moved down by this many face widths (safefm.face.retarget.open_mouth; dlib reads ~0.2 more on a real face)
OPENS = 0.05       # least a render's dlib-68 mouth opening must grow when the person's opens by OPEN_BY: ~1 candidate in 4 barely opens (+0.03 or less where most read +0.06-0.14) and its mouth stays shut all clip long (dlib mouth r 0.07 on one clip, session 20)
MOUTH = 0.06       # most a render's dlib-68 mouth opening (inner-lip gap / inter-ocular) may differ from the person's in the same frame: some identities draw parted, dark lips that read open all clip long (dlib mouth r 0.24 and 0.36 on two clips, session 18), ~1 candidate in 10
SLACK = 0.03       # when no choice is far enough, those this close to the farthest (dlib distance) may be worn for cleaner skin (the ~10 most distant of 64 renders span ~0.05)
KEPT = 2.0         # a fit (IdentityAssigner._fit) at least this reads as the kept gender
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


class Renders(NamedTuple):
    """What a renderer tells of K candidates' faces as the engine would show them for a person."""
    faces: np.ndarray     # (K, 128) dlib descriptors of the rendered faces (NaN rows: not embeddable)
    mouth: np.ndarray     # (K,) each render's dlib-68 mouth opening less the person's own now (NaN: unknown)
    uneven: np.ndarray    # (K,) the generated skin's unevenness (safefm.face.skin.uneven_skin; NaN: unknown)
    opens: np.ndarray | None = None   # (K,) how much more open dlib reads the render's mouth when the person's opens by OPEN_BY (NaN / None: unknown)


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
    ``memory``: frames a forgotten track's identity is kept for its person's return; ``video``:
    False for still images (:data:`ALONE_PHOTO` candidates for a person alone, no second batch)."""

    def __init__(self, sampler, classifier=None, *, match: tuple[str, ...] = MATCH_KEYS, seed: int = -1,
                 memory: int = 150, video: bool = True):
        if match and classifier is None:
            raise ValueError("attribute matching needs an attribute classifier")
        self.sampler, self.classifier, self.match = sampler, classifier, tuple(match)
        self.seed, self.memory, self.video = seed, int(memory), bool(video)
        self._rng = np.random.default_rng(None if seed < 0 else seed)
        self._retired: list[_Memory] = []
        self._refs: dict[int, tuple[Identity, np.ndarray]] = {}   # id(identity) -> its rendered face's descriptor

    @classmethod
    def shipped(cls, cfg, embedding_dim: int, video: bool = True) -> "IdentityAssigner":
        """The assigner of ``cfg`` with the shipped sampler and (when matching) classifier, for
        a video or (``video`` False) still images; a one-line SafeFMError when a file is missing
        or does not fit the model."""
        from .attributes import load_attributes
        from .errors import ConfigError
        from .identity_sampler import load_default_sampler

        sampler = load_default_sampler()
        dim = sampler.groups["any/any"].mean.shape[0]
        if dim != embedding_dim:
            raise ConfigError(f"identity_per_track: the identity sampler draws {dim}-d identities; "
                              f"this model needs {embedding_dim}")
        clf = load_attributes() if cfg.identity_match else None
        return cls(sampler, clf, match=cfg.identity_match, seed=cfg.identity_seed, memory=cfg.identity_memory,
                   video=video)

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
        """The identity of one new track (or a track whose person changed at a scene cut):
        :meth:`assign_all` for one person. Returns (identity, how it was chosen)."""
        return self.assign_all([(real, render)], frame, worn, lost)[0]

    def assign_all(self, people: list[tuple[np.ndarray | None, object]], frame: int, worn: list[Identity],
                   lost: list[tuple[Identity, np.ndarray | None]] = ()) -> list[tuple[Identity, str]]:
        """The identities of the new tracks of one frame, chosen together.

        people: one (real, render) per new track: real, (128,) the person's dlib descriptor or
        None; render, ``render(identities) -> Renders`` of the identities' faces as the engine
        would show them for this person now (or just their (N, 128) descriptors; None: choose
        by embedding only). worn: identities of the tracks seen this frame (never shared); lost:
        (identity, descriptor) of tracks not seen this frame. A person back as a new track gets
        their identity back; the others each get one of :data:`CANDIDATES` drawn identities
        (:data:`ALONE` for one person with no one else worn or remembered), the
        choices made in turn and revised (:data:`ROUNDS`) so that people who appear together
        are chosen as a pair, not the second against the first's fixed choice.
        Returns [(identity, how it was chosen)], one per person."""
        self._retired = [m for m in self._retired if frame - m.frame <= self.memory]
        keep = {id(i) for i in worn} | {id(i) for i, _ in lost} | {id(m.identity) for m in self._retired}
        self._refs = {k: v for k, v in self._refs.items() if k in keep}
        worn, out = list(worn), [None] * len(people)
        for n, (real, _) in enumerate(people):
            back = self._returned(real, worn, lost)
            if back is not None:
                out[n] = (back, "returned")
                worn.append(back)
        new = [n for n in range(len(people)) if out[n] is None]
        alone = len(new) == 1 and not (worn or lost or self._retired)
        count = (ALONE if self.video else ALONE_PHOTO) if alone else CANDIDATES
        draws = {n: self._candidates(people[n][0], worn, lost, count if people[n][1] is not None else 1)
                 for n in new}   # n -> (candidates, attributes, how)
        missing = [i for i in [*worn, *(i for i, _ in lost)] if id(i) not in self._refs]
        faces, looks = {}, {}   # n -> (K, 128) descriptors; n -> (K, 3) mouth reading, uneven skin, opens
        for n in new:
            f = self._render(people[n][1], draws[n][0], missing)
            if f is not None:
                (faces[n], looks[n]), missing = f, []   # the worn identities are rendered once
        pick, far = self._choose(*self._inputs(faces, draws, people), looks)
        for _ in range(MORE if self.video or not alone else 0):   # not far enough apart (or from the person's own): more candidates
            if far or not faces:
                break
            for n in faces:
                more = self._candidates(people[n][0], worn, lost, count)
                f = self._render(people[n][1], more[0], [])
                if f is not None:
                    draws[n] = (draws[n][0] + more[0], *draws[n][1:])
                    faces[n] = np.concatenate([faces[n], f[0]])
                    looks[n] = np.concatenate([looks[n], f[1]])
            pick, far = self._choose(*self._inputs(faces, draws, people), looks)
        pick = {n: pick.get(n, 0) for n in new}
        for n in new:
            cands, _, how = draws[n]
            ident = cands[pick[n]]
            if n in faces:
                f = faces[n][pick[n]]
                others = [r for _, r in self._refs.values()] + [faces[m][pick[m]] for m in faces if m != n]
                real = people[n][0]
                how += (f", rendered {_fmt(_nearest(f[None], others)[0])} from the other people's faces, "
                        f"{_fmt(_nearest(f[None], [] if real is None else [real])[0])} from the person's own, "
                        f"mouth {_fmt(looks[n][pick[n], 0], '+.2f')} from theirs and opens "
                        f"{_fmt(looks[n][pick[n], 2], '+.2f')}, "
                        f"uneven skin {_fmt(looks[n][pick[n], 1])} (candidates' median {_fmt(_median(looks[n][:, 1]))})"
                        + self._reading(f, faces[n], draws[n][1]))
            out[n] = (ident, how)
        for n in faces:
            self._refs[id(out[n][0])] = (out[n][0], faces[n][pick[n]])
        return out

    def _render(self, render, cands: list[Identity],
                missing: list[Identity]) -> tuple[np.ndarray, np.ndarray] | None:
        """((K, 128) the candidates' rendered faces, (K, 3) their mouth readings, skin unevenness and mouth openings,
        NaN where unknown) (``render(cands + missing)``; the worn identities in ``missing`` join
        the references), or None (no renderer, it failed, or no face could be embedded: the
        first candidate is worn)."""
        if render is None:
            return None
        try:
            got = render(cands + missing)
            if not isinstance(got, Renders):
                got = Renders(got, np.full(len(got), np.nan), np.full(len(got), np.nan))
            refs = np.asarray(got.faces, np.float32)
            opens = np.full(len(refs), np.nan) if got.opens is None else got.opens
            look = np.stack([np.asarray(got.mouth, np.float64), np.asarray(got.uneven, np.float64),
                             np.asarray(opens, np.float64)], axis=1)
        except Exception as exc:   # e.g. dlib missing: the first candidate
            log.warning("per-track identities: cannot render candidates (%s); choosing by embedding", exc)
            return None
        for i, r in zip(missing, refs[len(cands):]):
            if np.isfinite(r).all():
                self._refs[id(i)] = (i, r)
        faces = refs[:len(cands)]
        return (faces, look[:len(cands)]) if np.isfinite(faces).all(axis=1).any() else None

    @staticmethod
    def _inputs(faces: dict, draws: dict, people: list) -> tuple[dict, dict, dict, dict]:
        """:meth:`_choose`'s arguments for the people with rendered ``faces``."""
        return (dict(faces), {n: draws[n][0] for n in faces}, {n: people[n][0] for n in faces},
                {n: draws[n][1] for n in faces})

    def _returned(self, real: np.ndarray | None, worn: list[Identity],
                  lost: list[tuple[Identity, np.ndarray | None]]) -> Identity | None:
        """The identity of a lost or recently forgotten track whose person is ``real`` (within
        dlib's match threshold; not worn by anyone now), taken back from memory; else None."""
        if real is None:
            return None
        worn_ids = {id(i) for i in worn}
        cands = [(m.identity, m.real, m) for m in self._retired] + [(i, r, None) for i, r in lost]
        best, best_d = None, MATCH_THRESHOLD
        for ident, r, mem in cands:
            if r is None or id(ident) in worn_ids:
                continue
            d = float(np.linalg.norm(np.asarray(r, np.float32) - real))
            if d < best_d:
                best, best_d = (ident, mem), d
        if best is None:
            return None
        if best[1] is not None:
            self._retired.remove(best[1])
        return best[0]

    def _candidates(self, real: np.ndarray | None, worn: list[Identity],
                    lost: list[tuple[Identity, np.ndarray | None]], count: int) -> tuple[list[Identity], dict, str]:
        """(``count`` identities drawn for a person, their kept attributes, the group drawn from):
        embeddings at least DISTINCT from every worn, lost or remembered identity's and from the
        person's own descriptor."""
        from .identity_sampler import new_identity

        attrs = self.attributes(real)
        avoid = [i.embedding for i in worn] + [i.embedding for i, _ in lost] + [m.identity.embedding for m in self._retired]
        if real is not None:
            avoid.append(np.asarray(real, np.float32))
        seeds = self._rng.integers(2 ** 31 - 1, size=count)
        cands = [new_identity(int(sd), attrs.get("gender"), attrs.get("age"), sampler=self.sampler,
                              avoid=np.stack(avoid) if avoid else None, min_distance=DISTINCT) for sd in seeds]
        return cands, attrs, "drawn from " + self.sampler.resolve_group(attrs.get("gender"), attrs.get("age"))

    def _choose(self, faces: dict, cands: dict, reals: dict, attrs: dict,
                looks: dict | None = None) -> tuple[dict[int, int], bool]:
        """({person: index of the candidate to wear}, whether that choice is far enough apart) for
        the new people who have rendered faces.

        faces[n]: (K, 128) person n's candidates' rendered faces (NaN rows: not embeddable);
        cands[n]: the candidates; reals[n]: the person's descriptor or None; attrs[n]: the kept
        attributes; looks[n]: (K, 3) each render's mouth opening less the person's, its
        generated skin's unevenness and how much its mouth opens when the person's does (NaN or
        no ``looks``: unknown). A choice for everyone is
        ranked, in order, by: every face embeddable and no two embeddings within DISTINCT; every
        face read as the kept gender (:data:`KEPT`); every face at least FAR from the other
        people's (worn and new) and OWN from the person's own; every mouth read within
        :data:`MOUTH` of the person's and opening by at least :data:`OPENS` when theirs opens by
        :data:`OPEN_BY` (unknown counts as following); then, for a person alone, the
        summed fit of the kept attributes (:meth:`_fit`), every face's skin among the cleaner
        half of its candidates' (unevenness at most their median; unknown counts as clean), the
        most typical render (nearest the centre of the person's
        candidates' rendered faces: the farthest ones are the oddest-looking faces, caricatures
        and smudges, and the distance to their own face is secured by the rule before) and the
        smallest of those distances; with other people, the gender fit, the clean skin, then the smallest
        distance between the people's faces (two people must stay apart all clip long: the first
        frame over-states it by ~0.05-0.12), then the age fit, then the most typical. A choice
        that is not far enough is ranked by the mouths, then that smallest distance, except that
        those within :data:`SLACK` of the farthest are ranked by their skin first. One or two
        people: every combination; more: each person's choice revised in turn given the others'
        (:data:`ROUNDS`)."""
        people = list(faces)
        if not people:
            return {}, True
        worn = [r for _, r in self._refs.values()]
        alone = len(people) == 1 and not worn   # no one else to stay apart from
        ok, fit, age_fit, kept, near, apart, far, emb, typical = {}, {}, {}, {}, {}, {}, {}, {}, {}
        follows, clean = {}, {}
        for n in people:
            mouth, uneven, opens = (looks[n].T if looks and n in looks else np.full((3, len(faces[n])), np.nan))
            follows[n] = ~(np.abs(mouth) > MOUTH) & ~(opens < OPENS)   # NaN: no veto
            clean[n] = ~(uneven > _median(uneven))                 # NaN: counts as clean
            ok[n] = np.isfinite(faces[n]).all(axis=1)
            faces[n] = np.where(ok[n][:, None], faces[n], 0.0)
            fit[n], age_fit[n] = self._fit(faces[n], attrs[n], parts=True)
            kept[n] = fit[n] + age_fit[n] >= KEPT
            d_other = _nearest(faces[n], worn)
            d_real = _nearest(faces[n], [] if reals[n] is None else [np.asarray(reals[n], np.float32)])
            near[n] = np.minimum(d_other, d_real)     # (K,) to the worn faces and the person's own
            apart[n] = d_other                          # (K,) to the worn faces only
            far[n] = (d_other >= FAR) & (d_real >= OWN)
            emb[n] = np.stack([c.embedding for c in cands[n]])
            centre = faces[n][ok[n]].mean(axis=0) if ok[n].any() else faces[n].mean(axis=0)
            typical[n] = -np.linalg.norm(faces[n] - centre, axis=1)   # (K,) nearer the candidates' centre: larger

        def rank(sel: dict[int, int], floor: float | None = None) -> tuple:
            """The ranking key of one choice for everyone (larger is better); ``floor``: among
            choices that are not far enough, those at least this far from every face are equal
            but for their skin."""
            good = all(ok[n][sel[n]] for n in people)
            gender = all(kept[n][sel[n]] for n in people)
            is_far = all(far[n][sel[n]] for n in people)
            mouth = all(follows[n][sel[n]] for n in people)
            skin = all(clean[n][sel[n]] for n in people)
            dist = min(float(near[n][sel[n]]) for n in people)
            sep = min(float(apart[n][sel[n]]) for n in people)
            for i, a in enumerate(people):
                for b in people[i + 1:]:
                    good &= float(np.linalg.norm(emb[a][sel[a]] - emb[b][sel[b]])) >= DISTINCT
                    d = float(np.linalg.norm(faces[a][sel[a]] - faces[b][sel[b]]))
                    is_far &= d >= FAR
                    dist, sep = min(dist, d), min(sep, d)
            typ = sum(float(typical[n][sel[n]]) for n in people)
            g_fit = sum(float(fit[n][sel[n]]) for n in people)
            a_fit = sum(float(age_fit[n][sel[n]]) for n in people)
            if not is_far:   # no choice is far enough: a mouth that follows, the farthest from every face
                return (good, gender, False, mouth, dist) if floor is None else (
                    good, gender, False, mouth, dist >= floor, skin, dist)
            if alone:
                return (good, gender, True, mouth, g_fit + a_fit, skin, typ, dist)
            # together: the gender first, then how far apart the people are, then the age group
            return (good, gender, True, mouth, g_fit, skin, sep, a_fit, typ)

        def best(key) -> dict[int, int]:
            """The choice for everyone that maximises ``key``: one or two people, every
            combination; more, each person's choice revised in turn (:data:`ROUNDS`)."""
            if len(people) <= 2:
                grids = np.meshgrid(*[np.arange(len(faces[n])) for n in people], indexing="ij")
                return max((dict(zip(people, map(int, c))) for c in zip(*(g.ravel() for g in grids))), key=key)
            sel = {n: 0 for n in people}
            for _ in range(ROUNDS):
                before = dict(sel)
                for n in people:
                    sel[n] = max(range(len(faces[n])), key=lambda k: key({**sel, n: k}))
                if sel == before:
                    break
            return sel

        sel = best(rank)
        if not rank(sel)[2]:   # none far enough: within SLACK of the farthest, the cleaner skin
            floor = rank(sel)[4] - SLACK
            sel = best(lambda c: rank(c, floor))
        return sel, rank(sel)[2]

    def _reading(self, face: np.ndarray, faces: np.ndarray, attrs: dict[str, str]) -> str:
        """How the classifier reads a chosen rendered face (128,), for the log: '' when nothing is
        matched; else e.g. ', read as female 0.93 / adult (12 of 32 candidates read as female)'."""
        if not attrs:
            return ""
        from .attributes import GENDER_CLASSES

        prob = self.classifier.probabilities(face)
        text = ", read as " + " / ".join(
            f"{self.classifier.heads[k].classes[int(np.argmax(prob[k][0]))]}"
            + (f" {prob[k][0].max():.2f}" if k == "gender" else "") for k in self.match)
        if "gender" in attrs:
            ok = np.isfinite(faces).all(axis=1)
            p = self.classifier.probabilities(faces[ok])["gender"][:, GENDER_CLASSES.index(attrs["gender"])]
            text += f" ({int((p >= 0.5).sum())} of {len(faces)} candidates read as {attrs['gender']})"
        return text

    def _fit(self, faces: np.ndarray, attrs: dict[str, str], parts: bool = False):
        """(K,) how well each rendered candidate (K, 128) reads as ``attrs``, gender first:
        2 * (2 = the kept gender with probability >= SURE, 1 = at least 0.5, 0 = otherwise)
        + (1 = the kept age group or one next to it, 0 = otherwise); 0 with nothing to match.
        ``parts``: the gender and the age terms as two (K,) arrays instead of their sum."""
        g_fit, a_fit = np.zeros(len(faces)), np.zeros(len(faces))
        if attrs:
            from .attributes import AGE_CLASSES, GENDER_CLASSES

            prob = self.classifier.probabilities(faces)
            if "gender" in attrs:
                p = prob["gender"][:, GENDER_CLASSES.index(attrs["gender"])]
                g_fit = 2.0 * np.where(p >= SURE, 2.0, np.where(p >= 0.5, 1.0, 0.0))
            if "age" in attrs:
                a_fit = (np.abs(prob["age"].argmax(axis=1) - AGE_CLASSES.index(attrs["age"])) <= 1).astype(float)
        return (g_fit, a_fit) if parts else g_fit + a_fit


def _nearest(x: np.ndarray, refs: list[np.ndarray]) -> np.ndarray:
    """(K,) distance from each row of x (K, D) to its nearest ref (D,); inf when there is none."""
    if not len(refs):
        return np.full(len(x), np.inf)
    return np.linalg.norm(x[:, None, :] - np.stack(refs)[None], axis=2).min(axis=1)


def _median(x: np.ndarray) -> float:
    """The median of the finite values of x (NaN when there are none)."""
    x = np.asarray(x, np.float64)
    return float(np.median(x[np.isfinite(x)])) if np.isfinite(x).any() else float("nan")


def _fmt(d: float, spec: str = ".2f") -> str:
    return "-" if not np.isfinite(d) else format(d, spec)
