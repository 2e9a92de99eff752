"""Research: quantization-aware fine-tuning of the decoder for onnxruntime int8 (issue 15).

The int8 decoder (static QDQ, ``safefm.quantize``) costs half the float one but adds
frame-to-frame flicker (session 14: +17 % on the camera path). Here a copy of the decoder is
fine-tuned with the int8 arithmetic simulated (fake quantization with straight-through
gradients: int8 per-channel symmetric weights, uint8 per-tensor activations at every
quantized convolution's input and output, ranges = onnxruntime's MinMax calibration on
``safefm.quantize.calibration_feeds``, refreshed as the weights move), to match the float
decoder (the teacher, frozen) on generator latents, and to match its *change* between two
nearby inputs (the same face with its landmarks jittered: what flicker is made of).

The first and last convolutions stay float (as onnxruntime is told: session 14's best variant).

    .venv/bin/python research/qat_decoder.py --minutes 30 --out runs/qat
    -> runs/qat/decoder_qat.safetensors (the decoder's weights, ``autoencoder.decoder.*``)
"""
from __future__ import annotations

import argparse
import glob
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def fq_act(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """uint8 asymmetric fake quantization over [lo, hi] (lo <= 0 <= hi), straight-through."""
    scale = max(hi - lo, 1e-8) / 255.0
    zp = round(-lo / scale)
    q = torch.clamp(torch.round(x / scale) + zp, 0, 255)
    return x + ((q - zp) * scale - x).detach()


def fq_weight(w: torch.Tensor) -> torch.Tensor:
    """int8 symmetric per-output-channel fake quantization, straight-through."""
    m = w.detach().abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-8)
    scale = m / 127.0
    return w + (torch.clamp(torch.round(w / scale), -127, 127) * scale - w).detach()


class QConv(nn.Module):
    """A Conv2d whose input, weights and output go through int8 fake quantization."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv
        self.rin = [0.0, 1.0]
        self.rout = [0.0, 1.0]
        self.quant = True
        self.observe = False

    def forward(self, x):
        if self.observe:
            self.rin = [min(self.rin[0], float(x.min())), max(self.rin[1], float(x.max()))]
        if self.quant:
            x = fq_act(x, *self.rin)
            w = fq_weight(self.conv.weight)
        else:
            w = self.conv.weight
        y = F.conv2d(x, w, self.conv.bias, self.conv.stride, self.conv.padding)
        if self.observe:
            self.rout = [min(self.rout[0], float(y.min())), max(self.rout[1], float(y.max()))]
        return fq_act(y, *self.rout) if self.quant else y


def wrap_convs(dec: nn.Module) -> list[QConv]:
    """Replace every Conv2d of ``dec`` but the first and the last (in forward order) by a QConv."""
    convs = [(name, m) for name, m in dec.named_modules() if isinstance(m, nn.Conv2d)]
    # forward order: layers[0] first ... the final conv before the pixel shuffle last; the heat
    # branch (a separate Sequential) runs at the last stage: order by name is not forward order.
    first = "layers.0"
    last = max((n for n, _ in convs if n.startswith("layers.")), key=lambda n: int(n.split(".")[1]))
    out = []
    for name, m in convs:
        if name in (first, last):
            continue
        parent = dec.get_submodule(name.rsplit(".", 1)[0])
        q = QConv(m)
        setattr(parent, name.rsplit(".", 1)[1], q)
        out.append(q)
    return out


def calibrate(model, qconvs, feeds) -> None:
    """onnxruntime MinMax ranges (each including 0) of every QConv's input and output on ``feeds``."""
    for q in qconvs:
        q.rin, q.rout, q.observe, q.quant = [0.0, 0.0], [0.0, 0.0], True, False
    with torch.no_grad():
        for f in feeds:
            model.decode(torch.from_numpy(f["z"]), torch.from_numpy(f["heat"]))
    for q in qconvs:
        q.observe, q.quant = False, True


def make_inputs(gen, n: int, seed: int, jitter: float):
    """n pairs of decoder inputs (z, heat), (z', heat'): training landmarks, a shipped identity's
    tokens and a random noise; the second with the landmarks jittered by ``jitter`` crop pixels."""
    from safefm.face import heatmaps
    from safefm.identity import load_identity
    from safefm.paths import identities_dir

    mc = gen.model_cfg
    rng = np.random.default_rng(seed)
    lms = []
    for f in sorted(glob.glob("data_cache/shards/shard_*.npz"))[:3]:
        with np.load(f, allow_pickle=False) as z:
            lms.append(z["landmarks"].astype(np.float32))
    lms = np.concatenate(lms)
    ids = [load_identity(p, mc.identity_dim) for p in sorted(identities_dir().glob("*.pt"))]
    toks = [gen.identity_tokens(i.embedding) for i in ids]
    Z, H, Z2, H2 = [], [], [], []
    for k in range(n):
        lm = lms[rng.integers(len(lms))]
        lm2 = lm + rng.normal(0, jitter, lm.shape).astype(np.float32) + rng.normal(0, jitter, (1, 3)).astype(np.float32)
        h = heatmaps.render_heatmaps(lm, mc.image_size, mc.heatmap_size)
        h2 = heatmaps.render_heatmaps(lm2, mc.image_size, mc.heatmap_size)
        tok = toks[rng.integers(len(toks))]
        noise = torch.from_numpy(rng.standard_normal((1,) + tuple(mc.latent_shape)).astype(np.float32))
        Z.append(gen.generate(h, tok, noise, guidance=1.0).numpy())
        Z2.append(gen.generate(h2, tok, noise, guidance=1.0).numpy())
        H.append(h[None]); H2.append(h2[None])
    return [torch.from_numpy(np.concatenate(a)) for a in (Z, H, Z2, H2)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--pairs", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--delta-weight", type=float, default=4.0)
    ap.add_argument("--jitter", type=float, default=0.5, help="landmark jitter of a pair, crop pixels")
    ap.add_argument("--recal-every", type=int, default=100)
    ap.add_argument("--out", default="runs/qat")
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)

    import safefm.quantize as Q
    from safefm.checkpoint import load_model
    from safefm.config import load_runtime_config
    from safefm.engine import build_engine
    from safefm.identity import load_identity
    from safefm.paths import identities_dir

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    eng = build_engine(load_runtime_config(runtime="onnx"), video=True)
    gen = eng.gen
    shipped = [load_identity(p, gen.model_cfg.identity_dim) for p in sorted(identities_dir().glob("*.pt"))]
    feeds = Q.calibration_feeds(gen, shipped)["decoder"]
    t0 = time.time()
    Z, H, Z2, H2 = make_inputs(gen, args.pairs, 0, args.jitter)
    print(f"{len(Z)} input pairs in {time.time() - t0:.0f} s", flush=True)

    teacher, _ = load_model("weights/safefm_default.safetensors")
    student, _ = load_model("weights/safefm_default.safetensors")
    teacher.requires_grad_(False)
    student.requires_grad_(False)
    dec = student.autoencoder.decoder
    qconvs = wrap_convs(dec)
    print(f"{len(qconvs)} convolutions fake-quantized", flush=True)
    for p in dec.parameters():
        p.requires_grad_(True)
    calibrate(student, qconvs, feeds)
    opt = torch.optim.AdamW([p for p in dec.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    with torch.no_grad():
        T, T2 = [], []
        for i in range(0, len(Z), 32):
            T.append(teacher.decode(Z[i:i + 32], H[i:i + 32]))
            T2.append(teacher.decode(Z2[i:i + 32], H2[i:i + 32]))
        T, T2 = torch.cat(T), torch.cat(T2)
    hold = slice(len(Z) - 64, len(Z))

    def evaluate():
        with torch.no_grad():
            y = student.decode(Z[hold], H[hold])
            y2 = student.decode(Z2[hold], H2[hold])
            return (float((y - T[hold]).abs().mean()),
                    float(((y2 - y) - (T2[hold] - T[hold])).abs().mean()),
                    float((T2[hold] - T[hold]).abs().mean()))
    print("before: err %.4f  delta err %.4f  (teacher delta %.4f)" % evaluate(), flush=True)
    rng = np.random.default_rng(1)
    end = time.time() + args.minutes * 60
    step = 0
    ntrain = len(Z) - 64
    while time.time() < end:
        idx = torch.from_numpy(rng.integers(0, ntrain, args.batch))
        y = student.decode(Z[idx], H[idx])
        y2 = student.decode(Z2[idx], H2[idx])
        loss = (y - T[idx]).abs().mean() + args.delta_weight * ((y2 - y) - (T2[idx] - T[idx])).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % args.recal_every == 0:
            calibrate(student, qconvs, feeds)
            print(f"step {step} loss {loss.item():.4f}  eval err %.4f delta %.4f (teacher %.4f)" % evaluate(),
                  flush=True)
    calibrate(student, qconvs, feeds)
    print(f"after {step} steps: err %.4f  delta err %.4f  (teacher delta %.4f)" % evaluate(), flush=True)
    # unwrap and save the decoder's float weights
    for name, m in list(dec.named_modules()):
        if isinstance(m, QConv):
            parent = dec.get_submodule(name.rsplit(".", 1)[0])
            setattr(parent, name.rsplit(".", 1)[1], m.conv)
    from safetensors.torch import save_file
    save_file({f"autoencoder.decoder.{k}": v.contiguous() for k, v in dec.state_dict().items()},
              str(out / "decoder_qat.safetensors"))
    print("saved", out / "decoder_qat.safetensors", flush=True)


if __name__ == "__main__":
    main()
