"""The per-frame anonymizing pipeline and its fail-closed policy.

One frame: landmarks (MediaPipe FaceMesh) -> tracks (ids, One-Euro smoothing) -> alignment
(similarity crop) -> retargeting (the user's expression on the identity's shape) -> heatmaps ->
generator (Euler ODE, warm-started from the track's previous latent) -> decode -> colour match
and paste back (feathered mask covering the real face oval).

Identity: every face wears the one identity given (``safefm-cam``, ``--identity FILE``), or with
``identity_per_track`` each track its own, drawn from the identity sampler when the track starts
and kept for its life (:mod:`safefm.identity_assign`; ``safefm-anonymize``'s default).

Fail-closed policy (a real face's pixels never leave while anonymizing):

1. A tracked face that is anonymized this frame gets a fresh synthetic face (``ANONYMIZED``).
2. A tracked face that cannot be anonymized this frame (landmarks lost, generator exception,
   non-finite output) is covered by that track's last synthetic face, pasted with a mask grown
   with every missing frame (``HELD``) for up to ``hold_frames`` frames;
3. after that, or before the track's first good frame, by an opaque placeholder over the
   last known face region, grown the same way (``PLACEHOLDER``), for ``placeholder_frames``
   more frames, after which the track is forgotten.
Never the raw face, never a light blur. Faces FaceMesh never detected at all cannot be covered:
``max_faces`` (default 4) bounds how many are looked for.

A frame runs in three stages, :meth:`Engine.prepare` (landmarks, tracks, retargeting,
heatmaps), :meth:`Engine.generate` (the networks) and :meth:`Engine.finish` (colour match,
paste, covers); :meth:`Engine.process` runs them one after the other. The live pipeline may
run each stage on its own thread so consecutive frames overlap: everything a later stage needs
travels in the :class:`FramePlan`, and each piece of per-track state has one writing stage.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

import cv2
import numpy as np
import torch

from .face import alignment, composite, heatmaps, outline, retarget, skin
from .face.context import face_context
from .config import RuntimeConfig
from .generator import Generator
from .sampler import first_step
from .guard import default_guard, embed_real_faces, mouth_openings, read_real_faces
from .identity import Identity, load_identity
from .identity_assign import OPEN_BY, IdentityAssigner, Renders
from .face.landmarks import FaceMeshDetector, FaceTracker, Track, face_box
from .recognition import MATCH_THRESHOLD, FaceRecognizer
from .results import ANONYMIZED, HELD, PLACEHOLDER, FaceResult, FrameResult

log = logging.getLogger(__name__)

WATCH_NEAR = 0.1        # identity watch: a comparison within this of dlib's match threshold ...
WATCH_NEAR_EVERY = 3    # ... brings the next one this many frames on (else identity_watch frames)


@dataclass
class _TrackState:
    """What the engine remembers of one face track between frames."""
    neutral: retarget.NeutralEstimator
    z_prev: torch.Tensor | None = None            # (1, C, h, w) last output latent (warm start)
    z_epoch: int = 0                              # the ``epoch`` z_prev was generated in
    epoch: int = 0                                # bumped when the face may have changed (no warm start across)
    last_crop: np.ndarray | None = None           # (S or 2S, same, 3) last good synthetic face
    last_M_inv: np.ndarray | None = None          # (2, 3) crop -> frame of that face
    last_face: np.ndarray | None = None           # its (same side) float32 face alpha (seamless paste)
    last_landmarks: np.ndarray | None = None      # (478, 3) real landmarks at the last sighting
    good_frames: int = 0
    repel: torch.Tensor | None = field(default=None, repr=False)  # tokens of the real face (identity_repel)
    real: np.ndarray | None = field(default=None, repr=False)     # (128,) the real face's dlib descriptor (memory only)
    real_tried: bool = False                      # the real face was embedded (once per track, again after a cut)
    identity: Identity | None = None              # identity_per_track: this track's own identity
    too_near: bool = False                        # its output matched the person's own face (identity_watch): draw anew
    pushed: bool = False                          # repel_when "near": its output came near the person's: repel from now on
    watch_at: int = 0                             # good_frames at which its output is next compared with the person
    tokens: torch.Tensor | None = field(default=None, repr=False)   # its generator tokens
    noise: torch.Tensor | None = field(default=None, repr=False)    # its fixed noise

    def forget_latent(self) -> None:
        """No warm start from a latent generated before now (another face, or another identity)."""
        self.epoch += 1


@dataclass
class _FaceJob:
    """One matched face of one frame on its way through prepare -> generate -> finish."""
    track: Track                         # a copy: the tracker updates its own objects in place
    st: _TrackState
    epoch: int = 0                       # st.epoch when prepared
    warm: bool = False                   # a warm start is allowed (video, warm_start, not a new track)
    repel: torch.Tensor | None = None    # (1, K, W) reference tokens of the real face, or None
    tokens: torch.Tensor | None = None   # (1, K, W) tokens of the identity this face wears
    noise: torch.Tensor | None = None    # (1, C, h, w) its noise
    M: np.ndarray | None = None          # (2, 3) frame -> crop
    lm_crop: np.ndarray | None = None    # (478, 3) real landmarks in the crop
    ret_crop: np.ndarray | None = None   # (478, 3) retargeted landmarks in the crop
    heat: np.ndarray | None = None       # (Ch, H, H) heatmaps
    context: np.ndarray | None = None    # (4, H, H) the frame around the face (context models), or None
    crop: np.ndarray | None = None       # (S, S, 3) uint8 decoded face
    error: BaseException | None = None   # why this face cannot be anonymized this frame


@dataclass
class FramePlan:
    """A frame between the engine's stages: what :meth:`Engine.prepare` decided, filled in by
    :meth:`Engine.generate`, turned into a :class:`FrameResult` by :meth:`Engine.finish`."""
    frame: np.ndarray                    # (H, W, 3) uint8 RGB input
    jobs: list[_FaceJob]                 # the faces matched this frame
    lost: list[tuple[Track, _TrackState]]  # faces remembered but not seen (copies)
    tokens: torch.Tensor                 # (1, K, W) identity tokens worn for this frame
    noise: torch.Tensor                  # (1, C, h, w) its noise
    timings: dict = field(default_factory=dict)


class Engine:
    """Anonymizes frames. Not thread-safe as a whole: :meth:`process` (or :meth:`prepare`, and
    every control call: reset, set_identity) from one thread; :meth:`generate` and
    :meth:`finish` may each run on another thread, called in frame order."""

    def __init__(self, generator: Generator, identity: Identity, cfg: RuntimeConfig, *,
                 video: bool = True, detector=None, guard=None, recognizer=None,
                 assigner: IdentityAssigner | None = None):
        self.cfg = cfg
        self.video = video
        self.gen = generator
        self.mcfg = generator.model_cfg
        self.detector = detector or FaceMeshDetector(
            max_faces=cfg.max_faces, static_image=not video,
            min_detection_confidence=cfg.min_detection_confidence,
            min_tracking_confidence=cfg.min_tracking_confidence)
        self.tracker = FaceTracker(cfg)
        self.template = alignment.load_template()
        self._states: dict[int, _TrackState] = {}
        self._prev_thumb: np.ndarray | None = None
        self._frame_index = 0
        self._lost_ids: set[int] = set()   # tracks not seen this frame
        # Fault injection for tests: callable(stage, track_id, value) -> value, may raise.
        # Stages: "generate" (value: heatmaps) and "latent" (value: the generated latent).
        self.fault_injector = None
        # The real-face recogniser of the identity guard and the identity repel, one for both
        # (``recognizer``: a detect/embed object; default a FaceRecognizer, dlib loaded on first use).
        self.recognizer = recognizer if recognizer is not None else FaceRecognizer(upsample=1)
        # Identity guard (safefm.guard.IdentityGuard or None): decides once per video (per image)
        # whether the chosen identity resembles the real face and another must be worn.
        self.guard = guard
        self._guard_done = False
        # identity_repel > 0: each track's real face is embedded once (in memory only) and the
        # generator is guided away from that embedding; a recogniser failure turns repel off, logged.
        self._repel_on = cfg.identity_repel > 0
        # identity_per_track: each track wears its own identity from the sampler (safefm.identity_assign);
        # ``identity`` is then only the warm-up face. Else every face wears ``identity``.
        self.assigner = (assigner or IdentityAssigner.shipped(cfg, self.mcfg.identity_dim, video)) \
            if cfg.identity_per_track else None
        self._embed_on = self._repel_on or self.assigner is not None   # each track's real face embedded once
        # repel_when "near" (the default since session 25): a track is pushed only once the identity
        # watch (every WATCH_NEAR_EVERY frames until then) finds its output near the person's own face;
        # where no watch runs (still images, one identity for everyone as in safefm-cam) always.
        self._push_by_need = (self._repel_on and cfg.repel_when == "near" and self.assigner is not None
                              and video and cfg.identity_watch > 0)
        self.set_identity(identity)

    # -- state ---------------------------------------------------------------------------
    def set_identity(self, identity: Identity) -> None:
        """Wear ``identity`` from now on (the identity guard checks it again at the next face)."""
        if identity.embedding.shape[0] != self.mcfg.identity_dim:
            from .errors import IdentityFileError
            raise IdentityFileError(f"identity '{identity.name}' has a {identity.embedding.shape[0]}-d "
                                    f"embedding; this model needs {self.mcfg.identity_dim}")
        self.chosen_identity = identity
        self._guard_done = False
        self._wear(identity)

    def identity_of(self, track_id: int) -> Identity | None:
        """The identity the face of track ``track_id`` wears (None: no such track, or not drawn yet)."""
        st = self._states.get(track_id)
        if st is None:
            return None
        return st.identity if self.assigner is not None else self.identity

    def _wear(self, identity: Identity) -> None:
        self.identity = identity
        self.tokens = self.gen.identity_tokens(identity.embedding)
        self.noise = self._noise(identity)
        for st in self._states.values():  # a new face: no warm start from the old one
            if st.identity is None:   # tracks wearing their own identity keep their warm start
                st.forget_latent()

    def reset(self) -> None:
        """Forget all tracks and temporal state (between unrelated images or files), the
        landmarker's tracking included (else the last face of one video is "found" in the next)."""
        self.tracker.reset()
        reset = getattr(self.detector, "reset", None)
        if reset is not None:
            reset()
        self._states.clear()
        if self.assigner is not None:
            self.assigner.reset()
        self._prev_thumb = None
        self._frame_index = 0
        self._guard_done = False
        if self.identity is not self.chosen_identity:
            self._wear(self.chosen_identity)

    def warmup(self, runs: int = 2) -> float:
        """Run the generator and decoder ``runs`` times on a neutral face (no track state is
        touched), so the first real frame does not pay for lazy runtime set-up. Returns seconds."""
        t0 = time.perf_counter()
        S = self.mcfg.image_size
        heat = heatmaps.render_heatmaps((self.template * S).astype(np.float32), S, self.mcfg.heatmap_size)
        for _ in range(max(1, runs)):
            z = self.gen.generate(heat, self.tokens, self.noise, z_prev=None, t0=0.0, steps=self.cfg.steps,
                                  guidance=self.cfg.identity_guidance, guidance_until=self.cfg.guidance_until)
            self.gen.decode(z, heat)
        if self.guard is not None:
            try:
                self.guard.references(self.gen, self.recognizer)
            except Exception as exc:
                log.warning("identity guard unavailable: %s", exc)
                self.guard = None
        return time.perf_counter() - t0

    def close(self) -> None:
        close = getattr(self.detector, "close", None)
        if close:
            close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- per frame -----------------------------------------------------------------------
    def process(self, frame: np.ndarray, timestamp: float | None = None) -> FrameResult:
        """Anonymize one RGB frame (H, W, 3) uint8. Returns a FrameResult whose image is safe."""
        return self.finish(self.generate(self.prepare(frame, timestamp)))

    def prepare(self, frame: np.ndarray, timestamp: float | None = None) -> FramePlan:
        """Stage 1: landmarks, tracks, identity guard, retargeting and heatmaps of each face."""
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise ValueError(f"frame must be (H, W, 3) uint8 RGB, got {frame.shape} {frame.dtype}")
        t = timestamp if timestamp is not None else self._frame_index / 30.0
        self._frame_index += 1
        timings = dict.fromkeys(("landmarks", "guard", "repel", "retarget_heatmaps", "generator", "decode",
                                 "composite"), 0.0)
        timings["generator_steps"] = 0

        t_a = time.perf_counter()
        faces = self.detector.detect(frame)
        matched, lost = self.tracker.update(faces, t)
        if self.video and self._scene_cut(frame):
            for st in self._states.values():   # a cut may put another person on a track
                st.forget_latent()
                st.repel, st.real_tried, st.pushed = None, False, False
        timings["landmarks"] = time.perf_counter() - t_a
        if self.guard is not None and self.assigner is None and matched and (not self._guard_done or not self.video):
            t_g = time.perf_counter()
            self._check_identity(frame, matched)
            timings["guard"] = time.perf_counter() - t_g

        live_ids = {tr.id for tr in matched} | {tr.id for tr in lost}
        for tid in [k for k in self._states if k not in live_ids]:
            st = self._states.pop(tid)
            if self.assigner is not None and st.identity is not None:   # kept a while for the person's return
                self.assigner.retire(st.identity, st.real, self._frame_index)
        self._lost_ids = {tr.id for tr in lost}
        geometry, broken = {}, {}
        t_p = time.perf_counter()
        for tr in matched:
            try:
                geometry[tr.id] = self._geometry(tr, self._state(tr.id))
            except Exception as exc:  # fail closed: covered in finish
                broken[tr.id] = exc
        timings["retarget_heatmaps"] += time.perf_counter() - t_p
        todo = [tr for tr in matched if tr.id in geometry and self._needs_embedding(self._state(tr.id))]
        if todo:   # once per track: the real face to steer away from / to match; new people's identities
            t_r = time.perf_counter()
            try:
                self._embed_tracks(frame, todo, geometry)
            except Exception as exc:
                broken.update((tr.id, exc) for tr in todo)
            timings["repel"] += time.perf_counter() - t_r
        jobs = []
        for tr in matched:
            st = self._state(tr.id)
            job = _FaceJob(replace(tr), st, epoch=st.epoch,
                           warm=self.video and self.cfg.warm_start and not tr.is_new)
            try:
                if tr.id in broken:
                    raise broken[tr.id]
                self._prepare_face(job, geometry[tr.id], timings, frame)
            except Exception as exc:  # fail closed: covered in finish
                job.error = exc
            jobs.append(job)
        return FramePlan(frame, jobs, [(replace(tr), self._state(tr.id)) for tr in lost],
                         self.tokens, self.noise, timings)

    def generate(self, plan: FramePlan) -> FramePlan:
        """Stage 2: the generator and decoder for each face prepared without error."""
        for job in plan.jobs:
            if job.error is None:
                try:
                    self._generate_face(job, plan)
                except Exception as exc:  # fail closed: covered in finish
                    job.error = exc
        return plan

    def finish(self, plan: FramePlan) -> FrameResult:
        """Stage 3: paste each generated face; cover (fail closed) every other face."""
        frame, timings = plan.frame, plan.timings
        out = frame.copy()
        results: list[FaceResult] = []
        # With several faces, no face's paste may read another's real face (faces are pasted in turn)
        real = [job.track.raw for job in plan.jobs] + [st.last_landmarks for _, st in plan.lost]
        protect = (composite.face_mask(real, out.shape[:2], self.cfg.mask_dilate, 0.0)
                   if len([lm for lm in real if lm is not None]) > 1 else None)
        for job in plan.jobs:
            tr, st = job.track, job.st
            try:
                if job.error is not None:
                    raise job.error
                results.append(self._paste_face(out, frame, job, timings, protect))
                if self._watched(st):
                    t_w = time.perf_counter()
                    self._watch(out, tr, st)
                    timings["guard"] += time.perf_counter() - t_w
            except Exception as exc:  # fail closed: whatever broke, the raw face does not leave
                log.warning("face %d not anonymized: %s", tr.id, exc)
                results.append(self._cover(out, tr, st, reason=f"{type(exc).__name__}: {exc}",
                                           landmarks=tr.raw, missing=1, protect=protect))
        for tr, st in plan.lost:
            results.append(self._cover(out, tr, st, reason="landmarks lost", landmarks=None,
                                       missing=tr.missing, protect=protect))
        return FrameResult(image=out, faces=results, timings=timings)

    def _watched(self, st: _TrackState) -> bool:
        """Whether this track's output face is to be compared with the person's own now: per-track
        identities in a video, every ``identity_watch`` frames the track was anonymized (every
        :data:`WATCH_NEAR_EVERY` while the last comparison was within :data:`WATCH_NEAR` of a match)."""
        return (self.assigner is not None and self.video and self.cfg.identity_watch > 0
                and st.identity is not None and st.real is not None and not st.too_near
                and st.good_frames >= st.watch_at)

    def _watch(self, out: np.ndarray, tr: Track, st: _TrackState) -> None:
        """The identity watch: a track whose output face (embedded in ``out`` at its landmarks'
        box, :func:`safefm.guard.embed_real_faces`, ~30 ms) comes within dlib's match threshold
        of the person's own descriptor draws a new identity on its next frame (logged). The
        first frame's choice over-states how far a face stays from its person over a clip."""
        try:
            emb = embed_real_faces(self.recognizer, out, [tr.raw], detect=False)
        except Exception as exc:   # e.g. dlib missing: the choice stands
            log.warning("identity watch unavailable (%s)", exc)
            st.real = None
            return
        d = float(np.linalg.norm(emb[0] - st.real)) if len(emb) else np.inf
        near = d < MATCH_THRESHOLD + WATCH_NEAR
        often = near or (self._push_by_need and not st.pushed)   # an unpushed face is watched closely
        st.watch_at = st.good_frames + (min(WATCH_NEAR_EVERY, self.cfg.identity_watch) if often
                                        else self.cfg.identity_watch)
        if near and self._push_by_need and not st.pushed and st.repel is not None:
            st.pushed = True
            log.info("face %d: the output came within %.2f of the person's own face: the identity repel is on "
                     "for it from now on", tr.id, d)
        if d < MATCH_THRESHOLD:
            log.warning("face %d: the output came within %.2f of the person's own face (match < %.2f); "
                        "drawing another identity than %s", tr.id, d, MATCH_THRESHOLD, st.identity.name)
            st.too_near, st.real_tried = True, False

    def _check_identity(self, frame: np.ndarray, matched: list[Track]) -> None:
        """The identity guard's decision for this video (or this image), before any output."""
        self._guard_done = True
        try:
            ident, why = self.guard.choose(self.gen, self.recognizer, frame, [tr.raw for tr in matched],
                                           self.chosen_identity)
            if ident is not self.identity:
                self._wear(ident)
        except Exception as exc:   # e.g. dlib missing: anonymize with the chosen identity
            log.warning("identity guard unavailable (%s); wearing '%s'", exc, self.chosen_identity.name)
            self.guard = None
            if self.identity is not self.chosen_identity:
                self._wear(self.chosen_identity)
            return
        if why:
            (log.warning if self.video else log.info)(why)

    def _real_embedding(self, frame: np.ndarray, tr: Track) -> np.ndarray | None:
        """(128,) dlib descriptor of this track's real face (in memory only, never stored): the
        reference the identity repel pushes away from, and what the per-track identity is matched
        and re-found by; None (logged) when it cannot be had."""
        try:
            emb = embed_real_faces(self.recognizer, frame, [tr.raw])
        except Exception as exc:   # e.g. dlib missing: anonymize without the push or the matching
            log.warning("identity repel unavailable (%s); generating without it%s", exc,
                        "; per-track identities drawn without attributes" if self.assigner is not None else "")
            self._repel_on = self._embed_on = False
            return None
        return emb[0] if len(emb) else None

    def _needs_embedding(self, st: _TrackState) -> bool:
        """Whether this track's real face is still to be embedded (once per track, again after a cut)."""
        return not st.real_tried and (self._embed_on or (self.assigner is not None and st.identity is None))

    def _embed_tracks(self, frame: np.ndarray, tracks: list[Track], geometry: dict[int, tuple]) -> None:
        """Once per track (again after a scene cut): the real face's descriptor, the repel's
        tokens, and with per-track identities the track's identity (a new one for a new person;
        the new people of one frame chosen together, among candidates rendered in each one's
        ``geometry[track id]``, :meth:`_render_in_context`)."""
        draw = []
        for tr in tracks:
            st = self._states[tr.id]
            st.real_tried = True
            was = st.real
            st.real = self._real_embedding(frame, tr) if self._embed_on else None
            st.repel = self.gen.identity_tokens(st.real) if (self._repel_on and st.real is not None) else None
            if self.assigner is None:
                st.real = None   # not needed beyond the repel's tokens
                continue
            if st.identity is not None and not st.too_near and (
                    st.real is None or was is None or float(np.linalg.norm(st.real - was)) < MATCH_THRESHOLD):
                continue         # the same person (or no way to tell): the track keeps its identity
            if st.identity is not None and not st.too_near:   # a scene cut put another person on this track
                self.assigner.retire(st.identity, was, self._frame_index)
            st.too_near, st.watch_at = False, 0   # one that came too near its person is not remembered for them
            draw.append(tr)
        if not draw:
            return
        drawing = {tr.id for tr in draw}
        others = [(k, o) for k, o in self._states.items() if k not in drawing and o.identity is not None]
        seen = [o.identity for k, o in others if k not in self._lost_ids]
        lost = [(o.identity, o.real) for k, o in others if k in self._lost_ids]

        def renderer(tr: Track):
            st, g = self._states[tr.id], geometry[tr.id]
            return lambda ids: self._render_in_context(ids, frame, tr, st, *g)

        people = [(self._states[tr.id].real, renderer(tr) if self._embed_on else None) for tr in draw]
        for tr, (ident, how) in zip(draw, self.assigner.assign_all(people, self._frame_index, seen, lost)):
            for k, o in others:   # taken back from a lost track of the same person: it gives it up
                if o.identity is ident:
                    o.identity = o.tokens = o.noise = None
                    o.real_tried = False
            self._wear_track(self._states[tr.id], ident)
            log.info("face %d: identity %s (%s)", tr.id, ident.name, how)

    def _render_in_context(self, identities: list[Identity], frame: np.ndarray, tr: Track, st: _TrackState,
                           M: np.ndarray, lm_crop: np.ndarray, pose, neutral: np.ndarray) -> Renders:
        """The identities' faces (:class:`safefm.identity_assign.Renders`) as this track would
        show them in this frame: the person's expression and pose retargeted onto each
        identity's rest shape, generated cold with the track's guidance (its identity repel),
        pasted into the frame as the output is (:meth:`_paste`; the person's own hair is not
        kept, so an identity is judged by its own face), and read there as the real face is
        (:func:`safefm.guard.read_real_faces`), so the comparison with the real face and with the
        other people's faces is like for like. The mouth reading is the render's dlib-68 mouth
        opening less the real face's in this frame (a mouth that reads open on a closed one, or
        shut on an open one, does not follow the person); the skin's unevenness is the generated
        crop's (:func:`safefm.face.skin.uneven_skin`); how much the mouth opens is read on a
        second render with the person's lower lip moved down by ``OPEN_BY`` face widths
        (:func:`safefm.face.retarget.open_mouth`), both at the landmarks' box (some identities'
        mouths stay shut whatever the heatmaps say). M: (2, 3) frame -> crop; lm_crop: (478, 3)
        the real landmarks in the crop; pose and neutral: as :meth:`_geometry` gives them. NaN
        for a face dlib cannot read. ~0.25 s an identity on a 2-core CPU."""
        S, cfg, gen = self.mcfg.image_size, self.cfg, self.gen
        push = self._push(st)
        guidance, until = self._guidance(push)
        scratch = np.empty_like(frame)
        out = np.full((len(identities), 128), np.nan, np.float32)
        mouth, uneven, opens = (np.full(len(identities), np.nan) for _ in range(3))
        real_mouth = mouth_openings(self.recognizer, frame, [tr.raw])   # its descriptor is st.real
        opened = retarget.open_mouth(lm_crop, OPEN_BY)                   # the person starting to speak

        def render(ident, lm):   # the identity's face on these real landmarks, pasted into scratch
            ret = retarget.retarget(lm, neutral, ident.shape, cfg.expression_gain, pose=pose,
                                    eye_gain=cfg.eye_gain, eye_rest=cfg.eye_rest)
            heat = heatmaps.render_heatmaps(ret, S, self.mcfg.heatmap_size)
            z = gen.generate(heat, gen.identity_tokens(ident.embedding), self._noise(ident), steps=cfg.steps,
                             guidance=guidance, guidance_until=until, reference=push,
                             context=self._context(frame, M, tr, lm, ret))
            crop = gen.decode(z, heat)[0]
            np.copyto(scratch, frame)
            self._paste(scratch, frame, tr, crop, ret, lm, M, hair=False)
            return crop, ret

        for i, ident in enumerate(identities):
            crop, ret = render(ident, lm_crop)
            uneven[i] = skin.uneven_skin(crop, ret)
            emb, opening = read_real_faces(self.recognizer, scratch, [tr.raw])
            if len(emb):
                out[i] = emb[0]
                if len(real_mouth):
                    mouth[i] = opening[0] - real_mouth[0]
            at_rest = mouth_openings(self.recognizer, scratch, [tr.raw], detect=False)
            render(ident, opened)
            wide = mouth_openings(self.recognizer, scratch, [tr.raw], detect=False)
            if len(at_rest) and len(wide):
                opens[i] = wide[0] - at_rest[0]
        return Renders(out, mouth, uneven, opens)

    def _wear_track(self, st: _TrackState, identity: Identity) -> None:
        """This track wears ``identity`` from now on (its own tokens and noise; no warm start)."""
        st.identity = identity
        st.tokens = self.gen.identity_tokens(identity.embedding)
        st.noise = self._noise(identity)
        st.forget_latent()

    def _noise(self, identity: Identity) -> torch.Tensor:
        """(1, C, h, w) the fixed noise ``identity`` is generated from (``cfg.seed`` overrides its own)."""
        seed = self.cfg.seed if self.cfg.seed >= 0 else identity.seed
        return Identity(identity.embedding, identity.shape, seed).noise(self.mcfg.latent_shape)

    def _push(self, st: _TrackState) -> torch.Tensor | None:
        """The repel's reference tokens for this track's face now, or None (no push): the real
        face's tokens when the repel is on and, with ``repel_when = "near"`` and a watch running,
        once the watch has found the track's output near the person's own face."""
        if st.repel is None or (self._push_by_need and not st.pushed):
            return None
        return st.repel

    def _guidance(self, repel: torch.Tensor | None) -> tuple[float, float]:
        """(guidance weight, until) of a face's sampling: the identity repel against its real
        face when it has ``repel`` tokens, else the identity guidance against the null identity."""
        if repel is not None:
            return 1.0 + self.cfg.identity_repel, self.cfg.repel_until
        return self.cfg.identity_guidance, self.cfg.guidance_until

    def _worn(self, st: _TrackState) -> tuple[Identity, torch.Tensor, torch.Tensor]:
        """(identity, tokens, noise) this track's face is generated with."""
        if st.identity is not None:
            return st.identity, st.tokens, st.noise
        return self.identity, self.tokens, self.noise

    def _state(self, track_id: int) -> _TrackState:
        """What the engine remembers of this track (new for a new track)."""
        st = self._states.get(track_id)
        if st is None:
            neutral = retarget.NeutralEstimator(self.cfg.neutral_window, self.template, warmup=self.cfg.neutral_warmup)
            st = self._states[track_id] = _TrackState(neutral)
        return st

    def _geometry(self, tr: Track, st: _TrackState) -> tuple:
        """This frame's (M (2, 3) frame -> crop, lm_crop (478, 3) the real landmarks in the crop,
        pose, neutral (478, 3) the rest shape the expression is measured from) of a track; updates
        its running rest shape (video), so once per frame."""
        S, cfg = self.mcfg.image_size, self.cfg
        M = alignment.align_matrix(tr.landmarks, S)
        lm_crop = alignment.transform_points(tr.landmarks, M)
        pose = retarget.pose_fit(lm_crop, self.template)  # canonical = the template's unit crop frame
        canon = retarget.to_canonical(lm_crop, pose)
        # In a video the expression is measured from the user's own running rest shape
        # (NeutralEstimator). A single image has no history: its rest shape is estimated from the
        # photo itself (the expression prior), or is the template (passes the person's lip shapes).
        if self.video:
            neutral = st.neutral.update(canon)
        elif cfg.image_neutral == "prior":
            neutral = retarget.single_image_neutral(canon, template=self.template)
        else:
            neutral = self.template
        return M, lm_crop, pose, neutral

    def _context(self, frame: np.ndarray, M: np.ndarray, tr: Track, lm_crop: np.ndarray,
                 ret_crop: np.ndarray) -> np.ndarray | None:
        """(4, H, H) the real frame around track ``tr``'s face as a context model reads it (the crop
        through M, the mask covering the real face where it is this frame (its raw landmarks) and
        where the smoothed track puts it (``lm_crop``), and the generated face (``ret_crop``):
        :mod:`safefm.face.context`), or None when the model reads none."""
        if not self.gen.reads_context:
            return None
        S = self.mcfg.image_size
        raw = alignment.transform_points(tr.raw, M)
        return face_context(alignment.crop_face(frame, M, S), (raw, lm_crop, ret_crop), self.cfg.context_grow,
                            self.mcfg.heatmap_size)

    def _prepare_face(self, job: _FaceJob, geometry: tuple, timings, frame: np.ndarray) -> None:
        S, cfg, st = self.mcfg.image_size, self.cfg, job.st
        identity, job.tokens, job.noise = self._worn(st)
        job.repel, job.epoch = self._push(st), st.epoch   # (a newly worn identity has just bumped the epoch)
        t_a = time.perf_counter()
        M, lm_crop, pose, neutral = geometry
        job.ret_crop = retarget.retarget(lm_crop, neutral, identity.shape, cfg.expression_gain, pose=pose,
                                         eye_gain=cfg.eye_gain, eye_rest=cfg.eye_rest)
        job.M, job.lm_crop = M, lm_crop
        job.heat = heatmaps.render_heatmaps(job.ret_crop, S, self.mcfg.heatmap_size)   # per frame: may overlap
        job.context = self._context(frame, M, job.track, lm_crop, job.ret_crop)
        timings["retarget_heatmaps"] += time.perf_counter() - t_a

    def _generate_face(self, job: _FaceJob, plan: FramePlan) -> None:
        cfg, tr, st, timings = self.cfg, job.track, job.st, plan.timings
        t_b = time.perf_counter()
        heat = self.fault_injector("generate", tr.id, job.heat) if self.fault_injector else job.heat
        warm = job.warm and st.z_prev is not None and st.z_epoch == job.epoch
        guidance, until = self._guidance(job.repel)
        t0 = cfg.warm_t0 if warm else 0.0
        z = self.gen.generate(heat, job.tokens, job.noise, z_prev=st.z_prev if warm else None,
                              t0=t0, steps=cfg.steps, guidance=guidance, guidance_until=until, reference=job.repel,
                              context=job.context)
        if self.fault_injector:
            z = self.fault_injector("latent", tr.id, z)
        if not torch.isfinite(z).all():
            raise FloatingPointError("generator returned non-finite values")
        t_c = time.perf_counter()
        timings["generator"] += t_c - t_b
        timings["generator_steps"] = cfg.steps - first_step(cfg.steps, t0)   # a warm frame takes fewer
        job.crop = self.gen.decode(z, heat)[0]
        timings["decode"] += time.perf_counter() - t_c
        if self.video:
            st.z_prev, st.z_epoch = z.detach().clone(), job.epoch

    def _paste_face(self, out, frame, job: _FaceJob, timings, protect=None) -> FaceResult:
        tr, st = job.track, job.st
        t_d = time.perf_counter()
        crop, M_inv, face, t_detail = self._paste(out, frame, tr, job.crop, job.ret_crop, job.lm_crop, job.M,
                                                  protect)
        timings["decode"] += t_detail
        timings["composite"] += time.perf_counter() - t_d - t_detail
        st.last_crop, st.last_M_inv, st.last_landmarks, st.last_face = crop, M_inv, tr.raw, face
        st.good_frames += 1
        return FaceResult(tr.id, face_box(tr.raw, out.shape), ANONYMIZED, tr.raw)

    def _paste(self, out: np.ndarray, frame: np.ndarray, tr: Track, crop: np.ndarray, ret_crop: np.ndarray,
               lm_crop: np.ndarray, M: np.ndarray, protect=None,
               hair: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, float]:
        """Fit the generated ``crop`` (S, S, 3) to the person's head (``outline_follow``:
        :func:`safefm.face.outline.fit_to_head`), even its skin out and light it with the real
        face's light field (``even_skin``, ``match_light``: :func:`safefm.face.skin.even_out`),
        colour-match it to the real face, run the detail
        stage for a large face, and paste it over track ``tr``'s face in ``out`` (in place). ret_crop, lm_crop:
        (478, 3) the generated and the real landmarks in the crop; M: (2, 3) frame -> crop; hair:
        keep the person's hair over the forehead when ``keep_hair`` is on (candidate renders do
        not: an identity is chosen by its own face, as without it).
        Returns (the pasted crop (S or 2S px), its crop -> frame affine, its face alpha or None,
        seconds spent in the detail stage)."""
        S, cfg = self.mcfg.image_size, self.cfg
        M_inv = alignment.invert_affine(M)
        crop, ret_crop = outline.fit_to_head(crop, ret_crop, lm_crop, cfg.outline_follow)
        ret_dist = composite.oval_distance(ret_crop, S)   # once: skin mask and face alpha share it
        real_crop, lm_dist = None, None
        hair = hair and cfg.keep_hair
        if cfg.color_match or hair or cfg.match_light:
            real_crop, lm_dist = alignment.crop_face(frame, M, S), composite.oval_distance(lm_crop, S)
        painted = crop   # the face alpha reads the generator's own dark rim and strands, before they are evened out
        if cfg.even_skin > 0 or cfg.match_light:
            crop = skin.even_out(crop, ret_crop, cfg.even_skin, real_crop if cfg.match_light else None, lm_crop)
        if cfg.color_match:
            crop = composite.color_match(crop, real_crop, composite.skin_mask(ret_crop, S, dist=ret_dist),
                                         composite.skin_mask(lm_crop, S, dist=lm_dist))
        ret_frame = alignment.transform_points(ret_crop, M_inv)
        mask = composite.face_mask([tr.raw, tr.landmarks, ret_frame], out.shape[:2],
                                   cfg.mask_dilate, cfg.mask_feather)
        if hair:
            composite.uncover(mask, composite.hair_over_face(real_crop, lm_crop, S, dist=lm_dist), M_inv)
        face = (composite.face_alpha(ret_crop, S, inner=cfg.face_inner, image=painted, dist=ret_dist)
                if cfg.seamless_paste else None)
        t_detail, detail = 0.0, self._wants_detail(M)
        # the camera's sharpness, for a still image's face without the detail stage (in a video the
        # reading moves with expression and motion, and the face would shimmer; the stage draws large faces)
        sharpen = cfg.match_sharpness and not self.video and not detail
        if detail:   # a large face: the 2x detail stage, pasted from 2S px
            t_e = time.perf_counter()
            crop = self.gen.refine(crop[None])[0]
            face = None if face is None else cv2.resize(face, (2 * S, 2 * S), interpolation=cv2.INTER_LINEAR)
            M_inv = alignment.resized_crop_affine(M_inv, S, 2 * S)
            t_detail = time.perf_counter() - t_e
        composite.paste(out, crop, M_inv, mask, out=out, face=face, protect=protect, grain=cfg.match_grain,
                        sharpen=sharpen)
        return crop, M_inv, face, t_detail

    def _wants_detail(self, M: np.ndarray) -> bool:
        """Whether a face whose frame -> crop affine is ``M`` gets the 2x detail stage: the model
        has one and the crop spans at least ``detail_min_px`` frame pixels."""
        px = self.cfg.detail_min_px
        return self.gen.has_detail and px > 0 and self.mcfg.image_size / alignment.affine_scale(M) >= px

    def _crop_to_frame(self, landmarks: np.ndarray, crop_size: int) -> np.ndarray:
        """The crop -> frame affine of a ``crop_size`` px crop aligned on ``landmarks``."""
        S = self.mcfg.image_size
        M_inv = alignment.invert_affine(alignment.align_matrix(landmarks, S))
        return M_inv if crop_size == S else alignment.resized_crop_affine(M_inv, S, crop_size)

    def _cover(self, out, tr: Track, st: _TrackState, *, reason: str, landmarks, missing: int,
               protect=None) -> FaceResult:
        """Fail-closed cover for a face that was not anonymized this frame (policy in the module doc)."""
        cfg = self.cfg
        lm = landmarks if landmarks is not None else (st.last_landmarks if st.last_landmarks is not None else tr.raw)
        grow = 0.15 * max(1, missing)
        box = face_box(lm, out.shape, margin=min(1.0, 0.2 + grow))
        if st.last_crop is not None and missing <= cfg.hold_frames:
            if landmarks is not None:  # the face is visible: place the held face where it is now
                M_inv = self._crop_to_frame(landmarks, st.last_crop.shape[0])
            else:
                M_inv = st.last_M_inv
            mask = composite.face_mask([lm], out.shape[:2], cfg.mask_dilate + grow, cfg.mask_feather)
            composite.paste(out, st.last_crop, M_inv, mask, out=out, face=st.last_face, protect=protect)
            return FaceResult(tr.id, box, HELD, landmarks, reason)
        composite.cover_placeholder(out, box, out=out)
        return FaceResult(tr.id, box, PLACEHOLDER, landmarks, reason)

    def _scene_cut(self, frame: np.ndarray) -> bool:
        thumb = cv2.resize(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY), (32, 32),
                           interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
        prev, self._prev_thumb = self._prev_thumb, thumb
        return prev is not None and float(np.abs(thumb - prev).mean()) > self.cfg.scene_cut_threshold


def build_engine(cfg: RuntimeConfig, model_path=None, identity_path=None, video: bool = True) -> Engine:
    """Load the weights (default: ``$SAFEFM_WEIGHTS`` or ``weights/``) and an identity file; with
    ``cfg.identity_guard`` > 0 the shipped identities are the guard's alternatives. With
    ``cfg.identity_per_track`` every track draws its own identity instead (the guard is not used).
    Best run where numpy's BLAS has one thread (``OPENBLAS_NUM_THREADS=1`` before numpy is first
    imported, as SAFE-FM's commands set it, :mod:`safefm.cli`): the per-frame fits are tiny, and
    a second BLAS thread waiting busily takes the cores from onnxruntime and OpenCV."""
    from .paths import default_identity_path, resolve_model_path

    if cfg.threads > 0:   # torch's count is process-wide (its own per-frame work, and the torch runtime)
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    gen = Generator.load(resolve_model_path(model_path), cfg)
    log.info("generator loaded in %.2f s (%s)", time.perf_counter() - t0, gen.runtime)
    identity = load_identity(identity_path or default_identity_path(), gen.model_cfg.identity_dim)
    if cfg.identity_per_track and cfg.identity_guard > 0:
        log.info("identity guard off: it chooses among the shipped identities, and each face draws its own")
    guard = None if cfg.identity_per_track else default_guard(cfg, identity, gen.model_cfg.identity_dim)
    engine = Engine(gen, identity, cfg, video=video, guard=guard)
    log.info("engine built in %.2f s", time.perf_counter() - t0)
    return engine
