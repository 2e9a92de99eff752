"""Frozen configuration objects, read from the TOML files in ``configs/``.

One :class:`ModelConfig` describes the network sizes (stored inside every checkpoint) and
one :class:`RuntimeConfig` says how frames are processed. They are passed down explicitly;
nothing reads a global.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError, first_line

OBJECTIVES = ("flow", "diffusion")
FLOW_SOLVERS = ("euler", "heun", "midpoint")     # safefm.sampler
DIFFUSION_SOLVERS = ("ddim", "dpmpp", "ddpm")     # safefm.diffusion_sampler
SOLVERS = ("auto",) + FLOW_SOLVERS + DIFFUSION_SOLVERS
INT8_MODES = ("off", "decoder", "all")   # RuntimeConfig.int8: which onnxruntime graphs run int8 convolutions


def resolve_solver(objective: str, solver: str) -> str:
    """The solver a model of ``objective`` runs for the runtime setting ``solver`` ("auto": euler
    for flow, ddim for diffusion); a solver of the other kind is a ConfigError."""
    own = FLOW_SOLVERS if objective == "flow" else DIFFUSION_SOLVERS
    if solver == "auto":
        return own[0]
    if solver not in own:
        raise ConfigError(f"solver {solver!r} does not run a {objective} model (use one of {', '.join(own)})")
    return solver
CONTEXT_CHANNELS = 4   # masked RGB crop + the mask (safefm.face.context)
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass(frozen=True)
class ModelConfig:
    image_size: int = 128
    latent_channels: int = 4
    latent_downscale: int = 8
    ae_width: int = 48
    ae_blocks: tuple[int, ...] = (1, 2, 2, 2)
    unet_channels: tuple[int, ...] = (32, 64, 128)
    unet_layers_per_block: int = 1
    unet_attention_head_dim: int = 8
    unet_cross_attention: str = "levels"
    identity_film: bool = False
    identity_dim: int = 128
    identity_tokens: int = 4
    cross_attention_dim: int = 128
    heatmap_channels: int = 9
    heatmap_size: int = 128
    controlnet_embedding_channels: tuple[int, ...] = (16, 32, 64, 128)
    lora_rank: int = 4
    lora_alpha: int = 4
    decoder: str = "fast"
    decoder_widths: tuple[int, ...] = (128, 64, 32)
    decoder_blocks: tuple[int, ...] = (3, 2, 1)
    decoder_heat: bool = False
    detail_width: int = 0          # > 0: a 2x detail stage (DetailNet) of this width after the decoder
    detail_blocks: int = 2
    objective: str = "flow"        # "flow" (flow matching, safefm.flow) or "diffusion" (the v-prediction twin, safefm.diffusion)
    context_channels: int = 0      # 4: the ControlNet also sees the frame around the face (safefm.face.context); 0: heatmaps only

    @property
    def latent_size(self) -> int:
        return self.image_size // self.latent_downscale

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one latent."""
        return (self.latent_channels, self.latent_size, self.latent_size)

    def __post_init__(self) -> None:
        if 2 ** (len(self.ae_blocks) - 1) != self.latent_downscale:
            raise ConfigError(
                f"ae_blocks has {len(self.ae_blocks)} stages, which downscale by "
                f"{2 ** (len(self.ae_blocks) - 1)}, not latent_downscale={self.latent_downscale}")
        if self.image_size % self.latent_downscale:
            raise ConfigError("image_size must be a multiple of latent_downscale")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.unet_cross_attention not in ("levels", "mid"):
            raise ConfigError(f"unet_cross_attention must be 'levels' or 'mid', got {self.unet_cross_attention!r}")
        if self.decoder not in ("tiny", "fast"):
            raise ConfigError(f"decoder must be 'tiny' or 'fast', got {self.decoder!r}")
        if self.decoder_heat and self.decoder != "fast":
            raise ConfigError("decoder_heat needs the fast decoder (decoder = \"fast\")")
        if self.decoder == "fast":
            if len(self.decoder_widths) != len(self.decoder_blocks) or not self.decoder_widths:
                raise ConfigError("decoder_widths and decoder_blocks need one entry per resolution")
            if 2 ** len(self.decoder_widths) != self.latent_downscale:
                raise ConfigError(
                    f"the fast decoder upsamples by 2 ** len(decoder_widths) = {2 ** len(self.decoder_widths)} "
                    f"(the last 2x by pixel shuffle), not latent_downscale={self.latent_downscale}")
        if self.detail_width < 0 or (self.detail_width and self.detail_blocks < 1):
            raise ConfigError(f"detail_width must be >= 0 (0: no detail stage) and detail_blocks >= 1, "
                              f"got {self.detail_width} and {self.detail_blocks}")
        if self.context_channels not in (0, CONTEXT_CHANNELS):
            raise ConfigError(f"context_channels must be 0 (no context) or {CONTEXT_CHANNELS} (masked RGB + mask), "
                              f"got {self.context_channels}")
        cn_down = 2 ** (len(self.controlnet_embedding_channels) - 1)
        if self.heatmap_size != self.latent_size * cn_down:
            raise ConfigError(
                f"heatmap_size={self.heatmap_size} must equal latent side {self.latent_size} x "
                f"ControlNet downscale {cn_down}")


@dataclass(frozen=True)
class RuntimeConfig:
    steps: int = 2
    solver: str = "auto"           # auto: euler (flow model) / ddim (diffusion twin); see safefm.solvers
    warm_start: bool = False
    seed: int = -1
    warm_t0: float = 0.5
    controlnet_scale: float = 1.0
    identity_guidance: float = 1.0
    guidance_until: float = 1.0
    runtime: str = "auto"
    device: str = "auto"
    threads: int = 0
    max_faces: int = 4
    min_detection_confidence: float = 0.5
    min_tracking_confidence: float = 0.5
    smoothing_min_cutoff: float = 1.0
    smoothing_beta: float = 0.05
    track_max_distance: float = 0.5
    neutral_window: int = 1800
    neutral_warmup: int = 1
    image_neutral: str = "prior"
    expression_gain: float = 1.0
    eye_gain: float = 1.5
    eye_rest: float = 1.0
    hold_frames: int = 8
    placeholder_frames: int = 50
    scene_cut_threshold: float = 0.45
    mask_dilate: float = 0.03
    mask_feather: float = 0.04
    face_inner: float = 0.03
    outline_follow: float = 0.5
    even_skin: float = 4.0
    match_light: bool = True
    match_grain: bool = True
    match_sharpness: bool = True
    color_match: bool = True
    seamless_paste: bool = True
    keep_hair: bool = True
    detail_min_px: int = 160
    detail_strength: float = 1.0
    int8: str = "off"
    identity_guard: float = 0.0
    identity_repel: float = 1.5
    repel_until: float = 0.5
    repel_when: str = "near"
    identity_per_track: bool = False
    identity_match: tuple[str, ...] = ("gender", "age")
    identity_seed: int = -1
    identity_memory: int = 150
    identity_watch: int = 12
    context: bool = True
    context_grow: float = 0.1

    def __post_init__(self) -> None:
        if isinstance(self.int8, bool):   # before session 15 a switch: true = every graph that can be
            object.__setattr__(self, "int8", "all" if self.int8 else "off")
        if self.int8 not in INT8_MODES:
            raise ConfigError(f"int8 must be one of {', '.join(INT8_MODES)}, got {self.int8!r}")
        if not 1 <= self.steps <= 50:
            raise ConfigError(f"steps must be in 1..50, got {self.steps}")
        if self.solver not in SOLVERS:
            raise ConfigError(f"solver must be one of {', '.join(SOLVERS)}, got {self.solver!r}")
        if not 0.0 <= self.warm_t0 < 1.0:
            raise ConfigError(f"warm_t0 must be in [0, 1), got {self.warm_t0}")
        if not 0.0 <= self.controlnet_scale <= 20.0:
            raise ConfigError(f"controlnet_scale must be in [0, 20], got {self.controlnet_scale}")
        if not 0.0 <= self.identity_guidance <= 10.0:
            raise ConfigError(f"identity_guidance must be in [0, 10], got {self.identity_guidance}")
        if not 0.0 <= self.guidance_until <= 1.0:
            raise ConfigError(f"guidance_until must be in [0, 1], got {self.guidance_until}")
        if self.runtime not in ("auto", "torch", "onnx"):
            raise ConfigError(f"runtime must be auto, torch or onnx, got {self.runtime!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.max_faces < 1:
            raise ConfigError("max_faces must be at least 1")
        if self.neutral_window < 1 or self.neutral_warmup < 1:
            raise ConfigError("neutral_window and neutral_warmup must be at least 1 frame")
        if self.image_neutral not in ("prior", "template"):
            raise ConfigError(f"image_neutral must be 'prior' or 'template', got {self.image_neutral!r}")
        if not 0.0 <= self.identity_repel <= 5.0 or not 0.0 <= self.repel_until <= 1.0:
            raise ConfigError("identity_repel must be in [0, 5] and repel_until in [0, 1]")
        if self.repel_when not in ("always", "near"):
            raise ConfigError(f"repel_when must be 'always' or 'near', got {self.repel_when!r}")
        if self.identity_repel > 0 and self.identity_guidance != 1.0:
            raise ConfigError("identity_repel and identity_guidance (against the null identity) are two "
                              "kinds of guidance: use one of them")
        if not 0.0 <= self.identity_guard <= 2.0:
            raise ConfigError(f"identity_guard must be in [0, 2] (0 = off), got {self.identity_guard}")
        if not 0.0 <= self.detail_strength <= 2.0:
            raise ConfigError(f"detail_strength must be in [0, 2], got {self.detail_strength}")
        if not 0.0 <= self.outline_follow <= 1.0:
            raise ConfigError(f"outline_follow must be in [0, 1] (0 = the identity's own face outline), got {self.outline_follow}")
        if not 0.0 <= self.even_skin <= 50.0:
            raise ConfigError(f"even_skin must be in [0, 50] ΔE (0 = off), got {self.even_skin}")
        if not 0.0 <= self.face_inner <= 0.3:
            raise ConfigError(f"face_inner must be in [0, 0.3] face widths, got {self.face_inner}")
        if self.detail_min_px < 0:
            raise ConfigError(f"detail_min_px must be >= 0 (0 = never use the detail stage), got {self.detail_min_px}")
        if not 0.0 <= self.eye_gain <= 3.0:
            raise ConfigError(f"eye_gain must be in [0, 3], got {self.eye_gain}")
        if not 0.0 <= self.eye_rest <= 1.0:
            raise ConfigError(f"eye_rest must be in [0, 1] (share of the person's resting eye opening kept), "
                              f"got {self.eye_rest}")
        bad = [a for a in self.identity_match if a not in ("gender", "age")]
        if bad or len(set(self.identity_match)) != len(self.identity_match):
            raise ConfigError(f"identity_match must list gender and/or age (each once; [] = none), "
                              f"got {list(self.identity_match)}")
        if not 0.0 <= self.context_grow <= 0.5:
            raise ConfigError(f"context_grow must be in [0, 0.5] face widths, got {self.context_grow}")
        if self.identity_seed < -1 or self.identity_memory < 0 or self.identity_watch < 0:
            raise ConfigError(f"identity_seed must be >= -1 (-1 = random), identity_memory and identity_watch "
                              f">= 0 frames, got {self.identity_seed}, {self.identity_memory} and {self.identity_watch}")


# The camera's own runtime defaults (safefm-cam, and what safefm-bench times by default), above the
# built-in ones and below --config and the flags: real time first, so no 2x detail stage (+6.5 ms
# a face on a 2-core CPU; session 12 at 2 steps: clip sharpness 0.11 -> 0.72, but 24 vs 28 FPS
# unpaced and a p50 latency of 94 vs 44 ms: --detail-min-px 160 turns it on).
# int8 = "decoder" (session 15): the image decoder's convolutions in int8 (safefm.quantize: ReLUs
# folded, the convolutions reading the latent and writing the pixels float), ~4 ms a frame less on the generator's stage; the
# generator's own int8 ("all") raised flicker on every clip (1.14 -> 1.37, docs/results.md).
# Grain matching costs ~3.5 ms a frame (measuring the frame's noise): files only.
# keep_hair off (session 16): without identity repel, keeping the person's hair over the forehead
# let 3 more of 1,356 clip frames match the real person (leak 1.7 -> 1.9 %); files kept 0.2 %.
# Identity repel on, as for files (session 17; off before): since it pushes on the first Euler step
# only (repel_until 0.5) it costs one network call a frame (generator 8.5 -> 11.3 ms here, 30 FPS
# held) and took the camera's clip leak from 23 to 13 of 1,356 frames (dlib mouth r 0.80 -> 0.78).
LIVE_DEFAULTS = {"detail_min_px": 0, "match_grain": False, "int8": "decoder", "keep_hair": False}


def _coerce(cls, values: Mapping[str, Any]):
    """Build a frozen dataclass from a mapping, rejecting unknown keys; lists become tuples."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - dataclass signature errors
        raise ConfigError(f"bad {cls.__name__}: {exc}") from None


def model_config_from_dict(values: Mapping[str, Any]) -> ModelConfig:
    return _coerce(ModelConfig, values)


def stored_model_config(values: Mapping[str, Any]) -> ModelConfig:
    """The ModelConfig stored with a checkpoint or weights file.

    A stored config without a ``decoder`` field predates the fast decoder: it was trained with
    AutoencoderTiny's own decoder, so it reads as ``decoder = "tiny"``."""
    return _coerce(ModelConfig, {"decoder": "tiny", **values})


def runtime_config_from_dict(values: Mapping[str, Any]) -> RuntimeConfig:
    return _coerce(RuntimeConfig, values)


def _read_toml(path: Path, table: str) -> dict:
    """The ``[table]`` of a TOML file; a missing, unreadable or malformed file is a one-line ConfigError."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {first_line(exc, filename=False)}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    if table not in data:
        raise ConfigError(f"config file {path} has no [{table}] table")
    return data[table]


def load_model_config(path: str | Path | None = None) -> ModelConfig:
    return model_config_from_dict(_read_toml(Path(path or CONFIG_DIR / "model_default.toml"), "model"))


def load_runtime_config(path: str | Path | None = None, *, defaults: Mapping[str, Any] | None = None,
                        **overrides: Any) -> RuntimeConfig:
    """The runtime configuration, built in one order (each layer overrides the one before):

    1. the built-in defaults (``configs/runtime_default.toml``, equal to :class:`RuntimeConfig`'s);
    2. ``defaults``: a command's own defaults (``safefm-cam`` skips the detail stage);
    3. the user's file ``path`` (``--config``): it must exist, or a one-line ConfigError names it;
    4. ``overrides``: command-line flags; ``None`` means the flag was not given.
    """
    builtin = CONFIG_DIR / "runtime_default.toml"
    values = _read_toml(builtin, "runtime") if builtin.exists() else {}
    values.update(defaults or {})
    if path is not None:
        values.update(_read_toml(Path(path), "runtime"))
    values.update({k: v for k, v in overrides.items() if v is not None})
    return runtime_config_from_dict(values)


def to_dict(cfg) -> dict:
    """JSON-ready dict of a config (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}
