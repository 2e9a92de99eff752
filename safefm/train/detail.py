"""Training the 2x detail stage (:class:`safefm.models.DetailNet`) adversarially.

The shipped generator draws faces at 128 px; a face on a talking-head frame is 300-400 px.
The training photos hold real detail only up to about 128 px of aligned crop (UTKFace's 200 px
chips, LFW's ~110 px faces), so the stage is trained one octave down, where targets are
sharp, and run one octave up (it is fully convolutional): 64 -> 128 px in training, 128 ->
256 px in the product.

Two kinds of batch (``sampled_fraction`` of them from the product's own outputs):

- **real** crops ``x`` (B, 3, 128, 128): input ``degrade(x)`` = a 2x downscale blurred by a
  random Gaussian (sigma drawn from ``blur`` in input pixels: the sampler's output at 128 px is
  about as soft as a real crop blurred by sigma ~1.2) plus a little noise; loss = L1 to ``x``
  + feature matching (L1 between the discriminator's features of output and target) +
  adversarial (hinge);
- **sampled**: what the 4-step sampler and decoder actually produce (colour matched, as the
  engine pastes them), degraded the same way; no target exists (another identity), so the loss
  is consistency (the output, downscaled, must give back the input) + adversarial.
  With ``coarse`` > 0 these batches run at the product's own scale instead: the 128 px output
  is the input (128 -> 256 px, as the engine runs it), the discriminator reads the output
  downscaled 2x (the real crops' scale, where the sampler's blotches and marbling live), and
  the consistency is mostly read at 1/``coarse`` of the input's resolution
  (:func:`coarse_consistency`), so the stage may redraw skin and texture but not move a feature.

The discriminator is a patch discriminator trained from scratch (spectral norm, hinge loss).
Everything runs on tensors on one device (augmentation included), so a GPU is fed without a
data loader. Pure functions for the image maths; :func:`train_detail` owns the loop.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..models import DetailNet


@dataclass(frozen=True)
class DetailTrainConfig:
    width: int = 32
    blocks: int = 2
    steps: int = 30000
    batch: int = 32
    lr: float = 2e-4
    d_lr: float = 2e-4
    l1: float = 1.0
    fm: float = 2.0
    adv: float = 0.05
    consistency: float = 1.0
    blur: tuple[float, float] = (0.4, 1.6)   # input-pixel sigma of the degradation
    noise: float = 0.01                      # std of the added noise (images in [-1, 1])
    sampled_fraction: float = 0.25
    coarse: int = 0                          # > 0: sampled batches at the product's scale, read at 1/coarse (below)
    coarse_weight: float = 1.0               # weight of that coarse consistency
    gan_start: int = 500                     # steps of L1 only before the discriminator joins
    d_width: int = 32                        # the patch discriminator's first width
    patch: int = 32                          # train on random patch x patch input crops (0 = whole)
    holdout: int = 256
    seed: int = 0


# -- pure image maths ------------------------------------------------------------------------
def gaussian_kernels(sigma: torch.Tensor, radius: int = 4) -> torch.Tensor:
    """Per-sample normalised 1-D Gaussian kernels: sigma (B,) -> (B, 2 * radius + 1)."""
    x = torch.arange(-radius, radius + 1, device=sigma.device, dtype=torch.float32)
    k = torch.exp(-(x[None] ** 2) / (2 * sigma.clamp_min(1e-3)[:, None] ** 2))
    return k / k.sum(1, keepdim=True)


def blur(x: torch.Tensor, sigma: torch.Tensor, radius: int = 4) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W) with one sigma per sample (B,); reflect padding."""
    b, c, h, w = x.shape
    k = gaussian_kernels(sigma, radius)                                   # (B, K)
    kk = k.repeat_interleave(c, 0)                                        # (B*C, K)
    y = F.pad(x.reshape(1, b * c, h, w), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, kk[:, None, None, :], groups=b * c)
    y = F.conv2d(y, kk[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


def downscale2(x: torch.Tensor) -> torch.Tensor:
    """2x area downscale (B, C, H, W) -> (B, C, H/2, W/2)."""
    return F.avg_pool2d(x, 2)


def degrade(x: torch.Tensor, sigma: torch.Tensor, noise: float, gen: torch.Generator | None = None) -> torch.Tensor:
    """The stage's training input for a sharp image x (B, 3, S, S): 2x downscale, Gaussian blur
    of ``sigma`` (B,) input pixels, additive noise of std ``noise``. -> (B, 3, S/2, S/2)."""
    y = blur(downscale2(x), sigma)
    if noise > 0:
        y = y + noise * torch.randn(y.shape, generator=gen, device=y.device)
    return y.clamp(-1, 1)


def coarse_consistency(y: torch.Tensor, inp: torch.Tensor, coarse: int) -> torch.Tensor:
    """L1 between the 2x output y (B, 3, 2S, 2S) and its input inp (B, 3, S, S), both
    area-averaged to S / ``coarse`` px: 0 when y keeps inp's coarse layout whatever its detail."""
    return F.l1_loss(F.avg_pool2d(y, 2 * coarse), F.avg_pool2d(inp, coarse))


def laplacian_energy(x: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """Variance of the Laplacian of the (sigma-blurred) luma of (B, 3, H, W): (B,). Grain a 1 px
    Gaussian removes does not count (the eval's sharpness measure, on tensors)."""
    luma = (0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    luma = blur(luma, torch.full((x.shape[0],), sigma, device=x.device))
    lap = torch.tensor([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=x.dtype, device=x.device)
    r = F.conv2d(luma, lap[None, None])[:, :, 2:-2, 2:-2]
    return r.flatten(1).var(1)


def augment(x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
    """Random flips, brightness / contrast / saturation jitter and 1 in 8 grey-scale, on
    (B, 3, H, W) in [-1, 1] (the same jitter for an input and its target: applied before
    :func:`degrade`)."""
    b, dev = x.shape[0], x.device
    r = torch.rand(b, 5, generator=gen, device=dev)
    flip = r[:, 0] < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    mean = x.mean((1, 2, 3), keepdim=True)
    x = (x - mean) * (0.8 + 0.4 * r[:, 1, None, None, None]) + mean + 0.2 * (r[:, 2, None, None, None] - 0.5)
    grey = x.mean(1, keepdim=True)
    sat = (0.7 + 0.6 * r[:, 3, None, None, None]) * (r[:, 4, None, None, None] >= 0.125)
    return (grey + (x - grey) * sat).clamp(-1, 1)


# -- the discriminator -------------------------------------------------------------------------
class PatchDiscriminator(nn.Module):
    """Patch discriminator: (B, 3, H, W) -> per-patch logits (B, 1, H/8, W/8) and the list of
    intermediate features (for feature matching). Spectral norm on every convolution."""

    def __init__(self, width: int = 48):
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm
        w = width
        self.blocks = nn.ModuleList([
            nn.Sequential(sn(nn.Conv2d(3, w, 4, 2, 1)), nn.LeakyReLU(0.2)),
            nn.Sequential(sn(nn.Conv2d(w, 2 * w, 4, 2, 1)), nn.LeakyReLU(0.2)),
            nn.Sequential(sn(nn.Conv2d(2 * w, 4 * w, 4, 2, 1)), nn.LeakyReLU(0.2)),
            nn.Sequential(sn(nn.Conv2d(4 * w, 4 * w, 3, 1, 1)), nn.LeakyReLU(0.2)),
        ])
        self.out = sn(nn.Conv2d(4 * w, 1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        feats = []
        for blk in self.blocks:
            x = blk(x)
            feats.append(x)
        return self.out(x), feats


def discriminator_step(d: nn.Module, opt: torch.optim.Optimizer, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """One hinge-loss step of patch discriminator ``d`` (with its optimiser ``opt``): ``real``
    (B, 3, H, W) images against ``fake`` (B', 3, H, W; detached here). Returns the loss."""
    lr_, _ = d(real)
    lf_, _ = d(fake.detach())
    loss = F.relu(1 - lr_).mean() + F.relu(1 + lf_).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


def feature_matching(fake: list[torch.Tensor], real: list[torch.Tensor]) -> torch.Tensor:
    """Mean L1 between matching discriminator features (real ones detached)."""
    return sum(F.l1_loss(f, r.detach()) for f, r in zip(fake, real)) / len(fake)


# -- data --------------------------------------------------------------------------------------
def to_tensor(images: np.ndarray, device) -> torch.Tensor:
    """(N, S, S, 3) uint8 -> (N, 3, S, S) float32 in [-1, 1] on ``device``."""
    t = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    return t.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def encode_pack(images: np.ndarray, quality: int = 94) -> dict[str, np.ndarray]:
    """(N, S, S, 3) uint8 RGB -> JPEG bytes concatenated + offsets (a small, pickle-free npz)."""
    import cv2

    blobs = [cv2.imencode(".jpg", im[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])[1].ravel() for im in images]
    offsets = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
    return {"jpeg": np.concatenate(blobs).astype(np.uint8), "offsets": offsets}


def decode_pack(jpeg: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Inverse of :func:`encode_pack`: -> (N, S, S, 3) uint8 RGB."""
    import cv2

    return np.stack([cv2.imdecode(jpeg[a:b], cv2.IMREAD_COLOR)[..., ::-1]
                     for a, b in zip(offsets[:-1], offsets[1:])])


# -- the loop ----------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(g: DetailNet, x: torch.Tensor, tcfg: DetailTrainConfig, batch: int = 64) -> dict[str, float]:
    """Held-out real crops x (N, 3, S, S): PSNR of the output against x, and the Laplacian
    energy of output and bilinear baseline relative to x (1 = as sharp as the real crop), at the
    middle of the blur range."""
    gen = torch.Generator(device=x.device).manual_seed(123)
    psnr, e_out, e_lin, e_ref = [], [], [], []
    mid = sum(tcfg.blur) / 2
    for i in range(0, len(x), batch):
        xb = x[i:i + batch]
        inp = degrade(xb, torch.full((len(xb),), mid, device=x.device), tcfg.noise, gen)
        y = g(inp).clamp(-1, 1)
        lin = F.interpolate(inp, scale_factor=2, mode="bilinear", align_corners=False)
        mse = ((y - xb) ** 2).flatten(1).mean(1)
        psnr.append(10 * torch.log10(4.0 / mse.clamp_min(1e-10)))
        e_out.append(laplacian_energy(y)), e_lin.append(laplacian_energy(lin)), e_ref.append(laplacian_energy(xb))
    e_ref = torch.cat(e_ref)
    return {"psnr": float(torch.cat(psnr).mean()),
            "energy": float((torch.cat(e_out) / e_ref).log().mean().exp()),
            "energy_bilinear": float((torch.cat(e_lin) / e_ref).log().mean().exp())}


def _window(n: int, size: int, gen: torch.Generator, device) -> tuple[int, int]:
    """A random (oy, ox) for an ``n`` px window inside ``size`` px (one for the whole batch)."""
    return tuple(int(v) for v in torch.randint(size - n + 1, (2,), generator=gen, device=device))


def _real_window(x_train: torch.Tensor, b: int, oy: int, ox: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """``b`` augmented real crops, cut at the window (oy, ox, n): the discriminator's real side."""
    idx = torch.randint(len(x_train), (b,), generator=gen, device=x_train.device)
    return augment(x_train[idx], gen)[:, :, oy:oy + n, ox:ox + n]


def _scaled_down_step(g, d, opt_d, x, x_train, use_sampled: bool, gan: bool, tcfg: DetailTrainConfig,
                      gen: torch.Generator):
    """One step one octave down (64 -> 128 px) on a batch x (B, 3, S, S): a real crop's L1 +
    feature matching, or a product output's consistency; the discriminator step when ``gan``.
    -> (generator loss, reconstruction loss, discriminator loss or None)."""
    lo, hi = tcfg.blur
    sigma = lo + (hi - lo) * torch.rand(x.shape[0], generator=gen, device=x.device)
    inp = degrade(x, sigma, tcfg.noise, gen)
    p = tcfg.patch if 0 < tcfg.patch < inp.shape[-1] else inp.shape[-1]
    oy, ox = _window(p, inp.shape[-1], gen, x.device)
    inp = inp[:, :, oy:oy + p, ox:ox + p]          # one random window for the batch (convolutional nets)
    x = x[:, :, 2 * oy:2 * (oy + p), 2 * ox:2 * (ox + p)]
    y = g(inp)
    loss_d = None
    if gan:   # discriminator: real crops against outputs (hinge)
        xr = _real_window(x_train, x.shape[0], 2 * oy, 2 * ox, 2 * p, gen) if use_sampled else x
        loss_d = discriminator_step(d, opt_d, xr, y)
    if use_sampled:
        loss_rec = tcfg.consistency * F.l1_loss(blur(downscale2(y), sigma), inp)
    else:
        loss_rec = tcfg.l1 * F.l1_loss(y, x)
    loss_g = loss_rec
    if gan:
        lf, ff = d(y)
        loss_g = loss_g + tcfg.adv * -lf.mean()
        if not use_sampled:
            _, fr = d(x)
            loss_g = loss_g + tcfg.fm * feature_matching(ff, fr)
    return loss_g, loss_rec, loss_d


def _product_scale_step(g, d, opt_d, x, x_train, use_sampled: bool, gan: bool, tcfg: DetailTrainConfig,
                        gen: torch.Generator):
    """One step on product outputs x (B, 3, S, S) at the product's scale (S -> 2S px, as the
    engine runs the stage): the discriminator judges the output downscaled 2x against real crops
    at the same window; the output must keep the input's layout at 1/``coarse`` (and, weighted
    by ``consistency``, at full resolution). -> as :func:`_scaled_down_step`."""
    p = min(2 * tcfg.patch, x.shape[-1]) if tcfg.patch > 0 else x.shape[-1]
    oy, ox = _window(p, x.shape[-1], gen, x.device)
    inp = x[:, :, oy:oy + p, ox:ox + p]
    y = g(inp)
    ys = downscale2(y)
    loss_d = discriminator_step(d, opt_d, _real_window(x_train, x.shape[0], oy, ox, p, gen), ys) if gan else None
    loss_rec = (tcfg.consistency * F.l1_loss(ys, inp)
                + tcfg.coarse_weight * coarse_consistency(y, inp, tcfg.coarse))
    loss_g = loss_rec
    if gan:
        lf, _ = d(ys)
        loss_g = loss_g + tcfg.adv * -lf.mean()
    return loss_g, loss_rec, loss_d


def train_detail(real: np.ndarray, sampled: np.ndarray | None, tcfg: DetailTrainConfig, out_dir: Path, *,
                 device: str = "cpu", max_minutes: float = 60.0, log_every: int = 200) -> dict:
    """Train a DetailNet on real crops (N, S, S, 3) uint8 (+ product outputs (M, S, S, 3) uint8
    or None). Resumes from ``out_dir/last.pt``; writes it every ``log_every`` steps and at the
    end. Returns the final checkpoint dict (``detail`` state, config, history, held-out eval)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(tcfg.seed)
    if str(device).startswith("cuda"):
        torch.backends.cudnn.benchmark = True
    gen = torch.Generator(device=device).manual_seed(tcfg.seed)
    x_all = to_tensor(real, device)
    x_hold, x_train = x_all[:tcfg.holdout], x_all[tcfg.holdout:]
    s_train = to_tensor(sampled, device) if sampled is not None and len(sampled) else None
    g, d = DetailNet(tcfg.width, tcfg.blocks).to(device), PatchDiscriminator(tcfg.d_width).to(device)
    opt_g = torch.optim.Adam(g.parameters(), lr=tcfg.lr, betas=(0.5, 0.99))
    opt_d = torch.optim.Adam(d.parameters(), lr=tcfg.d_lr, betas=(0.5, 0.99))
    step, history = 0, []
    last = out_dir / "last.pt"
    if last.exists():
        ck = torch.load(last, map_location=device, weights_only=True)
        g.load_state_dict(ck["detail"]), d.load_state_dict(ck["disc"])
        opt_g.load_state_dict(ck["opt_g"]), opt_d.load_state_dict(ck["opt_d"])
        step, history = int(ck["step"]), list(ck["history"])

    def save(evaluation: dict | None = None) -> dict:
        ck = {"detail": g.state_dict(), "disc": d.state_dict(), "opt_g": opt_g.state_dict(),
              "opt_d": opt_d.state_dict(), "step": step, "history": history,
              "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(tcfg).items()},
              "eval": evaluation or {}}
        tmp = last.with_suffix(".tmp")
        torch.save(ck, tmp)
        tmp.replace(last)
        return ck

    t_end = time.time() + 60 * max_minutes
    while step < tcfg.steps and time.time() < t_end:
        use_sampled = s_train is not None and torch.rand(1, generator=gen, device=device).item() < tcfg.sampled_fraction
        pool = s_train if use_sampled else x_train
        idx = torch.randint(len(pool), (tcfg.batch,), generator=gen, device=device)
        x = augment(pool[idx], gen)
        gan = step >= tcfg.gan_start
        take = _product_scale_step if use_sampled and tcfg.coarse > 0 else _scaled_down_step
        loss_g, loss_rec, loss_d = take(g, d, opt_d, x, x_train, use_sampled, gan, tcfg, gen)
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        step += 1
        if step % log_every == 0 or step == tcfg.steps:
            ev = evaluate(g.eval(), x_hold, tcfg)
            g.train()
            history.append({"step": step, "loss_g": loss_g.item(), "loss_rec": loss_rec.item(),
                            "loss_d": loss_d.item() if loss_d is not None else math.nan, **ev})
            print(f"step {step}: g {loss_g.item():.4f} rec {loss_rec.item():.4f} "
                  f"psnr {ev['psnr']:.2f} energy {ev['energy']:.3f} (bilinear {ev['energy_bilinear']:.3f})",
                  flush=True)
            save(ev)
    ev = evaluate(g.eval(), x_hold, tcfg)
    return save(ev)


# -- the pack (what --stage detail trains on) and the export ----------------------------------
def product_outputs(photos: list[Path], n: int, source: str = "default", seed: int = 5) -> np.ndarray:
    """What the engine pastes (decoded, colour-matched 128 px crops) for ``n`` of ``photos``,
    each worn by another identity (the shipped ones, half with an embedding drawn from the
    shipped identity sampler). -> (n', S, S, 3) uint8, n' <= n (photos without a face skipped)."""
    from ..config import RuntimeConfig
    from ..engine import build_engine
    from ..face import composite
    from ..identity import Identity, load_identity
    from ..identity_sampler import IdentitySampler
    from ..media import read_image
    from ..paths import REPO_ROOT, resolve_model_path

    rng = np.random.default_rng(seed)
    # detail stage off: what the stage itself is given (the 128 px crop, before any 2x)
    engine = build_engine(RuntimeConfig(identity_repel=0.0, detail_min_px=0), resolve_model_path(source), video=False)
    weights = REPO_ROOT / "weights"
    idents = [load_identity(p, engine.mcfg.identity_dim) for p in sorted((weights / "identities").glob("*.pt"))]
    sampler = IdentitySampler.load(weights / "identity_sampler.safetensors")
    got: list[np.ndarray] = []
    paste = composite.paste

    def grab(*args, **kw):   # the crop the engine pastes (its 2nd argument), as it pastes it
        got.append(args[1].copy())
        return paste(*args, **kw)

    outputs = []
    composite.paste = grab
    try:
        for j, path in enumerate(photos):
            if len(outputs) >= n:
                break
            base = idents[j % len(idents)]
            emb = sampler.sample(rng) if j % 2 else base.embedding
            engine.set_identity(Identity(np.asarray(emb, np.float32), base.shape, int(rng.integers(1 << 30))))
            engine.reset()
            got.clear()
            engine.process(read_image(path))
            if len(got) == 1:
                outputs.append(got[0])
    finally:
        composite.paste = paste
    return np.stack(outputs)


def write_pack(path: Path, *, real: int, sampled: int, source: str = "default", seed: int = 5) -> Path:
    """Pack ``real`` training crops and ``sampled`` product outputs (on other training photos)
    as JPEG bytes in one pickle-free npz (small enough to carry to a GPU machine)."""
    from ..paths import shared_data_dir
    from .data import finished_shards, load_shards

    data = load_shards(finished_shards(), keys=["crops", "path"])
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(data["crops"]))
    crops = data["crops"][order[:real]]
    photos = [shared_data_dir() / data["path"][i] for i in order[real:]]
    outs = product_outputs(photos, sampled, source=source, seed=seed)
    r, s = encode_pack(crops, 92), encode_pack(outs, 92)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, real_jpeg=r["jpeg"], real_offsets=r["offsets"], sampled_jpeg=s["jpeg"],
             sampled_offsets=s["offsets"])
    tmp.replace(path)
    return path


def read_pack(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(real crops, product outputs), each (N, S, S, 3) uint8, from :func:`write_pack`'s file."""
    with np.load(path, allow_pickle=False) as z:
        return (decode_pack(z["real_jpeg"], z["real_offsets"]),
                decode_pack(z["sampled_jpeg"], z["sampled_offsets"]))


def export_detail(source: str, checkpoint: Path, out: Path) -> Path:
    """Write ``source``'s model (name or path) with the trained detail stage of ``checkpoint``
    to ``out`` (the other weights unchanged; the training summary extended)."""
    import dataclasses
    import json

    from ..checkpoint import load_model, save_model
    from ..models import SafeFMModel
    from ..paths import resolve_model_path

    src = resolve_model_path(source)
    model, meta = load_model(src)
    ck = torch.load(checkpoint, map_location="cpu", weights_only=True)
    cfg = dataclasses.replace(model.cfg, detail_width=int(ck["config"]["width"]),
                              detail_blocks=int(ck["config"]["blocks"]))
    new = SafeFMModel(cfg, with_controlnet=model.controlnet is not None,
                      with_lora=any("lora_" in k for k in model.state_dict()))
    new.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("detail.")}, strict=False)
    new.detail.load_state_dict(ck["detail"])
    training = json.loads(meta.get("training") or "{}")
    training["detail"] = {"from_sha256": meta["sha256"], "steps": ck["step"], "config": ck["config"],
                          "heldout": ck.get("eval", {})}
    extra = {k: meta[k] for k in ("license",) if k in meta}
    return save_model(new.eval(), out, extra_meta={**extra, "training": json.dumps(training)})
