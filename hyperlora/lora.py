"""LoRA algebra on generated LoRAs and the kohya ``.safetensors`` format.

A LoRA here is a :data:`LoraDict`: a flat ``dict`` of tensors with kohya keys,
three per module prefix (format §5.6)::

    f"{prefix}.lora_down.weight"   [rank, in]
    f"{prefix}.lora_up.weight"     [out, rank]
    f"{prefix}.alpha"              []  (scalar; optional, a missing alpha means alpha = rank)

so that the weight update of a module merged at strength ``s`` is
``dW = s * (alpha / rank) * up @ down`` (``[out, in]``).

Two ways of combining identities exist, and they are different on purpose:

* **weight-delta space** (:func:`scale_lora`, :func:`weighted_sum`,
  :func:`difference`): exact sums of the dW of several LoRAs, done by
  concatenating ranks, so the result's rank is the sum of the inputs' ranks.
* **coefficient space** (:func:`mix_tokens`): the normalised resampler tokens
  ``[Q, K]`` of several identities are interpolated and renormalised *before*
  one rank-8 LoRA is built from them (the authors' "ID interpolation").

Every function here is pure (inputs are never modified; unchanged tensors may
be shared between input and output) and keeps the device and dtype of its
inputs.  Files are written and read by :mod:`hyperlora.lora_file`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .errors import LoraError
from .spec import NORM_EPS

logger = logging.getLogger(__name__)

LoraDict = dict[str, Tensor]


class GeneratedLora(dict):
    """A kohya LoRA dict (``LoraDict``) that also remembers where it came from.

    To ComfyUI and its core LoRA nodes it is a plain dict of tensors (the ``LORA_MODEL`` type);
    ``provenance`` carries the HyperLoRA model name and fingerprint, the number of photos and
    how it was made, so an exported file can say so in its metadata.
    """

    def __init__(self, tensors: Mapping[str, Tensor], provenance: Mapping[str, str] | None = None) -> None:
        super().__init__(tensors)
        self.provenance: dict[str, str] = dict(provenance or {})


def provenance_of(lora: Mapping[str, Tensor]) -> dict[str, str]:
    """The provenance of a :class:`GeneratedLora` (``{}`` for any other LoRA dict)."""
    return dict(getattr(lora, "provenance", {}) or {})

DOWN_SUFFIX = ".lora_down.weight"
UP_SUFFIX = ".lora_up.weight"
ALPHA_SUFFIX = ".alpha"

SDXL_ARCHITECTURE = "stable-diffusion-xl-v1-base/lora"
SDXL_BASE_VERSION = "sdxl_base_v1-0"



# --------------------------------------------------------------------------- structure


def _shape(t: Tensor) -> str:
    return "[" + ", ".join(str(d) for d in t.shape) + "]"


def split_lora(lora: Mapping[str, Tensor], label: str = "The LoRA") -> dict[str, tuple[Tensor, Tensor, Tensor | None]]:
    """Group a kohya LoRA by module prefix: ``{prefix: (down [r, in], up [out, r], alpha [] or None)}``.

    Prefix order is the insertion order of the ``lora_down`` keys.  Raises
    :class:`LoraError` naming the first key that does not belong to a plain
    kohya LoRA (LoCon ``lora_mid``, DoRA ``dora_scale``, LoHa ``hada_*``, ...)
    or whose shape does not fit its partners.
    """
    if not isinstance(lora, Mapping):
        raise LoraError(f"{label} is a {type(lora).__name__}, not a dict of LoRA tensors.")
    prefixes: list[str] = []
    for key in lora:
        if not isinstance(key, str):
            raise LoraError(f"{label} has a key {key!r} that is not a string; it is not a kohya LoRA.")
        if key.endswith(DOWN_SUFFIX):
            prefixes.append(key[: -len(DOWN_SUFFIX)])
        elif key.endswith(UP_SUFFIX):
            if key[: -len(UP_SUFFIX)] + DOWN_SUFFIX not in lora:
                raise LoraError(f"{label} has '{key}' but no matching '{key[: -len(UP_SUFFIX)]}{DOWN_SUFFIX}'.")
        elif key.endswith(ALPHA_SUFFIX):
            if key[: -len(ALPHA_SUFFIX)] + DOWN_SUFFIX not in lora:
                raise LoraError(f"{label} has '{key}' but no matching '{key[: -len(ALPHA_SUFFIX)]}{DOWN_SUFFIX}'.")
        else:
            raise LoraError(
                f"{label} has the key '{key}', which is not part of a plain kohya LoRA "
                "(only '*.lora_down.weight', '*.lora_up.weight' and '*.alpha' are supported here); "
                "LoCon/LoHa/DoRA LoRAs cannot be combined with HyperLoRA LoRAs."
            )
    if not prefixes:
        raise LoraError(f"{label} holds no LoRA weights (no '*{DOWN_SUFFIX}' keys).")
    out: dict[str, tuple[Tensor, Tensor, Tensor | None]] = {}
    for prefix in prefixes:
        down = lora[prefix + DOWN_SUFFIX]
        up_key = prefix + UP_SUFFIX
        if up_key not in lora:
            raise LoraError(f"{label} has '{prefix}{DOWN_SUFFIX}' but no '{up_key}'.")
        up = lora[up_key]
        alpha = lora.get(prefix + ALPHA_SUFFIX)
        for key, t in ((prefix + DOWN_SUFFIX, down), (up_key, up)):
            if not isinstance(t, Tensor) or t.dim() != 2 or not t.is_floating_point():
                what = _shape(t) if isinstance(t, Tensor) else type(t).__name__
                raise LoraError(
                    f"{label}: '{key}' must be a 2-D floating-point matrix but is {what}; "
                    "convolution LoRAs and other formats are not supported here."
                )
        if up.shape[1] != down.shape[0]:
            raise LoraError(
                f"{label}: '{up_key}' is {_shape(up)} but '{prefix}{DOWN_SUFFIX}' is {_shape(down)}; "
                "the rank (up columns, down rows) must be equal."
            )
        if alpha is not None and (not isinstance(alpha, Tensor) or alpha.numel() != 1):
            raise LoraError(f"{label}: '{prefix}{ALPHA_SUFFIX}' must be a single number.")
        out[prefix] = (down, up, alpha)
    return out


def _scale_of(down: Tensor, alpha: Tensor | None) -> float:
    """``alpha / rank`` as a Python float (1.0 without alpha, as ComfyUI does)."""
    if alpha is None:
        return 1.0
    return float(alpha.item()) / down.shape[0]


def lora_prefixes(lora: Mapping[str, Tensor]) -> list[str]:
    """Module prefixes of a kohya LoRA, in insertion order.

    ``lora_unet_..._attn1_to_q.lora_down.weight`` -> ``lora_unet_..._attn1_to_q``.
    """
    return list(split_lora(lora))


def lora_rank(lora: Mapping[str, Tensor]) -> int | None:
    """The common rank of every module, or ``None`` when ranks differ."""
    ranks = {down.shape[0] for down, _, _ in split_lora(lora).values()}
    return ranks.pop() if len(ranks) == 1 else None


def lora_num_params(lora: Mapping[str, Tensor]) -> int:
    """Number of values in the down and up matrices (alphas not counted)."""
    return sum(down.numel() + up.numel() for down, up, _ in split_lora(lora).values())


def lora_delta(lora: Mapping[str, Tensor], prefix: str) -> Tensor:
    """Weight update of one module at strength 1: ``(alpha / rank) * up @ down``.

    Returns a float32 ``[out, in]`` tensor on the LoRA's device (float64 in,
    float64 out).
    """
    if not isinstance(lora, Mapping) or prefix + DOWN_SUFFIX not in lora:
        names = [k[: -len(DOWN_SUFFIX)] for k in lora if isinstance(k, str) and k.endswith(DOWN_SUFFIX)]
        example = f" (it has {len(names)} modules, e.g. '{names[0]}')" if names else ""
        raise LoraError(f"The LoRA has no module '{prefix}'{example}.")
    # validate only this module: a loop over all prefixes stays linear
    sub = {k: lora[k] for k in (prefix + DOWN_SUFFIX, prefix + UP_SUFFIX, prefix + ALPHA_SUFFIX) if k in lora}
    if prefix + UP_SUFFIX not in sub:
        raise LoraError(f"The LoRA has '{prefix}{DOWN_SUFFIX}' but no '{prefix}{UP_SUFFIX}'.")
    down, up, alpha = split_lora(sub)[prefix]
    ctype = torch.promote_types(torch.promote_types(down.dtype, up.dtype), torch.float32)
    return (up.to(ctype) @ down.to(ctype)) * _scale_of(down, alpha)


# --------------------------------------------------------------------------- algebra


def _scaled(t: Tensor, s: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``t * s`` computed in at least float32, returned in ``dtype`` on ``device``."""
    ctype = torch.promote_types(t.dtype, torch.float32)
    return (t.to(device=device, dtype=ctype) * s).to(dtype)


def _alpha_like(value: float, like: Tensor) -> Tensor:
    return torch.tensor(value, dtype=like.dtype, device=like.device)


def scale_lora(lora: Mapping[str, Tensor], s: float) -> LoraDict:
    """``s`` times the LoRA in weight-delta space: every dW becomes ``s * dW``.

    The factor is folded into each ``lora_up`` matrix (computed in float32,
    stored in the up matrix's dtype); down matrices and alphas are shared.
    Negative ``s`` is allowed (it inverts the effect).
    """
    s = _check_number(s, "The LoRA scale")
    out: LoraDict = {}
    for prefix, (down, up, alpha) in split_lora(lora).items():
        out[prefix + DOWN_SUFFIX] = down
        out[prefix + UP_SUFFIX] = _scaled(up, s, up.dtype, up.device)
        if alpha is not None:
            out[prefix + ALPHA_SUFFIX] = alpha
    return out


def _check_number(value: float, what: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise LoraError(f"{what} must be a number, got {value!r}.") from None
    if not math.isfinite(v):
        raise LoraError(f"{what} must be a finite number, got {value!r}.")
    return v

def _paired_weights(items: Iterable[Any], weights: Iterable[float], *, noun: str, nouns: str,
                    verb: str) -> tuple[list[Any], list[float]]:
    """``(items, weights)`` as lists, one finite weight per item; LoraError naming the mismatch."""
    items, weights = list(items), list(weights)
    if not items:
        raise LoraError(f"Cannot {verb} an empty list of {nouns}; give at least one.")
    if len(weights) != len(items):
        raise LoraError(f"Got {len(items)} {nouns} but {len(weights)} weights; give exactly one weight per {noun}.")
    return items, [_check_number(w, f"The weight of {noun} {j}") for j, w in enumerate(weights, start=1)]



def _check_compatible(
    parts: Sequence[dict[str, tuple[Tensor, Tensor, Tensor | None]]],
) -> None:
    """Raise :class:`LoraError` naming the first key where LoRA ``j`` differs from LoRA 1."""
    ref = parts[0]
    for j, other in enumerate(parts[1:], start=2):
        for prefix, (down, up, _) in ref.items():
            if prefix not in other:
                raise LoraError(
                    f"Cannot combine these LoRAs: LoRA {j} has no '{prefix}{DOWN_SUFFIX}', which LoRA 1 has. "
                    "Only LoRAs made for the same modules (e.g. by the same HyperLoRA model) can be combined."
                )
            o_down, o_up, _ = other[prefix]
            if o_down.shape[1] != down.shape[1]:
                raise LoraError(
                    f"Cannot combine these LoRAs: '{prefix}{DOWN_SUFFIX}' is {_shape(o_down)} in LoRA {j} "
                    f"but {_shape(down)} in LoRA 1 (different input size). "
                    "Only LoRAs made for the same base model can be combined."
                )
            if o_up.shape[0] != up.shape[0]:
                raise LoraError(
                    f"Cannot combine these LoRAs: '{prefix}{UP_SUFFIX}' is {_shape(o_up)} in LoRA {j} "
                    f"but {_shape(up)} in LoRA 1 (different output size). "
                    "Only LoRAs made for the same base model can be combined."
                )
        for prefix in other:
            if prefix not in ref:
                raise LoraError(
                    f"Cannot combine these LoRAs: LoRA {j} has '{prefix}{DOWN_SUFFIX}', which LoRA 1 lacks. "
                    "Only LoRAs made for the same modules (e.g. by the same HyperLoRA model) can be combined."
                )


def weighted_sum(loras: Sequence[Mapping[str, Tensor]], weights: Sequence[float]) -> LoraDict:
    """Exact weighted sum in weight-delta space: ``dW = sum_j w_j * dW_j`` for every module.

    Ranks are concatenated: with LoRA ``j`` of rank ``r_j`` and scale
    ``c_j = w_j * alpha_j / r_j``::

        down = cat_j(down_j)          [sum r_j, in]
        up   = cat_j(c_j * up_j)      [out, sum r_j]
        alpha = sum r_j               (so alpha / rank = 1)

    All LoRAs must have the same module prefixes and in/out sizes (ranks may
    differ, e.g. an ID-LoRA of rank 8 and a Base-LoRA of rank 4).  The result
    follows LoRA 1's key order, device and dtype (the promoted dtype when the
    inputs differ).  Raises :class:`LoraError` naming the first mismatching key.
    """
    if isinstance(loras, Mapping):
        raise LoraError("weighted_sum takes a list of LoRAs, not a single LoRA.")
    loras, ws = _paired_weights(loras, weights, noun="LoRA", nouns="LoRAs", verb="combine")
    parts = [split_lora(lora, f"LoRA {j}") for j, lora in enumerate(loras, start=1)]
    _check_compatible(parts)

    out: LoraDict = {}
    for prefix, (down0, _, _) in parts[0].items():
        device = down0.device
        dtype = down0.dtype
        for p in parts:
            d, u, _ = p[prefix]
            dtype = torch.promote_types(dtype, torch.promote_types(d.dtype, u.dtype))
        downs: list[Tensor] = []
        ups: list[Tensor] = []
        for p, w in zip(parts, ws):
            down, up, alpha = p[prefix]
            downs.append(down.to(device=device, dtype=dtype))
            ups.append(_scaled(up, w * _scale_of(down, alpha), dtype, device))
        down = torch.cat(downs, dim=0)
        out[prefix + DOWN_SUFFIX] = down
        out[prefix + UP_SUFFIX] = torch.cat(ups, dim=1)
        out[prefix + ALPHA_SUFFIX] = _alpha_like(float(down.shape[0]), down)
    return out


def difference(a: Mapping[str, Tensor], b: Mapping[str, Tensor], strength: float = 1.0) -> LoraDict:
    """Concept slider: ``dW = strength * (dW_a - dW_b)`` (exact, rank ``r_a + r_b``).

    ``a`` is typically the LoRA of an edited photo and ``b`` the LoRA of the
    original; a negative strength pushes the other way.
    """
    s = _check_number(strength, "The slider strength")
    return weighted_sum([a, b], [s, -s])


def normalize_tokens(t: Tensor) -> Tensor:
    """Per-token L2 normalisation over the last axis, ``t / sqrt(sum(t^2) + 1e-8)`` (format §5.4).

    ``[..., K]`` -> the same shape, computed and returned in at least float32.
    """
    t = t.to(torch.promote_types(t.dtype, torch.float32))
    return t / torch.sqrt(t.square().sum(-1, keepdim=True) + NORM_EPS)


TOKEN_NORM_TOLERANCE = 1e-2
"""How far a stored token's L2 norm may lie from 1.  Every token the resampler outputs went through
:func:`normalize_tokens` last, whose result has norm ``|t| / sqrt(|t|^2 + NORM_EPS)``: 1 up to float rounding
(about 1e-3 in float16) for any token that is not all but zero."""


def token_norm_deviation(t: Tensor) -> Tensor:
    """``[..., K]`` tokens -> ``[...]`` float32: how far each token's L2 norm is from 1, the norm
    :func:`normalize_tokens` gives; above :data:`TOKEN_NORM_TOLERANCE` a token is not a resampler output."""
    return (t.float().norm(dim=-1) - 1.0).abs()


def mix_tokens(tokens: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """Interpolate identities in coefficient space.

    ``tokens``: several ``[Q, K]`` token matrices (normalised resampler
    outputs of different identities, same model).  Each is normalised per
    token, combined as ``sum_j (w_j / sum(w)) * t_j``, and every token of the
    result is L2-normalised again: ``t / sqrt(sum(t^2) + 1e-8)``.  So
    ``mix([a, b], [1, 0]) == a`` and ``mix([a, a], [w1, w2]) == a`` (up to
    float rounding), and the result is a valid input for one rank-``r`` LoRA.
    Weights are relative; negative weights extrapolate, but they must not sum
    to 0.  Returns ``[Q, K]`` in the first matrix's dtype and device (computed
    in at least float32).
    """
    if isinstance(tokens, Tensor):
        raise LoraError("mix_tokens takes a list of token matrices, not a single tensor.")
    tokens, ws = _paired_weights(tokens, weights, noun="identity", nouns="identities", verb="mix")
    total = math.fsum(ws)
    if abs(total) < 1e-6:
        raise LoraError(
            f"The identity weights {ws} add up to 0; weights are relative, so give at least one "
            "non-zero weight and make them add up to something other than 0 (e.g. 0.5 and 0.5)."
        )
    first = tokens[0]
    for j, t in enumerate(tokens, start=1):
        if not isinstance(t, Tensor) or t.dim() != 2 or not t.is_floating_point():
            what = _shape(t) if isinstance(t, Tensor) else type(t).__name__
            raise LoraError(f"Identity {j}'s tokens must be a 2-D float matrix [Q, K], got {what}.")
        if t.shape != first.shape:
            raise LoraError(
                f"Identity {j} has tokens {_shape(t)} but identity 1 has {_shape(first)}: they were made with "
                "different HyperLoRA models. Re-create both identities with the same model before mixing them."
            )
        if not bool(torch.isfinite(t).all()):
            raise LoraError(f"Identity {j}'s tokens contain NaN or infinite values; re-create that identity.")
    ctype = torch.promote_types(first.dtype, torch.float32)
    acc = torch.zeros(first.shape, dtype=ctype, device=first.device)
    for t, w in zip(tokens, ws):
        if w != 0.0:
            acc = acc + normalize_tokens(t.to(device=first.device, dtype=ctype)) * (w / total)
    return normalize_tokens(acc).to(first.dtype)


__all__ = [
    "ALPHA_SUFFIX",
    "DOWN_SUFFIX",
    "GeneratedLora",
    "LoraDict",
    "SDXL_ARCHITECTURE",
    "SDXL_BASE_VERSION",
    "UP_SUFFIX",
    "difference",
    "lora_delta",
    "lora_num_params",
    "lora_prefixes",
    "lora_rank",
    "mix_tokens",
    "normalize_tokens",
    "provenance_of",
    "split_lora",
    "scale_lora",
    "weighted_sum",
    "step_window",
    "HOOK_CACHE_MARGIN",
    "hook_cache_bytes",
    "hook_cache_fits",
]


def step_window(start_percent: float, end_percent: float) -> list[tuple[float, float]]:
    """Strength keyframes ``[(strength multiplier, start percent), ...]`` that switch a LoRA on for
    the sampling steps in ``[start_percent, end_percent)`` and off elsewhere (empty = always on).

    Percent 0 is the first (noisiest) step, 1 the end of sampling, as in ComfyUI's timestep
    ranges.  Raises :class:`LoraError` for a window outside 0..1 or one that ends before it starts.
    """
    for value, name in ((start_percent, "start_percent"), (end_percent, "end_percent")):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and 0.0 <= value <= 1.0):
            raise LoraError(f"{name} is {value!r}; it must be between 0 and 1 (0 = first step, 1 = end).")
    if end_percent <= start_percent:
        raise LoraError(f"end_percent ({end_percent}) must be larger than start_percent ({start_percent}); "
                        "the identity would apply to no step. Use 0 and 1 for all steps.")
    keys: list[tuple[float, float]] = []
    if start_percent > 0:
        keys.append((0.0, 0.0))
    if start_percent > 0 or end_percent < 1:
        keys.append((1.0, float(start_percent)))
    if end_percent < 1:
        keys.append((0.0, float(end_percent)))
    return keys


HOOK_CACHE_MARGIN = 2 << 30
"""Bytes of RAM kept free beyond the hook cache for sampling itself (activations, the decoded image)."""


def hook_cache_bytes(hooked_numel: int, weight_itemsize: int, groups: int) -> int:
    """Bytes a sampler keeps beside the model when it caches weight hooks (ComfyUI's "max speed" hook mode):
    one patched fp32 copy of every hooked weight per hook group (``groups``, e.g. one per identity on a
    prompt), plus one backup of each hooked weight in the model's dtype (``weight_itemsize`` bytes per number).
    ``hooked_numel``: the numbers in the hooked weights (the 560 attention projections of SDXL: 0.95 billion,
    so 3.8 GB per group)."""
    return groups * hooked_numel * 4 + hooked_numel * weight_itemsize


def hook_cache_fits(hooked_numel: int, weight_itemsize: int, groups: int, free_bytes: int,
                    margin: int = HOOK_CACHE_MARGIN) -> tuple[bool, int]:
    """``(fits, bytes needed)``: whether :func:`hook_cache_bytes` plus ``margin`` fits in ``free_bytes``."""
    need = hook_cache_bytes(hooked_numel, weight_itemsize, groups)
    return need + margin <= free_bytes, need
