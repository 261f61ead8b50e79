"""Differentiable, per-sample HyperLoRA: tokens -> low-rank factors -> applied inside Linear layers.

Three parts, plain PyTorch (no diffusers, no ComfyUI):

* :func:`basis_factors` builds, for every ``(module, layer)`` of a HyperLoRA architecture, the
  per-sample LoRA factors from coefficient tokens ``[B, Q, K]`` and the bases (in the grouped
  layout of :class:`hyperlora.generate.HyperLoRAModel`: ``down [M, in*rank, K]``,
  ``up [M, rank*out, K]`` per group)::

      down[b] = (sum_k a[b, k] * down_basis[k])^T     [B, rank, in]
      up[b]   = (sum_k c[b, k] * up_basis[k])^T       [B, out, rank]

  the same maths as ``HyperLoRAModel.build_lora`` (facts §5.5), batched over samples and
  differentiable w.r.t. the tokens and the bases.  Factors with a leading 1 broadcast over any batch.
* :func:`applied` (a context manager) adds ``scale * up(down(x))`` per sample to the output of
  the given ``nn.Linear`` layers (forward hooks), without ever building an ``[out, in]`` weight:
  ``x [B, ..., in] -> (x @ down^T) [B, ..., rank] -> @ up^T [B, ..., out]``.  Several LoRAs
  (e.g. ID + Base) are applied at once by concatenating their ranks; ``scale`` may be a float or
  a ``[B]`` tensor (one strength per sample), and per-prefix multipliers are optional.
* :func:`diffusers_lora_targets` maps kohya prefixes onto the Linear layers of a UNet that uses
  diffusers module names (``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``,
  ``...to_out.0``).  Other hosts (e.g. ComfyUI's own UNet) pass their own ``{prefix: Linear}`` map.

Merged, a generated LoRA changes ``W`` into ``W + strength * (alpha / rank) * up @ down`` with
``alpha = rank / 2`` (facts §5.6): the HyperLoRA scale is ``LORA_SCALE * strength``.

With gradient checkpointing, the recomputation of a checkpointed block runs the hooks again
during ``backward()``: keep the :func:`applied` context open until the backward pass is done.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .errors import LoraError
from .generate import BasisGroup
from .spec import KOHYA_LAYER, LoraModuleSpec, token_index

log = logging.getLogger(__name__)

LORA_SCALE = 0.5
"""``alpha / rank`` of every generated LoRA (alpha = rank / 2, facts §5.6)."""

Factors = dict[str, tuple[Tensor, Tensor]]
"""kohya prefix (``{module}_{to_q|to_k|to_v|to_out_0}``) -> ``(down [B|1, rank, in], up [B|1, out, rank])``."""

_DIFFUSERS_LAYER = re.compile(r"(^|\.)attn[12]\.(to_q|to_k|to_v|to_out\.0)$")


def kohya_prefix(module_name: str, layer: str) -> str:
    """``lora_unet_..._attn1`` + ``to_out`` -> ``lora_unet_..._attn1_to_out_0``."""
    return f"{module_name}_{KOHYA_LAYER[layer]}"


def group_factors(tokens: Tensor, group: BasisGroup, down_basis: Tensor, up_basis: Tensor
                  ) -> tuple[Tensor, Tensor]:
    """Factors of one basis group for every sample.

    tokens ``[B, Q, K]``; down_basis ``[M, in*rank, K]``; up_basis ``[M, rank*out, K]`` ->
    ``(down [B, M, rank, in], up [B, M, out, rank])`` in the bases' dtype (tokens are cast to it).
    """
    b = tokens.shape[0]
    m, r, fin, fout = len(group.entries), group.rank, group.in_features, group.out_features
    idx = torch.tensor([token_index(i, layer) for i, layer in group.entries], device=tokens.device)
    t = tokens.to(down_basis.dtype)
    a = t.index_select(1, idx).transpose(0, 1)            # [M, B, K] down coefficients
    c = t.index_select(1, idx + 1).transpose(0, 1)        # [M, B, K] up coefficients
    down = torch.bmm(a, down_basis.transpose(1, 2))       # [M, B, in*rank]
    up = torch.bmm(c, up_basis.transpose(1, 2))           # [M, B, rank*out]
    down = down.view(m, b, fin, r).permute(1, 0, 3, 2)    # [B, M, rank, in]
    up = up.view(m, b, r, fout).permute(1, 0, 3, 2)       # [B, M, out, rank]
    return down, up


def basis_factors(tokens: Tensor, groups: Sequence[tuple[BasisGroup, Tensor, Tensor]],
                  modules: Sequence[LoraModuleSpec]) -> Factors:
    """Per-sample factors of every ``(module, layer)``: tokens ``[B, Q, K]`` -> :data:`Factors`.

    ``groups``: ``(group, down_basis [M, in*rank, K], up_basis [M, rank*out, K])`` as returned by
    ``HyperLoRAModel.basis_groups(kind)`` or a training module in the same layout; ``modules`` the
    architecture's modules (JSON order) naming the prefixes.  Differentiable w.r.t. tokens and bases.
    """
    if tokens.dim() != 3:
        raise LoraError(f"coefficient tokens must be [batch, Q, K], got {list(tokens.shape)}; "
                        f"add a batch dimension (tokens[None]) for one identity.")
    out: Factors = {}
    for group, down_basis, up_basis in groups:
        down, up = group_factors(tokens, group, down_basis, up_basis)
        # unbind, not down[:, j] per entry: each select's backward would add a zero tensor of the whole
        # group (quadratic in the group's entries: 360 in SDXL's largest group)
        for (i, layer), d, u in zip(group.entries, down.unbind(1), up.unbind(1)):
            out[kohya_prefix(modules[i].name, layer)] = (d, u)
    return out


def factors_from_lora(lora: Mapping[str, Tensor]) -> Factors:
    """A kohya LoRA dict (``lora_down [r, in]``, ``lora_up [out, r]``, ``alpha``) -> B=1 :data:`Factors`
    with ``alpha / rank`` folded into ``up`` (apply them with ``scale = strength``)."""
    out: Factors = {}
    for key, down in lora.items():
        if not key.endswith(".lora_down.weight"):
            continue
        prefix = key[: -len(".lora_down.weight")]
        up = lora.get(prefix + ".lora_up.weight")
        if up is None or down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0]:
            raise LoraError(f"LoRA module '{prefix}' needs lora_down [rank, in] and lora_up [out, rank]; "
                            f"got {list(down.shape)} and {None if up is None else list(up.shape)}.")
        alpha = lora.get(prefix + ".alpha")
        ratio = 1.0 if alpha is None else float(alpha) / down.shape[0]
        out[prefix] = (down[None], (up * ratio)[None])
    if not out:
        raise LoraError("The LoRA holds no '*.lora_down.weight' keys, so there is nothing to apply.")
    return out


@dataclass
class LoraTerm:
    """One LoRA to apply: its factors and strength.

    ``scale``: a number or a ``[B]`` tensor (one multiplier per sample); for generated LoRAs use
    ``LORA_SCALE * strength``.  ``layer_scales``: optional extra multiplier per prefix (missing
    prefixes keep 1).
    """

    factors: Factors
    scale: float | Tensor = LORA_SCALE
    layer_scales: Mapping[str, float] | None = None


def _scaled_up(up: Tensor, scale: float | Tensor, extra: float) -> Tensor:
    if isinstance(scale, Tensor):
        s = scale.to(device=up.device, dtype=up.dtype).reshape(-1, 1, 1) * extra
        return up * s
    return up * (float(scale) * extra)


def combine_terms(terms: Sequence[LoraTerm]) -> Factors:
    """All terms as one set of factors: ranks concatenated, scales folded into ``up``.

    Per prefix: ``down [B, sum r, in]``, ``up [B, out, sum r]`` (B = 1 when every term is B = 1).
    """
    combined: dict[str, tuple[list[Tensor], list[Tensor]]] = {}
    for term in terms:
        for prefix, (down, up) in term.factors.items():
            extra = 1.0 if term.layer_scales is None else float(term.layer_scales.get(prefix, 1.0))
            downs, ups = combined.setdefault(prefix, ([], []))
            downs.append(down)
            ups.append(_scaled_up(up, term.scale, extra))
    out: Factors = {}
    for prefix, (downs, ups) in combined.items():
        if len(downs) == 1:
            out[prefix] = (downs[0], ups[0])
            continue
        batch = max(max(d.shape[0] for d in downs), max(u.shape[0] for u in ups))
        dtype = downs[0].dtype
        d = torch.cat([t.to(dtype).expand(batch, -1, -1) for t in downs], dim=1)
        u = torch.cat([t.to(dtype).expand(batch, -1, -1) for t in ups], dim=2)
        out[prefix] = (d, u)
    return out


def low_rank_delta(x: Tensor, down: Tensor, up: Tensor) -> Tensor:
    """``up(down(x))`` per sample: x ``[B, ..., in]``, down ``[B|1, r, in]``, up ``[B|1, out, r]`` -> ``[B, ..., out]``."""
    b = x.shape[0]
    if down.shape[0] not in (1, b) or up.shape[0] not in (1, b):
        raise LoraError(f"LoRA factors for {down.shape[0]} sample(s) cannot be applied to a batch of {b}; "
                        f"give one LoRA per sample or a single one for all.")
    flat = x.reshape(b, -1, x.shape[-1])
    h = torch.matmul(flat, down.to(x.dtype).transpose(1, 2))     # [B, L, r]
    y = torch.matmul(h, up.to(x.dtype).transpose(1, 2))          # [B, L, out]
    return y.reshape(*x.shape[:-1], y.shape[-1])


def _hook(down: Tensor, up: Tensor):
    def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        return output + low_rank_delta(args[0], down, up)
    return hook


@contextlib.contextmanager
def applied(targets: Mapping[str, nn.Module], terms: Sequence[LoraTerm], *, strict: bool = True) -> Iterator[Factors]:
    """Within the block, every target Linear returns ``W x + b + sum_terms scale * up(down(x))``.

    ``targets``: ``{kohya prefix: nn.Linear}``.  ``strict``: every prefix of every term must be a
    target (:class:`LoraError` naming the missing ones otherwise); not strict skips them.
    Yields the combined factors.  Hooks are removed on exit, also after an exception.
    """
    combined = combine_terms(terms)
    missing = [p for p in combined if p not in targets]
    if missing and strict:
        raise LoraError(f"{len(missing)} LoRA module(s) have no matching layer in the model, e.g. "
                        f"{', '.join(missing[:3])}; the LoRA was made for another UNet.")
    handles = []
    try:
        for prefix, (down, up) in combined.items():
            module = targets.get(prefix)
            if module is None:
                continue
            fin = getattr(module, "in_features", down.shape[-1])
            fout = getattr(module, "out_features", up.shape[1])
            if down.shape[-1] != fin or up.shape[1] != fout:
                raise LoraError(f"LoRA module '{prefix}' maps {down.shape[-1]} -> {up.shape[1]} features but the "
                                f"layer maps {fin} -> {fout}; the LoRA was made for another UNet.")
            handles.append(module.register_forward_hook(_hook(down, up)))
        yield combined
    finally:
        for h in handles:
            h.remove()


def diffusers_lora_targets(unet: nn.Module, prefixes: Sequence[str] | None = None) -> dict[str, nn.Linear]:
    """``{kohya prefix: Linear}`` of the attention projections of a diffusers-named UNet.

    ``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0`` ->
    ``lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0``.  With
    ``prefixes``, only those (in that order) and :class:`LoraError` naming any that is absent.
    """
    found: dict[str, nn.Linear] = {}
    for name, module in unet.named_modules():
        if isinstance(module, nn.Linear) and _DIFFUSERS_LAYER.search(name):
            found["lora_unet_" + name.replace(".", "_")] = module
    if prefixes is None:
        return found
    missing = [p for p in prefixes if p not in found]
    if missing:
        raise LoraError(f"The UNet has no layer for {len(missing)} LoRA module(s), e.g. {', '.join(missing[:3])}; "
                        f"the HyperLoRA model was made for another UNet.")
    return {p: found[p] for p in prefixes}


__all__ = [
    "Factors", "LORA_SCALE", "LoraTerm", "applied", "basis_factors", "combine_terms", "diffusers_lora_targets",
    "factors_from_lora", "group_factors", "kohya_prefix", "low_rank_delta",
]
