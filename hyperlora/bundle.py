"""What the ComfyUI nodes ask of the core, as plain functions (no comfy imports).

The nodes only map ComfyUI types onto these calls:

* :func:`identity_from_images`: face photos -> :class:`~hyperlora.identity.Identity` (+ the crops used)
* :func:`lora_from_identity`:  identity -> kohya LoRA dict (ID, Base or both)
* :func:`mix_identities`:      several identities -> one LoRA (coefficient or weight-delta space)
* :func:`concept_slider`:      edited minus original identity -> signed LoRA
* :func:`lora_target_shapes`:  the ``[out, in]`` weight shape every LoRA module expects
* :func:`architecture_target_shapes`: the same for every LoRA a model can make (no LoRA needed)

Everything runs on the device the :class:`~hyperlora.generate.HyperLoRAModel` is on;
returned identities are float32 on the CPU, returned LoRAs on the CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from .encoders import ClipVisionEncoder
from .errors import LoraError, SettingError, check_choice
from .faces.analysis import FaceAnalyzer
from .faces.options import DEFAULTS, FaceOptions
from .generate import HyperLoRAModel
from .identity import Identity, check_identity_fits, mean_face_embedding
from .lora import DOWN_SUFFIX, UP_SUFFIX, GeneratedLora, difference, lora_prefixes, mix_tokens, weighted_sum
from .pipeline import FaceConditions, extract_conditions
from .spec import LORA_LAYERS, HyperLoRAArchitecture, kohya_prefix

log = logging.getLogger(__name__)

LORA_KINDS = ("id", "base", "id+base")
MIX_MODES = ("coefficients", "weight_delta")


def conditions_needed(model: HyperLoRAModel) -> tuple[bool, bool, bool]:
    """``(need_id, need_clip, need_base)``: which encoders this model's resamplers read.

    Two-condition models (released) need ArcFace and CLIP; a one-condition model with an
    id_projector needs ArcFace only; one without needs CLIP only; a base resampler needs the
    CLIP features of the base-condition crops.
    """
    arch = model.arch
    has_id = model.id_projector is not None
    two = len(arch.resampler.embed_dims) == 2
    need_clip = two or not has_id
    return has_id, need_clip, model.base_resampler is not None


def clip_width_needed(model: HyperLoRAModel) -> int | None:
    """Width of the CLIP features this model's resamplers read (None when it reads none).

    1024 for the released models: only then must the encoder be ViT-L/14 itself.
    """
    need_id, need_clip, need_base = conditions_needed(model)
    widths = set()
    if need_clip:
        widths.add(model.arch.resampler.embed_dims[-1])
    if need_base and model.arch.base_resampler is not None:
        widths.add(model.arch.base_resampler.embed_dims[0])
    if len(widths) > 1:
        raise LoraError(f"HyperLoRA model '{model.name}' reads CLIP features of widths {sorted(widths)}; "
                        f"its resampler files do not belong together.")
    return widths.pop() if widths else None


def identity_from_conditions(model: HyperLoRAModel, cond: FaceConditions, *, settings: dict[str, str],
                             face_models: str = "",
                             check_interrupt: Callable[[], None] | None = None) -> Identity:
    """Resampler tokens of one person from the extracted conditions (mean over the used images).

    The identity records the mean ArcFace embedding of the photos when ``cond`` has them
    (``face_embedding``, for :mod:`hyperlora.similarity`) and ``face_models``, the fingerprint of
    the face models that made it (:attr:`FaceAnalyzer.fingerprint`).  ``check_interrupt`` is called
    between resampler chunks.
    """
    device, dtype = model.device, model.module_dtype

    def put(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.to(device=device, dtype=dtype)

    with torch.inference_mode():
        tokens = model.id_tokens(id_embeds=put(cond.id_embeds), clip_features=put(cond.clip_features),
                                 check_interrupt=check_interrupt)
        base = None
        if model.base_resampler is not None and cond.base_clip_features is not None:
            base = model.base_tokens(put(cond.base_clip_features), check_interrupt=check_interrupt)
    return Identity(   # clone outside inference mode: plain tensors
        tokens=tokens.detach().float().cpu().clone(),
        base_tokens=None if base is None else base.detach().float().cpu().clone(),
        model_name=model.name,
        model_fingerprint=model.fingerprint,
        num_images=len(cond.used),
        settings=dict(settings),
        face_embedding=None if cond.id_embeds is None else mean_face_embedding(cond.id_embeds),
        face_models=face_models if cond.id_embeds is not None else "",
    )


def identity_from_images(
    model: HyperLoRAModel,
    images: list[np.ndarray],
    *,
    analyzer: FaceAnalyzer,
    clip: ClipVisionEncoder,
    options: FaceOptions = DEFAULTS,
    check_interrupt: Callable[[], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Identity, FaceConditions]:
    """Face photos (uint8 RGB ``[H, W, 3]`` each) -> identity and the conditions used.

    ArcFace always runs (also for a model that reads only CLIP), so every identity records the
    person's face embedding.  Raises :class:`FaceNotFoundError` when no image holds a usable face (whatever the
    no-face policy: with "skip" only the faceless images are dropped).  ``check_interrupt`` is called
    between photos, CLIP forwards and resampler chunks; ``progress(done, total)`` after each photo's
    face analysis.
    """
    _need_id, need_clip, need_base = conditions_needed(model)
    cond = extract_conditions(
        images, analyzer=analyzer, clip=clip, need_id=True, need_clip=need_clip, need_base=need_base,
        options=options, check_interrupt=check_interrupt, progress=progress,
    )
    if check_interrupt is not None:
        check_interrupt()
    settings = options.settings()
    settings["skipped_images"] = ",".join(str(i) for i in cond.skipped)
    return identity_from_conditions(model, cond, settings=settings, face_models=analyzer.fingerprint,
                                    check_interrupt=check_interrupt), cond


def _build(model: HyperLoRAModel, tokens: Tensor, kind: str) -> dict[str, Tensor]:
    device = model.device
    with torch.inference_mode():
        lora = model.build_lora(tokens.to(device), kind=kind)
    # clone outside inference mode: plain tensors (usable by any later node, also in-place or with
    # autograd, e.g. as the start of a LoRA fine-tune) that no longer share one group buffer
    return {k: v.detach().cpu().clone() for k, v in lora.items()}


def _provenance(model: HyperLoRAModel, how: str, identities: Sequence[Identity]) -> dict[str, str]:
    return {"model_name": model.name, "model_fingerprint": model.fingerprint, "how": how,
            "num_images": str(sum(int(i.num_images) for i in identities))}


def lora_from_identity(model: HyperLoRAModel, identity: Identity, *, kind: str = "id") -> GeneratedLora:
    """Identity -> kohya LoRA. ``kind``: "id" (released use), "base" or "id+base" (sum of both)."""
    check_choice(kind, LORA_KINDS, "kind")
    info = _provenance(model, f"{kind} LoRA of one identity", [identity])
    if kind == "id":
        check_identity_fits(identity, model)
        return GeneratedLora(_build(model, identity.tokens, "id"), info)
    if model.base_resampler is None:
        raise LoraError(
            f"HyperLoRA model '{model.name}' has no Base-LoRA (no base_resampler.safetensors); the released "
            f"models already hold it inside the ID-LoRA. Set kind to 'id'.")
    check_identity_fits(identity, model, need_base=True)
    base = _build(model, identity.base_tokens, "base")
    if kind == "base":
        return GeneratedLora(base, info)
    return GeneratedLora(weighted_sum([_build(model, identity.tokens, "id"), base], [1.0, 1.0]), info)


def mix_identities(
    model: HyperLoRAModel, identities: Sequence[Identity], weights: Sequence[float], *, mode: str = "coefficients",
) -> GeneratedLora:
    """Several identities -> one LoRA.

    ``coefficients``: interpolate the normalised tokens, renormalise, build one rank-r LoRA
    (the authors' ID interpolation).  ``weight_delta``: the exact weighted sum of the LoRAs'
    weight updates (rank grows with the number of identities).
    """
    check_choice(mode, MIX_MODES, "mode")
    if len(identities) != len(weights) or not identities:
        raise SettingError(f"Got {len(identities)} identities and {len(weights)} weights; connect at least one "
                           "identity and give one weight per identity.")
    for ident in identities:
        check_identity_fits(ident, model)
    info = _provenance(model, f"mix of {len(identities)} identities ({mode}, weights "
                              f"{', '.join(f'{float(w):g}' for w in weights)})", identities)
    if mode == "coefficients":
        return GeneratedLora(_build(model, mix_tokens([i.tokens for i in identities], list(weights)), "id"), info)
    return GeneratedLora(weighted_sum([_build(model, i.tokens, "id") for i in identities], list(weights)), info)


def concept_slider(model: HyperLoRAModel, edited: Identity, original: Identity, *,
                   strength: float = 1.0) -> GeneratedLora:
    """``strength * (LoRA(edited) - LoRA(original))``: a signed slider for what the edit changed."""
    check_identity_fits(edited, model)
    check_identity_fits(original, model)
    info = _provenance(model, f"concept slider (edited minus original, strength {float(strength):g})",
                       [edited, original])
    return GeneratedLora(difference(_build(model, edited.tokens, "id"), _build(model, original.tokens, "id"),
                                    strength), info)


def lora_target_shapes(lora: dict[str, Tensor]) -> dict[str, tuple[int, int]]:
    """``{prefix: (out, in)}``: the weight shape each LoRA module updates (``up [out, r] @ down [r, in]``)."""
    shapes: dict[str, tuple[int, int]] = {}
    for prefix in lora_prefixes(lora):
        up, down = lora[prefix + UP_SUFFIX], lora[prefix + DOWN_SUFFIX]
        shapes[prefix] = (int(up.shape[0]), int(down.shape[-1]) if down.dim() == 2 else int(np.prod(down.shape[1:])))
    return shapes


def architecture_target_shapes(arch: HyperLoRAArchitecture) -> dict[str, tuple[int, int]]:
    """``{prefix: (out, in)}`` of every LoRA module a model of ``arch`` makes, without building one
    (equal to ``lora_target_shapes`` of any of its LoRAs)."""
    return {kohya_prefix(m, layer): (m.out_features(layer), m.in_features(layer))
            for m in arch.modules for layer in LORA_LAYERS}
