"""Stage 1: the AutoencoderTiny on aligned crops, the latent statistics and the latent cache.

Loss on an augmented crop (or a random ``patch`` of it: the autoencoder is convolutional,
so patches train it at a fraction of the cost) ``x`` in [-1, 1], (B, 3, P, P)::

    z = model.encode(x)                      (B, C, P/8, P/8), latent_mean 0 / std 1 here
    y = decoder(z) * 2 - 1                   SafeFMModel.decode without its final clamp
    loss = |y - x| + grad_weight * |grad y - grad x| + latent_weight * z^2
           + color_weight * |avgpool8 y - avgpool8 x|     (colour: short runs otherwise go sepia)

After training, :func:`fit_latent_stats` sets ``latent_mean/std`` (per channel) so flow
latents are ~N(0, 1), and :func:`build_latent_cache` encodes the crops once for stages 2-3.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..models import SafeFMModel
from .common import (Deadline, History, checkpoint_model_config, config_dict, load_checkpoint, save_checkpoint,
                     run_payload, stage_dir, train_config_from_dict)


@dataclass(frozen=True)
class AETrainConfig:
    batch: int = 8
    patch: int = 64              # random training patch side (multiple of 8); 0 = whole crop
    lr: float = 1.5e-3
    warmup: int = 50
    weight_decay: float = 0.0
    grad_weight: float = 0.5     # image-gradient L1 (sharpness) weight
    latent_weight: float = 1e-4  # small L2 on the latent (keeps it bounded / centred)
    color_weight: float = 1.0    # L1 of 8x-average-pooled images: colour / low frequencies
    max_steps: int = 100_000
    ckpt_every: int = 50
    eval_every: int = 200
    holdout: int = 256           # crops held back for PSNR (the first rows of shard_000)
    seed: int = 0


def _block_types():
    from diffusers.models.autoencoders.vae import AutoencoderTinyBlock

    from ..models import _ResBlock

    return (AutoencoderTinyBlock, _ResBlock)


def _he_init(module: torch.nn.Module) -> None:
    """He-normal convs, zero biases, and every residual block's last conv zeroed (identity)."""
    for m in module.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)
    for m in module.modules():
        if isinstance(m, _block_types()):
            torch.nn.init.zeros_(m.conv[-1].weight)


def init_decoder(model: SafeFMModel) -> None:
    """Re-initialise only ``model.autoencoder.decoder`` (see :func:`init_autoencoder`): He init,
    identity blocks, a small last conv whose bias makes ``SafeFMModel.decode`` start at mid-grey."""
    dec = model.autoencoder.decoder
    _he_init(dec)
    last = [m for m in dec.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():
        last.weight.mul_(0.05)
        probe = torch.zeros(1, model.cfg.latent_channels, 2, 2)
        last.bias.zero_()
        y0 = decode_raw(model, probe).mean()
        last.bias.fill_(1.0)
        slope = decode_raw(model, probe).mean() - y0   # d output / d bias
        last.bias.fill_(float(-y0 / slope) if abs(float(slope)) > 1e-6 else 0.0)


def init_autoencoder(model: SafeFMModel) -> None:
    """Re-initialise the autoencoder for training from scratch.

    With PyTorch's default init the signal shrinks through its ~40 un-normalised ReLU convs;
    the latent collapses (std ~0.04) and training sits on the "predict the mean colour"
    plateau (measured: no progress in 200 steps on one fixed batch). Here: He-normal convs,
    every residual block's last conv zeroed (blocks start as identities), a linear-gain
    latent projection, and the decoder set up by :func:`init_decoder`.
    """
    ae = model.autoencoder
    _he_init(ae.encoder)
    enc_last = [m for m in ae.encoder.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    torch.nn.init.kaiming_normal_(enc_last.weight, nonlinearity="linear")
    init_decoder(model)


def ae_model(cfg: ModelConfig, init: bool = True) -> SafeFMModel:
    """A SafeFMModel without adapters (only its autoencoder is trained here), with the
    autoencoder initialised for training (:func:`init_autoencoder`) unless ``init=False``."""
    model = SafeFMModel(cfg, with_controlnet=False, with_lora=False)
    if init:
        init_autoencoder(model)
    return model


def decode_raw(model: SafeFMModel, z: torch.Tensor) -> torch.Tensor:
    """SafeFMModel.decode without the final clamp (so gradients reach every pixel)."""
    return model.autoencoder.decoder(model.from_flow_latent(z)) * 2 - 1


def image_gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Finite differences along width and height: (B, C, H, W-1), (B, C, H-1, W)."""
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


def ae_loss(model: SafeFMModel, x: torch.Tensor, tcfg: AETrainConfig) -> tuple[torch.Tensor, dict]:
    """x: (B, 3, P, P) in [-1, 1] -> (scalar loss, logs)."""
    z = model.encode(x)
    rec, logs = recon_terms(decode_raw(model, z), x, tcfg.grad_weight, tcfg.color_weight)
    lat = z.pow(2).mean()
    loss = rec + tcfg.latent_weight * lat
    return loss, {**logs, "loss": loss.item(), "z_rms": lat.sqrt().item()}


def recon_terms(y: torch.Tensor, x: torch.Tensor, grad_weight: float, color_weight: float
                ) -> tuple[torch.Tensor, dict]:
    """Reconstruction loss of y against x, both (B, 3, P, P) in [-1, 1]:
    L1 + grad_weight * image-gradient L1 + color_weight * L1 of 8x-average-pooled images."""
    l1 = (y - x).abs().mean()
    gx, gy = image_gradients(x)
    hx, hy = image_gradients(y)
    grad = 0.5 * ((hx - gx).abs().mean() + (hy - gy).abs().mean())
    color = (F.avg_pool2d(y, 8) - F.avg_pool2d(x, 8)).abs().mean()
    loss = l1 + grad_weight * grad + color_weight * color
    return loss, {"loss": loss.item(), "l1": l1.item(), "grad": grad.item(), "color": color.item()}


@torch.no_grad()
def psnr(model: SafeFMModel, images: torch.Tensor, batch: int = 32) -> float:
    """Mean PSNR (dB, images in [0, 1]) of model.decode(model.encode(x)) over (N, 3, S, S)."""
    vals = []
    for i in range(0, len(images), batch):
        x = images[i:i + batch]
        y = model.decode(model.encode(x))
        mse = ((y - x) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)
        vals.append(10 * torch.log10(1 / mse))
    return torch.cat(vals).mean().item()


@torch.no_grad()
def fit_latent_stats(model: SafeFMModel, crops: np.ndarray, batch: int = 64, limit: int = 768,
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of the raw autoencoder latents over up to ``limit`` crops.

    crops: (N, S, S, 3) uint8. Sets model.latent_mean / latent_std and returns them (C,).
    """
    from .data import to_tensor_image

    model.latent_mean.zero_()
    model.latent_std.fill_(1.0)
    idx = np.random.default_rng(seed).permutation(len(crops))[:limit]
    zs = []
    for i in range(0, len(idx), batch):
        x = torch.stack([to_tensor_image(crops[j]) for j in idx[i:i + batch]])
        zs.append(model.encode(x))
    z = torch.cat(zs).transpose(0, 1).reshape(model.cfg.latent_channels, -1)
    mean, std = z.mean(1), z.std(1).clamp_min(1e-3)
    model.latent_mean.copy_(mean)
    model.latent_std.copy_(std)
    return mean, std


def _lr(step: int, tcfg: AETrainConfig) -> float:
    return tcfg.lr * min(1.0, (step + 1) / max(1, tcfg.warmup))


def train_autoencoder(cfg: ModelConfig, tcfg: AETrainConfig, crops: np.ndarray, *,
                      run_dir: Path | None = None, max_minutes: float = 20, resume: bool = True,
                      log=print) -> dict:
    """Train (or continue) the autoencoder on (N, S, S, 3) uint8 crops; returns the checkpoint.

    Writes ``run_dir/last.pt`` every ``ckpt_every`` steps and at the end, ``loss.png``.
    """
    from tqdm import tqdm

    from .data import AugmentConfig, CropDataset, to_tensor_image

    run_dir = Path(run_dir or stage_dir("ae"))
    ckpt_path = run_dir / "last.pt"
    model = ae_model(cfg)
    ae = model.autoencoder
    opt = torch.optim.AdamW(ae.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    step, history, metrics = 0, History(), {}
    if resume and ckpt_path.exists():
        ck = load_checkpoint(ckpt_path)
        if checkpoint_model_config(ck) != cfg:
            raise ValueError(f"{ckpt_path} was trained with another model config; use a new run dir")
        tcfg = train_config_from_dict(AETrainConfig, {**config_dict(tcfg), **{
            k: v for k, v in ck["train_config"].items() if k in ("seed", "holdout")}})
        model.load_state_dict(ck["state"]["model"], strict=False)
        opt.load_state_dict(ck["opt"])
        step, history, metrics = ck["step"], History(ck["history"]), ck.get("metrics", {})
        log(f"resumed {ckpt_path} at step {step}")
    # held-back crops: the first rows (of shard_000, itself a random sample), so the set stays
    # the same when later shards are added between runs
    n_ho = max(0, min(tcfg.holdout, len(crops) // 10))
    ho, tr = np.arange(n_ho), np.arange(n_ho, len(crops))
    ds = CropDataset(crops, tr, AugmentConfig(), patch=tcfg.patch or None, seed=tcfg.seed + step)
    held = torch.stack([to_tensor_image(crops[i]) for i in ho]) if len(ho) else None
    rng = np.random.default_rng(tcfg.seed + 7919 * step)
    deadline = Deadline(max_minutes)

    def save():
        state = {k: v for k, v in model.state_dict().items()
                 if k.startswith("autoencoder.") or k.startswith("latent_")}
        save_checkpoint(ckpt_path, run_payload("ae", cfg, tcfg, step, state, opt, history, metrics,
                                               holdout_indices=torch.from_numpy(ho.astype(np.int64))))
        history.plot(run_dir / "loss.png", ("loss", "l1"), f"autoencoder (step {step})")

    model.train()
    bar = tqdm(total=tcfg.max_steps, initial=step, desc="ae", unit="step", mininterval=5)
    t0, steps0 = time.monotonic(), step
    while step < tcfg.max_steps and not deadline.passed():
        for g in opt.param_groups:
            g["lr"] = _lr(step, tcfg)
        x = ds.batch(rng.integers(0, len(ds), tcfg.batch))
        loss, logs = ae_loss(model, x, tcfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ae.parameters(), 1.0)
        opt.step()
        step += 1
        history.log(step, **logs)
        bar.update(1)
        bar.set_postfix(loss=f"{history.mean_last('loss', 20):.4f}", refresh=False)
        if held is not None and step % tcfg.eval_every == 0:
            model.eval()
            metrics["psnr_holdout"] = psnr(model, held)
            metrics.setdefault("psnr_curve", []).append([step, metrics["psnr_holdout"]])
            model.train()
            log(f"step {step}: held-back PSNR {metrics['psnr_holdout']:.2f} dB")
        if step % tcfg.ckpt_every == 0:
            save()
    bar.close()
    model.eval()
    if held is not None:
        metrics["psnr_holdout"] = psnr(model, held)
    metrics["sec_per_step"] = (time.monotonic() - t0) / max(1, step - steps0)
    metrics["steps"] = step
    mean, std = fit_latent_stats(model, crops[tr])
    metrics["latent_mean"], metrics["latent_std"] = mean.tolist(), std.tolist()
    save()
    log(f"ae: step {step}, held-back PSNR {metrics.get('psnr_holdout', float('nan')):.2f} dB, "
        f"{metrics['sec_per_step']:.2f} s/step, latent mean {np.round(mean.numpy(), 3)} std {np.round(std.numpy(), 3)}")
    return load_checkpoint(ckpt_path)


def load_autoencoder(ckpt_or_path, model: SafeFMModel | None = None) -> SafeFMModel:
    """Load the autoencoder + latent statistics of an ``ae`` checkpoint into ``model``
    (default: a fresh adapter-free SafeFMModel of the checkpoint's config)."""


    ck = load_checkpoint(ckpt_or_path) if isinstance(ckpt_or_path, (str, Path)) else ckpt_or_path
    if model is None:
        model = ae_model(checkpoint_model_config(ck), init=False)
    missing = model.load_state_dict(ck["state"]["model"], strict=False)
    bad = [k for k in missing.missing_keys if k.startswith("autoencoder.") or k.startswith("latent_")]
    if bad or missing.unexpected_keys:
        raise ValueError(f"autoencoder checkpoint does not fit the model: {bad[:2]} {missing.unexpected_keys[:2]}")
    return model


# ---------------------------------------------------------------------------------------
# Latent cache for stages 2-3


@torch.no_grad()
def build_latent_cache(model: SafeFMModel, data: dict[str, np.ndarray], out_path: Path, *,
                       limit: int = 0, batch: int = 64, seed: int = 0, ae_step: int = -1,
                       exclude: np.ndarray | None = None) -> Path:
    """Encode crops once (each one either as-is or mirrored, 50/50) into flow latents.

    data: shard arrays (crops, landmarks, embeddings, gender, age, race, source, person).
    Writes ``out_path`` (.npz) with ``z`` (N, C, h, w) float16 flow latents, ``landmarks``
    (N, 478, 3) float16 matching the (possibly mirrored) crop, ``flipped`` (N,) bool,
    ``embeddings`` (N, 128), attributes and ``index`` into ``data``. ``exclude``: indices
    kept out (the autoencoder's held-back crops). Resumable in chunks of 1024.
    """
    from tqdm import tqdm

    from .data import flip_landmarks, to_tensor_image

    out_path = Path(out_path)
    n = len(data["crops"])
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    if exclude is not None and len(exclude):
        order = order[~np.isin(order, exclude)]
    if limit:
        order = order[:limit]
    flips = np.random.default_rng(seed + 1).random(len(order)) < 0.5
    size = data["crops"].shape[1]
    parts_dir = out_path.with_name(f"{out_path.stem}.parts_ae{ae_step}_n{len(order)}_s{seed}")
    parts_dir.mkdir(parents=True, exist_ok=True)
    chunk = 1024
    model.eval()
    for c0 in tqdm(range(0, len(order), chunk), desc="encode", unit="chunk"):
        part = parts_dir / f"{c0:06d}.npy"
        if part.exists():
            continue
        zs = []
        for i in range(c0, min(c0 + chunk, len(order)), batch):
            sel = range(i, min(i + batch, len(order), c0 + chunk))
            imgs = [data["crops"][order[j]][:, ::-1] if flips[j] else data["crops"][order[j]] for j in sel]
            zs.append(model.encode(torch.stack([to_tensor_image(im) for im in imgs])).half().numpy())
        tmp = part.with_name(part.stem + ".tmp.npy")
        np.save(tmp, np.concatenate(zs))
        tmp.replace(part)
    z = np.concatenate([np.load(parts_dir / f"{c0:06d}.npy") for c0 in range(0, len(order), chunk)])
    lms = np.stack([flip_landmarks(data["landmarks"][i].astype(np.float32), size) if f
                    else data["landmarks"][i].astype(np.float32) for i, f in zip(order, flips)])
    arrays = {"z": z, "landmarks": lms.astype(np.float16), "flipped": flips, "index": order.astype(np.int64),
              "embeddings": data["embeddings"][order].astype(np.float32),
              "latent_mean": model.latent_mean.numpy(), "latent_std": model.latent_std.numpy(),
              "ae_step": np.int64(ae_step), "image_size": np.int64(size)}
    for k in ("gender", "age", "race", "source", "person", "path", "has_embedding"):
        if k in data:
            arrays[k] = data[k][order]
    tmp = out_path.with_name(out_path.stem + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(out_path)
    for p in parts_dir.glob("*.npy"):
        p.unlink()
    parts_dir.rmdir()
    return out_path
