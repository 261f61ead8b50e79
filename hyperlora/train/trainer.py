"""One micro-batch of ``fit``: noise, the stage's scenarios and the loss of the frozen UNet with the generated LoRAs.

:class:`Trainer` holds the frozen SDXL UNet, the generator (possibly wrapped by an engine) and the config; it runs
no accelerate code itself (``fit`` passes ``accelerator.backward``), so the validation
(:class:`hyperlora.train.monitor.Validation`) and the tests call it directly.  Every sample gets its own LoRA:
per-sample factors from :meth:`TrainableHyperLoRA.forward <hyperlora.train.hypernet.TrainableHyperLoRA.forward>`,
applied inside ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` of every module by
:func:`hyperlora.lora_functional.applied` at scale ``LORA_SCALE``.  What each stage's pass compares comes from
its :class:`~hyperlora.train.stages.Stage`.

Shapes: ``batch`` is :func:`hyperlora.train.data.collate`'s dict (latents ``[B, 4, h, w]``, ``text [B, L, C]``,
``pooled [B, P]``, ``time_ids [B, 6]``, features ``[B, ...]``); timesteps ``[B]``; per-sample losses ``[B]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..lora_functional import applied, diffusers_lora_targets
from . import engine
from .config import FitConfig
from .hypernet import TrainableHyperLoRA
from .stages import stage_named


class Trainer:
    """The frozen UNet, the generator and the loss of one micro-batch (no accelerate inside)."""

    def __init__(self, unet: nn.Module, model: nn.Module, noise_scheduler: Any, cfg: FitConfig) -> None:
        self.unet = unet
        self.model = model                      # possibly wrapped (DDP): call it, never its methods
        self.cfg = cfg
        gen = model.module if hasattr(model, "module") else model
        self.generator: TrainableHyperLoRA = gen
        self.targets = diffusers_lora_targets(unet, [f"{m.name}_{lay}" for m in gen.arch.modules
                                                     for lay in ("to_q", "to_k", "to_v", "to_out_0")])
        self.alphas_cumprod = noise_scheduler.alphas_cumprod.to(torch.float32)
        self.num_timesteps = int(noise_scheduler.config.num_train_timesteps)
        self.teacher: TrainableHyperLoRA | None = None
        self.generator_context = engine.generator_precision(gen)   # fp32 bases: autocast off (no bf16 copies)

    @property
    def distill_base(self) -> float:
        """The fraction of the teacher's Base-LoRA the distil stage's target adds (``cfg.distill_base``)."""
        return self.cfg.distill_base

    def generate(self, net: nn.Module, *args: Any, **kw: Any) -> tuple[Any, Any]:
        """``net(*args, **kw)``: the (ID, Base) factors, with autocast off for fp32 bases."""
        with self.generator_context():
            return net(*args, **kw)

    def predict(self, x: Tensor, t: Tensor, text: Tensor, pooled: Tensor, time_ids: Tensor) -> Tensor:
        """The frozen UNet's noise prediction ``[B, 4, h, w]`` in float32 (inputs cast to its dtype)."""
        dtype = next(self.unet.parameters()).dtype
        out = self.unet(x.to(dtype), t, encoder_hidden_states=text.to(dtype),
                        added_cond_kwargs={"text_embeds": pooled.to(dtype), "time_ids": time_ids.to(dtype)}).sample
        return out.float()

    def noise(self, batch: dict[str, Tensor], gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """(noisy latents, noise, timesteps): DDPM forward process ``sqrt(a) x0 + sqrt(1 - a) eps``."""
        x0 = batch["latents"]
        noise = torch.randn(x0.shape, generator=gen).to(x0.device)
        t = torch.randint(0, self.num_timesteps, (x0.shape[0],), generator=gen)
        a = self.alphas_cumprod[t].to(x0.device).view(-1, 1, 1, 1)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise, noise, t.to(x0.device)

    def scenarios(self, stage: str, b: int, gen: torch.Generator) -> list[str]:
        """The scenarios of ``b`` samples in ``stage``, drawn from ``gen`` (:meth:`Stage.draw`)."""
        return stage_named(stage).draw(b, self.cfg.scenarios, gen)

    def loss(self, stage: str, batch: dict[str, Tensor], gen: torch.Generator,
             backward: Callable[[Tensor], None], *, scenario: str | None = None,
             net: nn.Module | None = None) -> dict[str, tuple[float, int]]:
        """One micro-batch: forward, ``backward(loss)`` inside the LoRA context; returns per-scenario (sum, n).

        What the pass compares is the stage's (:meth:`hyperlora.train.stages.Stage.inputs`); the loss is the
        mean over the batch of ``scenario_weights[s_i] x`` the per-sample MSE (:func:`engine.weighted_loss`).
        ``scenario`` (stages 2 and 3) gives every sample that scenario instead of drawing them; ``net`` makes the
        LoRAs instead of the (possibly wrapped) training model: the validation passes both
        (:class:`hyperlora.train.monitor.Validation`)."""
        st = stage_named(stage)
        noisy, noise, t = self.noise(batch, gen)
        b = noisy.shape[0]
        scen = st.draw(b, self.cfg.scenarios, gen, given=scenario)
        dev = noisy.device
        mask = {s: torch.tensor([x == s for x in scen], device=dev) for s in set(scen)}
        model = self.model if net is None else net
        inp = st.inputs(self, model, batch, noisy, noise, t, mask)
        with applied(self.targets, inp.terms):
            pred = self.predict(noisy, t, inp.text, inp.pooled, batch["time_ids"])
            per = F.mse_loss(pred, inp.target.float(), reduction="none").mean(dim=tuple(range(1, pred.dim())))  # [B]
            # mean over the batch of weight x per-sample loss: scenario weights independent of the batch size
            total = engine.weighted_loss(per, scen, self.cfg.scenario_weights)
            out = {s: (float(per[m].detach().sum()), int(m.sum())) for s, m in mask.items()}
            backward(total)                      # inside the context: checkpointed blocks re-run the hooks
        return out


__all__ = ["Trainer"]
