"""Identity files: round trip, validation of corrupt or foreign files, no code execution."""

import pickle

import numpy as np
import pytest
import torch

from safefm.face.alignment import load_template
from safefm.errors import IdentityFileError
from safefm.identity import Identity, describe, load_identity, random_shape, save_identity
from safefm.eval.metrics import head_pose
from safefm.face.retarget import upright_shape


def _identity(seed=3):
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=128).astype(np.float32)
    return Identity(embedding=emb, shape=random_shape(load_template(), rng), seed=seed,
                    name="alex", attributes={"gender": "female"})


def test_round_trip(tmp_path):
    ident = _identity()
    p = save_identity(ident, tmp_path / "id.pt")
    back = load_identity(p, embedding_dim=128)
    assert np.array_equal(back.embedding, ident.embedding) and np.array_equal(back.shape, ident.shape)
    assert (back.seed, back.name, back.attributes) == (3, "alex", {"gender": "female"})
    assert torch.equal(back.noise((4, 16, 16)), ident.noise((4, 16, 16)))  # fixed noise per identity
    assert "seed:       3" in describe(back)


def test_random_shapes_differ_per_seed_but_stay_face_sized():
    template = _identity().shape
    a = random_shape(template, np.random.default_rng(1))
    b = random_shape(template, np.random.default_rng(2))
    assert np.abs(a - b).max() > 0.005
    assert np.abs(a - template).max() < 0.1


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.pop("format"), "not a SAFE-FM identity"),
    (lambda d: d.update(version=99), "unsupported"),
    (lambda d: d.update(embedding=torch.zeros(64)), "embedding"),
    (lambda d: d.update(embedding=d["embedding"].double()), "float32"),
    (lambda d: d["embedding"].__setitem__(0, float("nan")), "NaN"),
    (lambda d: d.update(shape=torch.zeros(468, 3)), r"\(478, 3\)"),
    (lambda d: d.update(seed=-1), "seed"),
])
def test_invalid_fields_are_named(tmp_path, mutate, message):
    p = save_identity(_identity(), tmp_path / "id.pt")
    data = torch.load(p, weights_only=True)
    mutate(data)
    torch.save(data, p)
    with pytest.raises(IdentityFileError, match=message):
        load_identity(p, embedding_dim=128)


def test_missing_truncated_and_garbage_files(tmp_path):
    with pytest.raises(IdentityFileError, match="not found"):
        load_identity(tmp_path / "nope.pt")
    p = save_identity(_identity(), tmp_path / "id.pt")
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(IdentityFileError, match="not a readable identity file"):
        load_identity(p)
    (tmp_path / "g.pt").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(IdentityFileError):
        load_identity(tmp_path / "g.pt")


class _Evil:
    def __reduce__(self):
        return (open, ("/tmp/safefm_pwned", "w"))


def test_loading_never_unpickles_code(tmp_path):
    import os
    p = tmp_path / "evil.pt"
    with open(p, "wb") as f:
        pickle.dump({"format": "safefm-identity", "x": _Evil()}, f)
    with pytest.raises(IdentityFileError):
        load_identity(p)
    assert not os.path.exists("/tmp/safefm_pwned")


def _tilt(shape, pitch_deg):
    a = np.radians(pitch_deg)
    r = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    c = shape.mean(0)
    return ((shape - c) @ r.T + c).astype(np.float32)


def test_identity_faces_are_upright_so_outputs_keep_the_users_head_pose(tmp_path):
    """A tilted rest shape would tilt every output head: new and loaded identities are upright."""
    t = load_template()
    for seed in range(5):
        assert np.abs(head_pose(random_shape(t, np.random.default_rng(seed)))).max() < 0.01
    tilted = _identity()
    tilted = Identity(tilted.embedding, _tilt(tilted.shape, 4.0), 3)
    assert abs(head_pose(tilted.shape)[1]) > 3.5
    back = load_identity(save_identity(tilted, tmp_path / "tilted.pt"))
    assert np.abs(head_pose(back.shape)).max() < 0.01
    # only the rotation goes: the face keeps its own shape and size (a rigid motion)
    dist = lambda s: np.linalg.norm(s[:, None] - s[None], axis=2)  # noqa: E731
    assert np.allclose(dist(back.shape), dist(tilted.shape), atol=1e-5)
    assert np.abs(back.shape - tilted.shape).max() > 0.01
    assert np.array_equal(upright_shape(back.shape), back.shape)


def test_a_shape_that_is_not_a_face_is_a_clear_identity_error(tmp_path):
    ident = _identity()
    bad = Identity(ident.embedding, ident.shape * 1000, 3)
    with pytest.raises(IdentityFileError, match="canonical"):
        load_identity(save_identity(bad, tmp_path / "bad.pt"))
