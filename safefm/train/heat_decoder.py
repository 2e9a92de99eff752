"""Stage 1c: fine-tune the shipped decoder to also read the expression heatmaps.

A 128 px crop has a 16×16 latent, so an eye is about one latent cell tall and the eyelids'
position is what the latent keeps worst (the autoencoder's own reconstructions: eye opening r
0.68). The heatmap decoder (:class:`safefm.models.FastDecoder` with ``heat_channels``) also gets
the heatmaps the generator was conditioned on, at its last stage (64×64), so lids can be drawn
where the landmarks put them. Everything else of the model (encoder, latent statistics, UNet,
ControlNet, LoRA) is the given weights file's, unchanged. One step::

    x (B, 3, S, S) aligned training crops (flip + photometric jitter), lm their landmarks
    z = model.encode(x)                       frozen encoder, flow latents (B, C, s, s)
    z[i, :, eye cells] <- z[j, :, eye cells]  for a ``swap_prob`` share (another face's eyes),
                                              so the lids must come from the heatmaps
    y = model.decode(z, render_heatmaps(lm))
    loss = recon_terms(y, x) + eye_weight * |y - x| inside the eye boxes

The new branch starts at zero, so step 0 decodes exactly as the given weights.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..face import heatmaps
from .data import AugmentConfig, augment, to_tensor_image
from ..models import SafeFMModel
from ..face.retarget import EYELIDS
from .autoencoder import recon_terms
from .common import (Deadline, History, load_checkpoint, restore_run, run_payload, save_checkpoint,
                     set_warmup_lr)


@dataclass(frozen=True)
class HeatDecoderTrainConfig:
    batch: int = 16
    lr: float = 5e-4             # AdamW, linear warm-up
    warmup: int = 50
    grad_weight: float = 0.5     # image-gradient L1 (as the decoder stage)
    color_weight: float = 2.0    # L1 of 8x-average-pooled images
    eye_weight: float = 4.0      # extra L1 inside the eye boxes
    swap_prob: float = 0.3       # share of samples whose latent eye cells come from another sample
    max_steps: int = 100_000
    ckpt_every: int = 50
    eval_every: int = 200
    holdout: int = 256           # the last rows of the data, never trained on
    seed: int = 0


def with_heat_decoder(model: SafeFMModel) -> SafeFMModel:
    """A copy of ``model`` whose decoder also takes the heatmaps (new branch zero-initialised)."""
    cfg = dataclasses.replace(model.cfg, decoder_heat=True)
    out = SafeFMModel(cfg, with_controlnet=model.controlnet is not None,
                      with_lora=any("lora_" in k for k in model.unet.state_dict()))
    missing, unexpected = out.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("autoencoder.decoder.heat.") for k in missing), (missing, unexpected)
    return out.eval()


def eye_boxes(landmarks: np.ndarray, margin: float = 0.6) -> np.ndarray:
    """(B, 2, 4) int boxes (x0, y0, x1, y1) around each eye's lid landmarks, grown by ``margin``
    x the eye's width vertically and half that horizontally; landmarks (B, 478, 3) crop pixels."""
    lids = np.asarray(landmarks)[:, list(EYELIDS), :2]                     # (B, K, 2)
    cx = lids[..., 0].mean(axis=1, keepdims=True)
    boxes = []
    for side in (lids[..., 0] < cx, lids[..., 0] >= cx):
        pts = np.where(side[..., None], lids, np.nan)
        lo, hi = np.nanmin(pts, axis=1), np.nanmax(pts, axis=1)            # (B, 2)
        w = (hi[:, 0] - lo[:, 0])[:, None]
        grow = np.concatenate([0.5 * margin * w, margin * w], axis=1)
        boxes.append(np.concatenate([lo - grow, hi + grow], axis=1))
    return np.rint(np.stack(boxes, axis=1)).astype(int)


def eye_mask(boxes: np.ndarray, size: int) -> torch.Tensor:
    """(B, 1, size, size) float mask of the eye boxes."""
    m = torch.zeros(len(boxes), 1, size, size)
    for i, bb in enumerate(boxes):
        for x0, y0, x1, y1 in bb:
            m[i, :, max(0, y0):max(0, y1), max(0, x0):max(0, x1)] = 1.0
    return m


def swap_eye_cells(z: torch.Tensor, boxes: np.ndarray, image_size: int, pick: np.ndarray,
                   partner: np.ndarray) -> torch.Tensor:
    """z (B, C, s, s) with the latent cells covering sample i's eye boxes taken from sample
    ``partner[i]`` (crops are aligned, so that is the partner's eye) for every i where ``pick[i]``."""
    z = z.clone()
    cell, s = image_size / z.shape[-1], z.shape[-1]
    for i in np.nonzero(pick)[0]:
        for x0, y0, x1, y1 in boxes[i]:
            c0, r0 = max(0, int(np.floor(x0 / cell))), max(0, int(np.floor(y0 / cell)))
            c1, r1 = min(s, max(int(np.ceil(x1 / cell)), c0 + 1)), min(s, max(int(np.ceil(y1 / cell)), r0 + 1))
            z[i, :, r0:r1, c0:c1] = z[partner[i], :, r0:r1, c0:c1]
    return z


def _batch(data, rows, rng, image_size, heat_size, aug: AugmentConfig):
    xs, lms, heats = [], [], []
    for r in rows:
        img, lm, _ = augment(data["crops"][r], data["landmarks"][r], rng, aug)
        xs.append(to_tensor_image(img))
        lms.append(lm)
        heats.append(heatmaps.render_heatmaps(lm, image_size, heat_size))
    return torch.stack(xs), np.stack(lms), torch.from_numpy(np.stack(heats))


def _eval(model, data, rows, image_size, heat_size) -> dict:
    """Held-back metrics: PSNR (dB) and eye-box L1 with the true latents, and both when
    the latent's eye cells come from another face (how much the heatmaps place the lids)."""
    from .data import NO_AUGMENT

    rng = np.random.default_rng(12345)
    x, lm, heat = _batch(data, rows, rng, image_size, heat_size, NO_AUGMENT)
    boxes = eye_boxes(lm)
    m = eye_mask(boxes, image_size)
    out = {}
    with torch.no_grad():
        z = model.encode(x)
        zs = swap_eye_cells(z, boxes, image_size, np.ones(len(z), bool), np.roll(np.arange(len(z)), 1))
        for name, zz in (("", z), ("_swapped", zs)):
            y = model.decode(zz, heat)
            mse = ((y - x) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)
            out[f"psnr{name}"] = float((10 * torch.log10(1 / mse)).mean())
            out[f"eye_l1{name}"] = float(((y - x).abs() * m).sum() / (3 * m.sum()))
    return out


def train_heat_decoder(model: SafeFMModel, weights_sha: str, tcfg: HeatDecoderTrainConfig, data: dict, *,
                       run_dir: Path, max_minutes: float = 20, resume: bool = True, log=print) -> dict:
    """Fine-tune ``model``'s decoder (converted by :func:`with_heat_decoder`) on ``data``
    (``crops`` (N, S, S, 3) uint8, ``landmarks`` (N, 478, 3) crop pixels); checkpoint
    ``run_dir/last.pt`` (decoder weights, optimiser, history, the source weights' sha256)."""
    from tqdm import tqdm

    model = with_heat_decoder(model)
    cfg = model.cfg
    S, H = cfg.image_size, cfg.heatmap_size
    dec = model.autoencoder.decoder
    for p in model.parameters():
        p.requires_grad_(False)
    for p in dec.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(dec.parameters(), lr=tcfg.lr, weight_decay=0.0)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = run_dir / "last.pt"
    step, history, metrics = 0, History(), {"weights_sha256": weights_sha}
    if resume and ckpt_path.exists():
        ck = load_checkpoint(ckpt_path)
        if ck["metrics"].get("weights_sha256") != weights_sha:
            raise ValueError(f"{ckpt_path} was trained from other weights; use --fresh")
        tcfg, step, history, metrics = restore_run(ck, HeatDecoderTrainConfig, tcfg, model, opt)
        log(f"resumed {ckpt_path} at step {step}")
    n = len(data["crops"])
    ho, tr = np.arange(n - tcfg.holdout, n), np.arange(n - tcfg.holdout)
    if "start" not in metrics:
        metrics["start"] = _eval(model, data, ho, S, H)   # = the given weights (branch at zero)
        log(f"given decoder on {len(ho)} held-back crops: {metrics['start']}")
    log(f"heat decoder: {sum(p.numel() for p in dec.parameters()) / 1e6:.3f} M trainable parameters "
        f"({sum(p.numel() for p in dec.heat.parameters())} new), {len(tr)} training crops")
    rng = np.random.default_rng(tcfg.seed + 7919 * step)
    aug = AugmentConfig()
    deadline = Deadline(max_minutes)

    def save():
        state = {k: v for k, v in model.state_dict().items() if k.startswith("autoencoder.decoder.")}
        save_checkpoint(ckpt_path, run_payload("heat_decoder", cfg, tcfg, step, state, opt, history, metrics))
        history.plot(run_dir / "loss.png", ("loss", "eye"), f"heat decoder (step {step})")

    dec.train()
    bar = tqdm(total=tcfg.max_steps, initial=step, desc="heat decoder", unit="step", mininterval=5)
    t0, steps0 = time.monotonic(), step
    while step < tcfg.max_steps and not deadline.passed():
        set_warmup_lr(opt, step, tcfg.lr, tcfg.warmup)
        x, lm, heat = _batch(data, tr[rng.integers(0, len(tr), tcfg.batch)], rng, S, H, aug)
        boxes = eye_boxes(lm)
        with torch.no_grad():
            z = model.encode(x)
        b = len(z)
        z = swap_eye_cells(z, boxes, S, rng.random(b) < tcfg.swap_prob, (np.arange(b) + rng.integers(1, b)) % b)
        y = model.decode(z, heat)
        loss, logs = recon_terms(y, x, tcfg.grad_weight, tcfg.color_weight)
        m = eye_mask(boxes, S)
        eye = ((y - x).abs() * m).sum() / (3 * m.sum().clamp_min(1.0))
        loss = loss + tcfg.eye_weight * eye
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dec.parameters(), 1.0)
        opt.step()
        step += 1
        history.log(step, **{**logs, "loss": loss.item(), "eye": eye.item()})
        bar.update(1)
        bar.set_postfix(loss=f"{history.mean_last('loss', 20):.4f}", refresh=False)
        if step % tcfg.eval_every == 0:
            dec.eval()
            metrics["holdout"] = _eval(model, data, ho, S, H)
            metrics.setdefault("curve", []).append([step, metrics["holdout"]])
            dec.train()
            log(f"step {step}: held back {metrics['holdout']}")
        if step % tcfg.ckpt_every == 0:
            save()
    bar.close()
    dec.eval()
    metrics["holdout"] = _eval(model, data, ho, S, H)
    if step > steps0:   # a call that only exports keeps the training's figure
        metrics["sec_per_step"] = (time.monotonic() - t0) / (step - steps0)
    metrics["steps"] = step
    save()
    log(f"heat decoder: step {step}, held back {metrics['holdout']} (given decoder {metrics['start']}), "
        f"{metrics.get('sec_per_step', float('nan')):.2f} s/step")
    return load_checkpoint(ckpt_path)


def apply_checkpoint(model: SafeFMModel, ck: dict) -> SafeFMModel:
    """``model`` (the weights the checkpoint was trained from) with the trained heat decoder."""
    out = with_heat_decoder(model)
    out.load_state_dict(ck["state"]["model"], strict=False)
    return out.eval()
