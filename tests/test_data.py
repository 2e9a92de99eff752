"""Data utilities: UTKFace names, the landmark mirror, augmentations, shards, latent cache."""

from __future__ import annotations

import numpy as np
import pytest

from safefm.train import data
from safefm.face.alignment import load_template
from safefm.paths import shared_data_dir


def test_parse_utk_name():
    assert data.parse_utk_name("100_0_0_20170112213500903.jpg.chip.jpg") == (100, 0, 0)
    assert data.parse_utk_name("26_1_3_20170104235421282.jpg.chip.jpg") == (26, 1, 3)
    assert data.parse_utk_name("39_1_20170116174525125.jpg.chip.jpg") == (39, -1, -1)  # missing field
    assert data.parse_utk_name("x_7_9_2017.jpg.chip.jpg") == (-1, -1, -1)


def test_mirror_permutation_is_involution_and_mirrors_template():
    perm = data.mirror_permutation()
    assert perm.shape == (478,) and sorted(perm.tolist()) == list(range(478))
    np.testing.assert_array_equal(perm[perm], np.arange(478))
    t = load_template()
    axis = 0.5 * (t[:, 0].min() + t[:, 0].max())
    mirrored = t[perm].copy()
    mirrored[:, 0] = 2 * axis - mirrored[:, 0]
    assert np.abs(mirrored[:, :2] - t[:, :2]).max() < 0.02   # unit crop coordinates
    assert perm[33] == 263 and perm[133] == 362 and perm[468] == 473 and perm[1] == 1


def test_flip_landmarks_matches_image_flip():
    size = 64
    lm = load_template() * size
    twice = data.flip_landmarks(data.flip_landmarks(lm, size), size)
    np.testing.assert_allclose(twice, lm, atol=1e-4)
    img = np.zeros((size, size, 3), np.uint8)
    x, y = 10, 20
    img[y, x] = 255
    pts = np.zeros((478, 3), np.float32)
    pts[:, 0], pts[:, 1] = x, y
    flipped = data.flip_landmarks(pts, size)
    fx, fy = int(flipped[0, 0]), int(flipped[0, 1])
    assert img[:, ::-1][fy, fx, 0] == 255


def test_augment_shapes_and_determinism():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    lm = load_template() * 32
    out, lm2, flipped = data.augment(img, lm, np.random.default_rng(1))
    out_b, _, _ = data.augment(img, lm, np.random.default_rng(1))
    assert out.shape == img.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out, out_b)
    assert lm2.shape == (478, 3)
    same, lm3, f = data.augment(img, lm, rng, data.NO_AUGMENT)
    np.testing.assert_array_equal(same, img)
    assert not f and lm3 is lm
    full = data.AugmentConfig(flip=1, color=1, blur=1, jpeg=1, noise=1)
    out, _, f = data.augment(img, lm, rng, full)
    assert f and out.shape == img.shape


def test_crop_dataset_patches():
    crops = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    ds = data.CropDataset(crops, np.arange(4), patch=16)
    x = ds.batch([0, 1, 3])
    assert tuple(x.shape) == (3, 3, 16, 16) and x.min() >= -1 and x.max() <= 1
    assert len(ds) == 4


def test_shard_roundtrip(tmp_path):
    arrays = {"crops": np.zeros((2, 8, 8, 3), np.uint8), "person": np.array(["", "A_B"]),
              "source": np.array([0, 1], np.int8), "path": np.array(["u/1.jpg", "lfw/A_B/1.jpg"])}
    data.save_shard(tmp_path / "shard_000.npz", arrays)
    data.save_shard(tmp_path / "shard_001.npz", {**arrays, "path": np.array(["u/2.jpg", "lfw/A_B/2.jpg"])})
    np.savez(tmp_path / "emb_001.npz", embeddings=np.ones((2, 128), np.float32), box_fallback=np.zeros(2, bool))
    paths = sorted(tmp_path.glob("shard_*.npz"))
    out = data.load_shards(paths)
    assert out["crops"].shape == (4, 8, 8, 3) and list(out["person"]) == ["", "A_B", "", "A_B"]
    assert out["has_embedding"].tolist() == [False, False, True, True]
    assert out["embeddings"][:2].sum() == 0 and out["embeddings"][2:].min() == 1
    only = data.load_shards(paths, keys=("embeddings",), require_embeddings=True)
    assert only["embeddings"].shape == (2, 128) and "crops" not in only
    cache = data.LatentCache(arrays={"z": np.zeros((2, 4, 2, 2), np.float16), "embeddings": np.zeros((2, 128), np.float32),
                                     "path": np.array(["lfw/A_B/2.jpg", "u/1.jpg"])})
    assert cache.refresh_embeddings(out) == 1 and cache.emb[0].min() == 1 and cache.emb[1].max() == 0
    tr, ho = data.split_indices(100, 10)
    assert len(ho) == 10 and len(np.intersect1d(tr, ho)) == 0 and len(tr) == 90


def test_latent_cache_batch_with_heatmaps():
    from safefm.face.heatmaps import CHANNELS

    n = 3
    arrays = {"z": np.random.default_rng(0).standard_normal((n, 4, 4, 4)).astype(np.float16),
              "embeddings": np.zeros((n, 128), np.float32),
              "landmarks": np.stack([load_template() * 32] * n).astype(np.float16),
              "image_size": np.int64(32)}
    c = data.LatentCache(arrays=arrays)
    b = c.batch([0, 2], heat_size=32)
    assert tuple(b["z"].shape) == (2, 4, 4, 4) and tuple(b["emb"].shape) == (2, 128)
    assert tuple(b["heat"].shape) == (2, len(CHANNELS), 32, 32) and float(b["heat"].max()) > 0


@pytest.mark.skipif(not (shared_data_dir() / "lfw" / "EVAL_IDENTITIES.txt").is_file(), reason="no shared data")
def test_training_list_excludes_eval_people():
    items = data.list_training_images()
    banned = data.eval_identities()
    assert items and not any(i.person in banned for i in items if i.source == 1)
    assert all(i.source == 0 and i.person == "" for i in items if i.rel.startswith("utkface/"))
