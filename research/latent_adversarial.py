"""Research: adversarial post-training of the few-step generator's output (issue 14 item 2).

The shipped generator's 2-step output is softer and more marbled than what its own autoencoder
can draw (``research/probe_look_ceiling.py``: the "AE (shipped)" oracle is clean, the output is
streaked). Few Euler steps of a flow model land near the *mean* of the paths they could take;
an adversarial term on what the sampler actually produces pushes that output back onto the
data's manifold (the idea of latent adversarial diffusion distillation), here at the size a CPU
trains: the 16 x 16 x 4 latent.

- generator: the shipped model's UNet + LoRA + ControlNet, run exactly as the product runs it
  (:func:`safefm.sampler.sample`, ``steps`` Euler steps from noise) with backpropagation
  through every step; conditions = a training crop's heatmaps and an identity drawn from the
  shipped identity sampler's vetted banks (what the product wears);
- discriminator: a small conv net (spectral norm, or an R1 penalty with ``sn=0``) on the latent
  concatenated with the heatmaps average-pooled to the latent's size (so it judges "a real face
  latent *with this expression*"); real = training crops encoded by the shipped encoder, with
  their own heatmaps. ``image=1``: the detail stage's patch discriminator on the decoded 128 px
  faces instead, real = those latents' round trips through the shipped decoder;
- anchor: L1 to the frozen starting model's output for the same noise and conditions, on the
  latent average-pooled ``anchor_pool`` x (structure, pose, identity, expression stay), plus a
  small full-resolution share. The adversarial term may only redraw what lies inside the pool.

Only the flow part's weights change, so the autoencoder, the ONNX graph shapes and the per-frame
cost are unchanged. Resumable (``--run``/last.pt); ``--export`` writes a model file the engine
loads (``--model``), the shipped one with these UNet / LoRA / ControlNet weights (EMA);
``--measure N`` prints how uneven and how detailed the skin of N held conditions' faces is (real
crops, their round trips, the starting model, the run). ``--device cuda`` on a lent GPU.
Session 29 of ``docs/results.md``.

    .venv/bin/python research/latent_adversarial.py --run runs/s29/ladv --minutes 60 \
        [--detail "image=1,adv=0.1,lr=2e-5"]
    .venv/bin/python research/latent_adversarial.py --run runs/s29/ladv --measure 64
    .venv/bin/python research/latent_adversarial.py --run runs/s29/ladv --export runs/s29/ladv/model.safetensors
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from safefm.train.detail import PatchDiscriminator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ae_adversarial import _train_script  # noqa: E402  (scripts/train.py's --detail parser, shared)


@dataclass(frozen=True)
class LatentAdvConfig:
    batch: int = 16
    lr: float = 1e-5            # generator (UNet + LoRA + ControlNet), Adam betas (0, 0.99)
    d_lr: float = 1e-4          # discriminator
    steps: int = 2              # Euler steps of the sampler trained (the product's default)
    adv: float = 0.5            # weight of the generator's hinge adversarial term
    anchor: float = 1.0         # L1 to the starting model's output, latent average-pooled anchor_pool x
    anchor_pool: int = 2
    anchor_full: float = 0.1    # L1 to the starting model's output at full latent resolution
    d_width: int = 64
    sn: int = 1                 # 1: spectral norm on the discriminator's convolutions; 0: an R1 penalty instead
    r1: float = 1.0             # R1 gradient penalty on real inputs (without spectral norm), every 4 steps
    d_steps: int = 1            # discriminator updates per generator step (on the same fakes)
    image: int = 0              # 1: the discriminator judges decoded faces (a patch discriminator on the
                                # 128 px images) against the real latents' decoded round trips
    gan_start: int = 100        # discriminator-only steps before the generator feels it
    ema: float = 0.995
    ckpt_every: int = 100
    preview_every: int = 200
    seed: int = 0


class LatentDiscriminator(PatchDiscriminator):
    """(B, C + 9, 16, 16): latent + pooled heatmaps -> per-patch logits (B, 1, 8, 8), features
    (the patch discriminator's forward, on a latent-sized input)."""

    def __init__(self, channels: int, width: int = 64, spectral: bool = True):
        nn.Module.__init__(self)
        sn = nn.utils.parametrizations.spectral_norm if spectral else (lambda m: m)
        w = width
        self.blocks = nn.ModuleList([
            nn.Sequential(sn(nn.Conv2d(channels, w, 3, 1, 1)), nn.LeakyReLU(0.2)),
            nn.Sequential(sn(nn.Conv2d(w, 2 * w, 4, 2, 1)), nn.LeakyReLU(0.2)),
            nn.Sequential(sn(nn.Conv2d(2 * w, 4 * w, 3, 1, 1)), nn.LeakyReLU(0.2)),
        ])
        self.out = sn(nn.Conv2d(4 * w, 1, 3, 1, 1))


def condition(z: torch.Tensor, heat: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) latent + (B, 9, H, H) heatmaps pooled to h -> the discriminator's input."""
    return torch.cat([z, F.adaptive_avg_pool2d(heat, z.shape[-1])], 1)


def real_latents(model, crops: np.ndarray, batch: int = 128) -> np.ndarray:
    """(N, S, S, 3) uint8 -> (N, C, h, w) float16 flow latents of the shipped encoder."""
    out = []
    with torch.no_grad():
        for i in range(0, len(crops), batch):
            x = torch.from_numpy(crops[i:i + batch]).permute(0, 3, 1, 2).float().div(127.5).sub(1)
            out.append(model.encode(x.to(model.latent_mean.device)).half().cpu().numpy())
    return np.concatenate(out)


def heat_batch(landmarks: np.ndarray, rows, image_size: int, heat_size: int) -> torch.Tensor:
    from safefm.face import heatmaps

    return torch.from_numpy(np.stack([heatmaps.render_heatmaps(landmarks[r], image_size, heat_size) for r in rows]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True, help="folder of this run (last.pt, latents cache, previews)")
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (a lent GPU)")
    ap.add_argument("--detail", default="", help="LatentAdvConfig overrides, k=v,...")
    ap.add_argument("--real", type=int, default=6144, help="training crops encoded as the real latents (seeded)")
    ap.add_argument("--export", help="write the model file with this run's EMA flow weights and stop")
    ap.add_argument("--measure", type=int, default=0,
                    help="N > 0: on N held conditions print how uneven (marbled) and how detailed the real crops, "
                         "their autoencoder round trips, the starting model's and this run's faces are, and stop")
    args = ap.parse_args()

    from safefm.checkpoint import load_model, save_model
    from safefm.identity_sampler import load_default_sampler
    from safefm.paths import resolve_model_path
    from safefm.sampler import sample
    from safefm.train.common import EMA, History, load_checkpoint, save_checkpoint
    from safefm.train.data import load_shards
    from safefm.train.reflow import reflow_keys

    torch.set_num_threads(args.threads)
    run = Path(args.run)
    run.mkdir(parents=True, exist_ok=True)
    model, meta = load_model(resolve_model_path("default"))
    dev = torch.device(args.device)
    model.to(dev)
    keys = reflow_keys(model)   # the UNet (with its LoRA) and the ControlNet, as a reflow pass trains
    last = run / "last.pt"
    if args.export:
        ck = load_checkpoint(last)
        model.load_state_dict({k: v for k, v in ck["ema"]["shadow"].items()}, strict=False)
        save_model(model, args.export, extra_meta={
            "license": meta.get("license", ""),
            "training": meta.get("training", ""),
            "latent_adversarial": str({"steps": ck["step"], "config": ck["train_config"]})})
        print(f"wrote {args.export} (step {ck['step']})")
        return

    ck = load_checkpoint(last) if last.exists() else None
    tcfg = LatentAdvConfig(**ck["train_config"]) if ck else LatentAdvConfig()
    if args.detail:
        tcfg = _train_script()._field_overrides(tcfg, args.detail, "--detail")
    mc = model.cfg
    S, H = mc.image_size, mc.heatmap_size

    data = load_shards(keys=("crops", "landmarks"))
    pick = np.sort(np.random.default_rng(0).choice(len(data["crops"]), min(args.real, len(data["crops"])),
                                                   replace=False))
    cache = run / f"latents_{len(pick)}.npy"
    if cache.exists():
        lat = np.load(cache)
    else:
        t0 = time.time()
        lat = real_latents(model, data["crops"][pick])
        np.save(cache, lat)
        print(f"encoded {len(lat)} crops in {time.time() - t0:.0f} s", flush=True)
    lms = data["landmarks"][pick]
    data_crops = data["crops"][pick] if args.measure else None
    del data
    heat_cache = run / f"heat_{len(pick)}.npy"   # rendered once (25 ms a face would halve the step rate)
    if heat_cache.exists():
        heat_all = np.load(heat_cache)
    else:
        heat_all = np.stack([heat_batch(lms, [i], S, H)[0].half().numpy() for i in range(len(lms))])
        np.save(heat_cache, heat_all)
    n = len(lat)
    banks = load_default_sampler().banks
    idents = torch.from_numpy(np.concatenate([np.asarray(b, np.float32) for b in banks.values()]))
    print(f"{n} real latents, {len(idents)} sampler identities; {tcfg}", flush=True)

    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(("unet.", "controlnet.")))
        if p.requires_grad:
            params.append(p)
    model.train()
    if tcfg.image:
        d = PatchDiscriminator(tcfg.d_width)
    else:
        d = LatentDiscriminator(mc.latent_channels + mc.heatmap_channels, tcfg.d_width, bool(tcfg.sn))
    d.to(dev)
    opt = torch.optim.Adam(params, lr=tcfg.lr, betas=(0.0, 0.99))
    opt_d = torch.optim.Adam(d.parameters(), lr=tcfg.d_lr, betas=(0.0, 0.99))
    ema = EMA(model, tcfg.ema, keys=keys)
    step, hist = 0, History()
    if ck:
        model.load_state_dict(ck["state"]["model"], strict=False)
        d.load_state_dict(ck["disc"])
        opt.load_state_dict(ck["opt"])
        opt_d.load_state_dict(ck["opt_d"])
        ema.load_state_dict(ck["ema"])
        step, hist = ck["step"], History(ck["history"])
        print(f"resumed at step {step}", flush=True)

    if args.measure:
        _measure(args.measure, ema.averaged(model).eval(), teacher, data_crops, lms, lat, heat_all, idents, tcfg,
                 sample, step)
        return
    rng = np.random.default_rng(tcfg.seed + step)
    gen = torch.Generator().manual_seed(tcfg.seed + step)
    vel, tvel = model.velocity, teacher.velocity
    # a fixed preview: 8 held conditions, identities and noises
    prng = np.random.default_rng(12345)
    pheat = torch.from_numpy(heat_all[np.sort(prng.choice(n, 8, replace=False))].astype(np.float32)).to(dev)
    ptok_emb = idents[prng.choice(len(idents), 8)].to(dev)
    px0 = torch.randn((8, *lat.shape[1:]), generator=torch.Generator().manual_seed(7)).to(dev)

    def run_sampler(v, x0, heat, tokens):
        def f(z, t):
            return v(z, torch.full((z.shape[0],), t, device=z.device), heat, tokens)
        return sample(f, x0, tcfg.steps)

    deadline = time.time() + 60 * args.minutes
    t_start, b = time.time(), tcfg.batch
    while time.time() < deadline:
        rows_r, rows_f = np.sort(rng.choice(n, b)), np.sort(rng.choice(n, b))
        heat_r = torch.from_numpy(heat_all[rows_r].astype(np.float32)).to(dev)
        heat_f = torch.from_numpy(heat_all[rows_f].astype(np.float32)).to(dev)
        z_real = torch.from_numpy(lat[rows_r].astype(np.float32)).to(dev)
        emb = idents[torch.from_numpy(rng.choice(len(idents), b))].to(dev)
        x0 = torch.randn((b, *lat.shape[1:]), generator=gen).to(dev)
        with torch.no_grad():
            z_t = run_sampler(tvel, x0, heat_f, teacher.identity(emb))
        z_g = run_sampler(vel, x0, heat_f, model.identity(emb))

        # discriminator: hinge, real latents with their own heatmaps against the sampler's
        if tcfg.image:
            with torch.no_grad():
                real_img = model.decode(z_real, heat_r)
            fake_img = model.decode(z_g, heat_f)
        for k in range(tcfg.d_steps):
            if tcfg.image:
                lr_, _ = d(real_img)
                lf_, _ = d(fake_img.detach())
            else:
                real_in = condition(z_real, heat_r).requires_grad_(not tcfg.sn and step % 4 == 0 and k == 0)
                lr_, _ = d(real_in)
                lf_, _ = d(condition(z_g.detach(), heat_f))
            loss_d = F.relu(1 - lr_).mean() + F.relu(1 + lf_).mean()
            if not tcfg.image and real_in.requires_grad:   # lazy R1: 4x the penalty every 4th step
                g, = torch.autograd.grad(lr_.sum(), real_in, create_graph=True)
                loss_d = loss_d + 4 * 0.5 * tcfg.r1 * g.pow(2).flatten(1).sum(1).mean()
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()

        pool = tcfg.anchor_pool
        anchor = F.l1_loss(F.avg_pool2d(z_g, pool), F.avg_pool2d(z_t, pool))
        full = F.l1_loss(z_g, z_t)
        loss = tcfg.anchor * anchor + tcfg.anchor_full * full
        adv = torch.zeros(())
        if step >= tcfg.gan_start:
            for q in d.parameters():
                q.requires_grad_(False)
            lg, _ = d(fake_img if tcfg.image else condition(z_g, heat_f))
            for q in d.parameters():
                q.requires_grad_(True)
            adv = -lg.mean()
            loss = loss + tcfg.adv * adv
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(model)
        step += 1
        hist.log(step, loss_d=float(loss_d.detach()), adv=float(adv.detach()), anchor=float(anchor.detach()),
                 full=float(full.detach()), d_real=float(lr_.detach().mean()), d_fake=float(lf_.detach().mean()))
        if step % 20 == 0:
            el = time.time() - t_start
            print(f"step {step}: d {hist.mean_last('loss_d', 20):.3f} (real {hist.mean_last('d_real', 20):+.2f}, "
                  f"fake {hist.mean_last('d_fake', 20):+.2f}) adv {hist.mean_last('adv', 20):+.3f} "
                  f"anchor {hist.mean_last('anchor', 20):.4f} full {hist.mean_last('full', 20):.4f} "
                  f"({el / max(1, step - (ck['step'] if ck else 0)):.2f} s/step)", flush=True)
        if step % tcfg.ckpt_every == 0 or time.time() >= deadline:
            save_checkpoint(last, {"stage": "latent-adversarial", "train_config": asdict(tcfg), "step": step,
                                   "state": {"model": {k: v for k, v in model.state_dict().items() if k in keys}},
                                   "disc": d.state_dict(), "opt": opt.state_dict(), "opt_d": opt_d.state_dict(),
                                   "ema": ema.state_dict(), "history": hist.data})
        if step % tcfg.preview_every == 0 or time.time() >= deadline:
            _preview(run / f"preview_{step:06d}.png", teacher, ema.averaged(model).eval(), run_sampler,
                     px0, pheat, ptok_emb)
    print(f"stopped at step {step}", flush=True)


@torch.no_grad()
def _measure(n, student, teacher, crops, lms, lat, heat_all, idents, tcfg, sample, step) -> None:
    """Median uneven_skin (ΔE from a smooth light field, :func:`safefm.face.skin.uneven_skin`) and
    Laplacian energy (σ = 1 px, the face's skin) of n held conditions' faces, 128 px."""
    import cv2

    from safefm.face.skin import skin_region, uneven_skin

    rows = np.random.default_rng(999).choice(len(lat), n, replace=False)
    dev = teacher.latent_mean.device
    emb = idents[torch.from_numpy(np.random.default_rng(998).choice(len(idents), n))].to(dev)
    x0 = torch.randn((n, *lat.shape[1:]), generator=torch.Generator().manual_seed(997)).to(dev)
    heat = torch.from_numpy(heat_all[rows].astype(np.float32)).to(dev)

    def to_u8(x):
        return ((x + 1) * 127.5).clamp(0, 255).byte().permute(0, 2, 3, 1).cpu().numpy()

    def energy(img, lm):
        g = cv2.GaussianBlur(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).astype(np.float32), (0, 0), 1.0)
        return float(cv2.Laplacian(g, cv2.CV_32F)[skin_region(lm, img.shape[0])].var())

    faces = {"real crop": crops[rows],
             "its autoencoder round trip": to_u8(teacher.decode(torch.from_numpy(lat[rows].astype(np.float32)).to(dev), heat))}
    for name, m in (("starting model, 2 steps", teacher), (f"this run (step {step}), 2 steps", student)):
        def v(z, t, m=m):
            return m.velocity(z, torch.full((z.shape[0],), t, device=z.device), heat, m.identity(emb))
        faces[name] = to_u8(m.decode(sample(v, x0, tcfg.steps), heat))
    print(f"| faces ({n} held conditions, 128 px) | uneven skin (ΔE, median) | skin detail (Laplacian energy, median) |")
    print("|---|---|---|")
    for name, imgs in faces.items():
        u = np.nanmedian([uneven_skin(im, lm) for im, lm in zip(imgs, lms[rows])])
        e = np.median([energy(im, lm) for im, lm in zip(imgs, lms[rows])])
        print(f"| {name} | {u:.2f} | {e:.1f} |")


@torch.no_grad()
def _preview(path: Path, teacher, student, run_sampler, x0, heat, emb) -> None:
    """Teacher's (top) and student's (bottom) decoded faces for the fixed preview conditions."""
    import cv2

    rows = []
    for m in (teacher, student):
        z = run_sampler(m.velocity, x0, heat, m.identity(emb))
        img = ((m.decode(z, heat) + 1) * 127.5).clamp(0, 255).byte().permute(0, 2, 3, 1).cpu().numpy()
        rows.append(np.concatenate(list(img), 1))
    cv2.imwrite(str(path), cv2.cvtColor(np.concatenate(rows, 0), cv2.COLOR_RGB2BGR))


if __name__ == "__main__":
    main()
