"""Perceiver resampler and ID projector of the released HyperLoRA models.

The modules are laid out so that ``state_dict()`` keys equal the released tensor names
(format §4) and the forward pass follows format §5.3: per layer

* ``latents += attn1(q = LN(latents), context = LN(latents))``   (same LN output)
* ``latents += attn2(q = LN(latents), context = LN(x'))``
* ``latents += attn3(q = LN(latents), context = LN(y'))``       (two conditions only)
* ``latents += ff(LN(latents))``, ff = Linear -> exact (erf) GELU -> Linear

with every LN its own LayerNorm (eps 1e-5), attention without biases and SDPA with scale
``1/sqrt(dim_head)``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .spec import LN_EPS, ResamplerConfig

log = logging.getLogger(__name__)


def _factory(device: Any, dtype: torch.dtype | None) -> dict[str, Any]:
    return {"device": device, "dtype": dtype}


class Attention(nn.Module):
    """Multi-head attention without biases.

    Keys: ``to_q.weight``, ``to_k.weight``, ``to_v.weight`` ``[heads*dim_head, dim]``,
    ``to_out.0.weight`` ``[dim, heads*dim_head]``.
    """

    def __init__(self, dim: int, *, heads: int, dim_head: int,
                 device: Any = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        inner = heads * dim_head
        fk = _factory(device, dtype)
        self.heads = heads
        self.dim_head = dim_head
        self.to_q = nn.Linear(dim, inner, bias=False, **fk)
        self.to_k = nn.Linear(dim, inner, bias=False, **fk)
        self.to_v = nn.Linear(dim, inner, bias=False, **fk)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim, bias=False, **fk)])

    def forward(self, query: Tensor, context: Tensor | None = None) -> Tensor:
        """query ``[N, Lq, dim]``, context ``[N, Lc, dim]`` (None: self-attention on ``query``) -> ``[N, Lq, dim]``.

        The projections that read the same input run as one matmul on the concatenated weights
        (q, k, v for self-attention; k, v for a context): wider matmuls reach more of the CPU's
        peak than 768-wide ones, and every output value is the same dot product as before.
        """
        n, lq, _ = query.shape
        h, d = self.heads, self.dim_head
        inner = h * d
        if context is None:
            lc = lq
            qkv = F.linear(query, torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight]))
            q, k, v = qkv.split(inner, dim=-1)
        else:
            lc = context.shape[1]
            q = self.to_q(query)
            k, v = F.linear(context, torch.cat([self.to_k.weight, self.to_v.weight])).split(inner, dim=-1)
        q = q.reshape(n, lq, h, d).transpose(1, 2)
        k = k.reshape(n, lc, h, d).transpose(1, 2)
        v = v.reshape(n, lc, h, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, scale=d**-0.5)
        out = out.transpose(1, 2).reshape(n, lq, inner)
        return self.to_out[0](out)


class GELUProj(nn.Module):
    """``proj`` Linear followed by the exact (erf) GELU; key ``proj.{weight,bias}``."""

    def __init__(self, dim_in: int, dim_out: int, *,
                 device: Any = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out, bias=True, **_factory(device, dtype))

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.proj(x), approximate="none")


class FeedForward(nn.Module):
    """``net.0.proj`` ``[dim*mult, dim]`` -> GELU -> (``net.1`` no weights) -> ``net.2`` ``[dim, dim*mult]``."""

    def __init__(self, dim: int, *, mult: int,
                 device: Any = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        fk = _factory(device, dtype)
        self.net = nn.Sequential(
            GELUProj(dim, dim * mult, **fk),
            nn.Identity(),
            nn.Linear(dim * mult, dim, bias=True, **fk),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ResamplerLayer(nn.Module):
    """One resampler layer (see the module docstring for the update order)."""

    def __init__(self, config: ResamplerConfig, *,
                 device: Any = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        dim = config.dim
        fk = _factory(device, dtype)
        two = len(config.embed_dims) == 2
        attn = dict(heads=config.heads, dim_head=config.dim_head, **fk)

        def ln() -> nn.Module:
            return nn.LayerNorm(dim, eps=LN_EPS, **fk)

        self.two_conditions = two
        self.norm_attn1 = ln()
        self.norm_attn2_l = ln()
        self.norm_attn2_x = ln()
        self.attn1 = Attention(dim, **attn)
        self.attn2 = Attention(dim, **attn)
        if two:
            self.norm_attn3_l = ln()
            self.norm_attn3_y = ln()
            self.attn3 = Attention(dim, **attn)
        self.norm_ff = ln()
        self.ff = FeedForward(dim, mult=config.ff_mult, **fk)

    def forward(self, latents: Tensor, x: Tensor, y: Tensor | None, *, same_latents: bool = False) -> Tensor:
        """latents ``[N, Q, dim]``, x ``[N, Lx, dim]``, y ``[N, Ly, dim]`` or None -> ``[N, Q, dim]``.

        ``same_latents``: every item of ``latents`` is the same (the first layer reads the learned
        latents expanded over the batch), so the self-attention runs once and is broadcast.
        """
        h = self.norm_attn1(latents[:1] if same_latents else latents)
        latents = latents + self.attn1(h)
        latents = latents + self.attn2(self.norm_attn2_l(latents), self.norm_attn2_x(x))
        if self.two_conditions:
            latents = latents + self.attn3(self.norm_attn3_l(latents), self.norm_attn3_y(y))
        latents = latents + self.ff(self.norm_ff(latents))
        return latents


class Resampler(nn.Module):
    """Perceiver resampler: conditions -> ``[N, Q, K]`` LoRA coefficient tokens.

    Keys (format §4): ``latents [1, Q, dim]``, ``proj_in.{weight,bias} [dim, E_x]``,
    ``proj_in_2.* [dim, E_y]`` (two conditions), ``proj_out.* [K, dim]``, ``layers.j.*``.
    """

    def __init__(self, config: ResamplerConfig, *,
                 device: Any = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        fk = _factory(device, dtype)
        self.config = config
        self.latents = nn.Parameter(torch.empty(1, config.num_queries, config.dim, **fk))
        self.proj_in = nn.Linear(config.embed_dims[0], config.dim, bias=True, **fk)
        if len(config.embed_dims) == 2:
            self.proj_in_2 = nn.Linear(config.embed_dims[1], config.dim, bias=True, **fk)
        self.proj_out = nn.Linear(config.dim, config.output_dim, bias=True, **fk)
        self.layers = nn.ModuleList(
            ResamplerLayer(config, **fk) for _ in range(config.depth)
        )

    @property
    def num_conditions(self) -> int:
        return len(self.config.embed_dims)

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """x ``[N, Lx, E_x]``, y ``[N, Ly, E_y]`` (two conditions) -> ``[N, Q, K]``."""
        x = self.proj_in(x)
        if self.num_conditions == 2:
            if y is None:
                raise ValueError("this resampler has two conditions: pass y (the CLIP features)")
            y = self.proj_in_2(y)
        latents = self.latents.expand(x.shape[0], -1, -1)
        for j, layer in enumerate(self.layers):
            latents = layer(latents, x, y, same_latents=j == 0)
        return self.proj_out(latents)


class IDProjector(nn.Module):
    """ArcFace embedding ``[N, id_embed_dim]`` -> ID tokens ``[N, num_tokens, embed_dim]``.

    Keys: ``0.{weight,bias}`` (Linear ``id_embed_dim -> embed_dim*num_tokens``), reshape,
    ``2.{weight,bias}`` (LayerNorm over ``embed_dim``, eps 1e-5).  Index 1 holds no weights.
    """

    def __init__(self, *, id_embed_dim: int, embed_dim: int, num_tokens: int,
                 device: Any = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        fk = _factory(device, dtype)
        self.embed_dim = embed_dim
        self.num_tokens = num_tokens
        self.add_module("0", nn.Linear(id_embed_dim, embed_dim * num_tokens, bias=True, **fk))
        self.add_module("1", nn.Identity())
        self.add_module("2", nn.LayerNorm(embed_dim, eps=LN_EPS, **fk))

    def forward(self, id_embeds: Tensor) -> Tensor:
        """``[N, 512]`` -> ``[N, num_tokens, embed_dim]``."""
        out = getattr(self, "0")(id_embeds)
        out = out.reshape(-1, self.num_tokens, self.embed_dim)
        return getattr(self, "2")(out)


__all__ = ["Attention", "FeedForward", "IDProjector", "Resampler", "ResamplerLayer"]
