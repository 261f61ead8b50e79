"""Training and sampling maths of DiffLoRA's latent diffusion: rectified flow (flow matching), Euler sampler.

The paper does not say which schedule it uses; our choice is **rectified flow**:

* ``x_t = (1 - t) * x0 + t * eps`` with ``eps ~ N(0, I)`` and ``t`` in [0, 1] (0 = data, 1 = pure noise);
* the DiT predicts the velocity ``v = eps - x0`` (the time derivative of ``x_t``); the loss is its mean
  squared error, with ``t ~ U(0, 1)``;
* sampling integrates ``dx/dt = v`` from ``t = 1`` to ``t = 0`` with ``steps`` uniform Euler steps.

Why: the straight noise-to-data paths of rectified flow are integrated well by a plain Euler sampler in few
steps (tens, not hundreds), the sampler is deterministic given the starting noise (a seed gives the same
LoRA every time, as a ComfyUI user expects), and the loss has no schedule constants to get wrong.  LAE
latents are scaled to about unit std, which matches the unit-variance noise end point.

Classifier-free guidance on the MIF condition: ``v = v_uncond + g * (v_cond - v_uncond)``, with the
unconditional branch using the learned null condition (:class:`~.condition.MifEncoder`); ``g = 1`` runs the
conditional pass only.  ``cond=None`` samples unconditionally: a person who does not exist.

The model is any callable ``model(x_t [B, T, C], t [B], cond [B, M, D] | None, drop_mask [B] | None)``
returning ``[B, T, C]`` (:class:`~.dit.LatentDiT`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import Tensor

from ..errors import SettingError

MAX_STEPS = 1000
"""Most sampling steps accepted (more change nothing visible and only cost time)."""
MAX_GUIDANCE = 30.0
"""Largest guidance scale accepted: far past any useful value; larger ones blow the latents up."""


class Denoiser(Protocol):
    def __call__(self, x_t: Tensor, t: Tensor, cond: Tensor | None, drop_mask: Tensor | None = None) -> Tensor: ...


def _param_device(model: object) -> torch.device:
    params = getattr(model, "parameters", None)
    if params is not None:
        for p in params():
            return p.device
    return torch.device("cpu")


def noisy_latents(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """``x0, noise [B, T, C]``, ``t [B]`` -> ``x_t = (1 - t) x0 + t noise``."""
    tt = t.to(x0.dtype)[:, None, None]
    return (1 - tt) * x0 + tt * noise


def training_loss(model: Denoiser, x0: Tensor, cond: Tensor | None, drop_prob: float,
                  generator: torch.Generator | None = None) -> Tensor:
    """Flow-matching loss of one batch: a scalar, ``mean((model(x_t, t, cond, drop) - (eps - x0))^2)``.

    ``x0 [B, T, C]``: clean latents.  ``cond [B, M, D]``: their condition tokens (keep them in the graph to
    train the condition encoder too), or None (unconditional training).  ``drop_prob``: each sample's
    condition is replaced by the null condition with this probability (classifier-free guidance needs it,
    e.g. 0.1).  ``generator``: a CPU generator for ``t``, the noise and the dropout draws (reproducible runs).
    """
    if not (isinstance(drop_prob, (int, float)) and 0.0 <= drop_prob <= 1.0):
        raise SettingError(f"drop_prob is {drop_prob!r}; it must be a probability between 0 and 1 (e.g. 0.1).")
    if x0.dim() != 3:
        raise SettingError(f"training_loss: the latents must be [B, T, C], got {list(x0.shape)}.")
    b = x0.shape[0]
    t = torch.rand(b, generator=generator)
    noise = torch.randn(tuple(x0.shape), generator=generator)
    drop = torch.rand(b, generator=generator) < drop_prob
    t, noise = t.to(x0.device), noise.to(device=x0.device, dtype=x0.dtype)
    x_t = noisy_latents(x0, noise, t)
    pred = model(x_t, t, cond, drop.to(x0.device) if cond is not None else None)
    return torch.mean((pred.float() - (noise - x0).float()) ** 2)


def initial_noise(shape: Sequence[int], seeds: Sequence[int]) -> Tensor:
    """The starting noise ``[B, T, C]`` float32 on the CPU: sample ``i`` drawn from its own generator seeded
    ``seeds[i]``, so a sample does not depend on the others in its batch."""
    b, tokens, channels = (int(v) for v in shape)
    return torch.stack([torch.randn(tokens, channels, generator=torch.Generator().manual_seed(int(s)))
                        for s in seeds]) if b else torch.empty(0, tokens, channels)


def _seeds(seed: int | Sequence[int], batch: int | None) -> list[int]:
    if isinstance(seed, bool):
        raise SettingError(f"seed is {seed!r}; give a whole number or one per sample.")
    if isinstance(seed, int):
        if batch is None:
            batch = 1
        if not 0 <= seed <= 2 ** 63 - 1 - batch:
            raise SettingError(f"seed {seed} is out of range; use 0 to 2**63 - {batch + 1}.")
        return [seed + i for i in range(batch)]
    seeds = [int(s) for s in seed]
    if batch is not None and len(seeds) != batch:
        raise SettingError(f"got {len(seeds)} seeds for {batch} samples; give one seed per sample "
                           "(or one whole number: sample i then uses seed + i).")
    if not seeds or any(not 0 <= s <= 2 ** 63 - 1 for s in seeds):
        raise SettingError(f"seeds {seeds[:4]} must be one or more whole numbers from 0 to 2**63 - 1.")
    return seeds


@torch.no_grad()
def sample(model: Denoiser, cond: Tensor | None, *, steps: int, guidance: float = 1.0,
           seed: int | Sequence[int] | None = None, generator: torch.Generator | None = None,
           shape: Sequence[int] | None = None,
           callback: Callable[[int, int], None] | None = None,
           check_interrupt: Callable[[], None] | None = None) -> Tensor:
    """Sample clean latents ``x0 [B, T, C]`` (float32, on the model's device) by Euler steps from ``t = 1`` to 0.

    ``cond [B, M, D]``: condition tokens (``model.encode(...)``), or None for unconditional samples (the null
    condition; ``guidance`` is then unused).  ``guidance`` g: ``v_u + g (v_c - v_u)``; 1 runs the conditional
    pass only.  The noise comes from ``seed`` (an int: sample i uses ``seed + i``; or one seed per sample), each
    sample from its own CPU generator, so sample i of a batch equals the single sample with its seed; or from
    ``generator`` (the whole batch in one draw).  Same seed, same model, CPU: the same latents.
    ``shape``: ``(B, T, C)``; by default ``T, C`` from ``model.config`` and B from ``cond`` or the seeds.
    ``callback(done, steps)`` is called after each step (progress bars); ``check_interrupt()`` before each step
    (it raises to stop, e.g. ComfyUI's interruption check).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise SettingError(f"steps is {steps!r}; use a whole number from 1 to {MAX_STEPS} (20 to 50 is plenty).")
    if not (isinstance(guidance, (int, float)) and math.isfinite(guidance) and 0 <= guidance <= MAX_GUIDANCE):
        raise SettingError(f"guidance is {guidance!r}; use a number from 0 to {MAX_GUIDANCE:g} (1 = no guidance, "
                           "about 2 to 5 sticks closer to the reference photos).")
    if (seed is None) == (generator is None):
        raise SettingError("give exactly one of seed and generator for the starting noise.")
    batch = None if cond is None else int(cond.shape[0])
    if shape is not None:
        shape = tuple(int(v) for v in shape)
        if len(shape) != 3 or (batch is not None and shape[0] != batch):
            raise SettingError(f"shape {list(shape)} must be (B, T, C) with B = {batch}, the condition's batch.")
        batch = shape[0]
    else:
        config = getattr(model, "config", None)
        if config is None:
            raise SettingError("give shape = (B, T, C): the model has no config to take T and C from.")
        if batch is None and seed is not None and not isinstance(seed, int):
            batch = len(list(seed))
        shape = (batch if batch is not None else 1, config.tokens, config.channels)
    if seed is not None:
        x = initial_noise(shape, _seeds(seed, shape[0]))
    else:
        x = torch.randn(shape, generator=generator)
    device = _param_device(model)
    x = x.to(device)
    b = shape[0]
    guided = cond is not None and guidance != 1
    if guided:
        cond_in = torch.cat([cond, cond])
        drop = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)]).to(device)
    else:
        cond_in, drop = cond, None
    for i in range(steps):
        if check_interrupt is not None:
            check_interrupt()
        t_now, t_next = 1.0 - i / steps, 1.0 - (i + 1) / steps
        if guided:
            t = torch.full((2 * b,), t_now, device=device)
            v_c, v_u = model(torch.cat([x, x]), t, cond_in, drop).float().chunk(2)
            v = v_u + guidance * (v_c - v_u)
        else:
            v = model(x, torch.full((b,), t_now, device=device), cond_in, None).float()
        x = x + (t_next - t_now) * v
        if callback is not None:
            callback(i + 1, steps)
    return x
