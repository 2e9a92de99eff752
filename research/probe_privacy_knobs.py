#!/usr/bin/env python
"""Does a runtime or identity knob move the output away from the real person? (development set)

Renders one identity on training LFW photos (people NOT in EVAL_IDENTITIES.txt, photo seed 1 so
they differ from ``scripts/identities.py select``'s default set) under variants of the runtime
config and of the identity itself, and prints, per variant, dlib's distance between each output
and its own original (mean, 5th percentile, share under the 0.6 match threshold).

    python research/probe_privacy_knobs.py --photos 150
    python research/probe_privacy_knobs.py --variants base,color_match=false,mask_dilate=0.25,emb_scale=1.6,shape_scale=2

Variant syntax: ``base``; a RuntimeConfig field ``name=value`` (several joined by ``+``); ``emb_scale=K`` (the identity
embedding moved K times as far from the identity sampler's mean); ``shape_scale=K`` (the
identity's face-shape deviation from the template times K).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np

DEFAULT_VARIANTS = ("base,color_match=false,mask_dilate=0.15,mask_dilate=0.25,mask_feather=0.12,"
                    "emb_scale=1.3,emb_scale=1.6,shape_scale=2")


def _value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(text)
    except ValueError:
        return float(text)


def apply_variant(spec: str, cfg, ident, sampler_mean: np.ndarray, template: np.ndarray):
    """(runtime config, identity) for one variant ``spec``; ValueError for an unknown one."""
    if spec == "base":
        return cfg, ident
    if "+" in spec:   # several knobs at once: a=1+b=2
        for part in spec.split("+"):
            cfg, ident = apply_variant(part, cfg, ident, sampler_mean, template)
        return cfg, ident
    name, _, raw = spec.partition("=")
    if not raw:
        raise ValueError(f"variant {spec!r}: expected base or name=value")
    k = _value(raw)
    if name == "emb_scale":
        emb = sampler_mean + float(k) * (ident.embedding - sampler_mean)
        return cfg, dataclasses.replace(ident, embedding=emb.astype(np.float32))
    if name == "shape_scale":
        shape = template + float(k) * (ident.shape - template)
        return cfg, dataclasses.replace(ident, shape=shape.astype(np.float32))
    if name not in {f.name for f in dataclasses.fields(cfg)}:
        raise ValueError(f"variant {spec!r}: {name} is not a runtime setting, emb_scale or shape_scale")
    return dataclasses.replace(cfg, **{name: k}), ident


def main(argv=None) -> int:
    from safefm.config import load_runtime_config
    from safefm.engine import Engine
    from safefm.eval.identities import originals, photo_scores, training_photos
    from safefm.face.alignment import load_template
    from safefm.generator import Generator
    from safefm.guard import default_guard
    from safefm.identity import load_identity
    from safefm.identity_sampler import IdentitySampler
    from safefm.paths import default_identity_path, resolve_model_path, weights_dir
    from safefm.recognition import FaceRecognizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model name or path (default: the default model)")
    ap.add_argument("--identity", type=Path, default=None, help="identity file (default: the shipped default)")
    ap.add_argument("--photos", type=int, default=150, help="training LFW people, one photo each")
    ap.add_argument("--photo-seed", type=int, default=1)
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help="comma list (see the module docstring)")
    ap.add_argument("--fidelity", action="store_true", help="also FaceMesh mouth / eye r and pose MAE")
    args = ap.parse_args(argv)

    cfg0 = load_runtime_config(None)
    gen = Generator.load(resolve_model_path(args.model), cfg0)
    ident0 = load_identity(args.identity or default_identity_path(), gen.model_cfg.identity_dim)
    mean = IdentitySampler.load(weights_dir() / "identity_sampler.safetensors").groups["any/any"].mean
    template = load_template()
    specs = [v.strip() for v in args.variants.split(",") if v.strip()]
    plans = [(s, *apply_variant(s, cfg0, ident0, np.asarray(mean, np.float32), template)) for s in specs]
    rec = FaceRecognizer(upsample=1)
    refs = originals(rec, training_photos(args.photos, args.photo_seed))
    print(f"{len(refs)} training photos with a dlib face; identity {ident0.name}", flush=True)
    mesh = None
    if args.fidelity:
        from safefm.face.landmarks import FaceMeshDetector
        mesh = FaceMeshDetector(max_faces=1, static_image=True)
    for spec, cfg, ident in plans:
        t = time.perf_counter()
        guard = default_guard(cfg, ident, gen.model_cfg.identity_dim)
        r = photo_scores(Engine(gen, ident, cfg, video=False, guard=guard), rec, refs, mesh)
        fid = "".join(f"  {k.replace('_', ' ', 1)} {v:.2f}" for k, v in r.items() if k.startswith(("r_", "mae_")))
        print(f"{spec:>22}: mean distance {r['mean_distance']:.3f} (others {r['other_distance']:.3f})  "
              f"p05 {r['p05_distance']:.3f}  leak {r['leak']:.3f}  face {r['face_found']:.2f}{fid}  "
              f"({time.perf_counter() - t:.0f}s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
