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

**Adversarial fine-tuning** (``adv > 0``; issue 14, item 2): the L1-type losses alone make the
decoder draw the mean of every face the latent could be, so skin, lids and lips come out soft.
A patch discriminator trained from scratch (:class:`safefm.train.detail.PatchDiscriminator`,
hinge loss) then judges decoded crops against the real crops, and the decoder also gets its
hinge loss (weight ramped up over ``gan_warmup`` steps) and feature matching (``fm``). The
reconstruction terms stay, so colours and layout keep following the latent. Run from a decoder
that already reads the heatmaps, the fine-tune keeps its architecture: the per-frame cost is
unchanged.

**What the sampler draws** (``sampled_batch`` > 0, a pack from :func:`sampled_pack`): the
decoder is run on the latents the few-step sampler produces, not only on the encoder's. They
have no real target (another identity is drawn), so their loss is the discriminator's verdict
plus ``color_weight`` x L1 of their 8x-average-pooled images against the given decoder's
output for the same latent: colours and layout stay, detail may come.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from ..face import heatmaps
from .data import AugmentConfig, augment, to_tensor_image
from ..models import SafeFMModel
from ..face.retarget import EYELIDS
from .autoencoder import recon_terms
from .detail import PatchDiscriminator, discriminator_step, feature_matching, laplacian_energy, to_tensor
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
    adv: float = 0.0             # > 0: weight of the decoder's hinge loss against a patch discriminator
    fm: float = 0.0              # weight of discriminator feature matching (with adv > 0)
    d_lr: float = 2e-4           # the discriminator's learning rate (Adam, betas 0.5 / 0.9)
    d_width: int = 32            # the discriminator's first width
    gan_warmup: int = 200        # steps over which the adversarial weights ramp up from 0
    sampled_batch: int = 0       # with adv > 0 and a sampled pack: latents the product's sampler drew, per step


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
            if not name:
                y_true = y
            mse = ((y - x) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)
            out[f"psnr{name}"] = float((10 * torch.log10(1 / mse)).mean())
            out[f"eye_l1{name}"] = float(((y - x).abs() * m).sum() / (3 * m.sum()))
        # Laplacian energy of the decoded crops over the real ones' (1 = as sharp; a 1 px blur first)
        out["energy"] = float((laplacian_energy(y_true) / laplacian_energy(x)).log().mean().exp())
    return out


def sampled_pack(photos: list, n: int, source: str = "default", seed: int = 5) -> dict[str, np.ndarray]:
    """What the product decodes, for ``n`` of ``photos`` (paths): each photo worn by a shipped
    identity or one drawn from the identity sampler (alternately), with identity repel on for
    every other photo (files) and off (the camera). -> {``z`` (n', C, s, s) float32 latents,
    ``heat`` (n', Ch, H, H) float16 heatmaps, ``ref`` (n', S, S, 3) uint8 the given decoder's
    output}; n' <= n (photos without a face are skipped)."""
    from ..config import RuntimeConfig
    from ..engine import build_engine
    from ..identity import Identity, load_identity
    from ..identity_sampler import IdentitySampler
    from ..media import read_image
    from ..paths import REPO_ROOT, resolve_model_path

    rng = np.random.default_rng(seed)
    weights = REPO_ROOT / "weights"
    engines = [build_engine(RuntimeConfig(identity_repel=r, runtime="torch"), resolve_model_path(source), video=False)
               for r in (0.0, 1.5)]
    idents = [load_identity(p, engines[0].mcfg.identity_dim) for p in sorted((weights / "identities").glob("*.pt"))]
    sampler = IdentitySampler.load(weights / "identity_sampler.safetensors")
    out: dict[str, list] = {"z": [], "heat": [], "ref": []}
    for j, path in enumerate(photos):
        if len(out["z"]) >= n:
            break
        engine = engines[j % 2]
        got = []
        decode = engine.gen.decode

        def grab(z, heat=None, _decode=decode, _got=got):
            y = _decode(z, heat)
            _got.append((z.detach().cpu().numpy().copy(), np.asarray(heat, np.float32).copy(), y[0].copy()))
            return y

        base = idents[(j // 2) % len(idents)]
        emb = sampler.sample(rng) if (j // 2) % 2 else base.embedding
        engine.set_identity(Identity(np.asarray(emb, np.float32), base.shape, int(rng.integers(1 << 30))))
        engine.reset()
        engine.gen.decode = grab
        try:
            engine.process(read_image(path))
        finally:
            engine.gen.decode = decode
        if len(got) == 1:
            z, heat, y = got[0]
            out["z"].append(z[0])
            out["heat"].append(heat.reshape(heat.shape[-3:]).astype(np.float16))
            out["ref"].append(y)
    return {k: np.stack(v) for k, v in out.items()}


def train_heat_decoder(model: SafeFMModel, weights_sha: str, tcfg: HeatDecoderTrainConfig, data: dict, *,
                       run_dir: Path, max_minutes: float = 20, resume: bool = True, log=print,
                       sampled: dict | None = None) -> dict:
    """Fine-tune ``model``'s decoder (converted by :func:`with_heat_decoder`) on ``data``
    (``crops`` (N, S, S, 3) uint8, ``landmarks`` (N, 478, 3) crop pixels); checkpoint
    ``run_dir/last.pt`` (decoder weights, optimiser, history, the source weights' sha256).
    ``sampled``: a :func:`sampled_pack` (used when ``tcfg.sampled_batch`` > 0 and ``adv`` > 0)."""
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
    disc = d_opt = None
    if tcfg.adv > 0:
        torch.manual_seed(tcfg.seed)
        disc = PatchDiscriminator(tcfg.d_width)
        d_opt = torch.optim.Adam(disc.parameters(), lr=tcfg.d_lr, betas=(0.5, 0.9))
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = run_dir / "last.pt"
    step, history, metrics = 0, History(), {"weights_sha256": weights_sha}
    if resume and ckpt_path.exists():
        ck = load_checkpoint(ckpt_path)
        if ck["metrics"].get("weights_sha256") != weights_sha:
            raise ValueError(f"{ckpt_path} was trained from other weights; use --fresh")
        tcfg, step, history, metrics = restore_run(ck, HeatDecoderTrainConfig, tcfg, model, opt)
        if disc is not None and ck.get("disc") is not None:
            disc.load_state_dict(ck["disc"])
            d_opt.load_state_dict(ck["d_opt"])
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
    use_sampled = disc is not None and tcfg.sampled_batch > 0 and sampled is not None and len(sampled["z"]) > 0
    if use_sampled:
        log(f"+ {tcfg.sampled_batch} of {len(sampled['z'])} sampled latents a step")
    deadline = Deadline(max_minutes)

    def save():
        state = {k: v for k, v in model.state_dict().items() if k.startswith("autoencoder.decoder.")}
        extra = {} if disc is None else {"disc": disc.state_dict(), "d_opt": d_opt.state_dict()}
        save_checkpoint(ckpt_path, run_payload("heat_decoder", cfg, tcfg, step, state, opt, history, metrics,
                                               **extra))
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
        if disc is not None:   # discriminator step (real crops vs decoded), then the decoder's terms
            fake = y
            if use_sampled:   # the sampler's latents: no target but the given decoder's colours
                rows = rng.integers(0, len(sampled["z"]), tcfg.sampled_batch)
                ys = model.decode(torch.from_numpy(sampled["z"][rows]),
                                  torch.from_numpy(sampled["heat"][rows].astype(np.float32)))
                ref = to_tensor(sampled["ref"][rows], "cpu")
                keep = (F.avg_pool2d(ys, 8) - F.avg_pool2d(ref, 8)).abs().mean()
                loss = loss + tcfg.color_weight * keep
                logs["sampled_color"] = keep.item()
                fake = torch.cat([y, ys])
            loss_d = discriminator_step(disc, d_opt, x, fake)
            ramp = min(1.0, (step + 1) / max(1, tcfg.gan_warmup))
            lf, ff = disc(fake)
            with torch.no_grad():
                _, fr = disc(x)
            loss_adv = -lf.mean()
            fm = feature_matching([f[:len(x)] for f in ff], fr)   # real targets exist for the first len(x) only
            loss = loss + ramp * (tcfg.adv * loss_adv + tcfg.fm * fm)
            logs.update(loss_d=loss_d.item(), adv=loss_adv.item())
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
