"""The coarse-attribute classifier (gender, age group over the dlib descriptor) and its file."""

from __future__ import annotations

import json

import numpy as np
import pytest

from safefm.attributes import (AGE_CLASSES, GENDER_CLASSES, AttributeClassifier, age_group_index,
                               default_attributes_path, fit_head, load_attributes, save_attributes)
from safefm.errors import WeightsError


def _separable(n=1000, seed=0):
    """Descriptors whose first two dimensions carry gender and age group."""
    rng = np.random.default_rng(seed)
    g, a = rng.integers(0, 2, n), rng.integers(0, 4, n)
    x = rng.normal(0, 0.05, (n, 128)).astype(np.float32)
    x[:, 0] += np.where(g == 1, 0.5, -0.5)
    x[:, 1] += (a - 1.5) * 0.3
    return x, g, a


@pytest.fixture(scope="module")
def trained():
    x, g, a = _separable()
    mean, std = x.mean(0), x.std(0)
    z = (x - mean) / std
    heads = {"gender": fit_head(z, g, GENDER_CLASSES, hidden=0, epochs=200),   # logistic regression
             "age": fit_head(z, a, AGE_CLASSES, hidden=8, epochs=300)}         # a tiny MLP
    return AttributeClassifier(mean, std, heads, {"held_out": {"gender_accuracy": 1.0}})


def test_a_trained_classifier_reads_the_attributes(trained):
    x, g, a = _separable(seed=1)
    pred = trained.predict_indices(x)
    assert (pred["gender"] == g).mean() > 0.95 and (pred["age"] == a).mean() > 0.35   # chance: 0.25
    one = trained.predict(x[0])
    assert one == {"gender": GENDER_CLASSES[pred["gender"][0]], "age": AGE_CLASSES[pred["age"][0]]}


def test_the_file_round_trips_and_refuses_damage(trained, tmp_path):
    path = save_attributes(trained, tmp_path / "attrs.safetensors")
    back = load_attributes(path)
    x, _, _ = _separable(seed=2)
    for k, p in trained.probabilities(x).items():
        np.testing.assert_allclose(back.probabilities(x)[k], p, atol=1e-6)
    assert back.info["held_out"]["gender_accuracy"] == 1.0
    side = json.loads(path.with_suffix(".json").read_text())
    assert side["heads"]["age"]["classes"] == list(AGE_CLASSES) and len(side["sha256"]) == 64
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="corrupt") as e:
        load_attributes(path)
    assert "\n" not in str(e.value)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(WeightsError) as e:
        load_attributes(tmp_path / "junk.safetensors")
    assert "\n" not in str(e.value)
    with pytest.raises(WeightsError, match="not found"):
        load_attributes(tmp_path / "missing.safetensors")


def test_age_groups_are_the_samplers():
    assert age_group_index(np.array([0, 17, 18, 34, 35, 59, 60, 99])).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def test_the_shipped_classifier_states_its_measured_accuracy():
    clf = load_attributes(default_attributes_path())
    held = clf.info["held_out"]
    assert held["gender_accuracy"] >= 0.9 and held["age_group_within_one"] >= 0.9
    assert set(clf.heads) == {"gender", "age"} and clf.heads["gender"].classes == GENDER_CLASSES
