"""The training stages of ``fit``, one small object each: name, trainable parts, scenarios and loss.

A :class:`Stage` knows

* ``name``: what ``loss.csv``, ``validation.csv``, the checkpoints and :meth:`FitConfig.stage_at
  <hyperlora.train.config.FitConfig.stage_at>` call it (``"1"``, ``"2"``, ``"3"``, ``"distill"``);
* ``number``: its ``"stage"`` value in the fit JSON (``None`` for the distil stage, which the config turns
  on with ``distill_base`` / ``distill_steps``);
* ``parts``: what it trains by default (names from :data:`hyperlora.train.hypernet.PARTS`; everything
  else, the UNet included, is frozen: :func:`hyperlora.train.engine.enter_stage`);
* ``scenarios``: the names of the losses it reports (the per-sample scenarios of the ID stages);
* :meth:`Stage.inputs`: what the one UNet pass with gradients compares (the LoRAs it applies, the
  caption, the target); :class:`hyperlora.train.trainer.Trainer` does the rest (noise, the pass, the
  weighted mean, the backward), the same for every stage.

This module is the one source of these facts: :data:`hyperlora.train.config.STAGE_PARTS`,
:data:`~hyperlora.train.config.DISTILL_PARTS` and :data:`~hyperlora.train.config.SCENARIOS` are read from
it.  A new stage is a new :class:`Stage` (or subclass) added to :data:`STAGES`.

Shapes: latents ``[B, 4, h, w]``, ``text [B, L, C]``, ``pooled [B, P]``, ``time_ids [B, 6]``,
timesteps ``[B]``; the per-sample masks of the scenarios ``[B]`` (bool).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ..lora_functional import LORA_SCALE, LoraTerm, applied
from .hypernet import TrainableHyperLoRA

SCENARIOS = ("recon", "id_only", "base_id")
"""The trigger-word scenarios of the ID stages (2 and 3), drawn per sample with the config's ``scenarios``
probabilities: ``recon`` (caption with trigger words, Base + ID, target the noise), ``id_only`` (no trigger
words, ID alone, target the frozen UNet), ``base_id`` (no trigger words, Base + ID, target Base alone)."""


@dataclass
class LossInputs:
    """What the UNet pass with gradients sees: the LoRAs applied, the conditioning and the target.

    ``text [B, L, C]``, ``pooled [B, P]``, ``target [B, 4, h, w]`` (the noise or a frozen prediction)."""

    terms: list[LoraTerm]
    text: Tensor
    pooled: Tensor
    target: Tensor


class LossContext(Protocol):
    """What a stage's :meth:`Stage.inputs` uses of the trainer (:class:`hyperlora.train.trainer.Trainer`)."""

    targets: dict[str, nn.Linear]
    generator: TrainableHyperLoRA
    teacher: TrainableHyperLoRA | None
    distill_base: float

    def generate(self, net: nn.Module, *args: Any, **kw: Any) -> tuple[Any, Any]:
        """``net(*args, **kw)`` (ID factors, Base factors) under the generator's precision context."""
        ...

    def predict(self, x: Tensor, t: Tensor, text: Tensor, pooled: Tensor, time_ids: Tensor) -> Tensor:
        """The frozen UNet's noise prediction ``[B, 4, h, w]`` (float32) with the LoRAs currently applied."""
        ...


@dataclass(frozen=True)
class Stage:
    """One training stage (see the module docstring); subclasses give :meth:`inputs`."""

    name: str
    number: int | None
    title: str
    parts: tuple[str, ...]
    scenarios: tuple[str, ...]
    uses_teacher: bool = False
    """True for a stage whose target comes from a frozen copy of the generator taken when it starts."""

    @property
    def drawn(self) -> bool:
        """Whether each sample draws its scenario (several of them) rather than all sharing the one."""
        return len(self.scenarios) > 1

    def draw(self, b: int, probabilities: Mapping[str, float], gen: torch.Generator, *,
             given: str | None = None) -> list[str]:
        """The scenarios of ``b`` samples: ``given`` for all (a drawing stage only), else drawn from ``gen`` with
        ``probabilities`` (``{scenario: p}``); a stage of one scenario draws nothing from ``gen``."""
        if not self.drawn:
            return [self.scenarios[0]] * b
        if given is not None:
            return [given] * b
        probs = torch.tensor([probabilities[s] for s in self.scenarios], dtype=torch.float64)
        idx = torch.multinomial(probs, b, replacement=True, generator=gen)
        return [self.scenarios[i] for i in idx.tolist()]

    def validation_scenarios(self, probabilities: Mapping[str, float]) -> list[str]:
        """The scenarios a validation in this stage reports: those with a positive probability."""
        if not self.drawn:
            return list(self.scenarios)
        return [s for s in self.scenarios if probabilities.get(s, 0.0) > 0]

    def inputs(self, ctx: LossContext, model: nn.Module, batch: Mapping[str, Tensor], noisy: Tensor, noise: Tensor,
               t: Tensor, mask: dict[str, Tensor]) -> LossInputs:
        """The LoRAs (made by ``model``, the possibly wrapped generator), caption and target of one micro-batch;
        ``noisy``/``noise`` ``[B, 4, h, w]``, ``t`` ``[B]``, ``mask`` ``{scenario: [B] bool}``."""
        raise NotImplementedError


@dataclass(frozen=True)
class BaseStage(Stage):
    """Stage 1: the Base resampler reads the blurred-face crop's CLIP features, the face encoder is not run; the
    UNet with the Base-LoRA and the caption with trigger words predicts the noise."""

    def inputs(self, ctx: LossContext, model: nn.Module, batch: Mapping[str, Tensor], noisy: Tensor, noise: Tensor,
               t: Tensor, mask: dict[str, Tensor]) -> LossInputs:
        _, basef = ctx.generate(model, None, None, batch["clip_base"], want_id=False, want_base=True)
        return LossInputs([LoraTerm(basef, LORA_SCALE)], batch["text"], batch["pooled"], noise)


@dataclass(frozen=True)
class IdStage(Stage):
    """Stages 2 and 3: the ID-LoRA from the face crop's CLIP features (``arcface`` False: the ArcFace branch gets
    zeros and adds nothing) or with the ArcFace embedding too; the scenarios of :data:`SCENARIOS` per sample.

    The targets of ``id_only`` and ``base_id`` come from one extra UNet pass without gradients (the Base-LoRA
    on per sample), skipped when every sample drew ``recon``.  Without a Base-LoRA (``base_rank`` 0), ``base_id``
    has ``id_only``'s target."""

    arcface: bool = False

    def inputs(self, ctx: LossContext, model: nn.Module, batch: Mapping[str, Tensor], noisy: Tensor, noise: Tensor,
               t: Tensor, mask: dict[str, Tensor]) -> LossInputs:
        b, dev = noisy.shape[0], noisy.device
        arc = batch["arcface"] if self.arcface else None
        has_base = ctx.generator.has_base
        idf, basef = ctx.generate(model, arc, batch["clip_id"], batch["clip_base"] if has_base else None,
                                  want_id=True, want_base=has_base, base_grad=False)
        recon = mask.get("recon", torch.zeros(b, dtype=torch.bool, device=dev))
        sel = recon.view(-1, 1, 1)
        text = torch.where(sel, batch["text"], batch["text_plain"])
        pooled = torch.where(recon.view(-1, 1), batch["pooled"], batch["pooled_plain"])
        target = noise
        if not bool(recon.all()):
            with torch.no_grad():
                if basef is not None:
                    bscale = LORA_SCALE * mask.get("base_id", torch.zeros(b, dtype=torch.bool, device=dev)).float()
                    with applied(ctx.targets, [LoraTerm(basef, bscale)]):
                        teacher = ctx.predict(noisy, t, text, pooled, batch["time_ids"])
                else:
                    teacher = ctx.predict(noisy, t, text, pooled, batch["time_ids"])
            target = torch.where(recon.view(-1, 1, 1, 1), noise, teacher)
        terms = [LoraTerm(idf, LORA_SCALE)]
        if basef is not None:
            id_only = mask.get("id_only", torch.zeros(b, dtype=torch.bool, device=dev))
            terms.append(LoraTerm(basef, LORA_SCALE * (~id_only).float()))
        return LossInputs(terms, text, pooled, target)


@dataclass(frozen=True)
class DistillStage(Stage):
    """The optional distil stage (``distill_base`` > 0): the ID-LoRA alone learns to predict what a frozen copy of
    the generator (the teacher, taken when the stage starts) predicts with ID + ``distill_base`` x Base; the
    export then leaves the Base-LoRA out (:mod:`hyperlora.train.export`)."""

    def inputs(self, ctx: LossContext, model: nn.Module, batch: Mapping[str, Tensor], noisy: Tensor, noise: Tensor,
               t: Tensor, mask: dict[str, Tensor]) -> LossInputs:
        if ctx.teacher is None:
            raise RuntimeError("distil stage without a teacher")
        with torch.no_grad():
            t_id, t_base = ctx.generate(ctx.teacher, batch["arcface"], batch["clip_id"], batch["clip_base"])
            with applied(ctx.targets, [LoraTerm(t_id, LORA_SCALE), LoraTerm(t_base, LORA_SCALE * ctx.distill_base)]):
                target = ctx.predict(noisy, t, batch["text"], batch["pooled"], batch["time_ids"])
        idf, _ = ctx.generate(model, batch["arcface"], batch["clip_id"], None, want_id=True, want_base=False)
        return LossInputs([LoraTerm(idf, LORA_SCALE)], batch["text"], batch["pooled"], target)


BASE_LORA = BaseStage("1", 1, "Base-LoRA", ("base_resampler", "base_basis"), ("base",))
ID_FROM_CLIP = IdStage("2", 2, "ID from CLIP", ("clip_branch", "resampler_core", "id_basis"), SCENARIOS)
ARCFACE_ADDED = IdStage("3", 3, "ArcFace added", ("id_projector", "arcface_branch", "resampler_core", "id_basis"),
                        SCENARIOS, arcface=True)
DISTILL = DistillStage("distill", None, "distil the Base-LoRA into the ID-LoRA",
                       ("id_projector", "arcface_branch", "clip_branch", "resampler_core", "id_basis"), ("distill",),
                       uses_teacher=True)
STAGES: tuple[Stage, ...] = (BASE_LORA, ID_FROM_CLIP, ARCFACE_ADDED, DISTILL)
"""Every stage, in training order."""
NUMBERED: dict[int, Stage] = {s.number: s for s in STAGES if s.number is not None}
"""The stages a fit JSON names by number (``{"stage": 2, "steps": ...}``)."""
LOSS_NAMES: tuple[str, ...] = SCENARIOS + tuple(dict.fromkeys(n for s in STAGES for n in s.scenarios
                                                              if n not in SCENARIOS))
"""Every loss name any stage reports, in a fixed order (the layout of the multi-process reduction)."""


def stage_named(name: str) -> Stage:
    """The stage called ``name`` (``"1"``, ``"2"``, ``"3"``, ``"distill"``); ``KeyError`` for another."""
    for s in STAGES:
        if s.name == name:
            return s
    raise KeyError(f"no training stage named {name!r}; the stages are {', '.join(s.name for s in STAGES)}")


__all__ = ["ARCFACE_ADDED", "BASE_LORA", "BaseStage", "DISTILL", "DistillStage", "ID_FROM_CLIP", "IdStage",
           "LOSS_NAMES", "LossContext", "LossInputs", "NUMBERED", "SCENARIOS", "STAGES", "Stage", "stage_named"]
