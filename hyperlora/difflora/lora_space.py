"""The LoRA space DiffLoRA's autoencoder works in: layouts, factors, a canonical form and invariant errors.

A LoRA module's weight update ``dW = (alpha / rank) * up @ down`` (``[out, in]``) has many factorisations:
``(up M, M^-1 down)`` gives the same ``dW`` for any invertible ``M [r, r]``.  An autoencoder over the raw
factors would have to learn that symmetry; this module removes it instead:

* :class:`LoraLayout` fixes which modules a DiffLoRA model makes (kohya prefix, out, in, rank) and in what
  order; :meth:`LoraLayout.check` refuses a LoRA that does not fit, naming the key and the fix.
* :func:`factors` / :func:`to_lora` go between a :data:`~hyperlora.lora.LoraDict` and plain per-module
  ``(up, down)`` pairs whose product *is* ``dW`` (alpha / rank folded in).
* :func:`canonical_factors` maps any factorisation of ``dW`` to the same pair, computed on ``r x r``
  matrices only (the ``[out, in]`` product is never formed).
* :func:`product_sq_error` / :func:`relative_frobenius` compare two products through ``r x r`` Gram
  matrices: exact, differentiable, invariant to the factorisation, and cheap for SDXL-sized modules.

Every function is pure, keeps the device of its inputs and computes in at least float32.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import LoraError
from ..lora import ALPHA_SUFFIX, DOWN_SUFFIX, UP_SUFFIX, LoraDict, split_lora

LAYOUT_FORMAT = "hyperlora-difflora-layout"
"""The ``format`` field of a layout's JSON."""
LAYOUT_VERSION = 1
"""The layout JSON's version; :meth:`LoraLayout.from_json` refuses any other."""
NORM_FLOOR = 1e-12
"""Added to a squared norm before dividing by it (an all-zero module gives a finite ratio)."""

Factors = tuple[Tensor, Tensor]
"""One module's ``(up [..., out, r], down [..., r, in])`` whose product is the module's ``dW``."""


@dataclass(frozen=True)
class LoraModule:
    """One module of a layout: its kohya ``prefix`` and ``dW``'s ``[out_features, in_features]`` at ``rank``."""

    prefix: str
    out_features: int
    in_features: int
    rank: int

    @property
    def num_params(self) -> int:
        """Values in its up and down matrices: ``rank * (out + in)``."""
        return self.rank * (self.out_features + self.in_features)


def _shape(t: Tensor) -> str:
    return "[" + ", ".join(str(d) for d in t.shape) + "]"


@dataclass(frozen=True)
class LoraLayout:
    """The ordered modules of the LoRAs a DiffLoRA model encodes and makes (order = the latent's token order)."""

    modules: tuple[LoraModule, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.modules, tuple):  # a list would make the frozen layout unhashable
            object.__setattr__(self, "modules", tuple(self.modules))
        if not self.modules:
            raise LoraError("A LoRA layout needs at least one module.")
        seen: set[str] = set()
        for m in self.modules:
            if not isinstance(m, LoraModule):
                raise LoraError(f"A LoRA layout holds LoraModule entries, got {type(m).__name__}.")
            if m.prefix in seen:
                raise LoraError(f"The LoRA layout names the module '{m.prefix}' twice; each prefix must be unique.")
            seen.add(m.prefix)
            for name, v in (("out_features", m.out_features), ("in_features", m.in_features), ("rank", m.rank)):
                if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                    raise LoraError(f"The LoRA layout's module '{m.prefix}' has {name} = {v!r}; it must be a "
                                    "positive whole number.")

    # ------------------------------------------------------------------ construction

    @classmethod
    def of(cls, lora: Mapping[str, Tensor], label: str = "The LoRA") -> LoraLayout:
        """The layout of a kohya LoRA: its modules in key order, with their sizes and ranks."""
        return cls(tuple(LoraModule(prefix, int(up.shape[0]), int(down.shape[1]), int(down.shape[0]))
                         for prefix, (down, up, _) in split_lora(lora, label).items()))

    # ------------------------------------------------------------------ properties

    @property
    def prefixes(self) -> tuple[str, ...]:
        return tuple(m.prefix for m in self.modules)

    @property
    def max_rank(self) -> int:
        return max(m.rank for m in self.modules)

    @property
    def num_params(self) -> int:
        """Values in all up and down matrices of one LoRA of this layout."""
        return sum(m.num_params for m in self.modules)

    def __len__(self) -> int:
        return len(self.modules)

    # ------------------------------------------------------------------ checking

    def check(self, lora: Mapping[str, Tensor], label: str = "The LoRA") -> None:
        """Raise :class:`LoraError` unless ``lora`` has exactly this layout's modules, sizes and ranks.

        The message names the first missing or extra module, or the key with the wrong shape, and the fix.
        """
        parts = split_lora(lora, label)
        for m in self.modules:
            if m.prefix not in parts:
                raise LoraError(
                    f"{label} has no '{m.prefix}{DOWN_SUFFIX}', which this DiffLoRA layout needs "
                    f"({len(self.modules)} modules). Use a LoRA made for the same modules (same base model, "
                    "same targets), or build the layout from this LoRA set with LoraLayout.of.")
            down, up, _ = parts[m.prefix]
            if tuple(up.shape) != (m.out_features, m.rank):
                raise LoraError(
                    f"{label}: '{m.prefix}{UP_SUFFIX}' is {_shape(up)} but the layout needs "
                    f"[{m.out_features}, {m.rank}] (out, rank). Use LoRAs of the layout's base model and rank.")
            if tuple(down.shape) != (m.rank, m.in_features):
                raise LoraError(
                    f"{label}: '{m.prefix}{DOWN_SUFFIX}' is {_shape(down)} but the layout needs "
                    f"[{m.rank}, {m.in_features}] (rank, in). Use LoRAs of the layout's base model and rank.")
        extra = [p for p in parts if p not in set(self.prefixes)]
        if extra:
            raise LoraError(
                f"{label} has '{extra[0]}{DOWN_SUFFIX}' ({len(extra)} module(s) in all), which this DiffLoRA "
                "layout does not know. Remove those modules from the LoRA, or build the layout from this LoRA "
                "set with LoraLayout.of.")

    # ------------------------------------------------------------------ JSON

    def to_dict(self) -> dict[str, Any]:
        return {"format": LAYOUT_FORMAT, "version": LAYOUT_VERSION,
                "modules": [{"prefix": m.prefix, "out": m.out_features, "in": m.in_features, "rank": m.rank}
                            for m in self.modules]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, data: Any, label: str = "The LoRA layout") -> LoraLayout:
        """Inverse of :meth:`to_dict`; :class:`LoraError` naming the field for anything else."""
        if not isinstance(data, Mapping):
            raise LoraError(f"{label} must be a JSON object, got {type(data).__name__}.")
        if set(data) != {"format", "version", "modules"}:
            raise LoraError(f"{label} has the fields {sorted(data)}; it needs exactly 'format', 'version' and "
                            "'modules'. Write it with LoraLayout.to_json.")
        if data["format"] != LAYOUT_FORMAT or data["version"] != LAYOUT_VERSION:
            raise LoraError(f"{label} is format {data['format']!r} version {data['version']!r}; this pack reads "
                            f"{LAYOUT_FORMAT!r} version {LAYOUT_VERSION}. Update the pack or re-save the layout.")
        mods = data["modules"]
        if not isinstance(mods, list):
            raise LoraError(f"{label}: 'modules' must be a list.")
        out: list[LoraModule] = []
        for j, entry in enumerate(mods):
            if not isinstance(entry, Mapping) or set(entry) != {"prefix", "out", "in", "rank"}:
                raise LoraError(f"{label}: module {j} must be an object with exactly 'prefix', 'out', 'in' and "
                                f"'rank', got {entry!r}.")
            if not isinstance(entry["prefix"], str):
                raise LoraError(f"{label}: module {j}'s prefix must be a string, got {entry['prefix']!r}.")
            out.append(LoraModule(entry["prefix"], entry["out"], entry["in"], entry["rank"]))
        return cls(tuple(out))

    @classmethod
    def from_json(cls, text: str, label: str = "The LoRA layout") -> LoraLayout:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LoraError(f"{label} is not valid JSON ({exc}); write it with LoraLayout.to_json.") from exc
        return cls.from_dict(data, label)


# --------------------------------------------------------------------------- LoraDict <-> factors


def factors(lora: Mapping[str, Tensor], layout: LoraLayout, label: str = "The LoRA") -> list[Factors]:
    """Per module of ``layout`` (in its order): ``(up [out, r], down [r, in])`` with ``up @ down == dW``.

    The scale ``c = alpha / rank`` (1 without alpha) is split evenly: both matrices are multiplied by
    ``sqrt(|c|)`` and ``up`` also by ``sign(c)``.  Float32 at least (float64 stays float64).  The LoRA
    is checked against the layout first (:meth:`LoraLayout.check`).
    """
    layout.check(lora, label)
    parts = split_lora(lora, label)
    out: list[Factors] = []
    for m in layout.modules:
        down, up, alpha = parts[m.prefix]
        ctype = torch.promote_types(torch.promote_types(down.dtype, up.dtype), torch.float32)
        c = 1.0 if alpha is None else float(alpha.item()) / m.rank
        if not math.isfinite(c):
            raise LoraError(f"{label}: '{m.prefix}{ALPHA_SUFFIX}' is {c * m.rank}; it must be a finite number.")
        root = math.sqrt(abs(c))
        out.append((up.to(ctype) * (root if c >= 0 else -root), down.to(ctype) * root))
    return out


def stack_factors(loras: Sequence[Mapping[str, Tensor]], layout: LoraLayout) -> list[Factors]:
    """:func:`factors` of ``B`` LoRAs stacked per module: ``[(up [B, out, r], down [B, r, in]), ...]``."""
    if isinstance(loras, Mapping) or len(loras) == 0:
        raise LoraError("stack_factors takes a non-empty list of LoRAs.")
    each = [factors(lora, layout, f"LoRA {j}") for j, lora in enumerate(loras, start=1)]
    dtype = each[0][0][0].dtype
    return [(torch.stack([e[i][0].to(dtype) for e in each]), torch.stack([e[i][1].to(dtype) for e in each]))
            for i in range(len(layout))]


def to_lora(module_factors: Sequence[Factors], layout: LoraLayout, *, dtype: torch.dtype | None = None) -> LoraDict:
    """A kohya LoRA from per-module ``(up [out, r], down [r, in])`` (one LoRA, no batch axis).

    ``alpha = rank`` so the scale is 1 and ``dW == up @ down``: the inverse of :func:`factors` up to the
    factorisation (the products are equal).  ``dtype`` defaults to the factors' own.
    """
    if len(module_factors) != len(layout):
        raise LoraError(f"Got factors for {len(module_factors)} modules but the layout has {len(layout)}.")
    out: LoraDict = {}
    for m, (up, down) in zip(layout.modules, module_factors):
        if tuple(up.shape) != (m.out_features, m.rank) or tuple(down.shape) != (m.rank, m.in_features):
            raise LoraError(f"The factors of '{m.prefix}' are up {_shape(up)} and down {_shape(down)}; the layout "
                            f"needs up [{m.out_features}, {m.rank}] and down [{m.rank}, {m.in_features}].")
        t = dtype or down.dtype
        out[m.prefix + DOWN_SUFFIX] = down.detach().to(t).contiguous()
        out[m.prefix + UP_SUFFIX] = up.detach().to(t).contiguous()
        out[m.prefix + ALPHA_SUFFIX] = torch.tensor(float(m.rank), dtype=t, device=down.device)
    return out


# --------------------------------------------------------------------------- canonical form


def canonical_factors(up: Tensor, down: Tensor) -> Factors:
    """The canonical factorisation of ``up @ down``, the same for every factorisation of that product.

    ``up [..., out, r]``, ``down [..., r, in]`` (any leading batch axes) -> ``(U [..., out, r],
    D [..., r, in])`` with ``U @ D == up @ down``, computed without forming the ``[out, in]`` product:

    1. reduced QR: ``up = Qu Ru`` and ``down^T = Qd Rd`` (``Qu [out, k]``, ``Qd [in, k']``);
    2. SVD of the small core ``Ru Rd^T = P S V^T``, so ``up @ down = (Qu P) S (Qd V)^T``;
    3. balanced split: ``U = Qu P sqrt(S)``, ``D = sqrt(S) (Qd V)^T`` (components ordered by singular value,
       largest first; both sides carry the same norm ``sqrt(s_i)``);
    4. sign rule: each component ``i`` is flipped (on both sides) so that the entry of largest magnitude of
       its up column is positive.

    When ``r > min(out, in)`` the trailing components are zero.  The form is unique (up to float rounding)
    when the nonzero singular values are distinct; equal singular values leave a rotation inside their
    subspace free, as for any SVD.  Computed in at least float32; differentiable where the SVD is.
    """
    if up.dim() < 2 or down.dim() < 2 or up.shape[-1] != down.shape[-2]:
        raise LoraError(f"canonical_factors needs up [..., out, r] and down [..., r, in] with the same r, got "
                        f"{_shape(up)} and {_shape(down)}.")
    ctype = torch.promote_types(torch.promote_types(up.dtype, down.dtype), torch.float32)
    up, down = up.to(ctype), down.to(ctype)
    r = up.shape[-1]
    qu, ru = torch.linalg.qr(up)                     # [.., out, ku], [.., ku, r]
    qd, rd = torch.linalg.qr(down.transpose(-1, -2))  # [.., in, kd], [.., kd, r]
    core = ru @ rd.transpose(-1, -2)                 # [.., ku, kd]
    p, s, vh = torch.linalg.svd(core, full_matrices=False)  # [.., ku, k], [.., k], [.., k, kd]
    left = qu @ p                                    # [.., out, k]  orthonormal columns
    right = vh @ qd.transpose(-1, -2)                # [.., k, in]   orthonormal rows
    # sign rule on the up side: the largest-magnitude entry of each column is positive
    idx = left.abs().argmax(dim=-2, keepdim=True)    # [.., 1, k]
    sign = torch.sign(torch.gather(left, -2, idx))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    root = s.clamp_min(0).sqrt().unsqueeze(-2)       # [.., 1, k]
    u = left * sign * root
    d = right * (sign * root).transpose(-1, -2)
    k = s.shape[-1]
    if k < r:  # pad zero components so the rank stays r
        u = torch.cat([u, u.new_zeros(*u.shape[:-1], r - k)], dim=-1)
        d = torch.cat([d, d.new_zeros(*d.shape[:-2], r - k, d.shape[-1])], dim=-2)
    return u, d


# --------------------------------------------------------------------------- invariant errors


def _trace_of_product(a: Tensor, b: Tensor) -> Tensor:
    """``tr(a @ b)`` for ``a [..., p, q]``, ``b [..., q, p]`` -> ``[...]`` without the product."""
    return (a * b.transpose(-1, -2)).sum(dim=(-1, -2))


def product_sq_norm(up: Tensor, down: Tensor) -> Tensor:
    """``||up @ down||_F^2 = tr((up^T up)(down down^T))``: ``[..., out, r]``, ``[..., r, in]`` -> ``[...]``."""
    return _trace_of_product(up.transpose(-1, -2) @ up, down @ down.transpose(-1, -2))


def product_sq_error(up_a: Tensor, down_a: Tensor, up_b: Tensor, down_b: Tensor) -> Tensor:
    """``||up_a @ down_a - up_b @ down_b||_F^2`` through ``r x r`` Gram matrices, ``[...]`` per batch entry.

    ``up_a [..., out, ra]``, ``down_a [..., ra, in]``, ``up_b [..., out, rb]``, ``down_b [..., rb, in]``
    (batch axes broadcast; the ranks may differ).  With ``A = up_a down_a`` and ``B = up_b down_b``::

        ||A - B||^2 = tr((Ua^T Ua)(Da Da^T)) - 2 tr((Ua^T Ub)(Db Da^T)) + tr((Ub^T Ub)(Db Db^T))

    Cost ``O((out + in) r^2)`` instead of ``O(out in r)``; differentiable; the same for every factorisation
    of either product.  The difference of the three terms cancels: in float32 a relative error below about
    1e-3 is rounding noise, so compare small errors in float64.  Clamped at 0.
    """
    aa = product_sq_norm(up_a, down_a)
    bb = product_sq_norm(up_b, down_b)
    ab = _trace_of_product(up_a.transpose(-1, -2) @ up_b, down_b @ down_a.transpose(-1, -2))
    return (aa - 2 * ab + bb).clamp_min(0)


def relative_frobenius(up_a: Tensor, down_a: Tensor, up_b: Tensor, down_b: Tensor) -> Tensor:
    """``||A - B||_F / ||A||_F`` with ``A = up_a @ down_a`` the reference, ``B = up_b @ down_b``; ``[...]``.

    Shapes as :func:`product_sq_error`.  An all-zero ``A`` divides by ``sqrt(NORM_FLOOR)``.
    """
    err = product_sq_error(up_a, down_a, up_b, down_b)
    return (err / (product_sq_norm(up_a, down_a) + NORM_FLOOR)).sqrt()


__all__ = [
    "LAYOUT_FORMAT",
    "LAYOUT_VERSION",
    "NORM_FLOOR",
    "Factors",
    "LoraLayout",
    "LoraModule",
    "canonical_factors",
    "factors",
    "product_sq_error",
    "product_sq_norm",
    "relative_frobenius",
    "stack_factors",
    "to_lora",
]
