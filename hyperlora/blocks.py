"""Block strengths: one multiplier per UNet block group and per attention kind.

A kohya LoRA module prefix names where in the UNet it lands::

    lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q   (diffusers names)
    lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q            (ldm / SGM names)

``down_blocks`` / ``input_blocks`` are the **input** blocks, ``mid_block`` / ``middle_block`` the
**middle** block and ``up_blocks`` / ``output_blocks`` the **output** blocks; ``attn1`` is
**self**-attention (queries, keys and values from the image) and ``attn2`` **cross**-attention
(keys and values from the text prompt).  Every HyperLoRA module is one of these (format §5.6).

:func:`apply_block_strengths` makes the LoRA whose update of a module is
``block multiplier x attention multiplier x (alpha / rank) x up @ down``, so merged at strength
``s`` the weight becomes ``W + s x m x 0.5 x up @ down`` for the released models (alpha = rank / 2).
The multiplier is folded into the module's ``alpha`` (stored as float64), not into ``lora_up``:
ComfyUI computes ``strength x alpha / rank x (up @ down)`` with the up and down matrices as they
are, so the product ``up @ down`` is the very one of the unscaled LoRA (no re-rounding of an
fp16 matrix) and no matrix is copied.  A multiplier of exactly 1 shares the module's tensors
unchanged; all multipliers 1 return the input LoRA object itself (the image is bit-for-bit the
same), and a module whose multiplier is 0 is left out, so its weight is not patched at all.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from .checks import MAX_STRENGTH, check_strength
from .errors import LoraError, SettingError
from .lora import ALPHA_SUFFIX, DOWN_SUFFIX, UP_SUFFIX, LoraDict, lora_prefixes

logger = logging.getLogger(__name__)

BLOCK_GROUPS = ("input", "middle", "output")
ATTENTION_KINDS = ("self", "cross")
_BLOCK_NAMES = {"down_blocks": "input", "input_blocks": "input", "mid_block": "middle", "middle_block": "middle",
                "up_blocks": "output", "output_blocks": "output"}
_BLOCK_RE = re.compile(r"^lora_unet_(down_blocks|input_blocks|mid_block|middle_block|up_blocks|output_blocks)(?:_|$)")
_ATTN_RE = re.compile(r"_attn([12])(?:_|$)")


def classify_prefix(prefix: str) -> tuple[str, str | None]:
    """``(block group, attention kind)`` of a kohya UNet module prefix.

    ``lora_unet_down_blocks_1_..._attn1_to_q`` -> ``("input", "self")``; ``..._attn2_...`` is
    ``"cross"``; a module outside the attention layers (e.g. ``..._proj_in``) has kind ``None``.
    LoraError for a prefix outside the UNet blocks (e.g. a text-encoder module ``lora_te1_...``).
    """
    block = _BLOCK_RE.match(prefix)
    if block is None:
        raise LoraError(
            f"The LoRA module '{prefix}' is not in the UNet's input, middle or output blocks, so block strengths "
            "cannot be applied to it; set every block multiplier to 1, or use a UNet LoRA (e.g. from Build LoRA).")
    attn = _ATTN_RE.search(prefix)
    kind = None if attn is None else ("self" if attn.group(1) == "1" else "cross")
    return _BLOCK_NAMES[block.group(1)], kind


@dataclass(frozen=True)
class BlockStrengths:
    """Multipliers of the LoRA update per UNet block group and per attention kind (1 = unchanged).

    A module's multiplier is its block group's times its attention kind's (a module that is
    neither self- nor cross-attention gets the block group's alone)."""

    input: float = 1.0
    middle: float = 1.0
    output: float = 1.0
    self_attention: float = 1.0
    cross_attention: float = 1.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise SettingError(f"The block multiplier '{f.name}' is {value!r}; use a number from "
                                   f"{-MAX_STRENGTH:g} to {MAX_STRENGTH:g} (1 = unchanged, 0 = off).")
            check_strength(value, f"The block multiplier '{f.name}'")

    @property
    def is_identity(self) -> bool:
        """True when every multiplier is exactly 1 (the LoRA passes unchanged)."""
        return all(getattr(self, f.name) == 1.0 for f in fields(self))

    def multiplier(self, prefix: str) -> float:
        """The factor of one module's update (see :func:`classify_prefix`)."""
        block, kind = classify_prefix(prefix)
        attention = {"self": self.self_attention, "cross": self.cross_attention, None: 1.0}[kind]
        return float(getattr(self, block)) * float(attention)


DEFAULT_STRENGTHS = BlockStrengths()


def _scaled_alpha(alpha: Tensor | None, rank: int, factor: float) -> Tensor:
    base = float(rank) if alpha is None else float(alpha.item())
    return torch.tensor(base * factor, dtype=torch.float64)


def apply_block_strengths(lora: Mapping[str, Tensor], strengths: BlockStrengths = DEFAULT_STRENGTHS) -> LoraDict:
    """The LoRA with each module's update times ``strengths.multiplier(prefix)``.

    All multipliers 1: ``lora`` itself.  Otherwise a new dict: modules at 1 share their tensors,
    modules at 0 are left out, the others get ``alpha' = alpha x m`` (float64 scalar; a module
    without alpha counts as alpha = rank) and share up and down.  LoraError when a module is
    not a UNet block module (see :func:`classify_prefix`).
    """
    if strengths.is_identity:
        return lora  # type: ignore[return-value]
    out: LoraDict = {}
    dropped = 0
    kept = 0
    for prefix in lora_prefixes(lora):
        factor = strengths.multiplier(prefix)
        if factor == 0.0:
            dropped += 1
            continue
        kept += 1
        down = lora[prefix + DOWN_SUFFIX]
        out[prefix + DOWN_SUFFIX] = down
        out[prefix + UP_SUFFIX] = lora[prefix + UP_SUFFIX]
        alpha = lora.get(prefix + ALPHA_SUFFIX)
        if factor == 1.0:
            if alpha is not None:
                out[prefix + ALPHA_SUFFIX] = alpha
        else:
            out[prefix + ALPHA_SUFFIX] = _scaled_alpha(alpha, down.shape[0], factor)
    logger.debug("block strengths %s: %d modules kept, %d at 0 left out", strengths, kept, dropped)
    return out


__all__ = ["ATTENTION_KINDS", "BLOCK_GROUPS", "BlockStrengths", "DEFAULT_STRENGTHS", "apply_block_strengths",
           "classify_prefix"]
