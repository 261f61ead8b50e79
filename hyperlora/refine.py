"""Refine an identity on the person's own photos: a short fine-tune with the diffusion model frozen.

The authors report that about 50 fine-tuning steps starting from the generated LoRA give a
better ID LoRA.  Two ways are offered (``mode``):

* ``coefficients``: tune the identity's tokens ``[Q, K]`` (1,120 x 128 for the released models).
  The LoRA is rebuilt from the tokens at every step (:func:`token_factors`)
  and each token is kept L2-normalised as the resampler makes them (format §5.4), so the result is
  an ordinary identity: saved, loaded, mixed and built like any other.  The factors come from
  :func:`token_factors` (inference-safe, the very numbers Build LoRA makes) and act through
  :func:`hyperlora.lora_functional.applied` (shared with training).
* ``lora``: tune the built LoRA matrices (down and up of every module) directly; the result is a
  kohya LoRA (rank and alpha unchanged).

Objective: the epsilon (noise-prediction) loss of the frozen diffusion model with the LoRA at
``strength``, on the photos' latents: a timestep ``t`` uniform in ``[0, T)``, noise ``n``,
``x = latent + sigma_t * n`` (the variance-exploding form of an epsilon model's noising) and
``loss = mean((x - denoised(x, sigma_t)) / sigma_t - n)^2``.  The caller adapts its network
to :class:`DenoiseTask` (ComfyUI's ``apply_model`` returns ``denoised`` already).

Before / after loss: the same fixed draws (photo, stratified timesteps, seeded noise) for both, so
the two numbers compare like with like.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from torch.utils.checkpoint import checkpoint

from .bundle import lora_from_identity
from .errors import LoraError, SettingError, check_choice
from .generate import HyperLoRAModel, batched_matvecs
from .identity import Identity, check_identity_fits
from .lora import ALPHA_SUFFIX, DOWN_SUFFIX, UP_SUFFIX, GeneratedLora, normalize_tokens
from .lora_functional import LORA_SCALE, Factors, LoraTerm, applied
from .spec import kohya_prefix

logger = logging.getLogger(__name__)

MODES = ("coefficients", "lora")
DEFAULT_STEPS = 50
"""The authors' suggestion: about 50 steps from the generated LoRA."""
DEFAULT_LEARNING_RATE = {"coefficients": 1e-3, "lora": 1e-4}
"""Adam step sizes: tokens are unit vectors (entries ~0.1 for K = 128); LoRA matrices take the usual 1e-4."""
EVAL_DRAWS = 8
"""Fixed draws of the before / after loss (timesteps stratified over the schedule)."""
EVAL_BATCH = 4
MAX_STEPS = 10_000


BACKWARD_CHUNK_BYTES = 64 << 20
"""Basis bytes converted to float32 at a time in the backward pass of :func:`token_factors`."""


class _BasisMatvec(torch.autograd.Function):
    """``out[m] = basis[m] @ coeffs[m]`` (basis ``[M, N, K]`` constant, coeffs ``[M, K]``) -> float32 ``[M, N]``."""

    @staticmethod
    def forward(ctx: Any, basis: Tensor, coeffs: Tensor) -> Tensor:  # type: ignore[override]
        # the basis is a constant buffer, possibly made in inference mode (ComfyUI loads models so): kept as
        # an attribute, not saved for backward, so autograd neither refuses nor copies it
        ctx.basis, ctx.coeff_dtype = basis, coeffs.dtype
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
            out[s:s + step] = torch.bmm(g[s:s + step].unsqueeze(1), basis[s:s + step].float()).squeeze(1)
        return None, out.to(ctx.coeff_dtype)


def token_factors(model: HyperLoRAModel, tokens: Tensor) -> Factors:
    """Identity tokens ``[Q, K]`` -> ``{kohya prefix: (down [1, r, in], up [1, out, r])}`` float32, with
    gradients to the tokens (the factor layout of :mod:`hyperlora.lora_functional`).

    The forward pass runs the kernels of :meth:`HyperLoRAModel.build_lora` (same numbers as Build LoRA);
    the backward pass streams ``basis^T @ grad`` through the basis in float32 chunks.  Unlike
    :func:`hyperlora.lora_functional.basis_factors` it never saves the basis for backward, so it works
    on models loaded in inference mode and keeps no fp32 copy of a 3 GB basis.
    """
    q, k = model.arch.num_tokens, model.arch.hyper_dim
    if tokens.dim() != 2 or tuple(tokens.shape) != (q, k):
        raise LoraError(f"coefficient tokens have shape {list(tokens.shape)} but HyperLoRA model '{model.name}' "
                        f"needs [{q}, {k}]; make the identity with this model.")
    t = tokens.to(device=model.device)
    out: Factors = {}
    for g, down_b, up_b in model.basis_groups("id"):
        tok = getattr(model, g.token_buffer).clone()     # index_select keeps it for backward: a plain copy
        m, r = len(g.entries), g.rank
        downs = _BasisMatvec.apply(down_b, t.index_select(0, tok)).view(m, g.in_features, r).transpose(1, 2)
        ups = _BasisMatvec.apply(up_b, t.index_select(0, tok + 1)).view(m, r, g.out_features).transpose(1, 2)
        for (i, layer), d, u in zip(g.entries, downs.unbind(0), ups.unbind(0)):
            out[kohya_prefix(model.arch.modules[i], layer)] = (d[None], u[None])
    return out


@contextlib.contextmanager
def checkpointed(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Activation checkpointing for ``modules`` while gradients are recorded (their ``forward`` is
    wrapped on the instance and restored on exit; without grad they run as usual), so a backward pass
    through a large frozen network holds one block's intermediates at a time."""
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


def inference_tensors(root: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """Every parameter and buffer of ``root`` (any depth) made in inference mode, as
    ``(qualified module name, module, attribute name)``; ``""`` names ``root`` itself.

    Autograd refuses to save such a tensor for backward ("Inference tensors cannot be saved for
    backward"), and ComfyUI makes every weight of a loaded model in inference mode.
    """
    found: list[tuple[str, nn.Module, str]] = []
    for name, module in root.named_modules():
        for attr, t in [*module._parameters.items(), *module._buffers.items()]:
            if isinstance(t, Tensor) and t.is_inference():
                found.append((name, module, attr))
    return found


@contextlib.contextmanager
def plain_copies(slots: Sequence[tuple[nn.Module, str]]) -> Iterator[int]:
    """Within the block, each ``(module, attribute)`` parameter or buffer is a plain (not inference-mode)
    copy that autograd can save; on exit the very same tensors as before are back.  Yields the bytes
    copied.  Call inside ``torch.inference_mode(False)`` (copies made in inference mode would be
    inference tensors again)."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError("plain_copies needs torch.inference_mode(False): copies made in inference mode "
                           "cannot be saved for backward either")
    saved: list[tuple[nn.Module, str, bool, Tensor]] = []
    copied = 0
    try:
        for module, attr in slots:
            is_param = attr in module._parameters
            old = module._parameters[attr] if is_param else module._buffers[attr]
            if old is None:
                continue
            saved.append((module, attr, is_param, old))
            fresh = old.detach().clone()
            if is_param:
                module._parameters[attr] = nn.Parameter(fresh, requires_grad=False)
            else:
                module._buffers[attr] = fresh
            copied += fresh.numel() * fresh.element_size()
        yield copied
    finally:
        for module, attr, is_param, old in reversed(saved):
            if is_param:
                module._parameters[attr] = old  # type: ignore[assignment]
            else:
                module._buffers[attr] = old


@dataclass(frozen=True)
class Draw:
    """One noisy sample: which photo, which discrete timestep, which noise (a seed)."""

    image: int
    timestep: int
    seed: int


@dataclass
class DenoiseTask:
    """The frozen diffusion model as the fine-tune sees it.

    ``denoise(x [B, C, H, W], sigma [B], images [B] long) -> denoised [B, C, H, W]``: the model's
    prediction of the clean latent for noisy ``x`` at noise level ``sigma`` with the conditioning of
    photos ``images`` (ComfyUI: ``model.apply_model``).  ``latents``: the photos' clean latents
    ``[N, C, H, W]`` in the model's space.  ``sigmas``: ``[T]`` noise level of each discrete timestep.
    """

    denoise: Callable[[Tensor, Tensor, Tensor], Tensor]
    latents: Tensor
    sigmas: Tensor


@dataclass
class RefineResult:
    """``identity``: the refined identity (coefficients mode) or None; ``lora``: the refined LoRA
    (kohya dict, float32, CPU; in coefficients mode the LoRA built from the refined identity)."""

    identity: Identity | None
    lora: GeneratedLora
    loss_before: float
    loss_after: float
    losses: list[float] = field(default_factory=list)     # training loss of every step
    mode: str = "coefficients"
    steps: int = 0
    learning_rate: float = 0.0

    def report(self) -> str:
        change = (self.loss_after / self.loss_before - 1.0) * 100.0 if self.loss_before > 0 else float("nan")
        return (f"refined in {self.mode} mode: {self.steps} steps, learning rate {self.learning_rate:g}\n"
                f"denoising loss on the photos (fixed draws): before {self.loss_before:.6f}, after "
                f"{self.loss_after:.6f} ({change:+.2f}%)")


def training_draws(n_images: int, steps: int, num_timesteps: int, seed: int) -> list[Draw]:
    """One draw per step: photos in seeded random order (each once per round), uniform timesteps."""
    gen = torch.Generator().manual_seed(int(seed))
    draws: list[Draw] = []
    order: list[int] = []
    for step in range(steps):
        if not order:
            order = torch.randperm(n_images, generator=gen).tolist()
        t = int(torch.randint(0, num_timesteps, (1,), generator=gen))
        draws.append(Draw(order.pop(0), t, int(seed) * 1_000_003 + step))
    return draws


def eval_draws(n_images: int, num_timesteps: int, seed: int, count: int = EVAL_DRAWS) -> list[Draw]:
    """Fixed draws for the before / after loss: timesteps at the centres of ``count`` equal strata."""
    return [Draw(j % n_images, min(num_timesteps - 1, int((j + 0.5) * num_timesteps / count)),
                 int(seed) * 1_000_003 + 500_000 + j) for j in range(count)]


def epsilon_loss(task: DenoiseTask, draws: Sequence[Draw]) -> Tensor:
    """Mean squared error of the predicted noise over ``draws`` (one batch)."""
    latents = task.latents
    idx = torch.tensor([d.image for d in draws], dtype=torch.long)
    x0 = latents.index_select(0, idx.to(latents.device))
    noise = torch.stack([torch.randn(tuple(latents.shape[1:]), generator=torch.Generator().manual_seed(d.seed))
                         for d in draws]).to(device=latents.device, dtype=latents.dtype)
    sigma = task.sigmas[[d.timestep for d in draws]].to(device=latents.device, dtype=latents.dtype)
    s = sigma.view(-1, *([1] * (latents.dim() - 1)))
    x = x0 + s * noise
    denoised = task.denoise(x, sigma, idx)
    eps = (x.float() - denoised.float()) / s.float()
    return torch.mean((eps - noise.float()) ** 2)


def _eval(task: DenoiseTask, draws: Sequence[Draw]) -> float:
    with torch.no_grad():
        total = 0.0
        for s in range(0, len(draws), EVAL_BATCH):
            part = draws[s:s + EVAL_BATCH]
            total += float(epsilon_loss(task, part)) * len(part)
    return total / len(draws)


def check_settings(mode: str, steps: int, learning_rate: float, strength: float) -> float:
    """Validate the settings; returns the learning rate to use (0 = the mode's default)."""
    check_choice(mode, MODES, "mode")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise SettingError(f"steps is {steps!r}; use a whole number from 1 to {MAX_STEPS} (about 50 is suggested).")
    lr = float(learning_rate)
    if not math.isfinite(lr) or lr < 0:
        raise SettingError(f"learning_rate is {learning_rate!r}; use a positive number, or 0 for the mode's default "
                           f"({DEFAULT_LEARNING_RATE[mode]:g}).")
    if not math.isfinite(float(strength)) or float(strength) == 0:
        raise SettingError(f"strength is {strength!r}; the LoRA must act to be tuned: use the strength you apply "
                           "it with (e.g. 0.85).")
    return lr or DEFAULT_LEARNING_RATE[mode]


class Refiner:
    """The trainable state of one refinement: parameters, optimiser, LoRA hooks; one :meth:`step` at a time.

    Use as a context manager (checkpointing on while inside; the LoRA hooks are on during each
    :meth:`evaluate` / :meth:`step`), under
    ``torch.inference_mode(False)`` with gradients enabled (:func:`refine` does all of that).
    ``targets``: ``{kohya prefix: nn.Linear}`` of the diffusion model; nothing else of it is changed
    and no gradient is stored on it (``torch.autograd.grad`` on our parameters only).
    """

    def __init__(self, model: HyperLoRAModel, identity: Identity, targets: Mapping[str, nn.Module], *,
                 mode: str, learning_rate: float, strength: float,
                 checkpoint_modules: Sequence[nn.Module] = ()) -> None:
        check_identity_fits(identity, model)
        self.model, self.identity, self.mode = model, identity, mode
        self.start = lora_from_identity(model, identity, kind="id")
        start = self.start
        self.prefixes = sorted({k[: -len(DOWN_SUFFIX)] for k in start if k.endswith(DOWN_SUFFIX)})
        missing = [p for p in self.prefixes if p not in targets]
        if missing:
            raise LoraError(f"{len(missing)} of {len(self.prefixes)} LoRA modules have no layer in the diffusion model "
                            f"(e.g. {missing[0]}); refine with the SDXL model the identity is meant for.")
        ratios = {float(start[p + ALPHA_SUFFIX]) / start[p + DOWN_SUFFIX].shape[0] for p in self.prefixes}
        if ratios != {LORA_SCALE}:
            raise LoraError(f"The LoRA of HyperLoRA model '{model.name}' has alpha / rank {sorted(ratios)}, not "
                            f"{LORA_SCALE}; this pack builds every LoRA with alpha = rank / 2.")
        self.targets = {p: targets[p] for p in self.prefixes}
        self.scale = LORA_SCALE * float(strength)
        device = model.device
        if mode == "coefficients":
            self.tokens = identity.tokens.detach().clone().to(device=device, dtype=torch.float32).requires_grad_(True)
            self.params = [self.tokens]
        else:
            self.mats = {p: tuple(start[p + suffix].detach().to(device=device, dtype=torch.float32).clone()
                                  .requires_grad_(True) for suffix in (DOWN_SUFFIX, UP_SUFFIX)) for p in self.prefixes}
            self.params = [t for pair in self.mats.values() for t in pair]
        self.optimizer = torch.optim.Adam(self.params, lr=learning_rate)
        self._checkpoint_modules = list(checkpoint_modules)
        self._checkpoint: contextlib.AbstractContextManager[None] | None = None

    def factors(self) -> Factors:
        """The current LoRA factors (rebuilt from the tokens in coefficients mode), ``[1, ...]`` each."""
        if self.mode == "coefficients":
            return token_factors(self.model, normalize_tokens(self.tokens))
        return {p: (d[None], u[None]) for p, (d, u) in self.mats.items()}

    def __enter__(self) -> Refiner:
        self._checkpoint = checkpointed(self._checkpoint_modules)
        self._checkpoint.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._checkpoint is not None:
            self._checkpoint.__exit__(None, None, None)
            self._checkpoint = None

    def evaluate(self, task: DenoiseTask, draws: Sequence[Draw]) -> float:
        """Mean epsilon loss over ``draws`` with the current LoRA (no gradients)."""
        with torch.no_grad(), applied(self.targets, [LoraTerm(self.factors(), self.scale)]):
            return _eval(task, draws)

    def step(self, task: DenoiseTask, draw: Draw) -> float:
        """One optimiser step on one draw; returns its loss.  The hooks stay on through the backward
        pass, where checkpointed blocks run again."""
        with applied(self.targets, [LoraTerm(self.factors(), self.scale)]):
            loss = epsilon_loss(task, [draw])
            if not torch.isfinite(loss):
                raise SettingError(f"The loss became {float(loss.detach())}; lower the learning rate "
                                   f"(it is {self.optimizer.param_groups[0]['lr']:g}).")
            grads = torch.autograd.grad(loss, self.params)      # gradients of our parameters only
        for p, g in zip(self.params, grads):
            p.grad = g
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def result(self, before: float, after: float, losses: list[float], steps: int, lr: float,
               strength: float) -> RefineResult:
        identity, start = self.identity, self.start
        settings = {**identity.settings,
                    "refined": f"{self.mode}, {steps} steps, lr {lr:g}, strength {float(strength):g}"}
        if self.mode == "coefficients":
            refined = Identity(tokens=normalize_tokens(self.tokens.detach()).float().cpu().clone(),
                               base_tokens=identity.base_tokens, model_name=identity.model_name,
                               model_fingerprint=identity.model_fingerprint, num_images=identity.num_images,
                               settings=settings, face_embedding=identity.face_embedding,
                               face_models=identity.face_models)
            return RefineResult(refined, lora_from_identity(self.model, refined, kind="id"), before, after, losses,
                                self.mode, steps, lr)
        tensors: dict[str, Tensor] = {}
        for p in self.prefixes:
            tensors[p + DOWN_SUFFIX] = self.mats[p][0].detach().cpu().clone()
            tensors[p + UP_SUFFIX] = self.mats[p][1].detach().cpu().clone()
            tensors[p + ALPHA_SUFFIX] = start[p + ALPHA_SUFFIX].detach().float().cpu().clone()
        lora = GeneratedLora(tensors, {**start.provenance, "how": f"ID LoRA refined on the photos ({steps} steps)"})
        return RefineResult(None, lora, before, after, losses, self.mode, steps, lr)


def plain_task(task: DenoiseTask) -> DenoiseTask:
    """``task`` with plain copies of its tensors: ComfyUI hands over tensors made in inference mode,
    which autograd refuses to keep.  Call inside ``torch.inference_mode(False)``."""
    return DenoiseTask(task.denoise, task.latents.detach().clone(), task.sigmas.detach().clone())


def refine(
    model: HyperLoRAModel,
    identity: Identity,
    targets: Mapping[str, nn.Module],
    task: DenoiseTask,
    *,
    mode: str = "coefficients",
    steps: int = DEFAULT_STEPS,
    learning_rate: float = 0.0,
    strength: float = 1.0,
    seed: int = 0,
    checkpoint_modules: Sequence[nn.Module] = (),
    check_interrupt: Callable[[], None] | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> RefineResult:
    """Fine-tune ``identity`` on ``task`` for ``steps`` steps; the diffusion model stays frozen.

    ``targets``: ``{kohya prefix: nn.Linear}`` of the diffusion model, one per LoRA module (see
    :class:`Refiner`).  ``checkpoint_modules``: blocks to run under activation checkpointing.
    ``learning_rate`` 0: :data:`DEFAULT_LEARNING_RATE` of the mode.  ``on_step(i, loss)`` after each
    step; ``check_interrupt()`` before each.
    """
    lr = check_settings(mode, steps, learning_rate, strength)
    n = int(task.latents.shape[0])
    if task.latents.dim() != 4 or n == 0:
        raise SettingError(f"The photos' latents have shape {list(task.latents.shape)}; connect VAE Encode of at "
                           "least one photo ([N, C, H, W]).")
    bad = int((~torch.isfinite(task.latents)).sum())
    if bad:
        raise SettingError(f"The photos' latents hold {bad} NaN or infinite values (of {task.latents.numel()}); encode "
                           "the photos again with the SDXL VAE in full precision (fp32: it overflows in fp16).")
    num_t = int(task.sigmas.shape[0])
    train, fixed = training_draws(n, steps, num_t, seed), eval_draws(n, num_t, seed)
    with torch.inference_mode(False), torch.enable_grad():
        task = plain_task(task)
        refiner = Refiner(model, identity, targets, mode=mode, learning_rate=lr, strength=strength,
                          checkpoint_modules=checkpoint_modules)
        losses: list[float] = []
        with refiner:
            before = refiner.evaluate(task, fixed)
            if not math.isfinite(before):
                raise SettingError(
                    f"The diffusion model's denoising loss on the photos is {before} before any tuning: the model "
                    "itself gives NaN or infinite outputs, so there is nothing to tune. Load the SDXL model at a "
                    "precision it computes in (fp32, fp16 or bf16; fp8_e8m0fnu, for instance, holds no usable weights).")
            for step, draw in enumerate(train):
                if check_interrupt is not None:
                    check_interrupt()
                losses.append(refiner.step(task, draw))
                if on_step is not None:
                    on_step(step, losses[-1])
            after = refiner.evaluate(task, fixed)
    result = refiner.result(before, after, losses, steps, lr, strength)
    logger.info("HyperLoRA refine: %s", result.report().replace("\n", "; "))
    return result


__all__ = ["DEFAULT_LEARNING_RATE", "DEFAULT_STEPS", "DenoiseTask", "Draw", "EVAL_DRAWS", "MODES", "RefineResult",
           "Refiner", "checkpointed", "epsilon_loss", "eval_draws", "inference_tensors", "plain_copies", "plain_task",
           "refine", "token_factors", "training_draws"]
