#!/usr/bin/env python
"""Train the SAFE-FM default model in stages (CPU-friendly, resumable, config in every checkpoint).

    python scripts/train.py --stage ae       --max-minutes 20   # autoencoder + latent stats
    python scripts/train.py --stage cache                       # encode crops once -> data_cache/latents.npz
    python scripts/train.py --stage from-weights --from default --objective diffusion --runs runs/twin
                                                                # a shipped model's frozen parts as runs/twin/ae
    python scripts/train.py --stage decoder  --max-minutes 20   # (optional) faster decoder on the frozen latents
    python scripts/train.py --stage base     --max-minutes 20   # UNet + identity projector (flow matching)
    python scripts/train.py --stage adapters --max-minutes 20   # ControlNet + LoRA, base frozen
    python scripts/train.py --stage sampler                     # identity sampler over dlib embeddings
    python scripts/train.py --stage export   [--out weights/safefm_default.safetensors]
    python scripts/train.py --stage preview                     # runs/preview_*.png (recon + samples)
    python scripts/train.py --stage detail-data                 # data_cache/detail_pack.npz: crops + product outputs
    python scripts/train.py --stage detail --device cuda --max-minutes 7   # 2x detail stage (patch GAN)
    python scripts/train.py --stage detail-export --from default --out weights/safefm_default.safetensors
    python scripts/train.py --stage reflow --from default --max-minutes 25   # one reflow pass (straighter paths)
    python scripts/train.py --stage reflow-export --from default --out weights/safefm_reflow.safetensors
    python scripts/train.py --stage context --from default --max-minutes 30   # adapters read the frame around the face
    python scripts/train.py --stage context-export --from default --out weights/safefm_context.safetensors
    python scripts/train.py --stage decoder-data --sampled 800  # data_cache/decoder_sampled.npz: the sampler's latents
    python scripts/train.py --stage heat-decoder --from default --max-minutes 40 \
        --out weights/safefm_default.safetensors               # decoder that also reads the heatmaps (eyelids)

On GPUs the flow stages run data parallel under ``accelerate launch`` (or ``torchrun``)::

    accelerate launch --multi_gpu --num_processes 2 scripts/train.py --stage base --threads 0
    accelerate launch --num_processes 1 --mixed_precision bf16 scripts/train.py --stage adapters

Each stage continues from ``runs/<stage>/last.pt`` unless ``--fresh``; ``--max-minutes``
bounds the wall clock of this invocation; run it again to continue. ``--stage ae`` also
builds the latent cache when it finishes (``--no-cache`` to skip).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

STAGES = ("ae", "from-weights", "cache", "decoder", "base", "adapters", "sampler", "export", "preview", "heat-decoder",
          "detail-data", "detail", "detail-export", "reflow", "reflow-export",
          "context", "context-export", "decoder-data")


def _overrides(tcfg, a):
    vals = {k: getattr(a, k) for k in ("batch", "lr", "max_steps") if getattr(a, k) is not None}
    return dataclasses.replace(tcfg, **vals)


def _field_overrides(tcfg, text: str, flag: str):
    """``tcfg`` with the ``'name=value,...'`` overrides of ``text`` (a tuple as ``a/b``)."""
    fields = {f.name: f.type for f in dataclasses.fields(tcfg)}
    over = {}
    for kv in (kv for kv in text.split(",") if kv.strip()):
        k, _, v = kv.partition("=")
        k = k.strip()
        if k not in fields:
            raise SystemExit(f"{flag}: unknown field {k!r} (fields: {', '.join(fields)})")
        over[k] = tuple(float(x) for x in v.split("/")) if "/" in v else (
            int(v) if fields[k] == "int" else float(v))
    return dataclasses.replace(tcfg, **over)


def _prepare_run(stage_dir: Path, fresh: bool) -> None:
    if fresh and stage_dir.exists():
        stale = stage_dir.with_name(f"{stage_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        shutil.move(str(stage_dir), stale)
        print(f"--fresh: moved the previous run to {stale}")
    stage_dir.mkdir(parents=True, exist_ok=True)


def stage_cache(a, root: Path) -> Path:
    from safefm.train.data import cache_root, load_shards
    from safefm.train.autoencoder import build_latent_cache, load_autoencoder
    from safefm.train.common import load_checkpoint

    ck = load_checkpoint(root / "ae" / "last.pt")
    model = load_autoencoder(ck).eval()
    data = load_shards(keys=("crops", "landmarks", "embeddings", "gender", "age", "race", "source", "person"))
    print(f"{int(data['has_embedding'].sum())} of {len(data['crops'])} crops have a dlib embedding")
    out = cache_root() / "latents.npz"
    t0 = time.time()
    build_latent_cache(model, data, out, limit=a.cache_limit, ae_step=ck["step"],
                       exclude=ck["holdout_indices"].numpy())
    print(f"latent cache: {out} ({time.time() - t0:.0f}s)")
    return out


def _flow_config(ae_ck: dict, path: Path | None):
    """The base's model config: the autoencoder checkpoint's, or ``--config`` (e.g. the lean
    UNet of configs/model_lean.toml) when its autoencoder fields agree with the checkpoint's."""
    from safefm.config import load_model_config
    from safefm.train.common import autoencoder_mismatch, checkpoint_model_config, with_decoder_of

    ae_cfg = checkpoint_model_config(ae_ck)
    if path is None:
        return ae_cfg
    cfg = load_model_config(path)
    bad = autoencoder_mismatch(cfg, ae_cfg)
    if bad:
        raise SystemExit(f"{path}: {', '.join(bad)} differ from the autoencoder checkpoint's; train a new ae")
    return with_decoder_of(cfg, ae_cfg)   # the decoder comes from the ae / decoder stages


def open_cache(ae_ck: dict):
    from safefm.train.data import LatentCache, cache_root

    from safefm.train.data import load_shards

    cache = LatentCache(cache_root() / "latents.npz")
    n_emb = cache.refresh_embeddings(load_shards(keys=("path", "embeddings")))
    print(f"{n_emb} of {len(cache)} cached latents have a dlib embedding (the rest train as the null identity)")
    if int(cache.a["ae_step"]) != int(ae_ck["step"]):
        raise SystemExit(f"latent cache was built with the autoencoder at step {int(cache.a['ae_step'])}, "
                         f"the checkpoint is at {ae_ck['step']}: run --stage cache")
    print(f"latent cache: {len(cache)} latents")
    return cache


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stage", choices=STAGES, required=True)
    ap.add_argument("--runs", type=Path, default=None, help="runs folder (default: runs/)")
    ap.add_argument("--config", type=Path, default=None, help="model config TOML (default configs/model_default.toml)")
    ap.add_argument("--max-minutes", type=float, default=20.0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is faster than 2 on a busy shared machine)")
    ap.add_argument("--fresh", action="store_true", help="start this stage over (moves the old run aside)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--cache-limit", type=int, default=8192, help="crops to encode into the latent cache (0 = all)")
    ap.add_argument("--no-cache", action="store_true", help="ae: do not build the latent cache afterwards")
    ap.add_argument("--sampler-bank", type=int, default=0,
                    help="sampler: store N pre-vetted samples per group INSTEAD of the training "
                         "embeddings (no real-face descriptors in the file); 0 = keep them")
    ap.add_argument("--controlnet-scale", type=float, default=1.0,
                    help="export: bake this conditioning scale into the ControlNet (see research/probe_control.py)")
    ap.add_argument("--out", type=Path, default=None, help="export / heat-decoder: output .safetensors")
    ap.add_argument("--from", dest="source", default="default",
                    help="heat-decoder: the model whose decoder is fine-tuned (name or .safetensors path)")
    ap.add_argument("--objective", choices=("flow", "diffusion"), default="diffusion",
                    help="from-weights: the objective the flow stages are retrained with")
    ap.add_argument("--device", default="cpu", help="detail: torch device (cpu, cuda)")
    ap.add_argument("--pack", type=Path, default=None,
                    help="detail-data / detail: the crops + product outputs pack (default data_cache/detail_pack.npz)")
    ap.add_argument("--detail", default="",
                    help="detail / heat-decoder: training config overrides, e.g. 'width=32,blocks=2,adv=0.05'")
    ap.add_argument("--pairs", type=int, default=4096, help="reflow: noise -> sample pairs drawn from the model")
    ap.add_argument("--teacher-steps", type=int, default=20, help="reflow: Euler steps that draw each pair")
    ap.add_argument("--real", type=int, default=4000, help="detail-data: real crops in the pack")
    ap.add_argument("--sampled", type=int, default=1500, help="detail-data: product outputs in the pack")
    a = ap.parse_args(argv)

    from safefm.config import load_model_config
    from safefm.train.common import load_checkpoint, runs_root, set_threads

    set_threads(a.threads)
    runner = None
    if a.stage in ("base", "adapters", "reflow", "context"):   # the flow stages: one process, or accelerate launch / torchrun
        from safefm.train.accel import Runner

        runner = Runner()
        print(f"{a.stage}: {runner.describe()}")
    elif int(os.environ.get("RANK", "0")) != 0:
        print(f"--stage {a.stage} runs in the main process only (data parallel is for base and adapters)")
        return 0
    log = print if runner is None or runner.is_main else (lambda *_: None)
    root = Path(a.runs or runs_root())
    sdir = root / a.stage
    if a.stage in ("ae", "decoder", "base", "adapters", "sampler", "heat-decoder", "detail", "reflow",
                   "context"):
        if runner is None or runner.is_main:
            _prepare_run(sdir, a.fresh)
        if runner is not None:
            runner.wait()

    if a.stage == "ae":
        from safefm.train.data import load_shards
        from safefm.train.autoencoder import AETrainConfig, train_autoencoder

        cfg = load_model_config(a.config)
        crops = load_shards(keys=("crops",))["crops"]
        print(f"autoencoder on {len(crops)} crops")
        train_autoencoder(cfg, _overrides(AETrainConfig(), a), crops, run_dir=sdir, max_minutes=a.max_minutes)
        del crops
        if not a.no_cache:
            stage_cache(a, root)
    elif a.stage == "from-weights":
        from safefm.train.common import save_checkpoint
        from safefm.train.twin import frozen_parts_checkpoint

        ck = frozen_parts_checkpoint(a.source, a.objective)
        print(f"wrote {save_checkpoint(root / 'ae' / 'last.pt', ck)} (frozen parts of {a.source}, "
              f"objective {a.objective}, autoencoder step {ck['step']})")
    elif a.stage == "cache":
        stage_cache(a, root)
    elif a.stage == "decoder":
        from safefm.train.data import LatentCache, cache_root, load_shards
        from safefm.train.decoder import DecoderTrainConfig, train_decoder

        ae = load_checkpoint(root / "ae" / "last.pt")
        cache = LatentCache(cache_root() / "latents.npz")
        if int(cache.a["ae_step"]) != int(ae["step"]):
            raise SystemExit("latent cache was built with another autoencoder step: run --stage cache")
        data = load_shards(keys=("crops", "path"))
        train_decoder(ae, load_model_config(a.config), _overrides(DecoderTrainConfig(), a), cache, data,
                      run_dir=sdir, max_minutes=a.max_minutes)
    elif a.stage == "base":
        from safefm.train.base import FlowTrainConfig, train_base

        ae = load_checkpoint(root / "ae" / "last.pt")
        train_base(_flow_config(ae, a.config), _overrides(FlowTrainConfig(), a), open_cache(ae), ae_ckpt=ae,
                   run_dir=sdir, max_minutes=a.max_minutes, runner=runner, log=log)
    elif a.stage == "adapters":
        from safefm.train.adapters import ADAPTER_DEFAULTS, train_adapters
        from safefm.train.common import checkpoint_model_config

        ae = load_checkpoint(root / "ae" / "last.pt")
        base = load_checkpoint(root / "base" / "last.pt")
        train_adapters(checkpoint_model_config(base), _overrides(ADAPTER_DEFAULTS, a), open_cache(ae), ae_ckpt=ae,
                       base_ckpt=base, run_dir=sdir, max_minutes=a.max_minutes, runner=runner, log=log)
    elif a.stage == "sampler":
        import numpy as np

        from safefm.train.data import load_shards
        from safefm.identity_sampler import IdentitySampler

        d = load_shards(keys=("embeddings", "gender", "age", "person"), require_embeddings=True)
        print(f"identity sampler over {len(d['embeddings'])} embedded training photos")
        t0 = time.time()
        s = IdentitySampler.fit(d["embeddings"], {k: d[k] for k in ("gender", "age", "person")})
        if a.sampler_bank > 0:   # ship pre-vetted samples only, no descriptor of a real face
            path = s.save(sdir / "identity_sampler.safetensors", include_reference=False, bank_size=a.sampler_bank)
        else:
            path = s.save(sdir / "identity_sampler.safetensors")
        rng = np.random.default_rng(0)
        rates = {"any": s.acceptance_rate(rng, 500)}
        rates.update({k: s.acceptance_rate(rng, 500, gender=k) for k in ("male", "female")})
        info = {**s.info, "acceptance_rate": rates, "seconds": round(time.time() - t0, 1)}
        (sdir / "summary.json").write_text(json.dumps(info, indent=2))
        print(json.dumps(info, indent=2))
        print(f"wrote {path}")
    elif a.stage == "export":
        from safefm.train.export import export_default

        out = a.out or root / "export" / "safefm_default.safetensors"
        export_default(root, out, controlnet_scale=a.controlnet_scale)
        print(f"wrote {out} and {out.with_suffix('.json')}")
    elif a.stage == "preview":
        preview(root)
    elif a.stage == "heat-decoder":
        stage_heat_decoder(a, sdir)
    elif a.stage == "decoder-data":
        stage_decoder_data(a)
    elif a.stage == "detail-data":
        from safefm.train.detail import write_pack

        out = write_pack(a.pack or _default_pack(), real=a.real, sampled=a.sampled, source=a.source)
        print(f"wrote {out}")
    elif a.stage == "detail":
        stage_detail(a, sdir)
    elif a.stage == "reflow":
        stage_reflow(a, sdir, runner, log)
    elif a.stage == "reflow-export":
        reflow_export(a, sdir.with_name("reflow"))
    elif a.stage == "context":
        stage_context(a, sdir, runner, log)
    elif a.stage == "context-export":
        context_export(a, sdir.with_name("context"))
    elif a.stage == "detail-export":
        from safefm.train.detail import export_detail

        out = a.out or root / "export" / "safefm_default.safetensors"
        export_detail(a.source, sdir.with_name("detail") / "last.pt", out)
        print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


def _default_pack() -> Path:
    from safefm.train.data import cache_root

    return cache_root() / "detail_pack.npz"


def stage_reflow(a, sdir: Path, runner, log) -> None:
    """One reflow pass on a shipped flow model: pairs drawn once into ``<runs>/reflow/pairs.npz``
    (from the latent cache's conditions), then the UNet + LoRA + ControlNet fine-tuned on them."""
    import numpy as np

    from safefm.checkpoint import load_model
    from safefm.paths import resolve_model_path
    from safefm.train.data import LatentCache, cache_root, load_shards
    from safefm.train.reflow import REFLOW_DEFAULTS, ReflowPairs, make_pairs, train_reflow

    model, meta = load_model(resolve_model_path(a.source))
    if model.cfg.objective != "flow":
        raise SystemExit(f"{a.source} is a {model.cfg.objective} model: reflow needs a flow-matching one")
    cache = LatentCache(cache_root() / "latents.npz")
    if model.cfg.context_channels:   # a context model: its pairs are drawn with the crops' contexts
        shards = load_shards(keys=("path", "embeddings", "crops"))
        cache.attach_crops(shards.pop("crops"))
    else:
        shards = load_shards(keys=("path", "embeddings"))
    cache.refresh_embeddings(shards)
    pairs_path = sdir / "pairs.npz"
    if not pairs_path.exists():
        t0 = time.time()
        arrays = make_pairs(model, cache, a.pairs, a.teacher_steps, log=log)
        tmp = pairs_path.with_name("pairs.tmp.npz")
        np.savez(tmp, **arrays, teacher_steps=np.int64(a.teacher_steps), from_sha256=np.array(meta["sha256"]))
        tmp.replace(pairs_path)
        log(f"reflow: {a.pairs} pairs ({a.teacher_steps} Euler steps each) in {time.time() - t0:.0f} s")
    with np.load(pairs_path) as z:
        arrays = {k: z[k] for k in z.files}
    if str(arrays["from_sha256"]) != meta["sha256"]:
        raise SystemExit(f"{pairs_path} was drawn from another model: use --fresh")
    ck = train_reflow(model, ReflowPairs(cache, arrays), _overrides(REFLOW_DEFAULTS, a), run_dir=sdir,
                      max_minutes=a.max_minutes, log=log, runner=runner)
    log(f"reflow: step {ck['step']}, loss (last 100) {ck['metrics']['loss_last100']:.4f}")


def reflow_export(a, rdir: Path) -> None:
    """The shipped model with the reflow run's EMA weights, written to ``--out``."""
    _finetune_export(a, rdir, "reflow", lambda model: model)


def _finetune_export(a, rdir: Path, stage: str, build) -> None:
    """``--from``'s model, made by ``build`` into the run's shape, with the run's EMA weights,
    written to ``--out`` (default ``<run>/safefm_<stage>.safetensors``); the run is recorded
    under the file's ``training`` metadata."""
    from safefm.checkpoint import load_model, save_model
    from safefm.paths import resolve_model_path
    from safefm.train.common import load_checkpoint

    model, meta = load_model(resolve_model_path(a.source))
    model = build(model)
    ck = load_checkpoint(rdir / "last.pt")
    res = model.load_state_dict(ck["ema"]["shadow"], strict=False)
    if res.unexpected_keys:
        raise SystemExit(f"{rdir / 'last.pt'} does not fit {a.source}: {res.unexpected_keys[:2]}")
    training = json.loads(meta.get("training") or "{}")
    training[stage] = {"from_sha256": meta["sha256"], "steps": ck["step"], "train_config": ck["train_config"],
                       "loss_last100": ck["metrics"].get("loss_last100"),
                       **{k: ck["metrics"][k] for k in ("pairs", "context_grow", "context_drop") if k in ck["metrics"]}}
    out = a.out or rdir / f"safefm_{stage}.safetensors"
    save_model(model, out, extra_meta={"license": meta.get("license", ""), "training": json.dumps(training)})
    print(f"wrote {out} and {Path(out).with_suffix('.json')}")


def stage_context(a, sdir: Path, runner, log) -> None:
    """Context-aware adapters (safefm.train.context) on ``--from``'s model: ControlNet + LoRA
    fine-tuned on the latent cache's crops with the frame around each face."""
    from safefm.checkpoint import load_model
    from safefm.paths import resolve_model_path
    from safefm.train.context import CONTEXT_DEFAULTS, context_model, train_context
    from safefm.train.data import LatentCache, cache_root, load_shards

    source, meta = load_model(resolve_model_path(a.source))
    if source.cfg.objective != "flow":
        raise SystemExit(f"{a.source} is a {source.cfg.objective} model: the context stage trains flow models")
    cache = LatentCache(cache_root() / "latents.npz")
    shards = load_shards(keys=("path", "embeddings", "crops"))
    cache.refresh_embeddings(shards)
    cache.attach_crops(shards.pop("crops"))
    model = context_model(source)
    ck = train_context(model, cache, _overrides(CONTEXT_DEFAULTS, a), run_dir=sdir, max_minutes=a.max_minutes,
                       log=log, runner=runner)
    log(f"context: step {ck['step']}, loss (last 100) {ck['metrics']['loss_last100']:.4f} (from {meta['sha256'][:12]})")


def context_export(a, rdir: Path) -> None:
    """``--from``'s model widened to read the context, with the context run's EMA weights."""
    from safefm.train.context import context_model

    _finetune_export(a, rdir, "context", context_model)


def stage_detail(a, sdir: Path) -> None:
    """The 2x detail stage (safefm.train.detail) on a pack from --stage detail-data."""
    from safefm.train.detail import DetailTrainConfig, read_pack, train_detail

    tcfg = _field_overrides(DetailTrainConfig(), a.detail, "--detail")
    real, sampled = read_pack(a.pack or _default_pack())
    print(f"detail: {len(real)} real crops, {len(sampled)} product outputs, {tcfg}", flush=True)
    ck = train_detail(real, sampled, tcfg, sdir, device=a.device, max_minutes=a.max_minutes)
    print(json.dumps({"step": ck["step"], **ck["eval"]}, indent=2))


def _sampled_pack_path(a) -> Path:
    from safefm.train.data import cache_root

    return a.pack or (cache_root() / "decoder_sampled.npz")


def stage_decoder_data(a) -> None:
    """The latents the product's sampler draws on training photos (their crops held back from
    nothing: training data only), for the heat-decoder stage's ``sampled_batch``."""
    import numpy as np

    from safefm.paths import shared_data_dir
    from safefm.train.data import finished_shards, load_shards
    from safefm.train.heat_decoder import sampled_pack

    data = load_shards(finished_shards(), keys=["path"])
    order = np.random.default_rng(11).permutation(len(data["path"]))
    photos = [shared_data_dir() / data["path"][i] for i in order]
    pack = sampled_pack(photos, a.sampled, source=a.source)
    out = _sampled_pack_path(a)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.npz")
    np.savez(tmp, **pack)
    tmp.replace(out)
    print(f"wrote {out}: {len(pack['z'])} sampled latents")


def stage_heat_decoder(a, sdir: Path) -> None:
    """Fine-tune a shipped model's decoder to read the heatmaps; ``--out`` writes the result
    (the source file's other weights unchanged, its training summary extended)."""
    from safefm.checkpoint import load_model, save_model
    from safefm.train.data import load_shards
    from safefm.paths import resolve_model_path
    from safefm.train.export import LICENSE_NOTE
    from safefm.train.heat_decoder import HeatDecoderTrainConfig, apply_checkpoint, train_heat_decoder

    src = resolve_model_path(a.source)
    model, meta = load_model(src)
    data = load_shards(keys=("crops", "landmarks"))
    print(f"heat decoder from {src} (sha256 {meta['sha256'][:12]}) on {len(data['crops'])} crops")
    tcfg = _field_overrides(_overrides(HeatDecoderTrainConfig(), a), a.detail, "--detail")
    print(tcfg, flush=True)
    sampled = None
    if tcfg.sampled_batch > 0:
        import numpy as np

        with np.load(_sampled_pack_path(a), allow_pickle=False) as z:
            sampled = {k: z[k] for k in ("z", "heat", "ref")}
    ck = train_heat_decoder(model, meta["sha256"], tcfg, data, run_dir=sdir, sampled=sampled,
                            max_minutes=a.max_minutes)
    if a.out:
        out = apply_checkpoint(model, ck)
        training = json.loads(meta.get("training") or "{}")
        training["heat_decoder"] = {"from_sha256": meta["sha256"], "steps": ck["step"],
                                    "train_config": ck["train_config"],
                                    **{k: ck["metrics"][k] for k in ("start", "holdout", "sec_per_step")
                                       if k in ck["metrics"]}}
        save_model(out, a.out, extra_meta={"license": meta.get("license") or LICENSE_NOTE,
                                           "training": json.dumps(training)})
        print(f"wrote {a.out} and {Path(a.out).with_suffix('.json')}")


def preview(root: Path) -> None:
    """runs/preview_ae.png, preview_base.png, preview_adapters.png from the latest checkpoints."""
    import numpy as np

    from safefm.train.data import finished_shards, load_shards
    from safefm.face.heatmaps import render_heatmaps
    from safefm.train.autoencoder import load_autoencoder
    from safefm.train.common import checkpoint_model_config, load_checkpoint
    from safefm.train.preview import ae_preview, flow_preview

    ae = load_checkpoint(root / "ae" / "last.pt")
    held = load_shards(finished_shards()[:1])
    k = 8
    crops = held["crops"][:k]                     # the autoencoder's held-back rows
    print("wrote", ae_preview(load_autoencoder(ae).eval(), crops, root / "preview_ae.png"))
    emb = held["embeddings"][:k].astype(np.float32)
    if (root / "base" / "last.pt").exists():
        from safefm.train.adapters import adapter_model, load_adapters

        base = load_checkpoint(root / "base" / "last.pt")
        model = adapter_model(checkpoint_model_config(base), ae, base).eval()   # the base's UNet config
        print("wrote", flow_preview(model, emb, root / "preview_base.png"))
        if (root / "adapters" / "last.pt").exists():
            load_adapters(load_checkpoint(root / "adapters" / "last.pt"), model)
            cfg = model.cfg
            heat = np.stack([render_heatmaps(l.astype(np.float32), cfg.image_size, cfg.heatmap_size)
                             for l in held["landmarks"][:k]])
            print("wrote", flow_preview(model, emb, root / "preview_adapters.png", heat=heat))


if __name__ == "__main__":
    sys.exit(main())
