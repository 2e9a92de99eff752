"""Shared training machinery: run folders, resumable checkpoints, EMA, deadlines, plots.

A checkpoint (``runs/<stage>/last.pt``, written atomically with ``torch.save`` and read with
``weights_only=True``) is a dict::

    {"stage": str, "model_config": dict, "train_config": dict, "step": int,
     "state": {name: state_dict}, "opt": optimizer state, "ema": state_dict | None,
     "history": {"step": [...], "loss": [...], ...}, "metrics": dict, "rng": tensor}

so a run carries its own configuration (k-diffusion style) and continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from copy import deepcopy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ModelConfig, stored_model_config, to_dict
from ..paths import REPO_ROOT


def runs_root() -> Path:
    return Path(os.environ.get("SAFEFM_RUNS") or REPO_ROOT / "runs")


def stage_dir(stage: str, root: Path | None = None) -> Path:
    d = Path(root or runs_root()) / stage
    d.mkdir(parents=True, exist_ok=True)
    return d


def set_threads(threads: int) -> None:
    """Limit torch's intra-op threads (0 = leave torch's default)."""
    if threads > 0:
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)


def config_dict(cfg) -> dict:
    """JSON-ready dict of any config dataclass (ModelConfig or a stage's TrainConfig)."""
    if isinstance(cfg, ModelConfig):
        return to_dict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def train_config_from_dict(cls, values: dict):
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in known})


# ---------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(path: Path, payload: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def run_payload(stage: str, cfg, tcfg, step: int, model_state: dict, opt, history: "History",
                metrics: dict, ema: dict | None = None, **extra) -> dict[str, Any]:
    """The checkpoint dict of a training stage (the schema above; ``extra`` keys are added)."""
    return {"stage": stage, "model_config": config_dict(cfg), "train_config": config_dict(tcfg),
            "step": step, "state": {"model": model_state}, "opt": opt.state_dict(), "ema": ema,
            "history": history.data, "metrics": metrics, **extra}


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors and plain data only)."""
    return torch.load(Path(path), map_location="cpu", weights_only=True)


def checkpoint_model_config(ckpt: dict) -> ModelConfig:
    return stored_model_config(ckpt["model_config"])


AUTOENCODER_FIELDS = ("image_size", "latent_channels", "latent_downscale", "ae_width", "ae_blocks")
# what a decoder stage trains: the decoder and whether it reads the heatmaps
DECODER_FIELDS = ("decoder", "decoder_widths", "decoder_blocks", "decoder_heat")
# the image side a flow run keeps from its autoencoder checkpoint: the decoder and the 2x detail
# stage (a shipped model's frozen parts, ``--stage from-weights``, carry both)
IMAGE_FIELDS = DECODER_FIELDS + ("detail_width", "detail_blocks")


def autoencoder_mismatch(a: ModelConfig, b: ModelConfig) -> list[str]:
    """The autoencoder fields in which two configs differ (flow stages on other latents)."""
    return [k for k in AUTOENCODER_FIELDS if getattr(a, k) != getattr(b, k)]


def with_decoder_of(cfg: ModelConfig, other: ModelConfig, fields: tuple[str, ...] = IMAGE_FIELDS) -> ModelConfig:
    """``cfg`` with ``other``'s image-side ``fields`` (the decoder and detail stages are trained
    apart from the flow stages; a decoder stage's checkpoint gives only ``DECODER_FIELDS``)."""
    return dataclasses.replace(cfg, **{k: getattr(other, k) for k in fields})


# ---------------------------------------------------------------------------------------
# EMA


class EMA:
    """Exponential moving average of some of a module's state (default: all of it).

    ``keys``: the state-dict names to average (e.g. only the trainable adapter weights).
    ``decay`` is warmed up as ``min(decay, (1 + n) / (10 + n))`` so early averages are not
    dominated by the initialisation.
    """

    def __init__(self, module: nn.Module, decay: float = 0.999, keys: list[str] | None = None):
        self.decay = decay
        self.num_updates = 0
        state = module.state_dict()
        self.shadow = {k: state[k].detach().clone().float() for k in (keys or state)}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        state = module.state_dict()
        for k, s in self.shadow.items():
            v = state[k]
            if v.is_floating_point():
                s.mul_(d).add_(v.detach().float(), alpha=1 - d)
            else:
                s.copy_(v)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.num_updates = state["decay"], state["num_updates"]
        dev = next(iter(self.shadow.values())).device if self.shadow else torch.device("cpu")
        self.shadow = {k: v.to(dev, copy=True) for k, v in state["shadow"].items()}   # where the model is

    def copy_to(self, module: nn.Module) -> nn.Module:
        """Load the averaged values into ``module`` (other state untouched)."""
        own = module.state_dict()
        module.load_state_dict({k: v.to(dtype=own[k].dtype) for k, v in self.shadow.items()}, strict=False)
        return module

    def averaged(self, module: nn.Module) -> nn.Module:
        """A deep copy of ``module`` carrying the averaged weights."""
        return self.copy_to(deepcopy(module))


# ---------------------------------------------------------------------------------------
# Loop helpers


def restore_run(ck: dict, cls, tcfg, model: torch.nn.Module, opt) -> tuple[Any, int, "History", dict]:
    """Continue a decoder-style run from checkpoint ``ck``: the given training config with the
    run's own ``seed`` and ``holdout`` (so the held-back rows stay held back), the checkpoint's
    weights (non-strict: it stores only the trained part) and optimiser state.
    Returns (training config, step, history, metrics)."""
    kept = {k: ck["train_config"][k] for k in ("seed", "holdout")}
    tcfg = train_config_from_dict(cls, {**config_dict(tcfg), **kept})
    model.load_state_dict(ck["state"]["model"], strict=False)
    opt.load_state_dict(ck["opt"])
    return tcfg, ck["step"], History(ck["history"]), ck["metrics"]


def set_warmup_lr(opt, step: int, lr: float, warmup: int) -> None:
    """Linear learning-rate warm-up over ``warmup`` steps, then constant ``lr``."""
    for g in opt.param_groups:
        g["lr"] = lr * min(1.0, (step + 1) / max(1, warmup))


class Deadline:
    """``max_minutes`` of wall clock from construction (0 = no limit)."""

    def __init__(self, max_minutes: float):
        self.end = time.monotonic() + max_minutes * 60 if max_minutes and max_minutes > 0 else math.inf

    def passed(self) -> bool:
        return time.monotonic() >= self.end


class History:
    """Logged scalars per step; plotted to ``loss.png``."""

    def __init__(self, data: dict | None = None):
        self.data: dict[str, list[float]] = {k: list(v) for k, v in (data or {}).items()}

    def log(self, step: int, **values: float) -> None:
        """Record scalars at ``step``; every key keeps its own step list (``<key>.step``)."""
        self.data.setdefault("step", []).append(int(step))
        for k, v in values.items():
            self.data.setdefault(k, []).append(float(v))
            self.data.setdefault(f"{k}.step", []).append(int(step))

    def mean_last(self, key: str, n: int = 50) -> float:
        v = self.data.get(key, [])[-n:]
        return sum(v) / len(v) if v else float("nan")

    def plot(self, path: Path, keys: tuple[str, ...] = ("loss",), title: str = "") -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for k in keys:
            v = self.data.get(k)
            if not v:
                continue
            steps = self.data.get(f"{k}.step") or list(range(1, len(v) + 1))
            steps = steps[-len(v):] if len(steps) >= len(v) else list(range(1, len(v) + 1))
            ax.plot(steps, v, alpha=0.3, lw=0.8)
            w = max(1, len(v) // 50)
            sm = [sum(v[max(0, i - w):i + 1]) / len(v[max(0, i - w):i + 1]) for i in range(len(v))]
            ax.plot(steps, sm, label=f"{k} (smoothed)")
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)


def trainable_fraction(params_trainable: int, params_total: int) -> float:
    return params_trainable / max(1, params_total)
