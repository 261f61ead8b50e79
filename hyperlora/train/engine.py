"""What ``fit`` needs to run the same way under every accelerate engine (DDP, FSDP2, DeepSpeed ZeRO-2).

* **Freezing per stage** (:func:`param_groups`, :func:`enter_stage`): one optimizer parameter group per
  model part (:data:`hyperlora.train.hypernet.PARTS`). At each step the parts outside the stage get
  ``requires_grad False`` (no gradient is computed, so no engine has one to apply) *and* learning rate 0
  in their group (an engine that steps every parameter it holds, as DeepSpeed's partitioned optimizer does
  with zero-filled gradients and non-zero momentum, still moves nothing: ``p - 0 * u == p`` and AdamW's
  decay ``p * (1 - 0 * wd) == p``). Every parameter keeps ``requires_grad True`` until the engine has
  wrapped the model, so DDP's reducer and DeepSpeed's flat buffers cover all parts.
* **Loss weighting** (:func:`weighted_loss`): the mean over the batch of ``scenario_weight x per-sample
  loss``: scenario ``s`` weighs ``w_s x n_s / B``, ``p_s x w_s`` in expectation at any batch size.
* **Sharded models** (:func:`full_state_dict`, :func:`plain_copy`): a full, unsharded copy of an
  FSDP2 generator, gathered collectively (every process calls it), for the distil teacher and the export.
* **DeepSpeed** (:func:`fill_deepspeed_batch`): the micro-batch size the shipped ZeRO-2 YAML leaves at
  ``"auto"`` (``fit`` hands accelerate no DataLoader to read it from).
* **Memory**: DDP with ``gradient_as_bucket_view`` (:func:`ddp_kwargs`: the gradients live in the
  reducer's buckets; without it the buckets are a second full-size copy of the gradients); the generator's
  forward outside bf16 autocast when its parameters are float32 (:func:`generator_precision`: no bf16
  copy of the bases held for the backward); diffusers new enough to checkpoint a UNet in eval mode
  (:func:`check_checkpointing_support`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import SettingError
from .hypernet import PARTS, TrainableHyperLoRA

log = logging.getLogger(__name__)

DIFFUSERS_MIN = (0, 32)
"""diffusers before 0.32 skipped gradient checkpointing for a UNet in ``eval()`` mode (fit keeps it in eval)."""


def param_groups(model: TrainableHyperLoRA, lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """One AdamW parameter group per non-empty part, in :data:`PARTS` order; each group names its ``part``."""
    groups = []
    for part in PARTS:
        params = [p for _, p in model.part_parameters([part])]
        if params:
            groups.append({"params": params, "part": part, "lr": lr, "weight_decay": weight_decay})
    covered = sum(len(g["params"]) for g in groups)
    if covered != len(list(model.parameters())):
        raise RuntimeError(f"{len(list(model.parameters())) - covered} generator parameters belong to no part")
    return groups


def enter_stage(model: TrainableHyperLoRA, optimizer: Any, parts: Sequence[str], lr: float) -> list[nn.Parameter]:
    """Make ``parts`` the only trainable ones: ``requires_grad`` and the group learning rates.

    ``model`` is the unwrapped generator (its parameters are the engine's: DTensors under FSDP2);
    ``optimizer`` the (accelerate-wrapped) optimizer built from :func:`param_groups`.  Returns the
    trainable parameters (for gradient clipping).  Cheap enough to call every step (warmup changes ``lr``).
    """
    wanted = set(parts)
    trainable: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        on = model.part_of(name) in wanted
        if p.requires_grad != on:
            p.requires_grad_(on)
        if on:
            trainable.append(p)
    for group in optimizer.param_groups:
        if "part" not in group:
            raise RuntimeError("the optimizer was not built by hyperlora.train.engine.param_groups")
        group["lr"] = lr if group["part"] in wanted else 0.0
    return trainable


def weighted_loss(per: Tensor, scenarios: Sequence[str], weights: dict[str, float]) -> Tensor:
    """The batch loss: ``mean_i(w[s_i] x per_i)``; ``per`` ``[B]`` per-sample losses, ``scenarios`` ``B`` names.

    Scenario ``s`` with ``n_s`` of the ``B`` samples weighs ``w_s x n_s / B``: ``p_s x w_s`` in expectation
    whatever the batch size (a sum of per-scenario means would weigh each scenario present ``w_s``, so a
    rare scenario weighs ``p_s x w_s`` at batch 1 and nearly ``w_s`` at batch 32).
    """
    if per.dim() != 1 or per.shape[0] != len(scenarios):
        raise ValueError(f"per-sample losses {tuple(per.shape)} do not match {len(scenarios)} scenarios")
    w = torch.tensor([weights.get(s, 1.0) for s in scenarios], dtype=per.dtype, device=per.device)
    return (w * per).mean()


def _is_sharded(t: Tensor) -> bool:
    return hasattr(t, "full_tensor") and hasattr(t, "placements")      # a DTensor (FSDP2)


def _fsdp2(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:                        # a torch without FSDP2
        return False
    return isinstance(model, FSDPModule)


def is_sharded(model: nn.Module) -> bool:
    """True for an FSDP2 module (or any model whose parameters are DTensor shards)."""
    return _fsdp2(model) or any(_is_sharded(p) for p in model.parameters())


def reshard(model: nn.Module) -> None:
    """Put an FSDP2 module's parameters back into shards after a forward without backward (FSDP2 leaves
    the root module's gathered parameters in place until its backward, which a sampling forward never runs)."""
    if _fsdp2(model):
        model.reshard()


def full_state_dict(model: nn.Module, device: torch.device | str | None = None) -> dict[str, Tensor]:
    """The generator's whole state on every process; DTensors (FSDP2) gathered with ``full_tensor()``.

    A collective under FSDP2: every process must call it, in the same place.  Plain tensors are returned
    as they are (DDP, DeepSpeed ZeRO-2 keep parameters whole).  ``device`` moves each tensor right after
    its gather (``"cpu"``: the accelerator holds one gathered tensor at a time, not the whole generator).
    """
    reshard(model)
    out: dict[str, Tensor] = {}
    for k, v in model.state_dict().items():
        full = v.full_tensor() if _is_sharded(v) else v
        out[k] = (full.to(device) if device is not None else full).detach()
    return out


def plain_copy(model: TrainableHyperLoRA, state: dict[str, Tensor] | None = None,
               device: torch.device | str | None = None) -> TrainableHyperLoRA:
    """A frozen, unwrapped copy of the generator (never ``deepcopy`` of an engine-wrapped module).

    ``state`` defaults to :func:`full_state_dict` (collective under FSDP2).  The copy lives on ``device``
    (default: that of ``state``'s tensors), in eval mode, ``requires_grad False``.
    """
    state = full_state_dict(model) if state is None else state
    copy = TrainableHyperLoRA(model.arch)
    copy.load_state_dict(state, strict=True)
    copy.distilled_base = float(getattr(model, "distilled_base", 0.0))
    target = device if device is not None else next(iter(state.values())).device
    return copy.to(target).requires_grad_(False).eval()


def generator_precision(model: nn.Module) -> Callable[[], AbstractContextManager[Any]]:
    """The context the generator's forward runs in: autocast off when its parameters are float32 and whole.

    Under bf16 autocast, every matmul with a float32 basis makes a bf16 copy of it, and autograd keeps that
    copy until the backward: a second copy of all bases (4.5 GB at the paper's size).  With autocast off
    the float32 bases themselves are used and saved (the factors it returns are then cast, small, inside
    the UNet's hooks).  Parameters already in bf16 (DeepSpeed's bf16 engine) or sharded (FSDP2 gathers them
    in its own compute dtype) keep autocast: there is no second copy to avoid.
    """
    params = list(model.parameters())
    whole_fp32 = bool(params) and not is_sharded(model) and all(p.dtype == torch.float32 for p in params)
    if not whole_fp32:
        return contextlib.nullcontext
    device_type = params[0].device.type
    return lambda: torch.autocast(device_type=device_type, enabled=False)


def fill_deepspeed_batch(plugin: Any, batch_size: int, gradient_accumulation: int) -> None:
    """Give DeepSpeed the micro-batch size (the YAML may say ``"auto"``, which accelerate can only fill
    from a DataLoader it is handed; fit hands it none).  ``plugin`` is accelerate's ``DeepSpeedPlugin``."""
    cfg = plugin.deepspeed_config
    micro = cfg.get("train_micro_batch_size_per_gpu", "auto")
    if micro not in ("auto", batch_size):
        raise SettingError(f"the DeepSpeed config says train_micro_batch_size_per_gpu {micro}, the fit config "
                           f"'batch_size' {batch_size}; make them equal (or \"auto\" in the DeepSpeed config).")
    cfg["train_micro_batch_size_per_gpu"] = batch_size
    acc = cfg.get("gradient_accumulation_steps", "auto")
    if acc not in ("auto", gradient_accumulation):
        raise SettingError(f"the DeepSpeed config says gradient_accumulation_steps {acc}, the fit config "
                           f"'gradient_accumulation' {gradient_accumulation}; make them equal.")
    cfg["gradient_accumulation_steps"] = gradient_accumulation


def ddp_kwargs() -> Any:
    """accelerate's DDP options for fit: unused parameters allowed (stages), gradients as bucket views."""
    from accelerate.utils import DistributedDataParallelKwargs

    return DistributedDataParallelKwargs(find_unused_parameters=True, gradient_as_bucket_view=True)


def check_checkpointing_support() -> None:
    """Stop with the fix when diffusers is too old to checkpoint a UNet kept in ``eval()`` mode."""
    import diffusers

    parts = []
    for x in diffusers.__version__.split(".")[:2]:
        digits = "".join(c for c in x if c.isdigit())
        parts.append(int(digits or 0))
    if tuple(parts) < DIFFUSERS_MIN:
        raise SettingError(f"diffusers {diffusers.__version__} skips gradient checkpointing for the frozen UNet "
                           f"(eval mode), so 'gradient_checkpointing' would do nothing; "
                           f"pip install 'diffusers>=0.32'.")


__all__ = ["DIFFUSERS_MIN", "check_checkpointing_support", "ddp_kwargs", "enter_stage", "fill_deepspeed_batch",
           "full_state_dict", "generator_precision", "is_sharded", "param_groups", "plain_copy", "reshard",
           "weighted_loss"]
