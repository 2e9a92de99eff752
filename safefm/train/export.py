"""Export the trained stages as the shipped model file (one safetensors + JSON sidecar).

:func:`export_default` assembles a full :class:`~safefm.models.SafeFMModel` from
``runs/ae`` (with ``runs/decoder``'s faster decoder when present), ``runs/base`` (EMA) and
``runs/adapters`` (EMA) and writes it with
:func:`safefm.checkpoint.save_model`: the state dict with the LoRA as separate ``lora_`` keys,
the model config JSON in the metadata, sha256 in the sidecar. The identity sampler
(``runs/sampler/identity_sampler.safetensors``) is copied beside it only when it is a bank
without real-photo embeddings (:func:`shippable_sampler`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .common import (DECODER_FIELDS, autoencoder_mismatch, checkpoint_model_config, load_checkpoint, runs_root,
                     with_decoder_of)
from .decoder import without_decoder

LICENSE_NOTE = ("Trained on UTKFace (non-commercial research use only) and LFW (research); "
                "these weights inherit research-only terms.")


def _check_lineage(name: str, ck: dict, **expected: int) -> None:
    """Refuse to combine stages trained on another autoencoder / base than the ones exported
    (recorded as ``metrics['ae_step']`` / ``['base_step']``; older checkpoints lack them)."""
    for key, want in expected.items():
        got = ck.get("metrics", {}).get(key)
        if got is not None and int(got) != int(want):
            raise ValueError(f"{name} checkpoint was trained on {key.replace('_step', '')} step {got}, "
                             f"but runs/ holds step {want}: retrain {name} (or restore the matching checkpoint)")


def assemble(run_dir: Path | None = None):
    """(SafeFMModel with every trained part loaded, summary dict) from a runs folder."""
    from .adapters import adapter_model, load_adapters

    run_dir = Path(run_dir or runs_root())
    ae = load_checkpoint(run_dir / "ae" / "last.pt")
    base = load_checkpoint(run_dir / "base" / "last.pt")
    cfg = checkpoint_model_config(base)   # the flow model's config (its UNet may differ from the ae run's)
    if autoencoder_mismatch(cfg, checkpoint_model_config(ae)):
        raise ValueError("ae and base checkpoints have different autoencoder configs")
    _check_lineage("base", base, ae_step=ae["step"])
    summary = {"ae_steps": ae["step"], "ae_psnr_holdout": ae["metrics"].get("psnr_holdout"),
               "base_steps": base["step"], "base_loss": base["metrics"].get("loss_last100")}
    dec_path = run_dir / "decoder" / "last.pt"
    dec = load_checkpoint(dec_path) if dec_path.exists() else None
    if dec is not None:   # a faster decoder trained on this autoencoder's frozen latents
        _check_lineage("decoder", dec, ae_step=ae["step"])
        ae = {**ae, "state": {"model": {**without_decoder(ae["state"]["model"]), **dec["state"]["model"]}}}
        summary.update(decoder=checkpoint_model_config(dec).decoder, decoder_steps=dec["step"],
                       decoder_psnr_holdout=dec["metrics"].get("psnr_holdout"),
                       old_decoder_psnr_holdout=dec["metrics"].get("psnr_old_decoder"))
    model = adapter_model(with_decoder_of(cfg, checkpoint_model_config(dec), DECODER_FIELDS) if dec is not None
                          else cfg, ae, base)
    ad_path = run_dir / "adapters" / "last.pt"
    if ad_path.exists():
        ad = load_checkpoint(ad_path)
        if checkpoint_model_config(ad) != cfg:
            raise ValueError("adapters checkpoint has a different model config")
        _check_lineage("adapters", ad, ae_step=ae["step"], base_step=base["step"])
        load_adapters(ad, model)
        summary.update(adapters_steps=ad["step"], adapters_loss=ad["metrics"].get("loss_last100"))
    else:
        summary["adapters_steps"] = 0  # untrained adapters: zero-conv ControlNet, B=0 LoRA = base
    return model.eval(), summary


def export_default(run_dir: Path | str | None, out_path: Path | str, controlnet_scale: float = 1.0) -> Path:
    """Write the shipped model to ``out_path`` (.safetensors + .json sidecar); returns out_path.

    ``controlnet_scale`` multiplies the ControlNet's residuals (its zero-convolution weights,
    :func:`safefm.models.scale_controlnet`) before saving: the conditioning scale chosen by
    measurement (``research/probe_control.py``), recorded in the training notes."""
    from ..checkpoint import save_model
    from ..models import scale_controlnet

    run_dir = Path(run_dir or runs_root())
    model, summary = assemble(run_dir)
    if controlnet_scale != 1.0:
        scale_controlnet(model.controlnet, controlnet_scale)
        summary["controlnet_scale_baked"] = controlnet_scale
    out_path = Path(out_path)
    save_model(model, out_path, extra_meta={"license": LICENSE_NOTE, "training": json.dumps(summary)})
    sampler = run_dir / "sampler" / "identity_sampler.safetensors"
    if shippable_sampler(sampler):
        for src in (sampler, sampler.with_suffix(".json")):
            shutil.copy2(src, out_path.parent / src.name)
    return out_path


def shippable_sampler(path: Path) -> bool:
    """True for an identity sampler that may ship: a bank of vetted synthetic embeddings whose
    sidecar says it holds no embedding of a real photo (``reference_photos`` 0). The full
    sampler keeps every training photo's embedding and is never copied next to the weights."""
    side = Path(path).with_suffix(".json")
    if not Path(path).exists() or not side.exists():
        return False
    try:
        return int(json.loads(side.read_text()).get("reference_photos", -1)) == 0
    except (ValueError, OSError):
        return False
