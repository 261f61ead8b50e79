"""Held-out evaluation of an exported HyperLoRA model: own LoRA vs another identity's vs none.

Two measures: the denoising loss on held-out photos (this module's functions, below) and identity in
generated pictures, ID-sim and retrieval as the paper measures it (:mod:`hyperlora.train.idsim`;
``python -m hyperlora.train evaluate`` (:mod:`hyperlora.train.evaluate_cli`) writes its ``eval.json`` and
``eval.png``).

The denoising loss:

What a user gets is measured, through the pack's own inference path:

1. the EXPORTED folder is loaded with :func:`hyperlora.checkpoint.load_hyper_lora` (strict loader);
2. an identity's LoRA is made from its *reference* photos: either through the pack's face pipeline
   (:func:`reference_features_from_photos`: :func:`hyperlora.pipeline.extract_conditions` with the
   AntelopeV2 analyser and the CLIP encoder, as the Identity node does) or from precomputed shard
   features of those photos (:func:`reference_features_from_samples`); then
   ``HyperLoRAModel.id_tokens`` (mean over the photos, normalised) -> ``build_lora`` (kohya LoRA,
   alpha = rank / 2) -> :func:`hyperlora.lora_functional.factors_from_lora`;
3. the LoRA is applied at strength 1 with :func:`hyperlora.lora_functional.applied` on the diffusers
   UNet (the same result as merging it into the weights);
4. the loss is SDXL's epsilon MSE on the *evaluation* photos (never trained on, never used as
   references) at fixed timesteps with fixed, seeded noise, the caption *with* the trigger words,
   the same for all three conditions, so only the LoRA differs:

   * ``own``: the photo's identity's LoRA;
   * ``other``: the LoRAs of the next :data:`MAX_OTHERS` identities of the same group (mean over them);
   * ``none``: no LoRA.

Only the ID-LoRA is applied: the Base-LoRA would be made from the evaluated photo itself (it carries
the background and pose of that photo, not the identity), so it would blur what this measures.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import SettingError
from ..image_files import read_image
from ..lora_functional import Factors, LoraTerm, applied, diffusers_lora_targets, factors_from_lora

log = logging.getLogger(__name__)

DEFAULT_TIMESTEPS = (200, 400, 600, 800)
"""Fixed timesteps of every evaluation photo (spread over the schedule where identity matters)."""
EVAL_KEYS = ("latents", "time_ids", "text", "pooled")
MAX_OTHERS = 3
""""Another identity's LoRA" = the next ``MAX_OTHERS`` identities of the group (cyclically), mean over them."""


@dataclass
class Features:
    """Encoder features of one identity's reference photos (``[N, 512]`` ArcFace, ``[N, 257, E]`` CLIP)."""

    arcface: Tensor | None
    clip: Tensor | None


@dataclass
class GroupLoss:
    """Mean held-out loss of one group of identities under the three conditions."""

    own: float
    other: float
    none: float
    identities: int
    photos: int
    per_identity: dict[str, dict[str, float]] = field(default_factory=dict)

    def line(self, label: str = "demo") -> str:
        return f"{label}: loss own {self.own:.5f}, other {self.other:.5f}, none {self.none:.5f}"


# --------------------------------------------------------------------------------- reference features


def reference_features_from_photos(folder: Path, identities: Sequence[str], *, antelope: Path, clip_folder: Path,
                                   clip_processor: Path | None = None) -> dict[str, Features]:
    """``folder/<identity>/*.png|jpg`` -> features through the pack's face pipeline (what the nodes run).

    ``antelope``: the AntelopeV2 folder; ``clip_folder``: a Hugging Face CLIP vision folder.
    """
    from ..encoders import ClipVisionEncoder
    from ..faces.analysis import FaceAnalyzer
    from ..faces.options import FaceOptions
    from ..pipeline import extract_conditions

    analyzer = FaceAnalyzer(antelope)
    clip = ClipVisionEncoder.from_pretrained(clip_folder, clip_processor, require_vit_l14=False)
    out: dict[str, Features] = {}
    for name in identities:
        photos = sorted(p for p in (Path(folder) / name).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        if not photos:
            raise SettingError(f"no reference photos in '{Path(folder) / name}'; put one or more face photos there.")
        images = [read_image(p) for p in photos]            # the size is checked before decoding
        cond = extract_conditions(images, analyzer=analyzer, clip=clip, need_id=True, need_clip=True, need_base=False,
                                  options=FaceOptions(no_face="skip"), use_cache=False)
        out[name] = Features(cond.id_embeds, None if cond.clip_features is None else cond.clip_features.float())
    return out


def reference_features_from_samples(samples: Sequence[Mapping[str, Any]]) -> dict[str, Features]:
    """Shard samples (``arcface``, ``clip_id``, ``identity``) -> features per identity."""
    arc: dict[str, list[Tensor]] = {}
    clip: dict[str, list[Tensor]] = {}
    for s in samples:
        arc.setdefault(str(s["identity"]), []).append(torch.as_tensor(s["arcface"]).float())
        clip.setdefault(str(s["identity"]), []).append(torch.as_tensor(s["clip_id"]).float())
    return {k: Features(torch.stack(arc[k]), torch.stack(clip[k])) for k in arc}


def identity_loras(model: Any, features: Mapping[str, Features]) -> dict[str, Factors]:
    """Per identity: the pack's ``id_tokens`` -> ``build_lora`` (fp32) -> factors (alpha/rank folded in).

    ``model``: a :class:`hyperlora.generate.HyperLoRAModel` (from ``load_hyper_lora``).
    """
    out: dict[str, Factors] = {}
    for name, f in features.items():
        tokens = model.id_tokens(id_embeds=f.arcface, clip_features=f.clip, use_cache=False)
        out[name] = factors_from_lora(model.build_lora(tokens, dtype=torch.float32))
    return out


# --------------------------------------------------------------------------------- loss


def _stack(samples: Sequence[Mapping[str, Any]], key: str) -> Tensor:
    return torch.stack([torch.as_tensor(s[key]) for s in samples]).float()


@torch.no_grad()
def denoising_losses(unet: nn.Module, alphas_cumprod: Tensor, samples: Sequence[Mapping[str, Any]],
                     factors: Factors | None, *, timesteps: Sequence[int] = DEFAULT_TIMESTEPS, seed: int = 0,
                     sample_ids: Sequence[int] | None = None, targets: Mapping[str, nn.Module] | None = None) -> Tensor:
    """Epsilon MSE of every (sample, timestep): ``[len(samples), len(timesteps)]``.

    Noise for (sample id ``i``, timestep ``j``) is drawn from ``torch.Generator(seed * 7919 + i)``, so
    the same photo sees the same noise under every LoRA.  ``factors``: a LoRA applied at strength 1, or None.
    """
    if not samples:
        return torch.zeros(0, len(timesteps))
    ids = list(range(len(samples))) if sample_ids is None else list(sample_ids)
    x0 = _stack(samples, "latents")
    n, t_count = x0.shape[0], len(timesteps)
    noise = torch.stack([torch.randn((t_count, *x0.shape[1:]), generator=torch.Generator().manual_seed(seed * 7919 + i))
                         for i in ids])                                           # [N, T, C, h, w]
    t = torch.as_tensor(list(timesteps), dtype=torch.long)
    a = alphas_cumprod.float()[t].view(1, t_count, 1, 1, 1)
    noisy = (a.sqrt() * x0[:, None] + (1 - a).sqrt() * noise).flatten(0, 1)       # [N*T, C, h, w]

    def rep(x: Tensor) -> Tensor:
        return x.repeat_interleave(t_count, dim=0)

    dtype = next(unet.parameters()).dtype
    kwargs = dict(encoder_hidden_states=rep(_stack(samples, "text")).to(dtype),
                  added_cond_kwargs={"text_embeds": rep(_stack(samples, "pooled")).to(dtype),
                                     "time_ids": rep(_stack(samples, "time_ids")).to(dtype)})
    tt = t.repeat(n)
    if factors is None:
        pred = unet(noisy.to(dtype), tt, **kwargs).sample.float()
    else:
        with applied(targets if targets is not None else diffusers_lora_targets(unet), [LoraTerm(factors, 1.0)]):
            pred = unet(noisy.to(dtype), tt, **kwargs).sample.float()
    err = (pred - noise.flatten(0, 1)).pow(2).mean(dim=(1, 2, 3))
    return err.view(n, t_count)


def group_loss(unet: nn.Module, alphas_cumprod: Tensor, samples: Sequence[Mapping[str, Any]],
               loras: Mapping[str, Factors], identities: Sequence[str], *,
               timesteps: Sequence[int] = DEFAULT_TIMESTEPS, seed: int = 0,
               progress: Callable[[str], None] | None = None) -> GroupLoss:
    """Mean loss of the ``identities``' evaluation samples: own / other (same group) / none."""
    if len(identities) < 2:
        raise SettingError(f"evaluation needs at least two identities per group to compare with 'another "
                           f"identity's LoRA', got {list(identities)}.")
    targets = diffusers_lora_targets(unet)
    by_id: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        by_id.setdefault(str(s["identity"]), []).append(i)
    per: dict[str, dict[str, float]] = {}
    own_all, other_all, none_all = [], [], []
    for name in identities:
        idx = by_id.get(name, [])
        if not idx:
            raise SettingError(f"no evaluation photos of identity '{name}' among the {len(samples)} samples.")
        if name not in loras:
            raise SettingError(f"no reference features (so no LoRA) for identity '{name}'.")
        chosen = [samples[i] for i in idx]

        def run(f: Factors | None) -> Tensor:
            return denoising_losses(unet, alphas_cumprod, chosen, f, timesteps=timesteps, seed=seed,
                                    sample_ids=idx, targets=targets)

        none = run(None)
        own = run(loras[name])
        j = list(identities).index(name)
        picks = [identities[(j + k) % len(identities)] for k in range(1, min(MAX_OTHERS, len(identities) - 1) + 1)]
        others = torch.stack([run(loras[o]) for o in picks]).mean(0)
        per[name] = {"own": float(own.mean()), "other": float(others.mean()), "none": float(none.mean())}
        own_all.append(own)
        other_all.append(others)
        none_all.append(none)
        if progress is not None:
            progress(name)
    return GroupLoss(own=float(torch.cat(own_all).mean()), other=float(torch.cat(other_all).mean()),
                     none=float(torch.cat(none_all).mean()), identities=len(identities),
                     photos=sum(len(by_id[n]) for n in identities), per_identity=per)


def evaluate_export(export: Path, unet: nn.Module, alphas_cumprod: Tensor, samples: Sequence[Mapping[str, Any]],
                    features: Mapping[str, Features], groups: Mapping[str, Sequence[str]], *,
                    timesteps: Sequence[int] = DEFAULT_TIMESTEPS, seed: int = 0) -> dict[str, GroupLoss]:
    """Load ``export`` with the pack's strict loader, make every identity's LoRA from ``features`` and
    return :class:`GroupLoss` per group (e.g. ``{"training": [...], "unseen": [...]}``).

    ``samples``: evaluation samples (``latents``, ``time_ids``, ``text``, ``pooled``, ``identity``);
    ``unet``: the diffusers UNet the model was trained for (frozen base).
    """
    from ..checkpoint import load_hyper_lora

    model = load_hyper_lora(export, dtype=torch.float32)
    wanted = {n for names in groups.values() for n in names}
    loras = identity_loras(model, {k: v for k, v in features.items() if k in wanted})
    unet.eval()
    out: dict[str, GroupLoss] = {}
    for group, names in groups.items():
        out[group] = group_loss(unet, alphas_cumprod, samples, loras, list(names), timesteps=timesteps, seed=seed)
        log.info("evaluation (%s identities, %d photos): own %.5f, other %.5f, none %.5f", group,
                 out[group].photos, out[group].own, out[group].other, out[group].none)
    return out


def margin_ok(result: GroupLoss, *, margin: float) -> bool:
    """``own < other`` and ``own < none``, each by a relative ``margin`` (0.05 = 5 % lower)."""
    return result.own < (1 - margin) * result.other and result.own < (1 - margin) * result.none


__all__ = ["DEFAULT_TIMESTEPS", "Features", "GroupLoss", "denoising_losses", "evaluate_export", "group_loss",
           "identity_loras", "margin_ok", "reference_features_from_photos", "reference_features_from_samples"]
