"""The SAFE-FM generator stack, built from a :class:`~safefm.config.ModelConfig`.

- ``AutoencoderTiny`` (diffusers): image (B, 3, S, S) in [-1, 1] <-> latent (B, C, S/8, S/8).
- ``UNet2DConditionModel`` (diffusers): the flow-matching base, velocity in latent space,
  conditioned on identity tokens through cross-attention. Frozen once adapters are trained.
- ``ControlNetModel.from_unet``: the expression adapter fed the heatmaps; its connections to
  the UNet are zero-initialised convolutions, so an untrained adapter changes nothing.
- LoRA (peft ``LoraConfig``) on the UNet's attention projections: the identity/expression
  adapter on the frozen base.
- :class:`IdentityProjector`: identity embedding (B, D) -> cross-attention tokens (B, K, W).

All sizes come from the config; nothing is downloaded.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TIME_SCALE = 1000.0  # flow time t in [0, 1] is fed to the UNet as t * 1000 (its sinusoidal embedding)


class _ResBlock(nn.Module):
    """conv-relu-conv-relu-conv + skip, then relu (AutoencoderTiny's block, one width)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(ch, ch, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(ch, ch, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(ch, ch, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x) + x)


class FastDecoder(nn.Module):
    """The CPU-real-time latent decoder: raw latent (B, C, s, s) -> image (B, 3, 8s, 8s) in ~[0, 1].

    Wide residual blocks at the latent side, narrower ones after each 2x nearest upsample,
    and the last 2x done by a pixel shuffle, so no convolution runs at full image resolution
    (the AutoencoderTiny decoder spends most of its time there: measured 58 ms vs 11-14 ms
    at 128 px on one core in onnxruntime). It drops in as ``autoencoder.decoder``: the same
    input clamp as ``DecoderTiny``; ``SafeFMModel.decode`` maps its output with ``* 2 - 1``.

    With ``heat_channels`` > 0 (``ModelConfig.decoder_heat``) the expression heatmaps (B, Ch,
    H, H) also enter at the last stage (image side / 2): a 16 px-tall latent cell holds an
    eye, so the lids are placed from the heatmaps at 4x the latent's resolution. The branch's
    last convolution starts at zero (an untrained branch changes nothing), and ``heat=None``
    skips it.
    """

    def __init__(self, latent_channels: int, widths: tuple[int, ...], blocks: tuple[int, ...],
                 heat_channels: int = 0, image_size: int = 128):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(latent_channels, widths[0], 3, padding=1), nn.ReLU()]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            if i == len(widths) - 1:
                self._inject_at = len(layers)          # start of the last stage
            layers += [_ResBlock(w) for _ in range(n)]
            if i < len(widths) - 1:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"),
                           nn.Conv2d(w, widths[i + 1], 3, padding=1), nn.ReLU()]
        layers += [nn.Conv2d(widths[-1], 3 * 4, 3, padding=1), nn.PixelShuffle(2)]
        self.layers = nn.Sequential(*layers)
        self.heat = None
        self._heat_side = image_size   # the branch's stride-2 conv brings it to the last stage's side
        if heat_channels > 0:
            hidden = max(16, widths[-1])
            self.heat = nn.Sequential(nn.Conv2d(heat_channels, hidden, 3, stride=2, padding=1), nn.ReLU(),
                                      nn.Conv2d(hidden, widths[-1], 3, padding=1))
            nn.init.zeros_(self.heat[-1].weight)
            nn.init.zeros_(self.heat[-1].bias)

    def forward(self, z: torch.Tensor, heat: torch.Tensor | None = None) -> torch.Tensor:
        x = torch.tanh(z / 3) * 3
        if self.heat is None or heat is None:
            return self.layers(x)
        for i, layer in enumerate(self.layers):
            if i == self._inject_at:
                side = self._heat_side
                h = heat if heat.shape[-1] == side else nn.functional.interpolate(
                    heat, size=(side, side), mode="bilinear", align_corners=False)
                x = x + self.heat(h)
            x = layer(x)
        return x


class DetailNet(nn.Module):
    """The 2x detail stage: image (B, 3, s, s) in [-1, 1] -> image (B, 3, 2s, 2s), about [-1, 1].

    The bilinear 2x upsample of the input plus a learned residual: a fixed binomial low-pass
    ([1, 2, 1] / 4 each way: the fast decoder's own pixel shuffle leaves a faint 2 px pattern that
    a sharpening stage would otherwise turn into a visible mesh), a head convolution, residual
    blocks at the input's resolution and a pixel shuffle (so no convolution runs at the output's
    resolution). The residual's last convolution starts at zero, so an untrained stage is the
    plain bilinear upsample. Fully convolutional: trained on 64 -> 128 px pairs (the only scale
    with real detail in the training photos) and run on 128 -> 256 px crops.
    """

    def __init__(self, width: int, blocks: int):
        super().__init__()
        self.head = nn.Conv2d(3, width, 3, padding=1)
        self.body = nn.ModuleList([nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.LeakyReLU(0.2),
                                                 nn.Conv2d(width, width, 3, padding=1)) for _ in range(blocks)])
        self.tail = nn.Conv2d(width, 3 * 4, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2)
        k = torch.tensor([1.0, 2.0, 1.0]) / 4
        self.register_buffer("lowpass", (k[:, None] * k[None, :]).expand(3, 1, 3, 3).clone(), persistent=False)
        nn.init.zeros_(self.tail.weight)
        nn.init.zeros_(self.tail.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xl = nn.functional.conv2d(nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), self.lowpass, groups=3)
        h = nn.functional.leaky_relu(self.head(xl), 0.2)
        for block in self.body:
            h = h + block(h)
        up = nn.functional.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        return up + self.shuffle(self.tail(h))


def build_autoencoder(cfg: ModelConfig):
    """AutoencoderTiny; with ``cfg.decoder == "fast"`` its decoder is a :class:`FastDecoder`."""
    ae = _build_tiny(cfg)
    if cfg.decoder == "fast":
        ae.decoder = FastDecoder(cfg.latent_channels, tuple(cfg.decoder_widths), tuple(cfg.decoder_blocks),
                                 heat_channels=cfg.heatmap_channels if cfg.decoder_heat else 0,
                                 image_size=cfg.image_size)
    return ae


def _build_tiny(cfg: ModelConfig):
    from diffusers import AutoencoderTiny

    return AutoencoderTiny(
        in_channels=3, out_channels=3,
        encoder_block_out_channels=(cfg.ae_width,) * len(cfg.ae_blocks),
        decoder_block_out_channels=(cfg.ae_width,) * len(cfg.ae_blocks),
        num_encoder_blocks=tuple(cfg.ae_blocks),
        num_decoder_blocks=tuple(reversed(cfg.ae_blocks)),
        latent_channels=cfg.latent_channels,
    )


def build_unet(cfg: ModelConfig):
    from diffusers import UNet2DConditionModel

    n = len(cfg.unet_channels)
    if cfg.unet_cross_attention == "mid":   # identity tokens attended to only at the bottleneck
        down, up = ("DownBlock2D",) * n, ("UpBlock2D",) * n
    else:
        down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1)
        up = ("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",)
    film = {"class_embed_type": "projection",
            "projection_class_embeddings_input_dim": cfg.cross_attention_dim} if cfg.identity_film else {}
    heads = tuple(max(1, c // cfg.unet_attention_head_dim) for c in cfg.unet_channels)
    return UNet2DConditionModel(
        sample_size=cfg.latent_size,
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        block_out_channels=tuple(cfg.unet_channels),
        down_block_types=down,
        up_block_types=up,
        layers_per_block=cfg.unet_layers_per_block,
        cross_attention_dim=cfg.cross_attention_dim,
        attention_head_dim=heads,
        norm_num_groups=min(32, min(cfg.unet_channels)),
        **film,
    )


def build_controlnet(cfg: ModelConfig, unet):
    from diffusers import ControlNetModel

    return ControlNetModel.from_unet(
        unet,
        conditioning_embedding_out_channels=tuple(cfg.controlnet_embedding_channels),
        conditioning_channels=cfg.heatmap_channels + cfg.context_channels,
        load_weights_from_unet=True,
    )


CONTROLNET_INPUT = "controlnet.controlnet_cond_embedding.conv_in.weight"


def widen_controlnet_input(state: dict, channels: int) -> dict:
    """A SafeFMModel state dict whose ControlNet reads ``channels`` more conditioning channels
    (appended after the heatmaps): their input weights start at zero, so the widened model's
    outputs equal the original's whatever those channels hold. Returns a new dict."""
    w = state[CONTROLNET_INPUT]
    extra = torch.zeros(w.shape[0], channels, *w.shape[2:], dtype=w.dtype)
    return {**state, CONTROLNET_INPUT: torch.cat([w, extra], dim=1)}


def lora_config(cfg: ModelConfig):
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, init_lora_weights="gaussian",
                      target_modules=LORA_TARGETS)


class IdentityProjector(nn.Module):
    """Identity embedding (B, D) -> K cross-attention tokens (B, K, W). Input is L2-normalised."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.tokens, self.width = cfg.identity_tokens, cfg.cross_attention_dim
        self.net = nn.Sequential(
            nn.Linear(cfg.identity_dim, 256), nn.SiLU(),
            nn.Linear(256, cfg.identity_tokens * cfg.cross_attention_dim),
        )
        self.norm = nn.LayerNorm(cfg.cross_attention_dim)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        emb = emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        return self.norm(self.net(emb).view(-1, self.tokens, self.width))


class Velocity(nn.Module):
    """v(z_t, t | heatmaps, identity tokens): the UNet with the ControlNet's residuals added.

    z: (B, C, h, w) latent at flow time t (B,) in [0, 1]; heat: (B, Ch, H, H) in [0, 1] (with
    the context after it for a ``context_channels`` model: see :mod:`safefm.face.context`);
    tokens: (B, K, W). Returns the velocity (B, C, h, w). ``controlnet=None`` is the bare base.
    """

    def __init__(self, unet, controlnet=None):
        super().__init__()
        self.unet = unet
        self.controlnet = controlnet

    def forward(self, z: torch.Tensor, t: torch.Tensor, heat: torch.Tensor | None,
                tokens: torch.Tensor) -> torch.Tensor:
        ts = t.reshape(-1).expand(z.shape[0]) * TIME_SCALE
        # identity_film: the mean identity token also shifts every ResNet's time embedding
        film = {"class_labels": tokens.mean(1)} if self.unet.config.class_embed_type else {}
        down = mid = None
        if self.controlnet is not None and heat is not None:
            down, mid = self.controlnet(z, ts, encoder_hidden_states=tokens, controlnet_cond=heat,
                                        return_dict=False, **film)
        return self.unet(z, ts, encoder_hidden_states=tokens, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid, return_dict=False, **film)[0]


@torch.no_grad()
def scale_controlnet(controlnet, scale: float):
    """Multiply the ControlNet's zero-convolution outputs (down blocks and mid block) by
    ``scale`` in place: the same as diffusers' ``conditioning_scale``, baked into the weights so
    exported graphs need no extra input. 1.0 leaves the trained adapter as it is."""
    if controlnet is None or scale == 1.0:
        return controlnet
    for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
        conv.weight.mul_(scale)
        if conv.bias is not None:
            conv.bias.mul_(scale)
    return controlnet


class SafeFMModel(nn.Module):
    """Every trained part in one module, so one state dict is one checkpoint.

    ``latent_mean``/``latent_std`` normalise autoencoder latents to roughly unit variance for
    flow matching (fitted on the training crops): ``z_flow = (z_ae - mean) / std``.
    """

    def __init__(self, cfg: ModelConfig, with_controlnet: bool = True, with_lora: bool = True):
        super().__init__()
        self.cfg = cfg
        self.autoencoder = build_autoencoder(cfg)
        self.unet = build_unet(cfg)
        self.identity = IdentityProjector(cfg)
        self.controlnet = build_controlnet(cfg, self.unet) if with_controlnet else None
        if with_lora:
            self.unet.add_adapter(lora_config(cfg))
        self.detail = DetailNet(cfg.detail_width, cfg.detail_blocks) if cfg.detail_width else None
        self.register_buffer("latent_mean", torch.zeros(cfg.latent_channels))
        self.register_buffer("latent_std", torch.ones(cfg.latent_channels))

    @property
    def velocity(self) -> Velocity:
        return Velocity(self.unet, self.controlnet)

    def to_flow_latent(self, z_ae: torch.Tensor) -> torch.Tensor:
        return (z_ae - self.latent_mean.view(1, -1, 1, 1)) / self.latent_std.view(1, -1, 1, 1)

    def from_flow_latent(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.latent_std.view(1, -1, 1, 1) + self.latent_mean.view(1, -1, 1, 1)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [-1, 1] -> flow latent (B, C, S/8, S/8)."""
        return self.to_flow_latent(self.autoencoder.encoder((images + 1) / 2))

    def decode(self, z: torch.Tensor, heat: torch.Tensor | None = None) -> torch.Tensor:
        """Flow latent (B, C, s, s) -> images (B, 3, S, S) in [-1, 1]; ``heat`` (B, Ch, H, H)
        feeds a heatmap-conditioned decoder (``cfg.decoder_heat``; ignored otherwise)."""
        z = self.from_flow_latent(z)
        if heat is not None and self.cfg.decoder_heat:
            return (self.autoencoder.decoder(z, heat) * 2 - 1).clamp(-1, 1)
        return (self.autoencoder.decoder(z) * 2 - 1).clamp(-1, 1)


def count_parameters(module: nn.Module | None, trainable_only: bool = False) -> int:
    if module is None:
        return 0
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
