"""The diffusion transformer of DiffLoRA: a DiT over LAE latents ``[B, T, C]``, conditioned on MIF tokens.

The paper only says "diffusion transformer"; the layout is ours (DiT with adaLN-Zero, plus PixArt-style
cross-attention to the condition tokens):

* input ``Linear(C, W)`` + a learned positional embedding ``[T, W]`` (the T latent tokens are fixed slots of
  the LAE, not a sequence of variable length);
* timestep: ``t`` is a **float in [0, 1]** (the flow-matching time of :mod:`.diffusion`: 0 = data, 1 = noise),
  embedded sinusoidally as ``1000 * t`` (:func:`timestep_embedding`) then ``Linear -> SiLU -> Linear``;
* the modulation vector ``c = emb(t) + Linear(mean_m cond)`` (timestep plus the pooled condition);
* ``depth`` blocks, each: ``x += g1 * SelfAttn(mod(LN(x), s1, b1))``; ``x += CrossAttn(LN(x), cond)``;
  ``x += g2 * MLP(mod(LN(x), s2, b2))``, with ``(b1, s1, g1, b2, s2, g2) = Linear(SiLU(c))`` zero-initialised
  (adaLN-Zero: every block starts as the identity), ``mod(h, s, b) = h * (1 + s) + b``;
* final ``LN`` modulated by ``c`` and an output ``Linear(W, C)``, both zero-initialised: the untrained model
  predicts exactly 0.

Attention is written as two matmuls and a softmax (not ``scaled_dot_product_attention``): CPU results are the
same op for op, and :func:`flops_per_step` can be checked with ``torch.utils.flop_counter`` (which does not
count the CPU SDPA kernel).  The tokens here are few (T latent + M condition), so the fused kernel would
save little.

The condition tokens come from :class:`~.condition.MifEncoder`, which the DiT owns (``cond_encoder``) so that
its learned null condition is at hand: ``drop_mask [B]`` replaces those samples' tokens with it, and
``cond=None`` uses it for all.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import SettingError
from .condition import MifEncoder, MifSpec

TIME_SCALE = 1000.0
"""t in [0, 1] is embedded as ``TIME_SCALE * t``: the sinusoid frequencies then span 1 to 1/10000 per step of
1/1000, as for the integer steps of DDPM models."""
FREQ_DIM = 256
"""Width of the sinusoidal timestep embedding (before its MLP)."""


@dataclass(frozen=True)
class DitConfig:
    """Size of a :class:`LatentDiT` (JSON-able: :meth:`to_dict` / :meth:`from_dict`).

    ``tokens`` T and ``channels`` C: the LAE latent ``[T, C]``.  ``width`` W, ``depth`` blocks, ``heads``
    (W must be divisible by them), ``mlp_ratio`` (MLP hidden = ``round(W * mlp_ratio)``).  ``cond_dim`` D and
    ``cond_tokens`` M: the condition tokens ``[M, D]`` (must equal the MifSpec's ``width`` / ``num_tokens``).
    """

    tokens: int = 16
    channels: int = 64
    width: int = 384
    depth: int = 8
    heads: int = 6
    mlp_ratio: float = 4.0
    cond_dim: int = 256
    cond_tokens: int = 9

    def __post_init__(self) -> None:
        for name in ("tokens", "channels", "width", "depth", "heads", "cond_dim", "cond_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SettingError(f"DitConfig.{name} is {value!r}; it must be a positive whole number.")
        if self.width % self.heads:
            raise SettingError(f"DitConfig.width {self.width} is not divisible by heads {self.heads}; "
                               "choose a width that is a multiple of the heads.")
        if not (isinstance(self.mlp_ratio, (int, float)) and math.isfinite(self.mlp_ratio) and self.mlp_ratio > 0):
            raise SettingError(f"DitConfig.mlp_ratio is {self.mlp_ratio!r}; it must be a positive number (e.g. 4).")

    @property
    def mlp_hidden(self) -> int:
        return max(1, int(round(self.width * self.mlp_ratio)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DitConfig":
        """Inverse of :meth:`to_dict`; unknown keys are refused (a file of a newer pack)."""
        if not isinstance(data, dict):
            raise SettingError(f"A DiT config must be a JSON object, got {type(data).__name__}.")
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise SettingError(f"The DiT config has unknown fields {unknown}; it was written by a newer "
                               "HyperLoRA Studio: update the pack.")
        return cls(**data)


def timestep_embedding(t: Tensor, dim: int = FREQ_DIM, max_period: float = 10000.0) -> Tensor:
    """``t [B]`` (float in [0, 1]) -> ``[B, dim]``: ``[cos(s * f_i), sin(s * f_i)]`` with ``s = TIME_SCALE * t``
    and ``f_i = max_period ** (-i / (dim // 2))``, ``i = 0 .. dim//2 - 1`` (a zero column is appended for odd
    ``dim``).  Computed in float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t.to(torch.float32) * TIME_SCALE)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def _modulate(h: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """``h [B, L, W]``, ``shift/scale [B, W]`` -> ``h * (1 + scale) + shift``."""
    return h * (1 + scale[:, None]) + shift[:, None]


class _Attention(nn.Module):
    """Multi-head attention ``query [B, L, W]``, ``context [B, S, Dc]`` -> ``[B, L, W]`` (with biases)."""

    def __init__(self, width: int, heads: int, context_dim: int | None = None) -> None:
        super().__init__()
        self.heads = heads
        self.self_attention = context_dim is None
        if self.self_attention:
            self.qkv = nn.Linear(width, 3 * width)
        else:
            self.q = nn.Linear(width, width)
            self.kv = nn.Linear(context_dim, 2 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        b, length, width = x.shape
        h = self.heads
        if self.self_attention:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        else:
            q = self.q(x)
            k, v = self.kv(context).chunk(2, dim=-1)

        def split(z: Tensor) -> Tensor:                                   # [B, S, W] -> [B, h, S, W/h]
            return z.reshape(b, z.shape[1], h, width // h).transpose(1, 2)

        q, k, v = split(q), split(k), split(v)
        weights = torch.softmax((q @ k.transpose(-1, -2)) * (width // h) ** -0.5, dim=-1)
        return self.out((weights @ v).transpose(1, 2).reshape(b, length, width))


class _Block(nn.Module):
    """One DiT block (see the module docstring): ``x [B, T, W]``, ``c [B, W]``, ``cond [B, M, D]`` -> ``[B, T, W]``."""

    def __init__(self, cfg: DitConfig) -> None:
        super().__init__()
        w = cfg.width
        self.norm1 = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
        self.attn = _Attention(w, cfg.heads)
        self.norm_cross = nn.LayerNorm(w, eps=1e-6)
        self.cross = _Attention(w, cfg.heads, context_dim=cfg.cond_dim)
        self.norm2 = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(w, cfg.mlp_hidden), nn.GELU(approximate="tanh"), nn.Linear(cfg.mlp_hidden, w))
        self.ada = nn.Linear(w, 6 * w)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def forward(self, x: Tensor, c: Tensor, cond: Tensor) -> Tensor:
        b1, s1, g1, b2, s2, g2 = self.ada(F.silu(c)).chunk(6, dim=-1)
        x = x + g1[:, None] * self.attn(_modulate(self.norm1(x), b1, s1))
        x = x + self.cross(self.norm_cross(x), cond)
        return x + g2[:, None] * self.mlp(_modulate(self.norm2(x), b2, s2))


class LatentDiT(nn.Module):
    """Diffusion transformer over LAE latents (module docstring).  Owns the :class:`MifEncoder`.

    ``forward(x_t [B, T, C], t [B] float in [0, 1], cond [B, M, D] | None, drop_mask [B] bool | None)``
    -> the velocity prediction ``[B, T, C]`` (:mod:`.diffusion`).  ``cond`` is the output of
    ``self.cond_encoder`` (:meth:`encode`); rows where ``drop_mask`` is True, or all rows when ``cond`` is None,
    use the learned null condition instead.
    """

    def __init__(self, config: DitConfig, mif: MifSpec) -> None:
        super().__init__()
        if mif.width != config.cond_dim or mif.num_tokens != config.cond_tokens:
            raise SettingError(
                f"The DiT reads condition tokens [{config.cond_tokens}, {config.cond_dim}] but the MIF spec makes "
                f"[{mif.num_tokens}, {mif.width}]; set DitConfig.cond_tokens = {mif.num_tokens} and cond_dim = {mif.width}.")
        self.config = config
        w = config.width
        self.cond_encoder = MifEncoder(mif)
        self.x_in = nn.Linear(config.channels, w)
        self.pos = nn.Parameter(torch.randn(config.tokens, w) * 0.02)
        self.t_mlp = nn.Sequential(nn.Linear(FREQ_DIM, w), nn.SiLU(), nn.Linear(w, w))
        self.cond_pool = nn.Linear(config.cond_dim, w)
        self.blocks = nn.ModuleList(_Block(config) for _ in range(config.depth))
        self.norm_out = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Linear(w, 2 * w)
        self.x_out = nn.Linear(w, config.channels)
        for layer in (self.ada_out, self.x_out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @property
    def mif_spec(self) -> MifSpec:
        return self.cond_encoder.spec

    def encode(self, face: Tensor, clip: Tensor | None = None) -> Tensor:
        """Raw MIF (``face [B, A]``, ``clip [B, Mc, E]``) -> condition tokens ``[B, M, D]``."""
        return self.cond_encoder(face, clip)

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor | None, drop_mask: Tensor | None = None) -> Tensor:
        cfg = self.config
        if x_t.dim() != 3 or tuple(x_t.shape[1:]) != (cfg.tokens, cfg.channels):
            raise SettingError(f"LatentDiT: the latents must be [B, {cfg.tokens}, {cfg.channels}] (the LAE latent this "
                               f"DiT was built for), got {list(x_t.shape)}; use the LAE that belongs to this DiT.")
        b = x_t.shape[0]
        if t.dim() != 1 or t.shape[0] != b or not t.is_floating_point():
            raise SettingError(f"LatentDiT: the time must be a float vector [{b}] in [0, 1], got "
                               f"{t.dtype} {list(t.shape)}.")
        null = self.cond_encoder.null_tokens(b)
        if cond is None:
            cond = null
        else:
            if tuple(cond.shape) != (b, cfg.cond_tokens, cfg.cond_dim):
                raise SettingError(f"LatentDiT: the condition must be [{b}, {cfg.cond_tokens}, {cfg.cond_dim}] "
                                   f"(tokens from its cond_encoder), got {list(cond.shape)}.")
            if drop_mask is not None:
                if drop_mask.shape != (b,) or drop_mask.dtype != torch.bool:
                    raise SettingError(f"LatentDiT: drop_mask must be a bool vector [{b}], got "
                                       f"{drop_mask.dtype} {list(drop_mask.shape)}.")
                cond = torch.where(drop_mask.to(cond.device)[:, None, None], null.to(cond.dtype), cond)
        dtype = self.x_in.weight.dtype
        x = self.x_in(x_t.to(dtype)) + self.pos
        c = self.t_mlp(timestep_embedding(t).to(dtype)) + self.cond_pool(cond.mean(dim=1))
        for block in self.blocks:
            x = block(x, c, cond)
        shift, scale = self.ada_out(F.silu(c)).chunk(2, dim=-1)
        return self.x_out(_modulate(self.norm_out(x), shift, scale))


def flops_per_step(config: DitConfig, batch: int = 1, *, guided: bool = False) -> int:
    """Floating-point operations of one :meth:`LatentDiT.forward` on ``batch`` samples (``guided``: twice that,
    one sampling step with classifier-free guidance, which runs a conditional and an unconditional pass).

    Counted as ``torch.utils.flop_counter`` counts: 2 per multiply-add of every matrix product (linear layers,
    attention scores and the attention-weighted sum); elementwise work (norms, softmax, activations,
    modulation, biases) is not counted (a few operations per activation against about W per activation for the
    matrix products, so a small fraction at any useful width).  The condition encoder runs once
    per sample, not per step, and is not included.  Per sample, with T tokens, C channels, W width, M and D
    the condition tokens and width, H the MLP width:

    * input/output ``2*T*C*W`` each; timestep MLP ``2*(256*W + W*W)``; pooled condition ``2*D*W``;
      final modulation ``2*W*2W``;
    * per block: modulation ``2*W*6W``; self-attention ``2*T*W*3W`` (qkv) ``+ 2*2*T*T*W`` (scores and sum)
      ``+ 2*T*W*W`` (out); cross-attention ``2*T*W*W`` (q) ``+ 2*M*D*2W`` (kv) ``+ 2*2*T*M*W`` ``+ 2*T*W*W``;
      MLP ``2*2*T*W*H``.
    """
    t, ch, w, m, d, h = (config.tokens, config.channels, config.width, config.cond_tokens, config.cond_dim,
                         config.mlp_hidden)
    per_block = (2 * w * 6 * w
                 + 2 * t * w * 3 * w + 2 * 2 * t * t * w + 2 * t * w * w
                 + 2 * t * w * w + 2 * m * d * 2 * w + 2 * 2 * t * m * w + 2 * t * w * w
                 + 2 * 2 * t * w * h)
    per_sample = (2 * t * ch * w * 2 + 2 * (FREQ_DIM * w + w * w) + 2 * d * w + 2 * w * 2 * w
                  + config.depth * per_block)
    return per_sample * batch * (2 if guided else 1)
