"""Tiny seeded models for tests and demos (diffusers-style: built in place, nothing downloaded).

The code path is the shipped one: the same SafeFMModel classes, Generator wrapper, identity
files and Engine; only the sizes are tiny and the weights random.
"""

from __future__ import annotations

import numpy as np
import torch

from .config import ModelConfig, RuntimeConfig, load_runtime_config
from .identity import Identity, random_shape


def tiny_model_config() -> ModelConfig:
    """32 px crops, 8x8x4 latents, a two-level UNet: milliseconds a call on the CPU."""
    return ModelConfig(image_size=32, latent_channels=4, latent_downscale=4, ae_width=8,
                       ae_blocks=(1, 1, 1), unet_channels=(8, 16), unet_layers_per_block=1,
                       unet_attention_head_dim=8, identity_dim=128, identity_tokens=2,
                       cross_attention_dim=16, heatmap_channels=9, heatmap_size=16,
                       controlnet_embedding_channels=(8, 8), lora_rank=2, lora_alpha=2,
                       decoder="fast", decoder_widths=(8, 8), decoder_blocks=(1, 1))


def tiny_model(seed: int = 0, cfg: ModelConfig | None = None):
    from .models import SafeFMModel

    torch.manual_seed(seed)
    model = SafeFMModel(cfg or tiny_model_config())
    with torch.no_grad():  # give the zero-initialised ControlNet links some effect
        for name, p in model.controlnet.named_parameters():
            if "controlnet_down_blocks" in name or "controlnet_mid_block" in name or "cond_embedding.conv_out" in name:
                p.normal_(0, 0.02)
    return model.eval()


def tiny_identity(seed: int = 0, dim: int = 128, name: str | None = None) -> Identity:
    from .face.alignment import load_template

    rng = np.random.default_rng(seed)
    emb = rng.normal(size=dim).astype(np.float32)
    emb /= np.linalg.norm(emb)
    return Identity(embedding=emb, shape=random_shape(load_template(), rng), seed=seed,
                    name=name or f"tiny-{seed}")


def tiny_generator(runtime_cfg: RuntimeConfig | None = None, seed: int = 0):
    from .generator import Generator

    cfg = runtime_cfg or load_runtime_config(runtime="torch")
    return Generator(tiny_model(seed), cfg)


def tiny_engine(runtime_cfg: RuntimeConfig | None = None, seed: int = 0, video: bool = True):
    """An Engine on tiny random models (torch runtime unless the config says otherwise)."""
    from .engine import Engine

    cfg = runtime_cfg or load_runtime_config(runtime="torch")
    return Engine(tiny_generator(cfg, seed), tiny_identity(seed), cfg, video=video)
