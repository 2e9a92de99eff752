"""One synthetic identity per person (``identity_per_track``, ``safefm-anonymize --identity auto``).

Engine tests: two real people side by side (two shared clips), tiny random models, the real dlib
recogniser (each face embedded once) and the shipped identity sampler.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from conftest import VIDEOS, needs_data, needs_dlib, read_frames

from safefm.config import ConfigError, RuntimeConfig, load_runtime_config
from safefm.identity_assign import IdentityAssigner, parse_match
from safefm.identity_sampler import load_default_sampler
from safefm.results import ANONYMIZED
from safefm.tiny import tiny_engine

SIDE = 256


@pytest.fixture(scope="module")
def pair_frames():
    """12 frames: liveportrait_d0 on the left, liveportrait_d3 on the right, 256 px each."""
    if not VIDEOS.is_dir():
        pytest.skip("../shared/data not present")
    left = read_frames(VIDEOS / "liveportrait_d0.mp4", 12, step=2)
    right = read_frames(VIDEOS / "liveportrait_d3.mp4", 12, step=2)
    return [np.concatenate([cv2.resize(a, (SIDE, SIDE), interpolation=cv2.INTER_AREA),
                            cv2.resize(b, (SIDE, SIDE), interpolation=cv2.INTER_AREA)], axis=1)
            for a, b in zip(left, right)]


def _engine(per_track: bool, **kw):
    cfg = load_runtime_config(runtime="torch", identity_repel=0.0, identity_per_track=per_track,
                              identity_seed=3, **kw)
    return tiny_engine(cfg, seed=0)


def _sides(res) -> dict[str, int]:
    """{"left" | "right": track id} of the faces in a FrameResult."""
    return {("left" if f.box[0] + f.box[2] < 2 * SIDE else "right"): f.track_id for f in res.faces}


@needs_data
@needs_dlib
def test_two_people_wear_two_identities_kept_through_a_short_loss(pair_frames):
    eng = _engine(True, identity_match=())
    worn = {"left": set(), "right": set()}
    frames = list(pair_frames[:6])
    grey = frames[5].copy()
    grey[:, SIDE:] = 128                      # the right person leaves for 3 frames ...
    frames += [grey, grey, grey] + list(pair_frames[6:9])   # ... and comes back
    for i, f in enumerate(frames):
        res = eng.process(f, i / 25)
        ids = _sides(res)
        assert "left" in ids
        for side, tid in ids.items():
            if any(x.track_id == tid and x.status == ANONYMIZED for x in res.faces):
                worn[side].add(eng.identity_of(tid).name)
        if len(ids) == 2 and all(x.status == ANONYMIZED for x in res.faces):
            a, b = eng.identity_of(ids["left"]), eng.identity_of(ids["right"])
            assert a is not b and not np.array_equal(a.embedding, b.embedding) and a.seed != b.seed
    assert len(worn["left"]) == 1 and len(worn["right"]) == 1   # one identity each, all along
    assert worn["left"] != worn["right"]
    assert eng.identity_of(ids["left"]) is not eng.identity  # drawn from the sampler, not the file
    eng.close()


@needs_data
@needs_dlib
def test_a_person_found_again_as_a_new_track_gets_their_identity_back(pair_frames):
    eng = _engine(True, identity_match=())
    for i, f in enumerate(pair_frames[:3]):
        first = _sides(eng.process(f, i / 25))
    right = eng.identity_of(first["right"])
    moved = pair_frames[3].copy()
    moved[:, SIDE:] = np.roll(moved[:, SIDE:], -SIDE // 3, axis=1)   # the right person jumped aside
    moved[:, 2 * SIDE - SIDE // 3:] = 128
    res = eng.process(moved, 3 / 25)
    now = _sides(res)
    new_id = max(f.track_id for f in res.faces if f.status == ANONYMIZED)
    assert new_id not in first.values()               # the tracker saw a new face ...
    assert eng.identity_of(new_id) is right           # ... the engine knew the person
    assert eng.identity_of(now["left"]) is not right
    eng.close()


class _ReadsTheOutputAt:
    """A recogniser that reads every face it detects as the person, and a face embedded without
    detection (the identity watch's way, at the landmarks' box) at distance ``d`` from them."""

    def __init__(self, d: float):
        self.d, self._detected = d, False

    def detect(self, rgb):
        self._detected = True
        return [(0, 0, rgb.shape[1], rgb.shape[0])]

    def embed(self, rgb, box=None):
        v = np.zeros(128, np.float32)
        v[0] = 0.0 if self._detected else self.d
        self._detected = False
        return v

    def mouth_opening(self, rgb, box):
        return 0.0


@needs_data
@pytest.mark.parametrize("d, watch, checked, switched", [
    (0.0, 12, [0, 1, 2, 3, 4, 5, 6, 7], True),   # a match: another identity from the next frame on
    (0.65, 12, [0, 3, 6], False),                # near a match: watched every 3 frames
    (0.9, 12, [0], False),                       # far: every 12 frames
    (0.0, 0, [], False)])                        # off: the first choice stands
def test_a_face_that_comes_to_match_its_person_gets_another_identity(pair_frames, d, watch, checked, switched,
                                                                     caplog):
    """identity_watch: the output face is compared with the person's own on a track's first
    anonymized frame, then every ``identity_watch`` frames (every 3 while within 0.1 of dlib's
    match threshold); a match makes the track draw another identity from the next frame on."""
    eng = _engine(True, identity_match=(), identity_watch=watch)
    eng.recognizer = _ReadsTheOutputAt(d)
    worn, ran = [], []
    with caplog.at_level("WARNING", logger="safefm.engine"):
        for i, f in enumerate(pair_frames[:8]):
            res = eng.process(np.ascontiguousarray(f[:, :SIDE]), i / 25)
            (face,) = res.faces
            assert face.status == ANONYMIZED
            worn.append(eng.identity_of(face.track_id))
            ran.append(res.timings["guard"] > 0)
    assert [i for i, r in enumerate(ran) if r] == checked
    assert all(w is not v for w, v in zip(worn, worn[1:])) if switched else all(w is worn[0] for w in worn)
    assert ("came within 0.00 of the person's own face" in caplog.text) == switched
    eng.close()


@needs_data
@pytest.mark.parametrize("d, when, video, pushed, watched", [
    (0.9, "near", True, [False] * 6, [0, 3]),                  # stays far: unpushed all along, watched every 3
    (0.65, "near", True, [False] + [True] * 5, [0, 3]),        # near at the first frame's watch: pushed from then on
    (0.9, "always", True, [True] * 6, [0]),                    # the old way: every frame pushed, watched every 12
    (0.9, "near", False, [True] * 6, [])])                     # still images: no watch, so pushed
def test_a_video_face_is_pushed_away_from_its_person_only_once_it_comes_near(pair_frames, d, when, video, pushed,
                                                                             watched, caplog):
    """repel_when = "near" (the files default): a person's own identity is generated without the
    identity repel (which paints blotches) until the identity watch finds the output within 0.1
    of dlib's match threshold of their face; then the track is pushed for good (logged). Still
    images and "always" push every face. An unpushed face is watched every 3 frames, not 12."""
    eng = tiny_engine(load_runtime_config(runtime="torch", identity_repel=1.5, repel_when=when,
                                          identity_per_track=True, identity_seed=3, identity_match=()),
                      seed=0, video=video)
    eng.recognizer = _ReadsTheOutputAt(d)
    refs, generate = [], eng.gen.generate

    def recorded(*a, **kw):
        refs.append(kw.get("reference") is not None)
        return generate(*a, **kw)
    eng.gen.generate = recorded
    seen, ran = [], []
    with caplog.at_level("INFO", logger="safefm.engine"):
        for i, f in enumerate(pair_frames[:6]):
            refs.clear()
            res = eng.process(np.ascontiguousarray(f[:, :SIDE]), i / 25)
            assert [x.status for x in res.faces] == [ANONYMIZED]
            seen.append(refs[-1])          # the frame's own face (after any candidate renders)
            ran.append(res.timings["guard"] > 0)
    assert seen == pushed
    assert [i for i, r in enumerate(ran) if r] == watched
    assert ("the identity repel is on for it from now on" in caplog.text) == (when == "near" and d < 0.7 and video)
    eng.close()


def test_repel_when_is_checked():
    with pytest.raises(ConfigError, match="repel_when must be 'always' or 'near'"):
        RuntimeConfig(repel_when="sometimes")
    assert RuntimeConfig().repel_when == load_runtime_config().repel_when == "near"


@needs_data
def test_an_identity_file_is_worn_by_everyone(pair_frames):
    eng = _engine(False)
    for i, f in enumerate(pair_frames[:3]):
        ids = _sides(eng.process(f, i / 25))
    assert len(ids) == 2
    assert eng.identity_of(ids["left"]) is eng.identity_of(ids["right"]) is eng.identity
    eng.close()


def test_match_parsing_and_its_one_line_errors():
    assert parse_match(None) == ("gender", "age")
    assert parse_match("age, gender") == ("gender", "age") and parse_match("gender") == ("gender",)
    assert parse_match("none") == () and parse_match("NONE") == ()
    for bad, words in (("race", "unknown attribute 'race'"), ("gender,gender", "twice"), (",", "nothing"),
                       ("none,age", "unknown attribute 'none'")):
        with pytest.raises(ConfigError, match=words) as e:
            parse_match(bad)
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="identity_match"):
        RuntimeConfig(identity_match=("gender", "eyes"))
    with pytest.raises(ConfigError, match="identity_watch >= 0 frames, got -1, 150 and -2"):
        RuntimeConfig(identity_seed=-1, identity_watch=-2)
    assert RuntimeConfig().identity_watch == 12
    assert RuntimeConfig().identity_per_track is False      # safefm-cam: one identity file


def _cli(capsys, *argv):
    from safefm.cli.anonymize import main

    seen = {}

    def factory(cfg, model_path=None, identity_path=None, video=True):
        seen.update(cfg=cfg, identity_path=identity_path)
        raise KeyboardInterrupt   # stop before any work: the options are what is checked

    code = main([str(a) for a in argv], engine_factory=factory)
    return code, capsys.readouterr().err, seen


def test_anonymize_draws_per_person_by_default_and_an_identity_file_turns_it_off(tmp_path, capsys):
    img = tmp_path / "in.png"
    cv2.imwrite(str(img), np.zeros((32, 32, 3), np.uint8))
    _, _, seen = _cli(capsys, img, "-o", tmp_path / "out.png")
    assert seen["cfg"].identity_per_track and seen["cfg"].identity_match == ("gender", "age")
    assert seen["identity_path"] is None
    _, _, seen = _cli(capsys, img, "-o", tmp_path / "out.png", "--match", "none")
    assert seen["cfg"].identity_per_track and seen["cfg"].identity_match == ()
    ident = tmp_path / "id.pt"
    ident.write_bytes(b"x")
    _, _, seen = _cli(capsys, img, "-o", tmp_path / "out.png", "--identity", ident)
    assert not seen["cfg"].identity_per_track and seen["identity_path"] == str(ident)
    for argv, words in ((["--match", "gender,eyes"], "error: --match: unknown attribute 'eyes'"),
                        (["--identity", ident, "--match", "age"], "error: --match applies to --identity auto")):
        code, err, seen = _cli(capsys, img, "-o", tmp_path / "out.png", *argv)
        assert code == 1 and err.startswith(words) and err.count("\n") == 1 and not seen


def test_draws_are_distinct_and_remembered_for_a_while():
    sampler = load_default_sampler()
    asg = IdentityAssigner(sampler, match=(), seed=0, memory=10)
    a, _ = asg.assign(None, 0, [])
    b, _ = asg.assign(None, 0, [a])
    assert np.linalg.norm(a.embedding - b.embedding) >= 0.8
    person = np.full(128, 0.05, np.float32)
    asg.retire(a, person, frame=5)
    back, how = asg.assign(person + 0.01, 12, [b])
    assert back is a and how == "returned"
    asg.retire(a, person, frame=5)
    later, _ = asg.assign(person, 30, [b])             # forgotten after ``memory`` frames
    assert later is not a
    with pytest.raises(ValueError, match="classifier"):
        IdentityAssigner(sampler, None, match=("gender",))


def _people(faces_by_person, reals):
    """[(real, render)] whose render returns the given (K, 128) faces for the K candidates
    (and zeros for any worn identity asked for); ``seen[n]`` records person n's candidates."""
    seen = {}

    def render(n):
        def f(ids):
            seen[n] = list(ids)
            k = len(faces_by_person[n])
            return np.concatenate([faces_by_person[n], np.zeros((len(ids) - k, 128), np.float32)])
        return f
    return [(reals[n], render(n)) for n in range(len(reals))], seen


def test_people_who_appear_together_get_the_pair_of_faces_farthest_apart():
    from safefm.identity_assign import CANDIDATES

    rng = np.random.default_rng(0)
    faces = [rng.normal(0, 0.02, (CANDIDATES, 128)).astype(np.float32) for _ in range(2)]
    faces[0][5, 0], faces[1][7, 0] = 0.45, -0.45    # only this pair is far apart (0.9)
    faces[0][3, 1] = 0.3                            # alone, person 0's farthest from their own face
    reals = [np.eye(128, dtype=np.float32)[1] * -2.0, np.eye(128, dtype=np.float32)[2] * 2.0]
    people, seen = _people(faces, reals)
    asg = IdentityAssigner(load_default_sampler(), match=(), seed=0)
    (a, how_a), (b, _) = asg.assign_all(people, 0, [])
    assert a is seen[0][5] and b is seen[1][7]
    assert float(how_a.split("rendered ")[1].split(" ")[0]) >= 0.9   # logged: how far apart they are
    assert not np.array_equal(a.embedding, b.embedding) and a.seed != b.seed


def test_the_candidate_read_as_the_persons_gender_is_worn_even_if_another_is_farther():
    from safefm.attributes import AttributeClassifier, Head
    from safefm.identity_assign import ALONE as CANDIDATES   # a person alone

    w = np.zeros((2, 128), np.float32)
    w[1, 0] = 10.0                                   # P(female) = sigmoid(10 * x[0])
    age = np.zeros((4, 128), np.float32)
    clf = AttributeClassifier(np.zeros(128, np.float32), np.ones(128, np.float32), {
        "gender": Head(("male", "female"), ((w, np.zeros(2, np.float32)),)),
        "age": Head(("child", "young", "adult", "senior"), ((age, np.array([0, 0, 1, 0], np.float32)),))})
    real = np.zeros(128, np.float32)
    real[0] = 1.0                                     # read as a woman
    faces = np.zeros((CANDIDATES, 128), np.float32)
    faces[:, 0] = -1.0                               # every candidate read as a man, far from her ...
    faces[:, 3] = np.linspace(0.0, 1.0, CANDIDATES)
    faces[9] = 0.0
    faces[9, 0], faces[9, 1] = 0.3, 0.8              # ... but one: a confident woman, nearer
    for match in (("gender", "age"), ()):
        people, seen = _people([faces], [real])
        asg = IdentityAssigner(load_default_sampler(), clf, match=match, seed=0)
        (ident, how), = asg.assign_all(people, 0, [])
        k = next(i for i, c in enumerate(seen[0]) if c is ident)
        if match:
            assert k == 9, how
        else:   # all far enough from her: the most typical render, not the oddest (farthest) one
            assert k != 9 and CANDIDATES // 4 <= k < 3 * CANDIDATES // 4, how
        assert (f"read as female 0.95 / adult (1 of {CANDIDATES} candidates read as female)" in how) == bool(match)


def test_when_no_candidate_is_far_from_the_persons_own_face_the_farthest_is_worn():
    """Every render near the person (under OWN): a second batch is drawn, and the choice is the
    farthest from their own face, not the most typical render (which sits among the near ones)."""
    from safefm.identity_assign import ALONE, ALONE_PHOTO, OWN

    assert OWN > 0.6   # every render below is nearer the person than OWN
    real = np.zeros(128, np.float32)
    batches = []

    def render(ids):
        k = len(batches)
        faces = np.zeros((len(ids), 128), np.float32)
        faces[:, 3] = np.linspace(0.1, 0.5 + 0.1 * k, len(ids))   # the 2nd batch reaches farther
        batches.append((list(ids), faces))
        return faces

    asg = IdentityAssigner(load_default_sampler(), match=(), seed=0)
    (ident, how), = asg.assign_all([(real, render)], 0, [])
    assert len(batches) == 2 and all(len(ids) == ALONE for ids, _ in batches)
    assert ident is batches[1][0][-1], how
    batches.clear()          # a still image: fewer candidates, one batch, still the farthest
    photo = IdentityAssigner(load_default_sampler(), match=(), seed=0, video=False)
    (ident, how), = photo.assign_all([(real, render)], 0, [])
    assert len(batches) == 1 and len(batches[0][0]) == ALONE_PHOTO < ALONE
    assert ident is batches[0][0][-1], how


def test_a_candidate_whose_mouth_does_not_read_as_the_persons_is_not_worn():
    """Some identities draw parted, dark lips that dlib reads open on a closed mouth (and stay
    so all clip long): among renders all far enough from the person, the most typical one is
    worn unless its mouth reads more than MOUTH from the person's; an unknown reading is no veto.
    With every render too near, the farthest whose mouth follows is worn, or one within SLACK
    of it with cleaner skin."""
    from safefm.identity_assign import ALONE, MOUTH, OWN, SLACK, Renders

    real = np.zeros(128, np.float32)
    real[1] = -2.0                                     # every render below is far from her
    faces = np.zeros((ALONE, 128), np.float32)
    faces[:, 3] = np.linspace(0.0, 1.0, ALONE)

    def choose(mouth, faces=faces, uneven=None):
        seen = []

        def render(ids):
            seen.append(list(ids))
            f = np.zeros((len(ids), 128), np.float32)
            f[:len(faces)] = faces[:len(ids)]
            if mouth is None and uneven is None:
                return f
            k = len(ids)
            return Renders(f, np.resize(np.full(ALONE, np.nan) if mouth is None else mouth, k),
                           np.resize(np.full(ALONE, np.nan) if uneven is None else uneven, k))
        (ident, how), = IdentityAssigner(load_default_sampler(), match=(), seed=0).assign_all([(real, render)], 0, [])
        drawn = [c for batch in seen for c in batch]   # a second batch renders the same faces
        return next(i for i, c in enumerate(drawn) if c is ident) % ALONE, how

    typical, _ = choose(None)
    assert ALONE // 4 <= typical < 3 * ALONE // 4
    assert choose(np.full(ALONE, np.nan))[0] == typical
    mouth = np.zeros(ALONE)
    mouth[typical - 2:typical + 3] = (0.2, -0.1, 0.15, 0.2, 0.3)   # open on her closed mouth, or shut
    k, how = choose(mouth)
    assert abs(k - typical) == 3 and abs(mouth[k]) <= MOUTH and "mouth +0.00 from theirs" in how
    assert choose(np.where(mouth > 0, MOUTH * 0.9, 0.0))[0] == typical   # within MOUTH: no veto

    near = np.zeros((ALONE, 128), np.float32)         # every render nearer her than OWN
    near[:, 1] = -2.0
    near[:, 3] = np.linspace(0.1, 0.5, ALONE)
    assert 0.5 < OWN
    far_k, _ = choose(None, near)
    assert far_k == ALONE - 1                         # the farthest
    mouth = np.zeros(ALONE)
    mouth[-1] = -0.12                                 # ... but its mouth reads shut on hers
    assert choose(mouth, near)[0] == ALONE - 2
    step = 0.4 / (ALONE - 1)
    assert 2 * step < SLACK < 3 * step
    uneven = np.linspace(5.0, 8.0, ALONE)             # the farther, the more marbled (as measured)
    uneven[[ALONE - 5, ALONE - 9]] = 3.0              # even skin 3 and 7 steps below the farthest that follows
    assert choose(mouth, near, uneven)[0] == ALONE - 2         # beyond SLACK: not worn for its skin
    uneven[ALONE - 4] = 3.0                           # 2 steps below it: within SLACK
    assert choose(mouth, near, uneven)[0] == ALONE - 4


def _choose_among_far_renders(renders):
    """A person alone whose ALONE candidates all render far from her (spread along one axis, so
    the middle one is the most typical): ``renders(faces (k, 128), k)`` gives the renderer's
    answer. Returns (index of the candidate worn in the first batch, the choice's log line)."""
    from safefm.identity_assign import ALONE

    real = np.zeros(128, np.float32)
    real[1] = -2.0
    faces = np.zeros((ALONE, 128), np.float32)
    faces[:, 3] = np.linspace(0.0, 1.0, ALONE)
    seen = []

    def render(ids):
        seen.append(list(ids))
        return renders(faces[:len(ids)], len(ids))
    (ident, how), = IdentityAssigner(load_default_sampler(), match=(), seed=0).assign_all([(real, render)], 0, [])
    return next(i for i, c in enumerate(seen[0]) if c is ident), how


def test_among_far_enough_renders_one_with_even_skin_is_worn_over_a_marbled_typical_one():
    """The most typical render is worn only when its generated skin is among the more even half
    of the candidates' (unevenness at most their median); an unknown reading is no veto."""
    from safefm.identity_assign import ALONE, Renders

    def choose(uneven):
        return _choose_among_far_renders(lambda f, k: Renders(f, np.zeros(k), uneven[:k]))

    even = np.full(ALONE, 0.5)
    typical, _ = choose(even)
    assert ALONE // 4 <= typical < 3 * ALONE // 4
    marbled = np.where(np.abs(np.arange(ALONE) - typical) <= 2, 7.0, 0.5)   # marbled patches around the centre
    k, how = choose(marbled)
    assert abs(k - typical) == 3 and "uneven skin 0.50 (candidates' median 0.50)" in how
    assert choose(np.where(marbled > 1, np.nan, 0.5))[0] == typical


def test_a_candidate_whose_mouth_stays_shut_when_the_person_opens_theirs_is_not_worn():
    """Some identities' mouths read like the person's closed one but do not open when theirs
    does (their dlib-68 opening grows by less than OPENS when the person's lower lip drops by
    OPEN_BY): among renders all far enough from the person, the most typical one is worn unless
    its mouth stays shut; an unknown reading is no veto."""
    from safefm.identity_assign import ALONE, OPENS, Renders

    def choose(opens):
        return _choose_among_far_renders(
            lambda f, k: Renders(f, np.zeros(k), np.full(k, 4.0), None if opens is None else opens[:k]))

    typical, how = choose(None)
    assert ALONE // 4 <= typical < 3 * ALONE // 4 and "opens -" in how     # unknown
    shut = np.where(np.abs(np.arange(ALONE) - typical) <= 2, 0.01, 0.12)  # around the centre: shut mouths
    k, how = choose(shut)
    assert abs(k - typical) == 3 and "opens +0.12" in how
    assert choose(np.where(shut < 0.05, OPENS, 0.12))[0] == typical       # at OPENS: it opens enough
    assert choose(np.where(shut < 0.05, np.nan, 0.12))[0] == typical      # unread: no veto
