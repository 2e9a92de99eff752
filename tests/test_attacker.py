"""The trained attacker of ``safefm-eval --attacker``: the head learns what an anonymizer leaves
behind and re-identifies people it never saw; linkage tells linked clips from unlinked ones."""

from __future__ import annotations

import json

import numpy as np
import pytest

from safefm.cli import eval as eval_cli
from safefm.eval import metrics as M
from safefm.eval.attacker import linkage, link_clips, rank1_other_photos, train_head, training_photos

from conftest import DATA, needs_dlib


def _people(rng, n, dim=128):
    """(n, dim) person embeddings about 1 apart, as dlib's are."""
    return rng.normal(size=(n, dim)) / np.sqrt(2 * dim)


def test_head_reidentifies_unseen_people_the_recogniser_cannot():
    rng, dim = np.random.default_rng(0), 16
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    shift = rng.normal(size=dim) * 0.3

    def anonymize(x):   # a fixed scramble: the same synthetic face plus a hidden trace of the person
        return shift + 0.4 * x @ q + rng.normal(size=x.shape) * 0.005

    train = _people(rng, 200, dim)
    f = train_head(anonymize(train), train, epochs=300)
    test = _people(rng, 40, dim)
    photos = np.repeat(test, 2, axis=0) + rng.normal(size=(80, dim)) * 0.01
    labels = np.repeat(np.arange(40), 2)
    probe = anonymize(photos)
    plain = M.rank1_reid(probe, labels, photos, labels)
    trained = M.rank1_reid(f(probe), labels, photos, labels)
    assert plain < 0.2 and trained > 0.8
    assert np.isnan(f(np.full((1, dim), np.nan))).all()


def test_linkage_and_rank1_without_the_own_photo():
    rng = np.random.default_rng(1)
    people = _people(rng, 6)
    assert linkage(people, people + 0.01) == {"auc": 1.0, "rank1": 1.0, "clips": 6}
    swapped = linkage(people, people[[1, 0, 3, 2, 5, 4]])
    assert swapped["auc"] < 0.5 and swapped["rank1"] == 0.0
    clips = [np.vstack([p + rng.normal(size=(4, 128)) * 0.01, [np.full(128, np.nan)]]) for p in people]
    assert link_clips(clips)["auc"] == 1.0
    # photo 0 and 1 are person a, 2 is person b (no other photo: left out), 3 is a again
    gal = np.array([people[0], people[0] + 0.01, people[1], people[0] + 0.02])
    probe = gal.copy()
    probe[1] = people[1]   # probe 1 looks like b: its nearest other photo is b's
    assert rank1_other_photos(probe, ["a", "a", "b", "a"], gal) == pytest.approx(2 / 3)


@pytest.mark.skipif(not (DATA / "lfw").is_dir(), reason="../shared/data not present")
def test_training_photos_never_use_evaluation_people():
    photos = training_photos(DATA, 50)
    held_out = set((DATA / "lfw" / "EVAL_IDENTITIES.txt").read_text().split())
    assert len(photos) == 50 and len(set(photos)) == 50
    assert not {p.parent.name for p in photos if p.parent.parent.name == "lfw"} & held_out
    assert sum(p.parent.name == "utkface" for p in photos) == 15


@pytest.mark.skipif(not ((DATA / "lfw").is_dir() and (DATA / "videos").is_dir()),
                    reason="../shared/data not present")
@needs_dlib
@pytest.mark.shared
@pytest.mark.slow
def test_eval_attacker_option_reports_next_to_the_recogniser(tmp_path):
    out = tmp_path / "eval"
    assert eval_cli.main(["--quick", "--attacker", "--methods", "none,pixelate", "--parts", "privacy",
                          "--max-people", "3", "--attacker-photos", "6", "--max-clips", "3",
                          "--max-frames", "8", "--out", str(out), "-q"]) == 0
    rep = json.loads((out / "report.json").read_text())
    a = rep["attacker"]
    assert a["train"]["photos"] >= 4 and len(a["clips"]) == 3
    none, pix = a["methods"]["none"], a["methods"]["pixelate"]
    assert none["rank1"]["recogniser"] == rep["privacy"]["methods"]["none"]["rank1"] == 1.0
    assert pix["rank1"]["recogniser"] == pytest.approx(rep["privacy"]["methods"]["pixelate"]["rank1"])
    assert none["linkage"]["recogniser"]["auc"] == 1.0
    for m in (none, pix):
        assert 0 <= m["rank1"]["attacker"] <= 1 and 0 <= m["linkage"]["attacker"]["auc"] <= 1
    md = (out / "report.md").read_text()
    assert "## A stronger attacker" in md and "| pixelate |" in md.split("## A stronger attacker")[1]
