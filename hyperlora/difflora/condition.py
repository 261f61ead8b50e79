"""Mixed Image Features (MIF): the condition of DiffLoRA's diffusion transformer.

The paper names the condition "mixed image features": face features and general image features of the
reference photos, integrated.  It says nothing more; everything below is our choice (documented in
``docs/difflora-dit.md``).  The inputs are what the pack's face pipeline already makes
(:class:`hyperlora.pipeline.FaceConditions`), so no new encoder is loaded:

* **ArcFace** ``id_embeds [N, 512]``: one L2-normalised AntelopeV2 embedding per photo.  Averaged as the pack
  averages every identity (:func:`hyperlora.identity.mean_face_embedding`: the L2-normalised mean), it is
  the person's face as a recogniser sees it, the signal identity fidelity is measured with.
* **CLIP** ``clip_features [N, 257, E]``: the *penultimate hidden states* of CLIP ViT-L/14 (no post-LayerNorm,
  no projection; ``E`` = 1024), exactly what :class:`hyperlora.encoders.ClipVisionEncoder` returns and what
  the HyperLoRA resampler reads.  Token 0 is the class token, tokens ``1..256`` the 16 x 16 patch grid.
  We keep the **class token** (a global summary: hair, skin, age, glasses, lighting) plus the patch grid
  **average-pooled to g x g cells** (``clip_tokens = 1 + g*g``; default g = 2: 5 tokens).  Why not the
  projected image embedding: the encoder drops the last layer and the projection head is not loaded (the
  pack never needs it), and the penultimate layer is the one HyperLoRA itself was trained on.  Why not all
  257 tokens: the DiT's cross-attention cost and the condition's size per training sample grow with them,
  and an identity is a *mean* over photos, where fine patch detail of single photos averages out anyway; a
  coarse grid keeps where things are in the aligned face crop (eyes above mouth, hair around).
  Each kept token is averaged over the photos (optionally weighted), like the ArcFace embedding.

:func:`mixed_image_features` turns one identity's pipeline outputs into a :class:`RawMif` (``face [A]``,
``clip [Mc, E]``; :func:`mif_from_conditions` takes a ``FaceConditions`` whole); :func:`stack_mifs` batches several; :class:`MifEncoder` (trained with the DiT) maps a
batch to condition tokens ``[B, M, D]`` and owns the learned **null condition** ``[M, D]`` used for condition
dropout, classifier-free guidance and unconditional sampling ("a person who does not exist").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ImageInputError, SettingError
from ..identity import mean_face_embedding
from ..spec import FACE_EMBEDDING_DIM, VIT_L14_WIDTH

if TYPE_CHECKING:                      # only for the annotation: the pipeline (face analysis) is not imported here
    from ..pipeline import FaceConditions

DEFAULT_CLIP_GRID = 2
"""Default g: the CLIP patch grid is average-pooled to g x g tokens (plus the class token)."""


def _shape(t: Any) -> str:
    return "[" + ", ".join(str(d) for d in t.shape) + "]" if isinstance(t, Tensor) else type(t).__name__


@dataclass(frozen=True)
class MifSpec:
    """What the MIF condition is made of (JSON-able: :meth:`to_dict` / :meth:`from_dict`).

    ``arcface_dim``: width of one face embedding (512 for AntelopeV2's ArcFace).
    ``clip_dim``: width ``E`` of the CLIP hidden states (1024 for ViT-L/14); unused when ``clip_tokens`` is 0.
    ``clip_tokens``: CLIP tokens kept per identity: 0 (ArcFace only), 1 (class token only) or ``1 + g*g``
    (class token + the patch grid pooled to ``g x g``).
    ``arcface_tokens``: condition tokens the face embedding is expanded into.
    ``width``: ``D``, the width of every condition token (the DiT's ``cond_dim``).
    """

    arcface_dim: int = FACE_EMBEDDING_DIM
    clip_dim: int = VIT_L14_WIDTH
    clip_tokens: int = 1 + DEFAULT_CLIP_GRID ** 2
    arcface_tokens: int = 4
    width: int = 256

    def __post_init__(self) -> None:
        for name in ("arcface_dim", "clip_dim", "arcface_tokens", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SettingError(f"MifSpec.{name} is {value!r}; it must be a positive whole number.")
        n = self.clip_tokens
        if not isinstance(n, int) or isinstance(n, bool) or n < 0 or (n > 1 and math.isqrt(n - 1) ** 2 != n - 1):
            raise SettingError(f"MifSpec.clip_tokens is {n!r}; use 0 (no CLIP), 1 (class token only) or 1 + g*g "
                               "(class token + patch grid pooled to g x g, e.g. 5 or 10).")

    @property
    def clip_grid(self) -> int:
        """g: the pooled patch grid's side (0 when only the class token or no CLIP is used)."""
        return math.isqrt(self.clip_tokens - 1) if self.clip_tokens > 1 else 0

    @property
    def num_tokens(self) -> int:
        """``M``: condition tokens per sample (ArcFace tokens first, then the CLIP tokens)."""
        return self.arcface_tokens + self.clip_tokens

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MifSpec":
        """Inverse of :meth:`to_dict`; unknown keys are refused (a file of a newer pack)."""
        if not isinstance(data, dict):
            raise SettingError(f"A MIF spec must be a JSON object, got {type(data).__name__}.")
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise SettingError(f"The MIF spec has unknown fields {unknown}; it was written by a newer "
                               "HyperLoRA Studio: update the pack.")
        return cls(**data)


@dataclass
class RawMif:
    """The mixed image features of one identity (``face [A]``) or a batch (``face [B, A]``), float32 CPU.

    ``face``: the L2-normalised mean ArcFace embedding.  ``clip``: ``[Mc, E]`` (or ``[B, Mc, E]``) pooled
    CLIP tokens averaged over the photos, None when the spec uses no CLIP tokens.
    """

    face: Tensor
    clip: Tensor | None


def _check_finite(t: Tensor, what: str, fix: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise ImageInputError(f"{what} contain NaN or infinite values; {fix}")


def _mean_unit(e: Tensor, w: Tensor) -> Tensor:
    """``e [N, A]``, ``w [N]`` -> the L2-normalised weighted mean of the L2-normalised rows ``[A]``: the maths
    of :func:`hyperlora.identity.mean_face_embedding` (which it calls for A = 512), for any width A."""
    if e.shape[1] == FACE_EMBEDDING_DIM:
        return mean_face_embedding(e, w.tolist())
    e = e / e.norm(dim=1, keepdim=True).clamp_min(1e-12)
    mean = (w[:, None] * e).sum(0)
    norm = float(mean.norm())
    if not norm > 1e-6:
        raise ImageInputError("MIF: the weighted mean of the ArcFace embeddings is zero (opposite faces); "
                              "give positive weights or other photos.")
    return mean / norm


def pool_clip_tokens(clip_features: Tensor, spec: MifSpec) -> Tensor:
    """CLIP hidden states ``[N, 1 + P*P, E]`` -> the kept tokens ``[N, clip_tokens, E]`` float32.

    Token 0 (class) is kept; the ``P x P`` patch grid is average-pooled to ``g x g`` (adaptive pooling, so
    any grid at least ``g`` wide works; row-major cell order).
    """
    n, length, width = clip_features.shape
    x = clip_features.detach().to(device="cpu", dtype=torch.float32)
    if spec.clip_tokens == 1:
        return x[:, :1]
    side = math.isqrt(length - 1)
    grid = x[:, 1:].reshape(n, side, side, width).permute(0, 3, 1, 2)             # [N, E, P, P]
    pooled = F.adaptive_avg_pool2d(grid, spec.clip_grid)                          # [N, E, g, g]
    pooled = pooled.flatten(2).transpose(1, 2)                                    # [N, g*g, E]
    return torch.cat([x[:, :1], pooled], dim=1)


def mixed_image_features(id_embeds: Tensor, clip_features: Tensor | None, spec: MifSpec, *,
                         weights: Sequence[float] | None = None) -> RawMif:
    """One identity's pipeline outputs -> its :class:`RawMif` (``face [A]``, ``clip [Mc, E]`` or None).

    ``id_embeds [N, A]``: the ArcFace embeddings of the N photos (``FaceConditions.id_embeds``).
    ``clip_features [N, 1 + P*P, E]``: their CLIP hidden states (``FaceConditions.clip_features``, any
    device/dtype), needed unless ``spec.clip_tokens`` is 0.  ``weights``: optional per-photo weights (as for
    identities).  The face part is the L2-normalised weighted mean; each CLIP token the weighted mean.
    Raises :class:`~hyperlora.errors.ImageInputError` naming the input and the fix for wrong shapes, a
    photo count that differs between the two, and NaN/inf values.
    """
    a = spec.arcface_dim
    if not isinstance(id_embeds, Tensor) or id_embeds.dim() != 2 or id_embeds.shape[0] == 0 or id_embeds.shape[1] != a:
        raise ImageInputError(
            f"MIF: the ArcFace embeddings (id_embeds) must be [N, {a}] with N >= 1 photos, got {_shape(id_embeds)}; "
            "pass FaceConditions.id_embeds from the face analysis of the reference photos (one row per photo).")
    e = id_embeds.detach().to(device="cpu", dtype=torch.float32)
    _check_finite(e, "MIF: the ArcFace embeddings (id_embeds)",
                  "run the face analysis again (a damaged face model or image gives such values).")
    n = e.shape[0]
    if weights is not None:
        w = torch.as_tensor(list(weights), dtype=torch.float32)
        if w.shape != (n,) or not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or not float(w.sum()) > 0:
            raise ImageInputError(f"MIF: the photo weights must be {n} finite non-negative numbers (one per photo) "
                                  f"with a positive sum, got {list(weights)}; fix the weights.")
    else:
        w = torch.ones(n)
    if not bool((e.norm(dim=1) > 0).all()):
        raise ImageInputError("MIF: an ArcFace embedding (id_embeds) is all zero; drop that photo or run the face "
                              "analysis again.")
    face = _mean_unit(e, w)
    if spec.clip_tokens == 0:
        return RawMif(face=face, clip=None)
    e_dim = spec.clip_dim
    if (not isinstance(clip_features, Tensor) or clip_features.dim() != 3 or clip_features.shape[2] != e_dim
            or clip_features.shape[1] < 2 and spec.clip_tokens > 1):
        raise ImageInputError(
            f"MIF: the CLIP features (clip_features) must be [N, 1 + P*P, {e_dim}] (257 tokens for ViT-L/14), got "
            f"{_shape(clip_features) if clip_features is not None else 'None'}; pass FaceConditions.clip_features of "
            f"the same photos from a CLIP vision encoder of width {e_dim}.")
    if clip_features.shape[0] != n:
        raise ImageInputError(f"MIF: got {n} ArcFace embeddings but {clip_features.shape[0]} CLIP feature sets; "
                              "give both for the same photos.")
    if spec.clip_tokens > 1:
        side = math.isqrt(clip_features.shape[1] - 1)
        if side * side != clip_features.shape[1] - 1 or side < spec.clip_grid:
            raise ImageInputError(
                f"MIF: the CLIP features have {clip_features.shape[1]} tokens; they must be a class token plus a "
                f"square patch grid at least {spec.clip_grid} wide (257 for ViT-L/14); pass the encoder's hidden "
                "states unchanged.")
    tokens = pool_clip_tokens(clip_features, spec)                                # [N, Mc, E]
    _check_finite(tokens, "MIF: the CLIP features (clip_features)",
                  "encode the photos again (fp16 overflow: run the CLIP encoder in fp32 or bf16).")
    clip = (w[:, None, None] * tokens).sum(0) / w.sum()
    return RawMif(face=face, clip=clip)


def mif_from_conditions(conditions: FaceConditions, spec: MifSpec, *,
                        weights: Sequence[float] | None = None) -> RawMif:
    """The MIF of one identity straight from :func:`hyperlora.pipeline.extract_conditions`' result
    (``id_embeds [N, 512]``, ``clip_features [N, 257, E]``): :func:`mixed_image_features` of its fields."""
    if conditions.id_embeds is None:
        raise ImageInputError("MIF: these face conditions hold no ArcFace embeddings; extract them with "
                              "need_id=True (DiffLoRA reads the face embedding of every photo).")
    if spec.clip_tokens and conditions.clip_features is None:
        raise ImageInputError("MIF: these face conditions hold no CLIP features; extract them with need_clip=True "
                              "and a CLIP vision encoder (the MIF spec uses CLIP tokens).")
    return mixed_image_features(conditions.id_embeds, conditions.clip_features if spec.clip_tokens else None,
                                spec, weights=weights)


def stack_mifs(mifs: Sequence[RawMif]) -> RawMif:
    """Several identities' :class:`RawMif` -> one batch (``face [B, A]``, ``clip [B, Mc, E]`` or None)."""
    if not mifs:
        raise ImageInputError("MIF: no identities to batch; give at least one.")
    has_clip = {m.clip is not None for m in mifs}
    if len(has_clip) != 1:
        raise ImageInputError("MIF: some identities have CLIP tokens and some do not; build all with the same MifSpec.")
    face = torch.stack([m.face for m in mifs])
    clip = torch.stack([m.clip for m in mifs]) if has_clip == {True} else None   # type: ignore[misc]
    return RawMif(face=face, clip=clip)


class MifEncoder(nn.Module):
    """Raw MIF ``face [B, A]`` (+ ``clip [B, Mc, E]``) -> condition tokens ``[B, M, D]``, M = ``spec.num_tokens``.

    * face: ``Linear(A, arcface_tokens * D)`` (the unit-norm embedding is scaled by ``sqrt(A)`` first, so
      its entries have about unit size), reshaped to ``[B, arcface_tokens, D]``;
    * CLIP: ``LayerNorm(E)`` (CLIP hidden states have a few very large channels) then ``Linear(E, D)``;
    * a learned embedding per token position (which token is which), and a final ``LayerNorm(D)``.

    ``null`` ``[M, D]``: the learned null condition that replaces a sample's tokens when it is dropped
    (training dropout, the unconditional branch of guidance, unconditional sampling).
    """

    def __init__(self, spec: MifSpec) -> None:
        super().__init__()
        self.spec = spec
        d = spec.width
        self.face_proj = nn.Linear(spec.arcface_dim, spec.arcface_tokens * d)
        if spec.clip_tokens:
            self.clip_norm = nn.LayerNorm(spec.clip_dim)
            self.clip_proj = nn.Linear(spec.clip_dim, d)
        self.token_embed = nn.Parameter(torch.randn(spec.num_tokens, d) * 0.02)
        self.out_norm = nn.LayerNorm(d)
        self.null = nn.Parameter(torch.randn(spec.num_tokens, d) * 0.02)

    def null_tokens(self, batch: int) -> Tensor:
        """The null condition for ``batch`` samples: ``[batch, M, D]``."""
        return self.null.unsqueeze(0).expand(batch, -1, -1)

    def forward(self, face: Tensor, clip: Tensor | None = None) -> Tensor:
        """``face [B, A]``, ``clip [B, Mc, E]`` (None iff ``spec.clip_tokens`` is 0) -> ``[B, M, D]``."""
        spec = self.spec
        if not isinstance(face, Tensor) or face.dim() != 2 or face.shape[1] != spec.arcface_dim or face.shape[0] == 0:
            raise ImageInputError(f"MIF encoder: the face input must be [B, {spec.arcface_dim}] (a batch of mean ArcFace "
                                  f"embeddings from mixed_image_features), got {_shape(face)}.")
        _check_finite(face, "MIF encoder: the face input values", "rebuild the MIF from the photos.")
        b = face.shape[0]
        param = self.face_proj.weight
        face = face.to(device=param.device, dtype=param.dtype)
        parts = [self.face_proj(face * math.sqrt(spec.arcface_dim)).reshape(b, spec.arcface_tokens, spec.width)]
        if spec.clip_tokens:
            want = (b, spec.clip_tokens, spec.clip_dim)
            if not isinstance(clip, Tensor) or tuple(clip.shape) != want:
                raise ImageInputError(
                    f"MIF encoder: the CLIP input must be [{b}, {spec.clip_tokens}, {spec.clip_dim}] (pooled tokens from "
                    f"mixed_image_features with the same MifSpec), got {_shape(clip) if clip is not None else 'None'}.")
            _check_finite(clip, "MIF encoder: the CLIP input values", "rebuild the MIF from the photos.")
            clip = clip.to(device=param.device, dtype=param.dtype)
            parts.append(self.clip_proj(self.clip_norm(clip)))
        elif clip is not None:
            raise ImageInputError("MIF encoder: got CLIP tokens, but its MifSpec uses none (clip_tokens = 0); "
                                  "build the MIF with the encoder's spec.")
        return self.out_norm(torch.cat(parts, dim=1) + self.token_embed)

    def encode(self, mif: RawMif) -> Tensor:
        """A batched :class:`RawMif` (from :func:`stack_mifs`) -> ``[B, M, D]``."""
        return self.forward(mif.face, mif.clip)
