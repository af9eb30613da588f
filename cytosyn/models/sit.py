"""SiT: the latent denoiser (a DiT-style transformer with adaLN-Zero), conditioned on a tile embedding.

Architecture (Peebles & Xie's DiT as used by SiT, REPA and REPA-E; written here from the papers):

- ``x_embedder.proj``: a ``p×p`` stride-``p`` convolution turning the ``(B, C, H, W)`` latent into
  ``(H/p)·(W/p)`` tokens (row-major), plus a fixed 2-D sin-cos positional embedding (``pos_embed``, a
  persistent buffer: saved, never trained).
- Conditioning vector ``c = t_embedder(t) + cond_embedder(cond)`` drives every block's adaLN:
  - ``t_embedder``: sinusoidal features of ``time_scale·t`` (256 wide, ``[cos, sin]``, max period 10⁴) →
    ``Linear → SiLU → Linear``. ``time_scale`` defaults to **1**: t ∈ [0, 1] is fed unscaled, exactly as
    REPA / REPA-E do, so their checkpoints load with the same time embedding. (Scaling by 1000, as DiT's
    discrete timesteps are, spreads the lower frequencies better; it is a config option, but a checkpoint
    must be used with the scale it was trained with.)
  - ``cond_embedder``: the encoder embedding (e.g. H0-mini's 768-d CLS token) → ``Linear(cond_dim, hidden)
    → SiLU → Linear(hidden, hidden)``. Its ``null_embedding`` (a learned vector of width ``cond_dim``)
    replaces the embedding of a sample with probability ``cond_dropout`` in training, and wherever
    ``uncond_mask`` is set (classifier-free guidance, unconditional sampling), or for every sample when
    ``cond`` is None. The null vector goes through the same MLP, so "no condition" is a point of the
    conditioning input space.
- ``blocks``: ``depth`` pre-norm transformer blocks. Each has affine-free LayerNorms (eps 1e-6), multi-head
  self-attention (fused ``qkv``, ``proj``; optional per-head q/k LayerNorm) and a GELU(tanh) MLP
  (``fc1``, ``fc2``), modulated by ``adaLN_modulation = SiLU → Linear(hidden, 6·hidden)`` giving shift,
  scale and gate for attention and MLP (in that order).
- ``final_layer``: adaLN (shift, scale) → ``Linear(hidden, p·p·C_out)`` → unpatchify.
- REPA: with ``repa_dim`` set, the tokens after block ``repa_depth`` (1-based: block index
  ``repa_depth − 1``) go through ``projectors.0`` (:class:`~cytosyn.models.repa.REPAProjector`).

adaLN-Zero: every ``adaLN_modulation`` and the final ``linear`` start at zero, so the model's output is
exactly 0 at initialisation. Attention runs through ``torch.nn.functional.scaled_dot_product_attention``;
the xformers kernel is used only when asked for (``"xformers"`` or ``"auto"``), importable and verified to
work on the current device and dtype, and SDPA is the fallback otherwise.

Parameter names follow the public SiT / REPA / REPA-E code wherever the architecture is the same, so
:func:`load_sit_state_dict` can start a fine-tune from their checkpoints.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from cytosyn.config import StrictModel
from cytosyn.models.repa import REPAProjector

AttentionBackend = Literal["sdpa", "xformers", "auto"]

# name -> (depth, hidden_size, num_heads); every size exists with patch 2, 4 and 8 ("SiT-XL/2", ...).
_SIZES: dict[str, tuple[int, int, int]] = {
    # Tiny, for CPU tests and smoke runs: 4 blocks, width 96, 4 heads of 24 (REPA after block 2, through a
    # 256-wide projector).
    "T": (4, 96, 4),
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}

SIT_PRESETS: dict[str, dict[str, Any]] = {}
for _size, (_depth, _hidden, _heads) in _SIZES.items():
    for _patch in (2, 4, 8):
        SIT_PRESETS[f"SiT-{_size}/{_patch}"] = {
            "depth": _depth,
            "hidden_size": _hidden,
            "num_heads": _heads,
            "patch_size": _patch,
            **({"repa_depth": 2, "repa_hidden": 256} if _size == "T" else {}),
        }


class SiTConfig(StrictModel):
    """Architecture of the denoiser. Defaults are SiT-XL/2 on 224 px tiles with SD-VAE f8 latents,
    conditioned on H0-mini's 768-d CLS token and REPA-aligned with its 768-d patch tokens after block 8.

    ``preset`` (e.g. ``"SiT-B/2"``) fills ``depth``, ``hidden_size``, ``num_heads`` and ``patch_size``
    (and ``repa_depth``/``repa_hidden`` for the tiny T preset) for the keys that are not given explicitly; explicit keys win.
    """

    preset: str | None = None
    input_size: int = Field(28, ge=1, description="latent side (224 px / f8 = 28)")
    in_channels: int = Field(4, ge=1)
    patch_size: int = Field(2, ge=1)
    hidden_size: int = Field(1152, ge=4)
    depth: int = Field(28, ge=1)
    num_heads: int = Field(16, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    cond_dim: int | None = Field(768, ge=1, description="conditioning embedding width; None: unconditional")
    cond_dropout: float = Field(0.1, ge=0.0, le=1.0)
    num_classes: int | None = Field(
        None, ge=1, description="class labels (label_embedder, index num_classes = null); None: no labels"
    )
    repa_depth: int = Field(8, ge=1, description="REPA tokens are taken after this block (1-based)")
    repa_dim: int | None = Field(768, ge=1, description="encoder token width; None disables REPA")
    repa_hidden: int = Field(2048, ge=1)
    learn_sigma: bool = False
    qk_norm: bool = False
    time_scale: float = Field(1.0, gt=0, description="the time embedding sees time_scale·t")
    attention: AttentionBackend = "sdpa"
    grad_checkpointing: bool = False

    @model_validator(mode="before")
    @classmethod
    def _fill_from_preset(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and data.get("preset") is not None:
            name = data["preset"]
            if name not in SIT_PRESETS:
                raise ValueError(f"unknown preset {name!r}; known: {', '.join(SIT_PRESETS)}")
            data = {**SIT_PRESETS[name], **data}
        return data

    @model_validator(mode="after")
    def _check(self) -> SiTConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.hidden_size % 4:
            raise ValueError(
                f"hidden_size {self.hidden_size} must be a multiple of 4 (2-D sin-cos embedding)"
            )
        if self.input_size % self.patch_size:
            raise ValueError(f"input_size {self.input_size} is not divisible by patch_size {self.patch_size}")
        if self.repa_dim is not None and self.repa_depth > self.depth:
            raise ValueError(f"repa_depth {self.repa_depth} exceeds depth {self.depth}")
        return self

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> SiTConfig:
        return cls.model_validate({"preset": name, **overrides})

    @property
    def grid_size(self) -> int:
        return self.input_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid_size**2

    @property
    def out_channels(self) -> int:
        return self.in_channels * (2 if self.learn_sigma else 1)

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


# --------------------------------------------------------------------------------------------------------
# Fixed embeddings
# --------------------------------------------------------------------------------------------------------


def _sincos_1d(dim: int, pos: Tensor) -> Tensor:
    """``[sin(pos·ω), cos(pos·ω)]`` with ``ω_k = 10000^(−k/(dim/2))``, in float64."""
    omega = torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2)
    omega = 1.0 / (10000.0**omega)
    args = pos.reshape(-1).to(torch.float64)[:, None] * omega[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int | None = None, device=None) -> Tensor:
    """Fixed 2-D sin-cos embedding ``(grid_h·grid_w, dim)`` for row-major tokens (MAE/DiT layout).

    The first half of the channels encodes the column index, the second half the row index, each as
    ``[sin, cos]`` of ``dim/4`` frequencies: the same values as the public DiT/SiT/REPA ``pos_embed``.
    """
    grid_w = grid_h if grid_w is None else grid_w
    if dim % 4:
        raise ValueError(f"embedding width {dim} must be a multiple of 4")
    rows = torch.arange(grid_h, dtype=torch.float64, device=device)
    cols = torch.arange(grid_w, dtype=torch.float64, device=device)
    row_idx, col_idx = torch.meshgrid(rows, cols, indexing="ij")
    emb = torch.cat([_sincos_1d(dim // 2, col_idx), _sincos_1d(dim // 2, row_idx)], dim=1)
    return emb.to(torch.float32)


def timestep_features(t: Tensor, dim: int = 256, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features ``[cos(t·f), sin(t·f)]`` of a ``(B,)`` time, ``f_k = max_period^(−k/(dim/2))``
    (float32; zero-padded when ``dim`` is odd)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


# --------------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------------

_XFORMERS_OK: dict[tuple[str, torch.dtype], bool] = {}
_WARNED_XFORMERS = False


def xformers_usable(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether xformers is importable and its memory-efficient attention runs correctly on ``device`` with
    ``dtype`` (checked once per device type and dtype against SDPA on a small problem)."""
    if device.type in ("meta", "cpu"):
        return False
    key = (device.type, dtype)
    if key not in _XFORMERS_OK:
        ok = False
        try:
            import xformers.ops as xops  # type: ignore[import-not-found]

            g = torch.Generator(device="cpu").manual_seed(0)
            q, k, v = (
                torch.randn(2, 4, 64, 32, generator=g).to(device=device, dtype=dtype) for _ in range(3)
            )
            got = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            want = F.scaled_dot_product_attention(q, k, v)
            ok = bool(torch.allclose(got.transpose(1, 2).float(), want.float(), atol=2e-2, rtol=2e-2))
        except Exception:  # missing, no kernel for this device/dtype, ...: use SDPA
            ok = False
        _XFORMERS_OK[key] = ok
    return _XFORMERS_OK[key]


def attention(q: Tensor, k: Tensor, v: Tensor, backend: AttentionBackend = "sdpa") -> Tensor:
    """Softmax attention ``softmax(q·kᵀ/√d)·v`` of ``(B, heads, N, head_dim)`` tensors.

    ``sdpa``: ``F.scaled_dot_product_attention``. ``xformers`` / ``auto``: xformers'
    ``memory_efficient_attention`` where :func:`xformers_usable`, SDPA otherwise (``xformers`` warns once
    when it has to fall back).
    """
    if backend != "sdpa":
        if xformers_usable(q.device, q.dtype):
            import xformers.ops as xops  # type: ignore[import-not-found]

            out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            return out.transpose(1, 2)
        global _WARNED_XFORMERS
        if backend == "xformers" and not _WARNED_XFORMERS and q.device.type != "meta":
            warnings.warn(
                "attention='xformers' requested but xformers is not usable here; using SDPA",
                RuntimeWarning,
                stacklevel=2,
            )
            _WARNED_XFORMERS = True
    return F.scaled_dot_product_attention(q, k, v)


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection (timm's layout and names)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False, backend: AttentionBackend = "sdpa"):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.backend: AttentionBackend = backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        out = attention(q, k, v, self.backend)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


# --------------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------------


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PatchEmbed(nn.Module):
    """``(B, C, H, W) → (B, (H/p)·(W/p), D)`` by a stride-``p`` convolution (``proj``), tokens row-major."""

    def __init__(self, patch_size: int, in_channels: int, dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int, frequency_size: int = 256, time_scale: float = 1.0):
        super().__init__()
        self.frequency_size = frequency_size
        self.time_scale = time_scale
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: Tensor) -> Tensor:
        freq = timestep_features(t.float() * self.time_scale, self.frequency_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class ConditionEmbedder(nn.Module):
    """Projects a conditioning embedding into the adaLN space; ``null_embedding`` stands for "no condition"."""

    def __init__(self, cond_dim: int, hidden_size: int):
        super().__init__()
        self.cond_dim = cond_dim
        self.null_embedding = nn.Parameter(torch.zeros(cond_dim))
        self.mlp = nn.Sequential(
            nn.Linear(cond_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, cond: Tensor | None, drop: Tensor) -> Tensor:
        """``cond`` ``(B, cond_dim)`` (or None: all null); ``drop`` ``(B,)`` bool, True → null embedding."""
        null = self.null_embedding.unsqueeze(0).expand(drop.shape[0], -1)
        if cond is None:
            inp = null
        else:
            if cond.ndim != 2 or cond.shape[1] != self.cond_dim:
                raise ValueError(f"cond must have shape (B, {self.cond_dim}), got {tuple(cond.shape)}")
            inp = torch.where(drop[:, None], null, cond.to(null.dtype))
        return self.mlp(inp)


class LabelEmbedder(nn.Module):
    """A learned vector per class label, added to the adaLN conditioning (few-shot class-conditional tuning).

    Label ``i`` (0-based, in the order of the adapter's ``label_names``) selects row ``i`` of ``table``;
    row ``num_classes`` is the **null label** (used where ``uncond_mask`` is set: classifier-free guidance
    and unconditional sampling). Every row starts at zero, so adding the embedder to a trained model
    changes nothing until it is trained: a fresh class-conditional fine-tune starts from the base model.
    """

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, hidden_size)
        nn.init.zeros_(self.table.weight)

    @property
    def null_index(self) -> int:
        return self.num_classes

    def forward(self, labels: Tensor, drop: Tensor) -> Tensor:
        """``labels`` ``(B,)`` integer class indices; ``drop`` ``(B,)`` bool, True → the null label."""
        labels = torch.as_tensor(labels, device=drop.device)
        if labels.shape != drop.shape or labels.dtype.is_floating_point:
            raise ValueError(f"labels must be integer class indices of shape {tuple(drop.shape)}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"labels must be in [0, {self.num_classes}), got {labels.tolist()}")
        return self.table(torch.where(drop, torch.full_like(labels, self.null_index), labels.long()))


class SiTBlock(nn.Module):
    def __init__(self, cfg: SiTConfig):
        super().__init__()
        d = cfg.hidden_size
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(d, cfg.num_heads, qk_norm=cfg.qk_norm, backend=cfg.attention)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(d, cfg.mlp_hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d, bias=True))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_a.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_a, scale_a))
        x = x + gate_m.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_m, scale_m))
        return x


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class SiT(nn.Module):
    """The denoiser: ``forward(x_t, t, cond) → v`` predicts the velocity ``ε − x`` (see module docstring)."""

    pos_embed: Tensor

    def __init__(self, cfg: SiTConfig | None = None, **overrides: Any):
        super().__init__()
        if cfg is None:
            cfg = SiTConfig(**overrides)
        elif overrides:
            cfg = SiTConfig.model_validate({**cfg.model_dump(), **overrides})
        self.cfg = cfg
        self.grad_checkpointing = cfg.grad_checkpointing
        d = cfg.hidden_size
        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, d)
        self.t_embedder = TimestepEmbedder(d, time_scale=cfg.time_scale)
        self.cond_embedder = ConditionEmbedder(cfg.cond_dim, d) if cfg.cond_dim is not None else None
        self.label_embedder = LabelEmbedder(cfg.num_classes, d) if cfg.num_classes is not None else None
        self.register_buffer("pos_embed", torch.zeros(1, cfg.num_tokens, d), persistent=True)
        self.blocks = nn.ModuleList([SiTBlock(cfg) for _ in range(cfg.depth)])
        self.projectors = nn.ModuleList(
            [REPAProjector(d, cfg.repa_dim, cfg.repa_hidden)] if cfg.repa_dim is not None else []
        )
        self.final_layer = FinalLayer(d, cfg.patch_size, cfg.out_channels)
        self.initialize_weights()

    # ---- initialisation ------------------------------------------------------------------------------

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """DiT's initialisation: Xavier-uniform linears with zero bias, the patch convolution initialised
        like a linear, N(0, 0.02) for the time/condition MLP weights and the null embedding, the fixed
        sin-cos ``pos_embed``, and zeros for every adaLN modulation and the final linear (adaLN-Zero).
        Safe to call after ``to_empty()`` on a model built on the meta device."""

        def _basic(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
                module.reset_parameters()

        self.apply(_basic)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.cond_embedder is not None:
            nn.init.normal_(self.cond_embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(self.cond_embedder.mlp[2].weight, std=0.02)
            nn.init.normal_(self.cond_embedder.null_embedding, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        g = self.cfg.grid_size
        self.pos_embed.copy_(
            sincos_pos_embed_2d(self.cfg.hidden_size, g, g, device=self.pos_embed.device)[None]
        )

    # ---- helpers -------------------------------------------------------------------------------------

    def add_label_embedder(self, num_classes: int) -> LabelEmbedder:
        """Give a trained model class labels (zero-initialised rows: the model's output is unchanged)."""
        if self.label_embedder is not None:
            raise ValueError(
                f"this SiT already has a label embedder ({self.label_embedder.num_classes} classes)"
            )
        self.cfg = SiTConfig.model_validate({**self.cfg.model_dump(), "num_classes": num_classes})
        ref = self.pos_embed
        self.label_embedder = LabelEmbedder(num_classes, self.cfg.hidden_size).to(ref.device)
        return self.label_embedder

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in the backward pass (saves memory, costs ~1 extra forward)."""
        self.grad_checkpointing = enabled

    def set_attention_backend(self, backend: AttentionBackend) -> None:
        for block in self.blocks:
            block.attn.backend = backend

    def cond_drop_mask(
        self,
        batch: int,
        device: torch.device | str,
        uncond_mask: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Which samples use the null embedding: ``uncond_mask`` OR (in training) a Bernoulli(cond_dropout)
        draw per sample from ``generator`` (or torch's RNG). Nothing is drawn in eval mode or when
        ``cond_dropout`` is 0, so the RNG stream is untouched then."""
        drop = torch.zeros(batch, dtype=torch.bool, device=device)
        p = self.cfg.cond_dropout
        if self.training and p > 0:
            drop = torch.rand(batch, device=device, generator=generator) < p
        if uncond_mask is not None:
            uncond_mask = torch.as_tensor(uncond_mask, device=device)
            if uncond_mask.shape != (batch,):
                raise ValueError(f"uncond_mask must have shape ({batch},), got {tuple(uncond_mask.shape)}")
            drop = drop | uncond_mask.bool()
        return drop

    def pos_embed_for(self, grid_h: int, grid_w: int) -> Tensor:
        if grid_h * grid_w == self.pos_embed.shape[1] and grid_h == grid_w == self.cfg.grid_size:
            return self.pos_embed
        return sincos_pos_embed_2d(self.cfg.hidden_size, grid_h, grid_w, device=self.pos_embed.device)[None]

    def unpatchify(self, x: Tensor, grid_h: int, grid_w: int) -> Tensor:
        """``(B, h·w, p·p·C) → (B, C, h·p, w·p)`` with the channel innermost in each token (DiT layout)."""
        p, c = self.cfg.patch_size, self.cfg.out_channels
        x = x.reshape(x.shape[0], grid_h, grid_w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, grid_h * p, grid_w * p)

    # ---- forward -------------------------------------------------------------------------------------

    def forward(
        self,
        x_t: Tensor,
        t: Tensor | float,
        cond: Tensor | None = None,
        uncond_mask: Tensor | None = None,
        return_repa: bool = False,
        generator: torch.Generator | None = None,
        labels: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Velocity prediction.

        ``x_t`` ``(B, C, H, W)`` normalised noisy latents (H, W multiples of the patch size; the fixed
        positional embedding is recomputed when the grid differs from ``input_size``); ``t`` ``(B,)`` or a
        scalar in [0, 1]; ``cond`` ``(B, cond_dim)`` or None (unconditional: the null embedding for all);
        ``uncond_mask`` ``(B,)`` bool, True → null embedding for that sample (CFG); ``generator`` for the
        training-time condition dropout; ``labels`` ``(B,)`` class indices for a model with ``num_classes``
        (the null label where ``uncond_mask`` is set or the condition is dropped; all null when None). Returns ``v`` ``(B, C, H, W)`` (the velocity channels only, when
        ``learn_sigma``), or ``(v, repa_tokens)`` with ``repa_tokens`` ``(B, (H/p)·(W/p), repa_dim)``.
        """
        if x_t.ndim != 4 or x_t.shape[1] != self.cfg.in_channels:
            raise ValueError(f"x_t must have shape (B, {self.cfg.in_channels}, H, W), got {tuple(x_t.shape)}")
        b, _, h, w = x_t.shape
        p = self.cfg.patch_size
        if h % p or w % p:
            raise ValueError(f"latent size {h}×{w} is not divisible by the patch size {p}")
        if return_repa and not self.projectors:
            raise ValueError("return_repa=True but this model has no REPA projector (repa_dim is None)")
        gh, gw = h // p, w // p
        t = torch.as_tensor(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(b)
        if t.shape != (b,):
            raise ValueError(f"t must be a scalar or of shape ({b},), got {tuple(t.shape)}")

        x = self.x_embedder(x_t) + self.pos_embed_for(gh, gw).to(x_t.dtype)
        c = self.t_embedder(t)
        if self.cond_embedder is not None or self.label_embedder is not None:
            drop = self.cond_drop_mask(b, x_t.device, uncond_mask, generator)
            if self.cond_embedder is not None:
                c = c + self.cond_embedder(cond, drop)
            if self.label_embedder is not None:
                if labels is None:
                    labels, drop = torch.zeros(b, dtype=torch.long, device=x_t.device), torch.ones_like(drop)
                c = c + self.label_embedder(labels, drop)
        elif labels is not None:
            raise ValueError("labels given, but this model has no label embedder (num_classes is None)")

        repa_tokens = None
        use_ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if use_ckpt:
                x = checkpoint(block, x, c, use_reentrant=False)
            else:
                x = block(x, c)
            if return_repa and i + 1 == self.cfg.repa_depth:
                repa_tokens = self.projectors[0](x)
        out = self.unpatchify(self.final_layer(x, c), gh, gw)
        if self.cfg.learn_sigma:
            out = out[:, : self.cfg.in_channels]
        if return_repa:
            return out, repa_tokens
        return out

    # ---- accounting ----------------------------------------------------------------------------------

    def num_parameters(self, include_repa: bool = True) -> int:
        total = sum(p.numel() for p in self.parameters())
        if not include_repa:
            total -= sum(p.numel() for p in self.projectors.parameters())
        return total

    def flops_per_image(self, include_repa: bool = True, input_size: int | None = None) -> int:
        """Forward FLOPs for one image (see :func:`sit_flops`)."""
        return sit_flops(self.cfg, include_repa=include_repa, input_size=input_size)["total"]


def sit_flops(cfg: SiTConfig, include_repa: bool = True, input_size: int | None = None) -> dict[str, int]:
    """Analytic forward FLOPs of one image, counting a multiply-add as 2 FLOPs, matmuls only.

    Elementwise work (norms, activations, softmax, modulation) is left out: below 1% of the total for the
    standard sizes. Attention counts ``QKᵀ`` and ``AV`` (``2·2·N²·D``). Training costs ~3× the forward (plus
    one more forward with activation checkpointing). DiT's published "118.6 Gflops" for XL/2 at 256 px
    counts multiply-adds, i.e. half of ``total`` here.
    """
    side = (input_size or cfg.input_size) // cfg.patch_size
    n, d, p = side * side, cfg.hidden_size, cfg.patch_size
    m = cfg.mlp_hidden
    out: dict[str, int] = {}
    out["patch_embed"] = 2 * n * (cfg.in_channels * p * p) * d
    out["t_embed"] = 2 * (256 * d + d * d)
    out["cond_embed"] = 2 * (cfg.cond_dim * d + d * d) if cfg.cond_dim is not None else 0
    per_block = {
        "adaln": 2 * d * 6 * d,
        "qkv": 2 * n * d * 3 * d,
        "attn": 2 * 2 * n * n * d,
        "proj": 2 * n * d * d,
        "mlp": 2 * 2 * n * d * m,
    }
    out["blocks"] = cfg.depth * sum(per_block.values())
    out["final"] = 2 * d * 2 * d + 2 * n * d * p * p * cfg.out_channels
    if include_repa and cfg.repa_dim is not None:
        r = cfg.repa_hidden
        out["repa"] = 2 * n * (d * r + r * r + r * cfg.repa_dim)
    else:
        out["repa"] = 0
    out["total"] = sum(out.values())
    return out


def build_sit(preset_or_cfg: str | SiTConfig | Mapping[str, Any] = "SiT-XL/2", **overrides: Any) -> SiT:
    """A SiT from a preset name (``"SiT-B/2"``), a :class:`SiTConfig` or a plain mapping, plus overrides."""
    if isinstance(preset_or_cfg, str):
        cfg = SiTConfig.from_preset(preset_or_cfg, **overrides)
    elif isinstance(preset_or_cfg, SiTConfig):
        cfg = SiTConfig.model_validate({**preset_or_cfg.model_dump(), **overrides})
    else:
        cfg = SiTConfig.model_validate({**dict(preset_or_cfg), **overrides})
    return SiT(cfg)


# --------------------------------------------------------------------------------------------------------
# Loading public SiT / REPA / REPA-E checkpoints
# --------------------------------------------------------------------------------------------------------

_LABEL_PREFIX = "y_embedder."
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# REPA-E keeps its latent normalisation inside the SiT: an affine-free ``BatchNorm2d`` named ``bn``.
_LATENT_STATS_PREFIX = "bn."
_LATENT_STATS_KEYS = ("running_mean", "running_var", "num_batches_tracked")
REPAE_BN_EPS = 1e-4  # REPA-E's BatchNorm eps: its eval-mode scale is sqrt(running_var + 1e-4)


@dataclass
class LoadReport:
    """What :func:`load_sit_state_dict` did with each key."""

    loaded: list[str] = field(default_factory=list)  # copied as is
    adapted: list[str] = field(default_factory=list)  # copied after reshaping (learn_sigma difference)
    recomputed: list[str] = field(default_factory=list)  # fixed buffers kept as computed (pos_embed)
    unused: list[str] = field(default_factory=list)  # in the checkpoint, not in the model (y_embedder.*)
    new: list[str] = field(default_factory=list)  # in the model, not in the checkpoint (cond_embedder.*)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    # REPA-E's latent statistics (``bn.running_mean`` / ``running_var`` / ``num_batches_tracked``, keys
    # without the ``bn.`` prefix): not SiT weights, but the latent normalisation the weights were trained
    # with; :func:`cytosyn.diffusion.carry_latent_statistics` puts them into a latent norm.
    latent_stats: dict[str, Tensor] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [
            f"loaded {len(self.loaded)} tensors, adapted {len(self.adapted)}, recomputed {len(self.recomputed)}",
            f"unused (checkpoint only): {', '.join(self.unused) or '-'}",
            f"new (kept at init): {', '.join(self.new) or '-'}",
        ]
        if self.latent_stats:
            lines.append(
                "latent statistics (REPA-E bn.*): "
                + ", ".join(f"{k} {tuple(v.shape)}" for k, v in sorted(self.latent_stats.items()))
            )
        if self.mismatched:
            lines.append(
                "shape mismatch (kept at init): "
                + ", ".join(f"{k} {tuple(a)}→{tuple(b)}" for k, a, b in self.mismatched)
            )
        return "\n".join(lines)


def _strip_wrappers(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def _adapt_sigma(src: Tensor, dst: Tensor, patch: int) -> Tensor | None:
    """Map the final linear between ``learn_sigma`` variants: per token the output is ``(p, p, C_out)`` with
    the channel innermost; the velocity is the first ``C`` channels. Dropping σ keeps those; adding σ
    starts the σ channels at zero."""
    pp = patch * patch
    if src.shape[0] % pp or dst.shape[0] % pp or src.shape[1:] != dst.shape[1:]:
        return None
    c_src, c_dst = src.shape[0] // pp, dst.shape[0] // pp
    tail = tuple(src.shape[1:])
    s = src.reshape(pp, c_src, *tail)
    if c_src == 2 * c_dst:
        return s[:, :c_dst].reshape(dst.shape).to(dst.dtype)
    if c_dst == 2 * c_src:
        out = torch.zeros(pp, c_dst, *tail, dtype=dst.dtype, device=src.device)
        out[:, :c_src] = s
        return out.reshape(dst.shape)
    return None


def load_sit_state_dict(
    model: SiT,
    state_dict: Mapping[str, Tensor],
    strict: bool = False,
    prefer: Literal["ema", "model"] = "ema",
) -> LoadReport:
    """Load a SiT / REPA / REPA-E state dict into ``model`` for fine-tuning, and report what happened.

    - A training checkpoint ``{"model": ..., "ema": ..., ...}`` (REPA's layout) is unwrapped, taking
      ``prefer`` (EMA weights by default). DDP's ``module.`` and ``torch.compile``'s ``_orig_mod.`` prefixes
      are stripped.
    - Same name and shape: copied (``loaded``).
    - The class-label embedder ``y_embedder.embedding_table`` has no counterpart (we condition on encoder
      embeddings): reported ``unused``; our ``cond_embedder.*`` (MLP and null embedding) stays at its
      initialisation and is reported ``new``. Because ``cond_embedder``'s last layer starts random, the
      conditioning path is learnt from the fine-tune's data.
    - ``pos_embed`` of another grid (e.g. a 256 px checkpoint, 16×16 tokens, into a 224 px model, 14×14):
      the fixed sin-cos table is kept as computed for our grid (``recomputed``).
    - ``final_layer.linear`` of a ``learn_sigma`` checkpoint into a model without (or vice versa) is
      sliced to the velocity channels (or padded with zero σ channels): ``adapted``.
    - Any other shape difference (another width, patch size, REPA encoder width) is left at init and
      reported in ``mismatched``.

    - REPA-E's latent BatchNorm (``bn.running_mean``, ``bn.running_var``, ``bn.num_batches_tracked``) is
      not part of our SiT (cytosyn keeps the latent normalisation beside it): the tensors are returned in
      ``report.latent_stats`` for :func:`cytosyn.diffusion.carry_latent_statistics`, never dropped — the
      weights were trained on latents normalised by exactly these statistics. A ``bn.*`` key other than
      those three, or with a shape other than ``(C,)`` for the model's ``C`` latent channels, is an error
      (in strict mode) or ``unused``.

    ``strict=True`` raises ``ValueError`` unless the only differences are the expected ones (label embedder
    unused, condition embedder new, pos_embed recomputed, σ adapted, latent statistics carried).

    Time convention: REPA and REPA-E use ours (t = 1 is noise, target ``ε − x``, t unscaled: keep
    ``time_scale=1``). Checkpoints of the original SiT code run time the other way (t = 1 is data) and
    predict ``x − ε``: their weights load, but the model then has to relearn the time direction.
    """
    if prefer in state_dict and isinstance(state_dict[prefer], Mapping):
        state_dict = state_dict[prefer]
    elif "model" in state_dict and isinstance(state_dict["model"], Mapping):
        state_dict = state_dict["model"]
    own = model.state_dict()
    report = LoadReport()
    to_load: dict[str, Tensor] = {}
    for raw_key, value in state_dict.items():
        key = _strip_wrappers(raw_key)
        if not isinstance(value, Tensor):
            report.unused.append(key)
            continue
        if key.startswith(_LATENT_STATS_PREFIX) and key not in own:
            name = key[len(_LATENT_STATS_PREFIX) :]
            per_channel = value.ndim == 1 and value.shape[0] == model.cfg.in_channels
            if name in _LATENT_STATS_KEYS and (per_channel or name == "num_batches_tracked"):
                report.latent_stats[name] = value.detach().clone()
            else:
                report.unused.append(key)
            continue
        if key not in own:
            report.unused.append(key)
            continue
        target = own[key]
        if value.shape == target.shape:
            to_load[key] = value
            report.loaded.append(key)
        elif key == "pos_embed":
            report.recomputed.append(key)
        elif (
            key.startswith("final_layer.linear.")
            and (adapted := _adapt_sigma(value, target, model.cfg.patch_size)) is not None
        ):
            to_load[key] = adapted
            report.adapted.append(key)
        else:
            report.mismatched.append((key, tuple(value.shape), tuple(target.shape)))
    seen = set(to_load) | set(report.recomputed) | {k for k, _, _ in report.mismatched}
    report.new = [k for k in own if k not in seen]
    if strict:
        bad_unused = [k for k in report.unused if not k.startswith(_LABEL_PREFIX)]
        bad_new = [k for k in report.new if not k.startswith("cond_embedder.")]
        partial_stats = bool(report.latent_stats) and not {"running_mean", "running_var"} <= set(
            report.latent_stats
        )
        if report.mismatched or bad_unused or bad_new or partial_stats:
            raise ValueError("state dict does not match this SiT:\n" + report.summary())
    model.load_state_dict(to_load, strict=False)
    return report
