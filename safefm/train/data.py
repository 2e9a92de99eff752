"""Training data: the image list, prepared shards, the landmark mirror and augmentations.

Shards are written by ``scripts/prepare_data.py`` into ``data_cache/shards/`` in two passes
and read with ``allow_pickle=False``. Pass 1 (fast, MediaPipe) writes ``shard_XXX.npz``:

==============  ======================  ===============================================
key             shape, dtype            meaning
==============  ======================  ===============================================
crops           (N, S, S, 3) uint8      aligned RGB crop (:mod:`safefm.face.alignment`), S = 128
landmarks       (N, 478, 3) float16     FaceMesh landmarks in crop pixels (x, y, z)
age             (N,) int16              UTKFace age, -1 unknown / LFW
gender          (N,) int8               0 male, 1 female, -1 unknown
race            (N,) int8               0 White, 1 Black, 2 Asian, 3 Indian, 4 Other, -1 unknown
source          (N,) int8               0 UTKFace, 1 LFW
person          (N,) <U                 LFW person name ('' for UTKFace)
path            (N,) <U                 path relative to the shared data folder
matrix          (N, 2, 3) float32       frame -> crop affine
==============  ======================  ===============================================

Pass 2 (slow, dlib ~0.2 s a face) writes ``emb_XXX.npz`` beside it:

==============  ======================  ===============================================
embeddings      (N, 128) float32        dlib descriptor of the face in the ORIGINAL photo
box_fallback    (N,) bool               dlib box came from the landmarks, not the HOG detector
==============  ======================  ===============================================

:func:`load_shards` merges them; rows of shards whose pass 2 has not run yet get zero
embeddings and ``has_embedding`` False (trained as the null identity). Nothing here is
committed; the folder is git-ignored.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable

import numpy as np

from ..paths import REPO_ROOT, shared_data_dir

SOURCES = ("utkface", "lfw")
N_LANDMARKS = 478
ARRAY_KEYS = ("crops", "landmarks", "age", "gender", "race", "source", "person", "path", "matrix")
EMB_KEYS = ("embeddings", "box_fallback")


def cache_root() -> Path:
    """``data_cache/`` beside the package (git-ignored)."""
    return REPO_ROOT / "data_cache"


def shards_dir(root: Path | None = None) -> Path:
    return Path(root or cache_root()) / "shards"


# ---------------------------------------------------------------------------------------
# The image list


@dataclass(frozen=True)
class ImageItem:
    rel: str           # path relative to the shared data folder
    source: int        # 0 UTKFace, 1 LFW
    person: str        # LFW person ('' for UTKFace)
    age: int = -1
    gender: int = -1
    race: int = -1


def parse_utk_name(name: str) -> tuple[int, int, int]:
    """(age, gender, race) from ``AGE_GENDER_RACE_DATE.jpg.chip.jpg``; -1 where missing/invalid."""
    parts = Path(name).name.split(".")[0].split("_")

    def num(s: str) -> int:
        return int(s) if s.isdigit() else -1

    age = num(parts[0]) if parts else -1
    if len(parts) != 4:
        return age, -1, -1
    gender, race = num(parts[1]), num(parts[2])
    return age, gender if gender in (0, 1) else -1, race if 0 <= race <= 4 else -1


def eval_identities(data_dir: Path | None = None) -> set[str]:
    """The LFW people reserved for re-identification evaluation (never trained on)."""
    p = Path(data_dir or shared_data_dir()) / "lfw" / "EVAL_IDENTITIES.txt"
    if not p.is_file():
        raise FileNotFoundError(f"{p} missing: refusing to list LFW without the eval exclusion list")
    return {line.strip() for line in p.read_text().splitlines() if line.strip()}


def training_people(min_photos: int, data_dir: Path | None = None) -> list[Path]:
    """Folders of the LFW people outside the evaluation list with >= ``min_photos`` photos, sorted."""
    root = Path(data_dir or shared_data_dir())
    banned = eval_identities(root)
    return [d for d in sorted((root / "lfw").iterdir())
            if d.is_dir() and d.name not in banned and len(list(d.glob("*.jpg"))) >= min_photos]


def list_training_images(data_dir: Path | None = None) -> list[ImageItem]:
    """Every UTKFace image and every LFW photo of a person NOT in EVAL_IDENTITIES, sorted."""
    root = Path(data_dir or shared_data_dir())
    items: list[ImageItem] = []
    utk = root / "utkface"
    if utk.is_dir():
        for p in sorted(utk.glob("*.jpg")):
            items.append(ImageItem(f"utkface/{p.name}", 0, "", *parse_utk_name(p.name)))
    lfw = root / "lfw"
    if lfw.is_dir():
        banned = eval_identities(root)
        for d in sorted(x for x in lfw.iterdir() if x.is_dir()):
            if d.name in banned:
                continue
            for p in sorted(d.glob("*.jpg")):
                items.append(ImageItem(f"lfw/{d.name}/{p.name}", 1, d.name))
    return items


def shard_plan(items: list[ImageItem], shard_size: int = 1024, seed: int = 0) -> list[list[ImageItem]]:
    """Deterministic shuffle, then chunks: every shard is a random sample of both sources."""
    order = list(items)
    random.Random(seed).shuffle(order)
    return [order[i:i + shard_size] for i in range(0, len(order), shard_size)]


# ---------------------------------------------------------------------------------------
# Shard I/O


def save_shard(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write a shard atomically (``.tmp.npz`` then rename), so a killed run leaves no half shard."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def emb_path(shard: Path) -> Path:
    """``shard_XXX.npz`` -> its pass-2 file ``emb_XXX.npz``."""
    shard = Path(shard)
    return shard.with_name(shard.name.replace("shard_", "emb_", 1))


def finished_shards(root: Path | None = None) -> list[Path]:
    return sorted(p for p in shards_dir(root).glob("shard_*.npz") if not p.name.endswith(".tmp.npz"))


def load_shards(paths: Iterable[Path] | None = None, keys: Iterable[str] | None = None,
                require_embeddings: bool = False) -> dict[str, np.ndarray]:
    """Concatenate shards (default: every finished shard in ``data_cache/shards``).

    Asking for ``embeddings`` also returns ``has_embedding`` (N,) bool; rows without a pass-2
    file get zeros there (or are dropped with ``require_embeddings``).
    """
    paths = finished_shards() if paths is None else [Path(p) for p in paths]
    if not paths:
        raise FileNotFoundError(f"no data shards in {shards_dir()}: run scripts/prepare_data.py")
    keys = list(keys) if keys is not None else None
    want_emb = keys is None or any(k in EMB_KEYS for k in keys)
    parts: dict[str, list[np.ndarray]] = {}
    for p in paths:
        ep = emb_path(p)
        if require_embeddings and not ep.exists():
            continue
        with np.load(p, allow_pickle=False) as z:
            n = len(z["source"])
            for k in (keys or z.files):
                if k not in EMB_KEYS:
                    parts.setdefault(k, []).append(z[k])
        if want_emb:
            if ep.exists():
                with np.load(ep, allow_pickle=False) as e:
                    emb, fb, has = e["embeddings"], e["box_fallback"], np.ones(n, bool)
            else:
                emb, fb, has = np.zeros((n, 128), np.float32), np.zeros(n, bool), np.zeros(n, bool)
            for k, v in (("embeddings", emb), ("box_fallback", fb), ("has_embedding", has)):
                if keys is None or k in keys or k == "has_embedding":
                    parts.setdefault(k, []).append(v)
    if not parts:
        raise FileNotFoundError(f"no shards with embeddings in {shards_dir()}: run scripts/prepare_data.py")
    return {k: np.concatenate(v) for k, v in parts.items()}


def split_indices(n: int, holdout: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-back) index arrays; the held-back set is fixed by ``seed``."""
    perm = np.random.default_rng(seed).permutation(n)
    holdout = max(0, min(holdout, n // 10))
    return np.sort(perm[holdout:]), np.sort(perm[:holdout])


# ---------------------------------------------------------------------------------------
# Horizontal mirror


@lru_cache(maxsize=1)
def mirror_permutation() -> np.ndarray:
    """(478,) int64 involution: landmark i of a face is landmark ``perm[i]`` of its mirror.

    Derived from the template: mirror it about its vertical axis (the midline, x = mean x of
    the points on it) and pair each point with the nearest original point (optimal one-to-one
    assignment, then symmetrised so that ``perm[perm] == identity``).
    """
    from scipy.optimize import linear_sum_assignment

    from ..face.alignment import load_template

    t = load_template()[:, :2].astype(np.float64)
    axis = 0.5 * (t[:, 0].min() + t[:, 0].max())
    m = t.copy()
    m[:, 0] = 2 * axis - m[:, 0]
    cost = np.linalg.norm(m[:, None, :] - t[None, :, :], axis=-1)
    _, perm = linear_sum_assignment(cost)
    perm = perm.astype(np.int64)
    for i in range(len(perm)):  # symmetrise: keep the closer of the two claims
        j = perm[i]
        if perm[j] != i:
            perm[j] = i
    if not np.array_equal(perm[perm], np.arange(len(perm))):
        raise RuntimeError("could not derive an involutive mirror permutation from the template")
    return perm


def flip_landmarks(landmarks: np.ndarray, size: int) -> np.ndarray:
    """Landmarks (478, 3) in crop pixels of an S-wide crop -> those of the flipped crop.

    Pixel centres sit at integers (OpenCV), so x -> (S - 1) - x; indices are permuted.
    """
    out = np.asarray(landmarks, np.float32)[mirror_permutation()].copy()
    out[:, 0] = (size - 1) - out[:, 0]
    return out


# ---------------------------------------------------------------------------------------
# Photometric augmentations (uint8 RGB in, uint8 RGB out)


@dataclass(frozen=True)
class AugmentConfig:
    flip: float = 0.5            # probability of a horizontal flip (with the landmark flip)
    color: float = 0.8           # probability of colour / lighting jitter
    brightness: float = 0.15     # +- additive, in [0, 1] units
    contrast: float = 0.2        # x (1 +- contrast)
    saturation: float = 0.25     # x (1 +- saturation)
    gain: float = 0.06           # per-channel white-balance gain +-
    gamma: float = 0.2           # gamma in exp(+-gamma)
    blur: float = 0.15           # probability of a Gaussian blur (sigma 0.3..1.2 px)
    jpeg: float = 0.2            # probability of JPEG re-compression (quality 35..90)
    noise: float = 0.15          # probability of Gaussian pixel noise (sigma <= 4/255)


NO_AUGMENT = AugmentConfig(flip=0, color=0, blur=0, jpeg=0, noise=0)


def color_jitter(img: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    x = img.astype(np.float32) / 255.0
    x = x * (1 + rng.uniform(-cfg.gain, cfg.gain, size=3)).astype(np.float32)
    grey = x.mean(axis=-1, keepdims=True)
    x = grey + (x - grey) * (1 + rng.uniform(-cfg.saturation, cfg.saturation))
    mean = x.mean()
    x = mean + (x - mean) * (1 + rng.uniform(-cfg.contrast, cfg.contrast))
    x = x + rng.uniform(-cfg.brightness, cfg.brightness)
    x = np.clip(x, 0, 1) ** np.exp(rng.uniform(-cfg.gamma, cfg.gamma))
    return (x * 255 + 0.5).clip(0, 255).astype(np.uint8)


def degrade(img: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """Blur, JPEG and noise (each with its probability)."""
    import cv2

    if rng.random() < cfg.blur:
        img = cv2.GaussianBlur(img, (0, 0), sigmaX=float(rng.uniform(0.3, 1.2)))
    if rng.random() < cfg.jpeg:
        ok, buf = cv2.imencode(".jpg", img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(35, 91))])
        if ok:
            img = cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1]
    if rng.random() < cfg.noise:
        n = rng.normal(0, rng.uniform(1, 4), img.shape)
        img = (img.astype(np.float32) + n).clip(0, 255).astype(np.uint8)
    return np.ascontiguousarray(img)


def augment(img: np.ndarray, landmarks: np.ndarray | None, rng: np.random.Generator,
            cfg: AugmentConfig = AugmentConfig()) -> tuple[np.ndarray, np.ndarray | None, bool]:
    """Random flip (image + landmarks) and photometric jitter of one (S, S, 3) uint8 crop.

    Returns (image, landmarks or None, flipped).
    """
    flipped = rng.random() < cfg.flip
    if flipped:
        img = np.ascontiguousarray(img[:, ::-1])
        if landmarks is not None:
            landmarks = flip_landmarks(landmarks, img.shape[1])
    if rng.random() < cfg.color:
        img = color_jitter(img, rng, cfg)
    img = degrade(img, rng, cfg)
    return img, landmarks, flipped


def to_tensor_image(img: np.ndarray):
    """(S, S, 3) uint8 -> torch (3, S, S) float32 in [-1, 1]."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div(127.5).sub(1)


# ---------------------------------------------------------------------------------------
# Datasets


class CropDataset:
    """Aligned crops with augmentation, for the autoencoder: item -> (3, S, S) in [-1, 1].

    ``crops``: (N, S, S, 3) uint8 (e.g. ``load_shards()["crops"]``); ``indices`` selects a
    subset; ``patch``: random square sub-crop side (None = whole crop), a multiple of 8.
    """

    def __init__(self, crops: np.ndarray, indices: np.ndarray | None = None,
                 aug: AugmentConfig = AugmentConfig(), patch: int | None = None, seed: int = 0):
        self.crops = crops
        self.indices = np.arange(len(crops)) if indices is None else np.asarray(indices)
        self.aug, self.patch = aug, patch
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        img, _, _ = augment(self.crops[self.indices[i]], None, self.rng, self.aug)
        if self.patch and self.patch < img.shape[0]:
            y, x = self.rng.integers(0, img.shape[0] - self.patch + 1, size=2)
            img = img[y:y + self.patch, x:x + self.patch]
        return to_tensor_image(img)

    def batch(self, idx: Iterable[int]):
        import torch

        return torch.stack([self[int(i)] for i in idx])


class LatentCache:
    """Pre-encoded flow latents (``data_cache/latents.npz``, see
    :func:`safefm.train.autoencoder.build_latent_cache`) for stages 2-3.

    ``batch(idx, heat_size)`` -> dict of torch tensors: ``z`` (B, C, h, w) float32,
    ``emb`` (B, 128) float32 and, with ``heat_size``, ``heat`` (B, 9, H, H) float32 rendered
    on the fly from the (mirrored where the crop was) crop landmarks.
    """

    def __init__(self, path: Path | str | None = None, arrays: dict | None = None):
        if arrays is None:
            path = Path(path or cache_root() / "latents.npz")
            if not path.is_file():
                raise FileNotFoundError(f"no latent cache at {path}: run scripts/train.py --stage ae")
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        self.a = arrays
        self.z = arrays["z"]
        self.landmarks = arrays.get("landmarks")
        self.emb = arrays["embeddings"].astype(np.float32)
        if "has_embedding" in arrays:  # faces without a dlib embedding train as the null identity
            self.emb[~arrays["has_embedding"].astype(bool)] = 0.0
        self.image_size = int(arrays.get("image_size", 128))

    def __len__(self) -> int:
        return len(self.z)

    def refresh_embeddings(self, data: dict[str, np.ndarray]) -> int:
        """Take the embeddings from shard arrays (``path``, ``embeddings``, ``has_embedding``),
        matched by image path, so pass-2 results that arrived after the cache was built are
        used. Returns how many cached latents have an embedding."""
        if "path" in self.a:
            where = {str(p): i for i, p in enumerate(data["path"])}
            rows = np.array([where.get(str(p), -1) for p in self.a["path"]])
        else:  # caches store the row index into load_shards()' (deterministic) order
            rows = np.asarray(self.a["index"], np.int64)
            rows = np.where(rows < len(data["has_embedding"]), rows, -1)
        ok = rows >= 0
        has = np.zeros(len(rows), bool)
        has[ok] = data["has_embedding"][rows[ok]]
        self.emb = np.zeros_like(self.emb)
        self.emb[has] = data["embeddings"][rows[has]].astype(np.float32)
        return int(has.sum())

    def attach_crops(self, crops: np.ndarray) -> None:
        """Keep the crop each latent was encoded from (``crops``: every shard row, (N, S, S, 3)
        uint8 as :func:`load_shards` gives it; mirrored where the latent's crop was), for
        :meth:`batch`'s context. Needs the cache's ``index`` and ``flipped``."""
        rows = np.asarray(self.a["index"], np.int64)
        if rows.max(initial=-1) >= len(crops):
            raise ValueError(f"the latent cache indexes {rows.max() + 1} shard rows, the shards have {len(crops)}")
        self.crops = crops[rows]
        flip = np.asarray(self.a["flipped"], bool)
        self.crops[flip] = self.crops[flip][:, :, ::-1]

    def batch(self, idx, heat_size: int | None = None, context: "ContextDraw | None" = None,
              rng: np.random.Generator | None = None, grows: np.ndarray | None = None) -> dict:
        """``context`` (with ``rng``, and crops attached): the heatmaps get the context channels
        of :mod:`safefm.face.context` after them, the mask grown by a draw from
        ``context.grow``, a ``context.drop`` share replaced by the null context; or ``grows``
        ``(B,)``: those growths exactly (NaN: the null context)."""
        import torch

        idx = np.asarray(idx)
        out = {"z": torch.from_numpy(self.z[idx].astype(np.float32)),
               "emb": torch.from_numpy(self.emb[idx])}
        if heat_size:
            from ..face import context as ctx
            from ..face.heatmaps import CHANNELS, render_heatmaps

            ch = len(CHANNELS)
            if context is not None:
                grows = context.draw(rng, len(idx))
            extra = len(ctx.CHANNELS) if grows is not None else 0
            heat = np.empty((len(idx), ch + extra, heat_size, heat_size), np.float32)
            for j, i in enumerate(idx):
                lm = self.landmarks[i].astype(np.float32)
                render_heatmaps(lm, self.image_size, heat_size, out=heat[j, :ch])
                if extra:
                    if np.isnan(grows[j]):
                        heat[j, ch:] = ctx.null_context(heat_size)
                    else:
                        ctx.face_context(self.crops[i], [lm], float(grows[j]), heat_size, out=heat[j, ch:])
            out["heat"] = torch.from_numpy(heat)
        return out


@dataclass(frozen=True)
class ContextDraw:
    """How training draws a context (:meth:`LatentCache.batch`): the mask grown by
    U(grow) face widths beyond the face oval, a ``drop`` share with no context at all."""
    grow: tuple[float, float] = (0.0, 0.3)
    drop: float = 0.1

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``(n,) float`` growths, NaN for the ``drop`` share (the null context)."""
        out = np.empty(n)
        for j in range(n):   # one draw after the other, as the batches always drew them
            out[j] = np.nan if rng.random() < self.drop else rng.uniform(*self.grow)
        return out
