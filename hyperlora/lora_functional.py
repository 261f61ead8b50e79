"""Differentiable HyperLoRA LoRAs inside a running network (for fine-tuning; plain PyTorch).

* :func:`lora_factors`: coefficient tokens ``[Q, K]`` (or per sample ``[B, Q, K]``) -> the LoRA's
  low-rank factors ``{kohya prefix: (down [(B,) rank, in], up [(B,) out, rank])}`` in float32, with
  gradients to the tokens.  The forward pass computes exactly what
  :meth:`hyperlora.generate.HyperLoRAModel.build_lora` computes (same kernels, so step 0 of a
  fine-tune starts from the very LoRA the pack builds); the backward pass is ``basis^T @ grad``,
  streamed through the basis in float32 chunks.
* :class:`LoraHooks`: forward hooks that add ``scale * up(down(x))`` to the output of given
  ``nn.Linear`` modules (``{kohya prefix: module}``), never building an ``[out, in]`` weight and
  never touching the module's weights.  Per-sample factors ``[B, ...]`` act on sample ``b`` of a
  ``[B, L, in]`` input.  The hooks are removed on exit, whatever happens.
* :func:`checkpointed`: runs the forward of given modules under activation checkpointing while a
  gradient is being recorded (non-reentrant ``torch.utils.checkpoint``), so a backward pass through
  a large frozen network holds one block's intermediates at a time.  Restored on exit.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .errors import LoraError
from .generate import HyperLoRAModel, batched_matvecs
from .spec import kohya_prefix

logger = logging.getLogger(__name__)

BACKWARD_CHUNK_BYTES = 64 << 20
"""Basis bytes converted to float32 at a time in the backward pass of :func:`lora_factors`."""

Factors = dict[str, tuple[Tensor, Tensor]]


class _BasisMatvec(torch.autograd.Function):
    """``out[m] = basis[m] @ coeffs[m]`` (basis ``[M, N, K]`` constant, coeffs ``[M, K]``) -> float32 ``[M, N]``."""

    @staticmethod
    def forward(ctx: Any, basis: Tensor, coeffs: Tensor) -> Tensor:  # type: ignore[override]
        # the basis is a constant buffer (possibly made in inference mode): kept as an attribute,
        # not saved for backward, so autograd never copies or checks it
        ctx.basis = basis
        ctx.coeff_dtype = coeffs.dtype
        with torch.no_grad():
            (out,) = batched_matvecs([(basis, coeffs.detach().to(device=basis.device, dtype=basis.dtype))])
        return out.float()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor]:  # type: ignore[override]
        basis: Tensor = ctx.basis
        m, n, k = basis.shape
        step = max(1, BACKWARD_CHUNK_BYTES // max(1, n * k * 4))
        g = grad.to(device=basis.device, dtype=torch.float32)
        out = torch.empty(m, k, dtype=torch.float32, device=basis.device)
        for s in range(0, m, step):
            chunk = basis[s:s + step].float()                                  # [m', N, K]
            out[s:s + step] = torch.bmm(g[s:s + step].unsqueeze(1), chunk).squeeze(1)
        return None, out.to(ctx.coeff_dtype)


def lora_factors(model: HyperLoRAModel, tokens: Tensor, *, kind: str = "id") -> Factors:
    """tokens ``[Q, K]`` or ``[B, Q, K]`` -> ``{kohya prefix: (down [(B,) r, in], up [(B,) out, r])}`` float32.

    Differentiable with respect to ``tokens``; the weight update of a module is
    ``(alpha / rank) * up @ down`` with ``alpha = rank / 2`` (format §5.6), as for the built LoRA.
    """
    groups = model.groups.get(kind) or []
    if not groups:
        raise LoraError(f"HyperLoRA model '{model.name}' has no '{kind}' basis; use kind 'id'.")
    q, k = model.arch.num_tokens, model.arch.hyper_dim
    batched = tokens.dim() == 3
    if tokens.dim() not in (2, 3) or tuple(tokens.shape[-2:]) != (q, k):
        raise LoraError(f"coefficient tokens have shape {list(tokens.shape)} but HyperLoRA model '{model.name}' "
                        f"needs [{q}, {k}] (or [B, {q}, {k}]); make the identity with this model.")
    samples = tokens.unbind(0) if batched else (tokens,)
    per_sample: list[Factors] = []
    for t in samples:
        t = t.to(device=model.device)
        out: Factors = {}
        for g, down_b, up_b in model.basis_groups(kind):
            tok = getattr(model, g.token_buffer)
            down = _BasisMatvec.apply(down_b, t.index_select(0, tok))          # [M, in*r]
            up = _BasisMatvec.apply(up_b, t.index_select(0, tok + 1))          # [M, r*out]
            m, r = len(g.entries), g.rank
            downs = down.view(m, g.in_features, r).transpose(1, 2)            # [M, r, in]
            ups = up.view(m, r, g.out_features).transpose(1, 2)               # [M, out, r]
            for (i, layer), d, u in zip(g.entries, downs.unbind(0), ups.unbind(0)):
                out[kohya_prefix(model.arch.modules[i], layer)] = (d, u)
        per_sample.append(out)
    if not batched:
        return per_sample[0]
    return {p: (torch.stack([f[p][0] for f in per_sample]), torch.stack([f[p][1] for f in per_sample]))
            for p in per_sample[0]}


def lora_delta_output(x: Tensor, down: Tensor, up: Tensor) -> Tensor:
    """``up(down(x))`` for ``x [..., in]``: factors ``[r, in]`` / ``[out, r]`` for every sample, or
    ``[B, r, in]`` / ``[B, out, r]`` for a ``[B, L, in]`` input (sample ``b`` by factors ``b``)."""
    xf = x.to(down.dtype)
    if down.dim() == 2:
        return torch.nn.functional.linear(torch.nn.functional.linear(xf, down), up)
    if xf.dim() != 3 or xf.shape[0] != down.shape[0]:
        raise LoraError(f"per-sample LoRA factors for {down.shape[0]} samples cannot act on an input of shape "
                        f"{list(x.shape)}; give one set of factors per sample of the batch.")
    return torch.bmm(torch.bmm(xf, down.transpose(1, 2)), up.transpose(1, 2))


class LoraHooks:
    """Adds ``scale[p] * up(down(x))`` to the output of each ``targets[p]`` while active.

    ``factors`` (``{prefix: (down, up)}``, e.g. from :func:`lora_factors`) may be replaced at any
    time, e.g. after each optimiser step; a module whose prefix has no factors is left alone.
    Use as a context manager; the hooks are removed on exit.
    """

    def __init__(self, targets: Mapping[str, nn.Module], scale: float | Mapping[str, float] = 1.0) -> None:
        self.targets = dict(targets)
        self.scale = scale
        self.factors: Mapping[str, tuple[Tensor, Tensor]] = {}
        self._handles: list[Any] = []

    def _scale(self, prefix: str) -> float:
        return float(self.scale[prefix]) if isinstance(self.scale, Mapping) else float(self.scale)

    def _hook(self, prefix: str) -> Any:
        def hook(_module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
            pair = self.factors.get(prefix)
            if pair is None:
                return output
            delta = lora_delta_output(inputs[0], *pair)
            return output + (self._scale(prefix) * delta).to(output.dtype)
        return hook

    def __enter__(self) -> LoraHooks:
        try:
            for prefix, module in self.targets.items():
                self._handles.append(module.register_forward_hook(self._hook(prefix)))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


@contextlib.contextmanager
def checkpointed(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Activation checkpointing for ``modules`` while gradients are recorded (their ``forward`` is
    wrapped on the instance and restored on exit; without grad they run as usual)."""
    wrapped: list[tuple[nn.Module, Any]] = []

    def wrap(forward: Any) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            if torch.is_grad_enabled():
                return checkpoint(forward, *args, use_reentrant=False, **kwargs)
            return forward(*args, **kwargs)
        return run

    try:
        for module in modules:
            wrapped.append((module, module.__dict__.get("forward")))
            module.forward = wrap(module.forward)  # type: ignore[method-assign]
        yield
    finally:
        for module, previous in reversed(wrapped):
            if previous is None:
                del module.forward
            else:
                module.forward = previous  # type: ignore[method-assign]


__all__ = ["BACKWARD_CHUNK_BYTES", "Factors", "LoraHooks", "checkpointed", "lora_delta_output", "lora_factors"]
