"""Research: the adversarial heatmap decoder on a ``--stage ae`` checkpoint (not a weights file).

``scripts/train.py --stage heat-decoder --detail adv=...`` fine-tunes the decoder of a shipped
weights file. Before any flow stage is retrained on a new autoencoder, the question is whether
its decoder *can* draw a face that looks filmed: this runs the same fine-tune
(:func:`safefm.train.heat_decoder.train_heat_decoder`: frozen encoder, the decoder also reading
the crop's heatmaps, L1 / gradient / colour terms, a patch discriminator from scratch with hinge
loss and feature matching) on the autoencoder checkpoint directly. Resumable (``--run``/last.pt).
``research/probe_look_ceiling.py --ae AE+RUN/last.pt`` then pastes its round trips into whole
frames.

    .venv/bin/python research/ae_adversarial.py --ae runs/s28/route/ae/last.pt --run runs/s28/adv \
        --minutes 35 [--detail "adv=0.1,fm=1.0"]
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
from pathlib import Path


def _train_script():
    """``scripts/train.py`` as a module (its ``--detail`` parser, ``_field_overrides``, is shared)."""
    path = Path(__file__).resolve().parents[1] / "scripts" / "train.py"
    spec = importlib.util.spec_from_file_location("safefm_train_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ae", required=True, help="a scripts/train.py --stage ae checkpoint")
    ap.add_argument("--run", required=True, help="folder for this fine-tune's last.pt")
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--detail", default="adv=0.1,fm=1.0", help="HeatDecoderTrainConfig overrides, k=v,...")
    args = ap.parse_args()

    import torch

    from safefm.train.autoencoder import load_autoencoder
    from safefm.train.common import load_checkpoint
    from safefm.train.data import load_shards
    from safefm.train.heat_decoder import HeatDecoderTrainConfig, train_heat_decoder

    torch.set_num_threads(args.threads)
    ck = load_checkpoint(args.ae)
    model = load_autoencoder(ck)
    sha = hashlib.sha256(Path(args.ae).read_bytes()).hexdigest()
    tcfg = _train_script()._field_overrides(HeatDecoderTrainConfig(), args.detail, "--detail")
    data = load_shards(keys=("crops", "landmarks"))
    print(f"autoencoder {args.ae} (step {ck['step']}, sha256 {sha[:12]}) on {len(data['crops'])} crops; {tcfg}",
          flush=True)
    train_heat_decoder(model, sha, tcfg, data, run_dir=Path(args.run), max_minutes=args.minutes)


if __name__ == "__main__":
    main()
