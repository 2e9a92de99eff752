"""Stage 1b: a faster decoder for a trained latent space (the encoder and latents stay frozen).

The base and the adapters live in the autoencoder's latent space, so a new decoder trained to
map *the same* latents back to the crops can replace the old one without retraining them.
Pairs come from the latent cache (flow latents + the crop they were encoded from, mirrored
where the cache mirrored it); the loss is the autoencoder's reconstruction loss::

    y = decoder(from_flow_latent(z)) * 2 - 1                       (B, 3, S, S)
    loss = |y - x| + grad_weight * |grad y - grad x| + color_weight * |avgpool8 y - avgpool8 x|

The checkpoint (``runs/decoder/last.pt``) holds only ``autoencoder.decoder.*``, its model
config (the autoencoder's with ``decoder = "fast"``) and the autoencoder step it belongs to;
:func:`safefm.train.export.assemble` swaps it in.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..config import ModelConfig
from .autoencoder import decode_raw, init_decoder, recon_terms
from .common import (Deadline, History, checkpoint_model_config, load_checkpoint, save_checkpoint,
                     restore_run, run_payload, set_warmup_lr, stage_dir)


@dataclass(frozen=True)
class DecoderTrainConfig:
    batch: int = 16
    lr: float = 1e-3
    warmup: int = 50
    grad_weight: float = 0.5     # image-gradient L1 (sharpness) weight
    color_weight: float = 2.0    # L1 of 8x-average-pooled images (colour / low frequencies)
    max_steps: int = 100_000
    ckpt_every: int = 50
    eval_every: int = 200
    holdout: int = 256           # cache rows held back for PSNR (the last rows)
    seed: int = 0


def fast_config(ae_cfg: ModelConfig, target: ModelConfig) -> ModelConfig:
    """The autoencoder's config with ``target``'s decoder fields."""
    return replace(ae_cfg, decoder=target.decoder, decoder_widths=target.decoder_widths,
                   decoder_blocks=target.decoder_blocks)


def decoder_state(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k.startswith("autoencoder.decoder.")}


def without_decoder(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.startswith("autoencoder.decoder.")}


def cache_pairs(cache, data: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(rows of the cache, rows of ``data``) for every cached latent whose crop is in ``data``:
    matched by file path where the cache stores paths, else by its row ``index`` into
    ``load_shards()``' order (shards are only ever appended, so rows do not shift)."""
    if "path" in cache.a:
        where = {str(p): i for i, p in enumerate(data["path"])}
        src = np.array([where.get(str(p), -1) for p in cache.a["path"]])
    else:
        src = np.asarray(cache.a["index"], np.int64)
        src = np.where(src < len(data["crops"]), src, -1)
    keep = np.nonzero(src >= 0)[0]
    return keep, src[keep]


def crop_images(crops: np.ndarray, rows: np.ndarray, flipped: np.ndarray) -> torch.Tensor:
    """(N, 3, S, S) in [-1, 1] of ``crops[rows]`` (N rows of (S, S, 3) uint8), mirrored where ``flipped``."""
    from .data import to_tensor_image

    return torch.stack([to_tensor_image(crops[r][:, ::-1] if f else crops[r]) for r, f in zip(rows, flipped)])


@torch.no_grad()
def psnr_pairs(model, z: torch.Tensor, x: torch.Tensor, batch: int = 32) -> float:
    """Mean PSNR (dB, [0, 1] scale) of model.decode(z) against x, both (N, ...)."""
    vals = []
    for i in range(0, len(z), batch):
        y = model.decode(z[i:i + batch])
        mse = ((y - x[i:i + batch]) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)
        vals.append(10 * torch.log10(1 / mse))
    return torch.cat(vals).mean().item()


def train_decoder(ae_ckpt: dict, target: ModelConfig, tcfg: DecoderTrainConfig, cache, data: dict, *,
                  run_dir: Path | None = None, max_minutes: float = 20, resume: bool = True,
                  log=print) -> dict:
    """Train (or continue) a ``target.decoder`` decoder on the frozen latents of ``ae_ckpt``."""
    from tqdm import tqdm

    from .autoencoder import ae_model


    cfg = fast_config(checkpoint_model_config(ae_ckpt), target)
    run_dir = Path(run_dir or stage_dir("decoder"))
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = run_dir / "last.pt"
    model = ae_model(cfg, init=False)
    model.load_state_dict(without_decoder(ae_ckpt["state"]["model"]), strict=False)
    init_decoder(model)
    dec = model.autoencoder.decoder
    opt = torch.optim.AdamW(dec.parameters(), lr=tcfg.lr, weight_decay=0.0)
    step, history, metrics = 0, History(), {"ae_step": int(ae_ckpt["step"])}
    if resume and ckpt_path.exists():
        ck = load_checkpoint(ckpt_path)
        if checkpoint_model_config(ck) != cfg or int(ck["metrics"]["ae_step"]) != int(ae_ckpt["step"]):
            raise ValueError(f"{ckpt_path} belongs to another autoencoder or decoder config; use --fresh")
        tcfg, step, history, metrics = restore_run(ck, DecoderTrainConfig, tcfg, model, opt)
        log(f"resumed {ckpt_path} at step {step}")

    rows_c, rows_d = cache_pairs(cache, data)
    flipped = np.asarray(cache.a["flipped"], bool)
    zs = torch.from_numpy(np.asarray(cache.a["z"], np.float32))
    ho, tr = np.arange(len(rows_c) - tcfg.holdout, len(rows_c)), np.arange(len(rows_c) - tcfg.holdout)
    z_ho = zs[rows_c[ho]]
    x_ho = crop_images(data["crops"], rows_d[ho], flipped[rows_c[ho]])
    if "psnr_old_decoder" not in metrics:
        from .autoencoder import load_autoencoder

        metrics["psnr_old_decoder"] = psnr_pairs(load_autoencoder(ae_ckpt).eval(), z_ho, x_ho)
        log(f"old decoder on the {len(ho)} held-back latents: {metrics['psnr_old_decoder']:.2f} dB")
    log(f"decoder: {sum(p.numel() for p in dec.parameters()) / 1e6:.2f} M parameters, "
        f"{len(tr)} training pairs, {len(ho)} held back")
    rng = np.random.default_rng(tcfg.seed + 7919 * step)
    deadline = Deadline(max_minutes)

    def save():
        save_checkpoint(ckpt_path, run_payload("decoder", cfg, tcfg, step, decoder_state(model), opt, history,
                                               metrics))
        history.plot(run_dir / "loss.png", ("loss", "l1"), f"fast decoder (step {step})")

    model.train()
    bar = tqdm(total=tcfg.max_steps, initial=step, desc="decoder", unit="step", mininterval=5)
    t0, steps0 = time.monotonic(), step
    while step < tcfg.max_steps and not deadline.passed():
        set_warmup_lr(opt, step, tcfg.lr, tcfg.warmup)
        pick = tr[rng.integers(0, len(tr), tcfg.batch)]
        x = crop_images(data["crops"], rows_d[pick], flipped[rows_c[pick]])
        y = decode_raw(model, zs[rows_c[pick]])
        loss, logs = recon_terms(y, x, tcfg.grad_weight, tcfg.color_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dec.parameters(), 1.0)
        opt.step()
        step += 1
        history.log(step, **logs)
        bar.update(1)
        bar.set_postfix(loss=f"{history.mean_last('loss', 20):.4f}", refresh=False)
        if step % tcfg.eval_every == 0:
            model.eval()
            metrics["psnr_holdout"] = psnr_pairs(model, z_ho, x_ho)
            metrics.setdefault("psnr_curve", []).append([step, metrics["psnr_holdout"]])
            model.train()
            log(f"step {step}: held-back PSNR {metrics['psnr_holdout']:.2f} dB "
                f"(old decoder {metrics['psnr_old_decoder']:.2f})")
        if step % tcfg.ckpt_every == 0:
            save()
    bar.close()
    model.eval()
    metrics["psnr_holdout"] = psnr_pairs(model, z_ho, x_ho)
    metrics["sec_per_step"] = (time.monotonic() - t0) / max(1, step - steps0)
    metrics["steps"] = step
    save()
    log(f"decoder: step {step}, held-back PSNR {metrics['psnr_holdout']:.2f} dB "
        f"(old decoder {metrics['psnr_old_decoder']:.2f}), {metrics['sec_per_step']:.2f} s/step")
    return load_checkpoint(ckpt_path)
