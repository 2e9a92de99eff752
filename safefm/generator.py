"""The one wrapper that owns device, dtype and runtime (torch or onnxruntime) for inference.

:class:`Generator` turns a trained :class:`~safefm.models.SafeFMModel` into three calls:

- ``identity_tokens(embedding (D,)) -> (1, K, W)``      once per identity
- ``generate(heat, tokens, noise, z_prev, t0, steps)``  the Euler ODE (:mod:`safefm.sampler`)
- ``decode(z) -> (B, S, S, 3) uint8``                   latent to RGB crops
- ``refine(crops) -> (B, 2S, 2S, 3) uint8``             the model's 2x detail stage, if it has one

LoRA is fused into the base weights at load (inference needs no adapter bookkeeping). The
ControlNet's heatmap encoder runs once per frame, not once per Euler step: it is split off
(``cond_embed``) and the velocity network takes its output.

The graphs (heatmap encoder, velocity = UNet + ControlNet, decoder, and the detail stage
when the model has one) are run by one backend, chosen once: :class:`TorchBackend` or
:class:`OnnxBackend` (exported once to ONNX, opset 17, cached by the weights' checksum, run by
onnxruntime sessions; the velocity also at batch 2, so a guided step's two velocities, the
identity's and the reference's, take one call). Both have the same small interface (``device``,
``embed``, ``velocity``, ``velocity_pair``, ``decode``, ``refine``); everything else (identity tokens, guidance, the
sampler, uint8 conversion) is the Generator's, the same for both. All
float32. Nothing process-wide is changed: ``threads`` sizes the onnxruntime sessions' own
pools; torch has only a process-wide count, which is its caller's to set
(``torch.set_num_threads``).

:meth:`Generator.load` on the onnx runtime, when the cache already holds the weights' graphs,
builds only the identity projector in torch (:class:`ExportedModel`): the UNet, ControlNet and
autoencoder are never constructed (importing diffusers alone took 6-10 s of ``safefm-cam``'s
start-up on a loaded 2-core CPU).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .config import ModelConfig, RuntimeConfig, resolve_solver
from .errors import DeviceError, WeightsError, first_line
from .models import IdentityProjector, SafeFMModel, Velocity, scale_controlnet
from .paths import cache_dir
from .sampler import sample

log = logging.getLogger(__name__)
ONNX_GRAPHS = "g5"  # bump when the exported graphs change, so stale caches are not reused

VelocityFn = Callable[[torch.Tensor, float], torch.Tensor]
PairFn = Callable[[torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]


def _onnx_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
        return True
    except ImportError:
        return False


def _onnx_providers() -> list[str]:
    import onnxruntime as ort
    return ort.get_available_providers()


def _state_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().float().numpy().tobytes())
    return h.hexdigest()


class _Decoder(torch.nn.Module):
    def __init__(self, model: SafeFMModel):
        super().__init__()
        self.model = model

    def forward(self, z, heat=None):
        return self.model.decode(z, heat)


class TorchBackend:
    """The three graphs run by torch on ``device``; inputs and outputs live there too."""

    name = "torch"
    providers = None

    def __init__(self, model: SafeFMModel, velocity_net: Velocity, cond_embed: torch.nn.Module,
                 device: torch.device):
        self.model, self.velocity_net, self.cond_embed, self.device = model, velocity_net, cond_embed, device

    def embed(self, heat: torch.Tensor) -> torch.Tensor:
        """Heatmaps (B, Ch, H, H) -> the ControlNet's conditioning (B, C0, h, w)."""
        return self.cond_embed(heat.to(self.device))

    def velocity(self, cond: torch.Tensor, tokens: torch.Tensor) -> VelocityFn:
        """``v(z (B, C, h, w), t) -> (B, C, h, w)`` with cond (B, C0, h, w) and tokens (1 or B, K, W) bound."""
        net, tok = self.velocity_net, tokens.expand(cond.shape[0], -1, -1)

        def v(z: torch.Tensor, t: float) -> torch.Tensor:
            return net(z, torch.full((z.shape[0],), t, device=z.device), cond, tok)
        return v

    def velocity_pair(self, cond: torch.Tensor, tokens: torch.Tensor, other: torch.Tensor) -> PairFn:
        """``v(z (B, C, h, w), t) -> (v with tokens, v with other)``, both (B, C, h, w), in one
        network call of batch 2B (tokens and other: (1 or B, K, W))."""
        net, n = self.velocity_net, cond.shape[0]
        cond2 = torch.cat([cond, cond])
        tok2 = torch.cat([tokens.expand(n, -1, -1), other.expand(n, -1, -1)])

        def v(z: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
            out = net(torch.cat([z, z]), torch.full((2 * n,), t, device=z.device), cond2, tok2)
            return out[:n], out[n:]
        return v

    def decode(self, z: torch.Tensor, heat: torch.Tensor | None) -> np.ndarray:
        """Latents (B, C, h, w) (+ heatmaps (B, Ch, H, H) or None) -> images (B, 3, S, S) in about [-1, 1]."""
        return self.model.decode(z.to(self.device), None if heat is None else heat.to(self.device)).cpu().numpy()

    def refine(self, x: np.ndarray) -> np.ndarray:
        """Images (B, 3, S, S) in [-1, 1] -> the detail stage's (B, 3, 2S, 2S)."""
        return self.model.detail(torch.from_numpy(x).to(self.device)).cpu().numpy()


def _run1(sess, feeds: dict) -> np.ndarray:
    """Run a batch-1 session over a batch: (B, ...) inputs -> (B, ...) output, item by item."""
    n = next(iter(feeds.values())).shape[0]
    if n == 1:
        return sess.run(None, feeds)[0]
    return np.concatenate([sess.run(None, {k: v[i:i + 1] for k, v in feeds.items()})[0] for i in range(n)])


class OnnxBackend:
    """The graphs exported to ONNX (batch 1, static shapes; the velocity also at batch 2 for a
    guided step) and run by onnxruntime sessions; inputs and outputs are host (CPU) tensors,
    batches run item by item.
    ``paths``: {graph name: exported file or None} (:func:`graph_paths`, :func:`export_graphs`)."""

    name = "onnx"
    device = torch.device("cpu")

    def __init__(self, paths: dict[str, Path | None], cfg: RuntimeConfig):
        import onnxruntime as ort

        folder = paths["velocity"].parent
        opts = ort.SessionOptions()
        if cfg.threads > 0:
            opts.intra_op_num_threads = cfg.threads
        opts.inter_op_num_threads = 1   # the graphs run sequentially: no second pool
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # No busy-waiting between runs: onnxruntime's spinning worker threads otherwise take the
        # cores from the per-frame torch / MediaPipe / OpenCV work right after every call
        # (measured: decode 20 ms through Generator.decode vs 9 ms inside the session).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        wanted = onnx_providers(cfg.device, ort.get_available_providers())
        fell_back = False
        try:
            sessions = open_sessions(ort, paths, opts, _provider_options(wanted, folder))
        except Exception as exc:
            if wanted == [CPU_PROVIDER]:
                raise WeightsError(f"onnxruntime could not load the exported model in {folder} ({exc}); "
                                   "delete that folder or use --runtime torch") from None
            log.warning("onnxruntime %s could not start (%s); running on the CPU",
                        " / ".join(wanted[:-1]), first_line(exc))
            fell_back = True
            try:
                sessions = open_sessions(ort, paths, opts, [CPU_PROVIDER])
            except Exception as exc2:
                raise WeightsError(f"onnxruntime could not load the exported model in {folder} ({exc2}); "
                                   "delete that folder or use --runtime torch") from None
        self._velocity, self._decoder = sessions["velocity"], sessions["decoder"]
        self._cond, self._detail = sessions["cond"], sessions["detail"]
        self._velocity2 = sessions.get("velocity2")   # a guided step's two velocities in one call
        self.providers = self._velocity.get_providers()
        self._folder, self._opts = folder, opts
        if not fell_back and self.providers[0] != wanted[0]:   # onnxruntime dropped it quietly
            log.warning("onnxruntime %s did not start; running on %s", wanted[0], self.providers[0])

    def use_int8(self, feeds_fn, names=("velocity", "decoder")) -> None:
        """Run the graphs ``names`` (of velocity, decoder) with int8 convolutions
        (:mod:`safefm.quantize`; made once from ``feeds_fn()`` and cached beside the float ones).
        The detail stage stays float: int8 left a dot pattern in its residual."""
        import onnxruntime as ort

        from .quantize import ensure_int8

        names = [n for n in ("velocity", "decoder") if n in names]
        paths = ensure_int8(self._folder, names, feeds_fn)
        try:
            sessions = open_sessions(ort, paths, self._opts, self.providers)
        except Exception as exc:
            raise WeightsError(f"onnxruntime could not load the int8 model in {self._folder} ({exc}); "
                               "delete its *.int8v2.onnx files or run without int8") from None
        if "velocity" in sessions:   # a guided step makes two int8 calls (the batch-2 graph is float)
            self._velocity, self._velocity2 = sessions["velocity"], None
        self._decoder = sessions.get("decoder") or self._decoder

    def embed(self, heat: torch.Tensor) -> torch.Tensor:
        """Heatmaps (B, Ch, H, H) -> the ControlNet's conditioning (B, C0, h, w)."""
        return torch.from_numpy(_run1(self._cond, {"heat": heat.cpu().numpy()}))

    def velocity(self, cond: torch.Tensor, tokens: torch.Tensor) -> VelocityFn:
        """``v(z (B, C, h, w), t) -> (B, C, h, w)`` with cond (B, C0, h, w) and tokens (1 or B, K, W) bound."""
        sess = self._velocity
        feeds = {"cond": cond.cpu().numpy(), "tokens": tokens.expand(cond.shape[0], -1, -1).cpu().numpy()}

        def v(z: torch.Tensor, t: float) -> torch.Tensor:
            feeds["z"] = z.numpy()
            feeds["t"] = np.full((z.shape[0],), t, np.float32)
            return torch.from_numpy(_run1(sess, feeds))
        return v

    def velocity_pair(self, cond: torch.Tensor, tokens: torch.Tensor, other: torch.Tensor) -> PairFn:
        """``v(z (B, C, h, w), t) -> (v with tokens, v with other)``, both (B, C, h, w): per item
        one call of the batch-2 graph (measured on 2 cores: 6.5 ms against 2 x 5.3 ms), or two
        of the batch-1 graph when there is none (int8)."""
        if self._velocity2 is None:
            v_a, v_b = self.velocity(cond, tokens), self.velocity(cond, other)
            return lambda z, t: (v_a(z, t), v_b(z, t))
        sess, n = self._velocity2, cond.shape[0]
        c, a, b = (x.cpu().numpy() for x in (cond, tokens.expand(n, -1, -1), other.expand(n, -1, -1)))
        items = [{"cond": np.concatenate([c[i:i + 1]] * 2), "tokens": np.concatenate([a[i:i + 1], b[i:i + 1]])}
                 for i in range(n)]

        def v(z: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
            zn, tt = z.numpy(), np.full((2,), t, np.float32)
            out = [sess.run(None, {**feeds, "z": np.concatenate([zn[i:i + 1]] * 2), "t": tt})[0]
                   for i, feeds in enumerate(items)]
            return (torch.from_numpy(np.concatenate([o[:1] for o in out])),
                    torch.from_numpy(np.concatenate([o[1:] for o in out])))
        return v

    def decode(self, z: torch.Tensor, heat: torch.Tensor | None) -> np.ndarray:
        """Latents (B, C, h, w) (+ heatmaps (B, Ch, H, H) or None) -> images (B, 3, S, S) in about [-1, 1]."""
        feeds = {"z": z.cpu().numpy().astype(np.float32)}
        if heat is not None:
            feeds["heat"] = np.ascontiguousarray(heat.cpu().numpy())
        return _run1(self._decoder, feeds)

    def refine(self, x: np.ndarray) -> np.ndarray:
        """Images (B, 3, S, S) in [-1, 1] -> the detail stage's (B, 3, 2S, 2S)."""
        return _run1(self._detail, {"image": np.ascontiguousarray(x, np.float32)})


CPU_PROVIDER = "CPUExecutionProvider"
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")   # best first


def onnx_providers(device: str, available) -> list[str]:
    """onnxruntime execution providers for ``device`` (cpu | cuda | auto), best first:
    TensorRT then CUDA where ``available`` has them (not for cpu), the CPU always last."""
    if device == "cpu":
        return [CPU_PROVIDER]
    return [p for p in GPU_PROVIDERS if p in available] + [CPU_PROVIDER]


def _provider_options(providers: list[str], folder: Path) -> list:
    """TensorRT builds its engines once into ``folder``/trt (float32, like every other runtime)."""
    return [(p, {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(folder / "trt")})
            if p == "TensorrtExecutionProvider" else p for p in providers]


def open_sessions(ort, paths: dict, opts, providers: list) -> dict:
    """{name: onnxruntime.InferenceSession or None} for {name: model path or None}."""
    return {k: ort.InferenceSession(str(v), opts, providers=providers) if v is not None else None
            for k, v in paths.items()}


def _export(module, args, path: Path, inputs, outputs) -> None:
    """A graph with static shapes (the batch of ``args``: 1, or 2 for the guided velocity):
    onnxruntime then folds the shape arithmetic away (measured: 2,833 -> 1,017 nodes after
    optimisation, 15 -> 10 ms a step on 1 thread); batches run item by item (``_run1``).
    Written under a name of this process's own and renamed: processes exporting the same
    weights at once (batch workers, parallel evaluations) never read or move each other's
    half-written file."""
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.{threading.get_ident()}.tmp.onnx")
    try:
        with torch.no_grad():
            torch.onnx.export(module, args, str(tmp), input_names=inputs, output_names=outputs,
                              opset_version=17, dynamo=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def onnx_folder(digest: str) -> Path:
    """The cache folder of the graphs exported from the weights with checksum ``digest``."""
    return cache_dir() / "onnx" / f"{digest[:16]}-{ONNX_GRAPHS}-{torch.__version__.split('+')[0]}"


def graph_paths(folder: Path, has_cond: bool, has_detail: bool) -> dict[str, Path | None]:
    """{graph name: its file in ``folder``, None for a graph the model does not have}."""
    return {"velocity": folder / "velocity.onnx", "velocity2": folder / "velocity2.onnx",
            "decoder": folder / "decoder.onnx",
            "cond": folder / "cond.onnx" if has_cond else None,
            "detail": folder / "detail.onnx" if has_detail else None}


def variant_digest(digest: str, cfg: RuntimeConfig, has_controlnet: bool, has_detail: bool) -> str:
    """The checksum of the weights as the Generator runs them: the file's ``digest``, changed
    by the runtime settings that rescale weights (so they get their own ONNX export)."""
    if cfg.controlnet_scale != 1.0 and has_controlnet:
        digest = hashlib.sha256(f"{digest}:cn{cfg.controlnet_scale!r}".encode()).hexdigest()
    if cfg.detail_strength != 1.0 and has_detail:
        digest = hashlib.sha256(f"{digest}:detail{cfg.detail_strength!r}".encode()).hexdigest()
    return digest


def export_graphs(model: SafeFMModel, velocity_net: Velocity, cond_embed: torch.nn.Module | None,
                  folder: Path) -> dict[str, Path | None]:
    """Export the graphs missing from ``folder`` (from the CPU); returns :func:`graph_paths`."""
    mc = model.cfg
    folder.mkdir(parents=True, exist_ok=True)
    paths = graph_paths(folder, cond_embed is not None, model.detail is not None)
    z = torch.zeros(1, *mc.latent_shape)
    heat = torch.zeros(1, mc.heatmap_channels + mc.context_channels, mc.heatmap_size, mc.heatmap_size)
    if cond_embed is not None and not paths["cond"].exists():
        _export(cond_embed.cpu(), (heat,), paths["cond"], ["heat"], ["cond"])
    cond = cond_embed.cpu()(heat) if cond_embed is not None else heat
    for name, n in (("velocity", 1), ("velocity2", 2)):   # batch 2: a guided step's two calls in one
        if not paths[name].exists():
            args = (torch.zeros(n, *mc.latent_shape), torch.full((n,), 0.5), cond.expand(n, -1, -1, -1).contiguous(),
                    torch.zeros(n, mc.identity_tokens, mc.cross_attention_dim))
            _export(velocity_net.cpu(), args, paths[name], ["z", "t", "cond", "tokens"], ["v"])
    if not paths["decoder"].exists():
        if mc.decoder_heat:
            _export(_Decoder(model).cpu(), (z, heat[:, :mc.heatmap_channels]), paths["decoder"], ["z", "heat"],
                    ["image"])
        else:
            _export(_Decoder(model).cpu(), (z,), paths["decoder"], ["z"], ["image"])
    if model.detail is not None and not paths["detail"].exists():
        _export(model.detail.cpu(), (torch.zeros(1, 3, mc.image_size, mc.image_size),), paths["detail"],
                ["image"], ["detail"])
    return paths


@dataclass(frozen=True)
class ExportedModel:
    """A model whose graphs are already exported to ONNX (found by :meth:`Generator.load` in the
    cache): its config, its identity projector (the only part run in torch) and the graph files.
    Nothing else of the model is built (no diffusers modules: seconds at start-up)."""
    cfg: ModelConfig
    identity: IdentityProjector
    paths: dict[str, Path | None]     # graph_paths()


def _resolve_runtime(cfg: RuntimeConfig) -> str:
    return cfg.runtime if cfg.runtime != "auto" else ("onnx" if _onnx_available() else "torch")


class Generator:
    """Inference wrapper. ``model`` is a SafeFMModel (LoRA is fused in place), or an
    :class:`ExportedModel` (the onnx runtime on graphs already exported; :meth:`load` makes it)."""

    def __init__(self, model: SafeFMModel | ExportedModel, cfg: RuntimeConfig, digest: str | None = None):
        self.cfg = cfg
        self.model_cfg: ModelConfig = model.cfg
        self.solver = resolve_solver(model.cfg.objective, cfg.solver)   # before any work: a loud one-line error
        self.runtime = _resolve_runtime(cfg)
        if isinstance(model, ExportedModel) and self.runtime != "onnx":
            raise ValueError(f"an ExportedModel runs on onnxruntime only, not the {self.runtime} runtime")
        if cfg.device == "cuda":
            if self.runtime == "torch" and not torch.cuda.is_available():
                raise DeviceError("--device cuda was asked for, but torch sees no CUDA GPU (use --device cpu)")
            if self.runtime == "onnx" and onnx_providers("cuda", _onnx_providers()) == [CPU_PROVIDER]:
                raise DeviceError("--device cuda was asked for, but onnxruntime has no CUDA or TensorRT "
                                  "provider (install onnxruntime-gpu, or use --device cpu)")
        # torch's device (the torch runtime, and the identity tokens with either runtime)
        self.device = torch.device("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")
        if isinstance(model, ExportedModel):
            self.model = None                 # no torch graphs: the sessions run the exported ones
            self.cond_embed = self.velocity_net = None
            self._has_cond, self._has_detail = model.paths["cond"] is not None, model.paths["detail"] is not None
            self.identity_net = model.identity
            self.backend = OnnxBackend(model.paths, cfg)
        else:
            self._build(model, digest)
        self.identity_net.to(self.device)   # identity tokens run in torch with either backend
        self.providers = self.backend.providers
        self._null_tokens: torch.Tensor | None = None
        self.int8 = cfg.int8 != "off" and self.runtime == "onnx" and self.providers[0] == CPU_PROVIDER
        if cfg.int8 != "off" and self.runtime != "onnx":   # "all" is asked for; "decoder" is the camera's default
            (log.warning if cfg.int8 == "all" else log.info)("int8 needs onnxruntime (runtime %s): running in float32",
                                                              self.runtime)
        elif cfg.int8 != "off" and not self.int8:   # QDQ graphs are a CPU speed-up; a GPU runs them no faster
            log.info("int8 is for the CPU: %s runs the float graphs", self.providers[0])
        if self.int8:
            from .paths import identities_dir
            from .identity import load_identity
            from .quantize import calibration_feeds

            def feeds():
                shipped = [load_identity(p, self.model_cfg.identity_dim)
                           for p in sorted(identities_dir().glob("*.pt"))]
                return calibration_feeds(self, shipped or [_random_identity(self.model_cfg.identity_dim)])
            self.backend.use_int8(feeds, ("decoder",) if cfg.int8 == "decoder" else ("velocity", "decoder"))

    def _build(self, model: SafeFMModel, digest: str | None) -> None:
        """Prepare the torch model for inference and open its backend (exporting for onnx)."""
        cfg = self.cfg
        if cfg.controlnet_scale != 1.0 and model.controlnet is not None:
            scale_controlnet(model.controlnet, cfg.controlnet_scale)
        if cfg.detail_strength != 1.0 and model.detail is not None:
            with torch.no_grad():   # the residual's last convolution carries the whole residual
                model.detail.tail.weight.mul_(cfg.detail_strength)
                model.detail.tail.bias.mul_(cfg.detail_strength)
        if digest:   # other weights than the file's: their own ONNX export
            digest = variant_digest(digest, cfg, model.controlnet is not None, model.detail is not None)
        if any("lora_" in k for k in model.unet.state_dict()):
            model.unet.fuse_lora()
            model.unet.unload_lora()
        self.model = model.eval().requires_grad_(False)
        if self.runtime == "onnx" and not digest:
            digest = _state_digest(self.model)   # before the split: the heatmap encoder counts too
        self.cond_embed = None
        if model.controlnet is not None:  # heatmaps (B, Ch, H, H) -> (B, C0, h, w), once per frame
            self.cond_embed = model.controlnet.controlnet_cond_embedding
            model.controlnet.controlnet_cond_embedding = torch.nn.Identity()
        self._has_cond, self._has_detail = self.cond_embed is not None, model.detail is not None
        self.identity_net = self.model.identity
        self.velocity_net = Velocity(self.model.unet, self.model.controlnet)
        if self.runtime == "onnx":   # exported from the CPU
            paths = export_graphs(self.model, self.velocity_net, self.cond_embed, onnx_folder(digest))
            self.backend = OnnxBackend(paths, cfg)
        else:
            if self.cond_embed is not None:
                self.cond_embed.to(self.device)
            self.backend = TorchBackend(self.model, self.velocity_net, self.cond_embed, self.device)
        self.model.to(self.device)

    @classmethod
    def load(cls, path: str | Path, cfg: RuntimeConfig) -> "Generator":
        """The generator of the weights file ``path``. On the onnx runtime, when the graphs of
        these weights (checksum from the sidecar) are already in the cache, only the identity
        projector is built in torch (:class:`ExportedModel`): seconds faster to start."""
        from .checkpoint import load_model, load_part, read_model_header

        mc, meta, keys = read_model_header(path)
        digest = meta["sha256"]
        if digest and _resolve_runtime(cfg) == "onnx":
            has_cn = any(k.startswith("controlnet.") for k in keys)
            paths = graph_paths(onnx_folder(variant_digest(digest, cfg, has_cn, bool(mc.detail_width))),
                                has_cn, bool(mc.detail_width))
            if all(p.exists() for p in paths.values() if p is not None):
                identity = load_part(path, "identity", IdentityProjector(mc))
                return cls(ExportedModel(mc, identity.requires_grad_(False), paths), cfg)
        model, meta = load_model(path)
        return cls(model, cfg, digest=meta.get("sha256") or None)

    # -- public calls ----------------------------------------------------------------------
    @torch.no_grad()
    def identity_tokens(self, embedding: np.ndarray) -> torch.Tensor:
        """(D,) identity embedding -> (1, K, W) float32 tokens on the runtime's device."""
        e = torch.as_tensor(np.asarray(embedding, np.float32)).reshape(1, -1).to(self.device)
        return self.identity_net(e)

    @torch.no_grad()
    def embed_heatmaps(self, heat: torch.Tensor) -> torch.Tensor:
        """The ControlNet's heatmap encoder, once per frame: (B, Ch, H, H) -> (B, C0, h, w)."""
        if not self._has_cond:
            return heat
        return self.backend.embed(heat)

    def velocity(self, heat: torch.Tensor, tokens: torch.Tensor, guidance: float | None = None,
                 until: float | None = None, reference: torch.Tensor | None = None) -> VelocityFn:
        """The callable ``v(z, t)`` for the sampler, with heatmaps (B, Ch, H, H) and tokens bound.

        With ``identity_guidance`` w != 1 (classifier-free guidance on the identity; the base and
        adapters were trained with a 10 % null identity), steps at flow times t < ``guidance_until``
        return ``v_ref + w * (v_id - v_ref)``: two velocities, in one network call of twice the
        batch (:meth:`OnnxBackend.velocity_pair`; two calls with int8 velocity). The reference is
        the null identity, or ``reference`` tokens (1, K, W): e.g. the real person's own
        embedding, so the output is pushed away from that face (``identity_repel``).
        ``guidance`` / ``until`` override the runtime config's values."""
        cond = self.embed_heatmaps(heat)
        v_id = self.backend.velocity(cond, tokens)
        w = self.cfg.identity_guidance if guidance is None else guidance
        until = self.cfg.guidance_until if until is None else until
        if w == 1.0 or until <= 0.0:
            return v_id
        pair = self.backend.velocity_pair(cond, tokens, self.null_tokens() if reference is None else reference)

        diffusion = self.model_cfg.objective == "diffusion"

        def v(z: torch.Tensor, t: float) -> torch.Tensor:
            if (1.0 - t if diffusion else t) >= until:   # `until` is a flow time (0 noise, 1 data)
                return v_id(z, t)
            vi, vn = pair(z, t)   # both in one network call of twice the batch
            return vn + w * (vi - vn)
        return v

    def null_tokens(self) -> torch.Tensor:
        """(1, K, W) tokens of the null identity (all-zero embedding), the CFG reference."""
        if self._null_tokens is None:
            self._null_tokens = self.identity_tokens(np.zeros(self.model_cfg.identity_dim, np.float32))
        return self._null_tokens

    @torch.no_grad()
    def generate(self, heat: np.ndarray | torch.Tensor, tokens: torch.Tensor, noise: torch.Tensor,
                 z_prev: torch.Tensor | None = None, t0: float = 0.0, steps: int | None = None,
                 guidance: float | None = None, guidance_until: float | None = None,
                 reference: torch.Tensor | None = None, context: np.ndarray | None = None) -> torch.Tensor:
        """Latents (B, C, h, w) for heatmaps (B, Ch, H, H) in [0, 1].

        noise: (B or 1, C, h, w) fixed identity noise; z_prev: the track's previous latent for a
        warm start at flow time t0, which takes only the solver steps of the grid left after t0
        (:func:`safefm.sampler.sample`, or :func:`safefm.diffusion_sampler.sample` for the
        diffusion twin; None = cold start from noise at t = 0); steps, guidance
        and guidance_until default to the runtime config's ``steps``, ``identity_guidance`` and
        ``guidance_until``; reference: the guidance's reference tokens (None: the null identity);
        context: the frame around the face (:meth:`cond_input`).
        """
        heat = self.cond_input(heat, context)
        noise = noise.expand(heat.shape[0], -1, -1, -1).to(self.backend.device)
        v = self.velocity(heat, tokens, guidance, guidance_until, reference)
        if self.model_cfg.objective == "diffusion":
            from .diffusion_sampler import sample as diffusion_sample

            return diffusion_sample(v, noise, steps or self.cfg.steps, self.solver, z_prev=z_prev, t0=t0)
        return sample(v, noise, steps or self.cfg.steps, z_prev=z_prev, t0=t0, solver=self.solver)

    @property
    def reads_context(self) -> bool:
        """Whether the model's ControlNet reads the frame around the face and the runtime config
        lets it (``context``); the engine builds a context only then."""
        return bool(self.model_cfg.context_channels) and self.cfg.context

    def cond_input(self, heat: np.ndarray | torch.Tensor, context: np.ndarray | None = None) -> torch.Tensor:
        """The ControlNet's input (B, Ch [+ 4], H, H) float32: the heatmaps ((B, Ch, H, H) or
        (Ch, H, H)), then for a model with ``context_channels`` the context ((B or 1, 4, H, H) or
        (4, H, H), :mod:`safefm.face.context`), the null context when None or when the runtime
        config turns context off. A model without context ignores ``context``."""
        heat = torch.as_tensor(heat, dtype=torch.float32)
        if heat.dim() == 3:
            heat = heat[None]
        mc = self.model_cfg
        if not mc.context_channels:
            return heat
        if context is None or not self.cfg.context:
            from .face.context import null_context

            context = null_context(mc.heatmap_size)
        ctx = torch.as_tensor(context, dtype=torch.float32)
        ctx = ctx[None] if ctx.dim() == 3 else ctx
        return torch.cat([heat, ctx.expand(heat.shape[0], -1, -1, -1)], dim=1)

    @torch.no_grad()
    def decode(self, z: torch.Tensor, heat: np.ndarray | torch.Tensor | None = None) -> np.ndarray:
        """Latents (B, C, h, w) -> RGB crops (B, S, S, 3) uint8. ``heat``: the heatmaps the
        latents were generated for ((B or 1, Ch, H, H) or (Ch, H, H)), used by a
        heatmap-conditioned decoder (``decoder_heat``; without them it gets empty heatmaps) and
        ignored otherwise."""
        mc = self.model_cfg
        if not mc.decoder_heat:
            heat = None
        elif heat is None:
            heat = torch.zeros(z.shape[0], mc.heatmap_channels, mc.heatmap_size, mc.heatmap_size)
        else:
            heat = torch.as_tensor(heat, dtype=torch.float32)
            heat = (heat[None] if heat.dim() == 3 else heat).expand(z.shape[0], -1, -1, -1)
        return _to_uint8(self.backend.decode(z, heat))

    @property
    def has_detail(self) -> bool:
        """Whether the model has a 2x detail stage (:meth:`refine`)."""
        return self._has_detail

    @torch.no_grad()
    def refine(self, crops: np.ndarray) -> np.ndarray:
        """RGB crops (B, S, S, 3) uint8 -> (B, 2S, 2S, 3) uint8 through the model's 2x detail
        stage (:class:`safefm.models.DetailNet`). Raises RuntimeError without one."""
        if not self.has_detail:
            raise RuntimeError("this model has no detail stage")
        x = np.ascontiguousarray(crops.transpose(0, 3, 1, 2), np.float32) / 127.5 - 1.0
        return _to_uint8(self.backend.refine(x))


def _random_identity(dim: int):
    """A seeded identity on the template face (int8 calibration when no identity ships)."""
    from .face.alignment import load_template
    from .identity import Identity

    e = np.random.default_rng(0).normal(size=dim).astype(np.float32)
    return Identity(e / np.linalg.norm(e), load_template().astype(np.float32), 0)


def _to_uint8(img: np.ndarray) -> np.ndarray:
    """(B, 3, H, W) float in about [-1, 1] -> (B, H, W, 3) uint8."""
    img = img.transpose(0, 2, 3, 1)
    return np.ascontiguousarray(np.rint((np.clip(img, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8))
