"""Identities: the per-token coefficients of one person, and identity files.

An :class:`Identity` holds what the resampler made of a person's photos: the
normalised tokens ``[Q, K]`` (``Q`` = 8 x modules, ``K`` = basis size), and
optionally the Base-LoRA tokens.  Together with the model that made them they
rebuild the LoRA bit for bit, so an identity file (about 0.57 MB for the
released models, ``1120 x 128`` float32) replaces a 23 MB LoRA.

An identity also carries the person's face as ArcFace sees it
(``face_embedding``: the L2-normalised mean of the photos' embeddings), which
:mod:`hyperlora.similarity` scores generated images against.

Identity files are ``.safetensors`` with tensors ``tokens`` (and
``base_tokens``, and since format version 2 ``face_embedding`` ``[512]``) and string metadata: ``format`` = :data:`IDENTITY_FORMAT`,
``format_version``, ``model_name``, ``model_fingerprint``, ``num_queries``,
``hyper_dim``, ``num_images``, ``settings`` (JSON).  Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .errors import IdentityFileError, ImageInputError
from .generate import HyperLoRAModel
from .lora import TOKEN_NORM_TOLERANCE, mix_tokens, token_norm_deviation
from .safetensors_io import open_safetensors, save_file_atomic
from .spec import FACE_EMBEDDING_DIM, FACE_MODELS_META, IDENTITY_FORMAT, IDENTITY_FORMAT_VERSION

logger = logging.getLogger(__name__)

MAX_PHOTOS = 1000
"""Most photos one identity is made from.  An identity is the mean over its photos: past a few dozen good
photos more change it little, while every photo is converted and analysed (about 0.5 s and up to a few MB
each), so a list of 10,000 photos would hold gigabytes for nothing."""


def check_photo_count(count: int, where: str = "") -> int:
    """``count`` if one identity may be made from that many photos (1 to :data:`MAX_PHOTOS`), else
    :class:`~hyperlora.errors.ImageInputError` saying why; checked before any photo is converted."""
    if count > MAX_PHOTOS:
        start = f"{where}: got" if where else "Got"
        raise ImageInputError(
            f"{start} {count} photos; one identity is made from at most {MAX_PHOTOS}. It is the mean over the "
            "photos, so more than a few dozen good ones change it little, while each is converted and analysed "
            "(memory and time grow with every photo). Pick the best photos (sharp, front-facing, one person), "
            "or make identities from parts of the set and join them with Mix Identities.")
    return count


@dataclass
class Identity:
    """One person as seen by one HyperLoRA model.

    ``tokens``: ``[Q, K]`` float32, per-token L2-normalised ID coefficients.
    ``base_tokens``: ``[Qb, K]`` float32 Base-LoRA coefficients, or None.
    ``model_name`` / ``model_fingerprint``: the model that made them
    (``HyperLoRAModel.name`` / ``.fingerprint``).  ``num_images``: photos used.
    ``settings``: how the photos were processed (face choice, background, ...).
    ``face_embedding``: ``[512]`` float32, the L2-normalised mean ArcFace embedding of the photos
    (:func:`mean_face_embedding`), or None for identities saved before it was recorded
    (identity format version 1).
    ``face_models``: the fingerprint of the face models that made ``face_embedding``
    (:attr:`hyperlora.faces.analysis.FaceAnalyzer.fingerprint`); embeddings of other face models
    cannot be compared with it.  "" when unknown (identities saved before it was recorded).
    """

    tokens: Tensor
    base_tokens: Tensor | None
    model_name: str
    model_fingerprint: str
    num_images: int
    settings: dict[str, str] = field(default_factory=dict)
    face_embedding: Tensor | None = None
    face_models: str = ""


def mean_face_embedding(embeds: Tensor, weights: Sequence[float] | None = None) -> Tensor:
    """``[N, 512]`` ArcFace embeddings -> their (weighted) mean, L2-normalised: ``[512]`` float32 on the CPU.

    Each row is normalised first, so every photo counts by its weight whatever its norm.
    Raises :class:`IdentityFileError` for an empty batch or a mean of length zero (opposite faces).
    """
    e = torch.as_tensor(embeds).detach().to(device="cpu", dtype=torch.float32)
    if e.dim() != 2 or e.shape[0] == 0 or e.shape[1] != FACE_EMBEDDING_DIM:
        raise IdentityFileError(f"Face embeddings must be [N, {FACE_EMBEDDING_DIM}] with N >= 1, got {_shape(e)}.")
    e = e / e.norm(dim=1, keepdim=True).clamp_min(1e-12)
    w = torch.full((e.shape[0],), 1.0) if weights is None else torch.as_tensor(list(weights), dtype=torch.float32)
    mean = (w[:, None] * e).sum(0)
    norm = float(mean.norm())
    if not norm > 1e-6:
        raise IdentityFileError("The weighted mean of the face embeddings is zero; give positive weights.")
    return mean / norm


def _shape(t: Tensor) -> str:
    return "[" + ", ".join(str(d) for d in t.shape) + "]"


def _check_tokens(t: Tensor, what: str, where: str) -> None:
    if not isinstance(t, Tensor) or t.dim() != 2 or not t.is_floating_point():
        got = _shape(t) if isinstance(t, Tensor) else type(t).__name__
        raise IdentityFileError(f"{where}: {what} must be a 2-D float matrix [Q, K], got {got}.")
    if t.numel() == 0:
        raise IdentityFileError(f"{where}: {what} is empty ({_shape(t)}).")
    if not bool(torch.isfinite(t).all()):
        raise IdentityFileError(f"{where}: {what} contain NaN or infinite values; re-create the identity from the photos.")
    _check_unit_tokens(t, what, where)


def _check_unit_tokens(t: Tensor, what: str, where: str) -> None:
    """IdentityFileError unless every token has L2 norm 1 (within :data:`TOKEN_NORM_TOLERANCE`), as every
    resampler output has (:func:`hyperlora.lora.normalize_tokens`).  All-zero tokens would build a LoRA that
    changes nothing, scaled ones a LoRA whose weight changes are scaled as much."""
    deviation = token_norm_deviation(t)
    bad = torch.nonzero(deviation > TOKEN_NORM_TOLERANCE).flatten()
    if bad.numel() == 0:
        return
    norms = t.float().norm(dim=-1)
    first = int(bad[0])
    state = ("all zero" if not bool(norms.any()) else
             f"not unit vectors: token {first} has length {float(norms[first]):.4g}")
    raise IdentityFileError(
        f"{where}: {what} are {state} ({bad.numel()} of {t.shape[0]} tokens off), but every token the resampler "
        f"makes has length 1 (within {TOKEN_NORM_TOLERANCE:g}). Such a file would build a LoRA that does nothing "
        "or one that wrecks the model; re-create the identity from the photos (Identity from Images) and save it "
        "with the HyperLoRA Studio Save Identity node.")


def _check_embedding(t: Tensor, where: str) -> None:
    if not isinstance(t, Tensor) or tuple(t.shape) != (FACE_EMBEDDING_DIM,) or not t.is_floating_point():
        got = _shape(t) if isinstance(t, Tensor) else type(t).__name__
        raise IdentityFileError(f"{where}: its face embedding must be a float vector [{FACE_EMBEDDING_DIM}], got {got}; "
                                "re-create the identity from the photos.")
    if not bool(torch.isfinite(t).all()) or not float(t.float().norm()) > 0:
        raise IdentityFileError(f"{where}: its face embedding is zero or not finite; re-create the identity from the photos.")


def save_identity(identity: Identity, path: str | os.PathLike[str]) -> None:
    """Write ``identity`` to ``path`` (``.safetensors``), tokens as float32 ``[Q, K]``, the face
    embedding (when the identity has one) as float32 ``[512]``.

    The file is written under a temporary name and renamed, so an existing file
    is never left half-written.
    """
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise IdentityFileError(f"Identity files are written as .safetensors; '{path}' has another extension.")
    where = f"Cannot save the identity to '{path}'"
    _check_tokens(identity.tokens, "its tokens", where)
    tensors = {"tokens": identity.tokens.detach().to(device="cpu", dtype=torch.float32).contiguous().clone()}
    if identity.base_tokens is not None:
        _check_tokens(identity.base_tokens, "its Base-LoRA tokens", where)
        if identity.base_tokens.shape[1] != identity.tokens.shape[1]:
            raise IdentityFileError(
                f"{where}: its Base-LoRA tokens {_shape(identity.base_tokens)} and ID tokens "
                f"{_shape(identity.tokens)} have different sizes K."
            )
        tensors["base_tokens"] = identity.base_tokens.detach().to(device="cpu", dtype=torch.float32).contiguous().clone()
    if identity.face_embedding is not None:
        _check_embedding(identity.face_embedding, where)
        tensors["face_embedding"] = identity.face_embedding.detach().to(device="cpu", dtype=torch.float32).contiguous().clone()
    q, k = identity.tokens.shape
    meta = {
        "format": IDENTITY_FORMAT,
        "format_version": str(IDENTITY_FORMAT_VERSION),
        "model_name": str(identity.model_name),
        "model_fingerprint": str(identity.model_fingerprint),
        "num_queries": str(q),
        "hyper_dim": str(k),
        "num_images": str(int(identity.num_images)),
        "settings": json.dumps(dict(identity.settings), sort_keys=True, default=str),
    }
    if identity.base_tokens is not None:
        meta["base_num_queries"] = str(identity.base_tokens.shape[0])
    if identity.face_embedding is not None and identity.face_models:
        meta[FACE_MODELS_META] = str(identity.face_models)
    save_file_atomic(tensors, path, metadata=meta)
    logger.info("Saved identity (%d images, model %s) to %s", identity.num_images, identity.model_name, path)


def load_identity(path: str | os.PathLike[str]) -> Identity:
    """Read an identity file written by :func:`save_identity`; tokens come back float32 on the CPU.

    Version 1 files (before face embeddings were recorded) load with ``face_embedding=None``; files
    without the face-model fingerprint (written before it was recorded) with ``face_models=""``.

    Raises :class:`IdentityFileError` for a missing file, a file that is not
    safetensors (pickles are never opened), a safetensors file that is not an
    identity (e.g. a LoRA), a newer format version, missing tensors, tokens
    whose shape differs from the metadata, and NaN/inf values.
    """
    path = Path(path)
    with open_safetensors(path, error=IdentityFileError, name="identity file",
                          pickle_fix="Save the identity again with the HyperLoRA Studio Save Identity node.",
                          fix="it is damaged (e.g. an interrupted copy) or not an identity file. Pick another file, "
                              "or make the identity again from the photos (Identity from Images) and save it with "
                              "the HyperLoRA Studio Save Identity node") as f:
        meta = dict(f.metadata() or {})
        keys = set(f.keys())
        tensors = {k: f.get_tensor(k) for k in ("tokens", "base_tokens", "face_embedding") if k in keys}

    if meta.get("format") != IDENTITY_FORMAT:
        what = "a LoRA" if any(k.endswith(".lora_down.weight") for k in keys) else "some other .safetensors file"
        raise IdentityFileError(
            f"'{path}' is not a HyperLoRA identity file (it looks like {what}); choose a file saved by the "
            "HyperLoRA Studio Save Identity node."
        )
    try:
        version = int(meta.get("format_version", ""))
    except ValueError:
        raise IdentityFileError(f"'{path}' has an unreadable identity format version; save the identity again.") from None
    if version > IDENTITY_FORMAT_VERSION:
        raise IdentityFileError(
            f"'{path}' was written by a newer HyperLoRA Studio (identity format {version}, this one reads "
            f"up to {IDENTITY_FORMAT_VERSION}); update HyperLoRA Studio."
        )
    if "tokens" not in tensors:
        raise IdentityFileError(f"'{path}' is damaged: it has no 'tokens' tensor; re-create the identity from the photos.")
    where = f"The identity file '{path}' is damaged"
    tokens = tensors["tokens"]
    _check_tokens(tokens, "its tokens", where)
    expected = (meta.get("num_queries"), meta.get("hyper_dim"))
    if expected != (str(tokens.shape[0]), str(tokens.shape[1])):
        raise IdentityFileError(
            f"{where}: its tokens are {_shape(tokens)} but its metadata says [{expected[0]}, {expected[1]}]; "
            "re-create the identity from the photos."
        )
    base = tensors.get("base_tokens")
    if base is not None:
        _check_tokens(base, "its Base-LoRA tokens", where)
    embedding = tensors.get("face_embedding")
    if embedding is not None:
        _check_embedding(embedding, where)
    try:
        settings = json.loads(meta.get("settings", "{}"))
        num_images = int(meta.get("num_images", "0"))
    except ValueError:
        raise IdentityFileError(f"{where}: its settings or image count cannot be read; save the identity again.") from None
    if not isinstance(settings, dict):
        raise IdentityFileError(f"{where}: its settings are not a JSON object; save the identity again.")
    return Identity(
        tokens=tokens.to(torch.float32),
        base_tokens=None if base is None else base.to(torch.float32),
        model_name=meta.get("model_name", ""),
        model_fingerprint=meta.get("model_fingerprint", ""),
        num_images=num_images,
        settings=settings,
        face_embedding=None if embedding is None else embedding.to(torch.float32),
        face_models=meta.get(FACE_MODELS_META, "") if embedding is not None else "",
    )


def _describe(identity: Identity) -> str:
    name = identity.model_name or "an unnamed model"
    return f"'{name}'"


def check_identity_fits(identity: Identity, model: HyperLoRAModel, *, need_base: bool = False) -> None:
    """Refuse an identity that was made with another model than ``model``.

    Checks the token shapes (``[Q, K]`` of ``model.arch``, and the Base-LoRA
    tokens when both have them) and the model fingerprint.  A fingerprint
    mismatch with fitting shapes is refused too (the tokens of another model
    mean something else).
    ``need_base``: also require Base-LoRA tokens (to build a Base-LoRA).
    Raises :class:`IdentityFileError` with a message naming both models and
    the fix.
    """
    arch = model.arch
    fix_same = (
        f"Re-create the identity from the photos with the model '{model.name}', "
        f"or load the model {_describe(identity)} it was made with."
    )
    q, k = arch.resampler.num_queries, arch.hyper_dim
    if tuple(identity.tokens.shape) != (q, k):
        raise IdentityFileError(
            f"This identity was made with the HyperLoRA model {_describe(identity)} and has "
            f"{_shape(identity.tokens)} tokens, but the loaded model '{model.name}' needs [{q}, {k}]. {fix_same}"
        )
    base_cfg = arch.base_resampler
    if identity.base_tokens is not None and base_cfg is not None:
        qb = base_cfg.num_queries
        if tuple(identity.base_tokens.shape) != (qb, k):
            raise IdentityFileError(
                f"This identity's Base-LoRA tokens {_shape(identity.base_tokens)} do not fit the model "
                f"'{model.name}' ([{qb}, {k}]). {fix_same}"
            )
    if need_base:
        if base_cfg is None:
            raise IdentityFileError(
                f"The model '{model.name}' has no Base-LoRA (no base_resampler.safetensors); build the ID LoRA "
                "instead, or load a model that has a Base-LoRA."
            )
        if identity.base_tokens is None:
            raise IdentityFileError(
                f"This identity has no Base-LoRA tokens; re-create it from the photos with the model "
                f"'{model.name}' (which has a Base-LoRA), or build the ID LoRA instead."
            )
    if identity.model_fingerprint != model.fingerprint:
        if identity.model_name == model.name:
            msg = (
                f"This identity was made with a different version of the HyperLoRA model '{model.name}' "
                f"(the model files differ: fingerprint {identity.model_fingerprint[:12] or 'none'} vs "
                f"{model.fingerprint[:12]}). {fix_same}"
            )
        else:
            msg = (
                f"This identity was made with the HyperLoRA model {_describe(identity)}, but the loaded model is "
                f"'{model.name}'; its tokens mean something else in another model. {fix_same}"
            )
        raise IdentityFileError(msg)


def mix_identities(identities: Sequence[Identity], weights: Sequence[float]) -> Identity:
    """Interpolate identities of the same model in coefficient space (:func:`hyperlora.lora.mix_tokens`).

    Base-LoRA tokens are mixed too when every identity has them, else dropped; so are the face
    embeddings (weighted mean, renormalised), which then describe the mix's face.
    All identities must come from the same model (same fingerprint).  The
    result's ``num_images`` is the sum; ``settings`` records the weights.
    """
    identities = list(identities)
    if not identities:
        raise IdentityFileError("Cannot mix an empty list of identities; give at least one.")
    first = identities[0]
    for j, ident in enumerate(identities[1:], start=2):
        if ident.model_fingerprint != first.model_fingerprint:
            raise IdentityFileError(
                f"Identity {j} was made with the model '{ident.model_name}' and identity 1 with "
                f"'{first.model_name}' (different model files); re-create them with one model before mixing."
            )
    tokens = mix_tokens([i.tokens for i in identities], weights)
    bases = [i.base_tokens for i in identities]
    base = mix_tokens(bases, weights) if all(b is not None for b in bases) else None  # type: ignore[arg-type]
    embeds = [i.face_embedding for i in identities]
    embedding = None
    known = {i.face_models for i in identities if i.face_models}
    if len(known) > 1:     # embeddings of different face models: their mean is no face at all
        logger.warning("HyperLoRA: the mixed identities were made with different face models; the mix records "
                       "no face embedding (score it with reference photos).")
    elif all(e is not None for e in embeds):
        try:
            embedding = mean_face_embedding(torch.stack(embeds), weights)  # type: ignore[arg-type]
        except IdentityFileError:          # weights that cancel out: the mix has no single face to record
            embedding = None
    return Identity(
        tokens=tokens,
        base_tokens=base,
        model_name=first.model_name,
        model_fingerprint=first.model_fingerprint,
        num_images=sum(i.num_images for i in identities),
        settings={"mix_weights": json.dumps([float(w) for w in weights]), "mixed": str(len(identities))},
        face_embedding=embedding,
        face_models=first.face_models if embedding is not None and all(i.face_models for i in identities) else "",
    )


__all__ = [
    "IDENTITY_FORMAT",
    "IDENTITY_FORMAT_VERSION",
    "Identity",
    "MAX_PHOTOS",
    "check_identity_fits",
    "check_photo_count",
    "load_identity",
    "mean_face_embedding",
    "mix_identities",
    "save_identity",
]
