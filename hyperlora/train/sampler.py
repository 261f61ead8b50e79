"""DDIM sampling (eta 0) of a diffusers SDXL UNet through the functional LoRA, on any device (CPU included).

The LoRA is applied exactly as ``fit`` applies it while training: :func:`hyperlora.lora_functional.applied`
hooks add ``scale * up(down(x))`` inside the attention projections, per sample when the factors have a batch
dimension, broadcast when it is 1.  No weight is merged, nothing is copied.

Shapes: latents ``[B, 4, h, w]`` (already multiplied by the VAE's scaling factor), ``text [B, L, C]``,
``pooled [B, P]``, ``time_ids [B, 6]``; images out are uint8 RGB ``[B, H, W, 3]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from ..lora_functional import LoraTerm, applied, diffusers_lora_targets

DEFAULT_STEPS = 20
"""DDIM steps of a sample (the same as fit's GPU samples)."""


@dataclass(frozen=True)
class Conditioning:
    """The UNet's text and size conditioning of a batch (``text [B, L, C]``, ``pooled [B, P]``, ``time_ids [B, 6]``)."""

    text: Tensor
    pooled: Tensor
    time_ids: Tensor

    def __post_init__(self) -> None:
        b = self.text.shape[0]
        if self.text.dim() != 3 or self.pooled.shape[0] != b or self.time_ids.shape != (b, 6):
            raise ValueError(f"conditioning shapes must be text [B, L, C], pooled [B, P], time_ids [B, 6]; got "
                             f"{list(self.text.shape)}, {list(self.pooled.shape)}, {list(self.time_ids.shape)}")


def ddim_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """Descending timesteps ``T-1, T-1-T//steps, ...`` (``steps`` of them, the last one >= 0)."""
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"DDIM steps must be in 1..{num_train_timesteps}, got {steps}")
    stride = num_train_timesteps // steps
    return [num_train_timesteps - 1 - j * stride for j in range(steps)]


@torch.no_grad()
def ddim_sample(unet: nn.Module, alphas_cumprod: Tensor, noise: Tensor, cond: Conditioning, *,
                terms: Sequence[LoraTerm] = (), steps: int = DEFAULT_STEPS,
                targets: Mapping[str, nn.Module] | None = None) -> Tensor:
    """Deterministic DDIM from ``noise`` ``[B, 4, h, w]`` to clean latents ``[B, 4, h, w]`` (float32).

    ``terms``: LoRAs applied during every UNet call (none: the base model).  ``alphas_cumprod``: the
    training schedule's ``[T]``.  Same noise and conditioning -> the same latents.
    """
    device = noise.device
    dtype = next(unet.parameters()).dtype
    ac = alphas_cumprod.to(device=device, dtype=torch.float32)
    ts = ddim_timesteps(int(ac.shape[0]), steps)
    b = noise.shape[0]
    x = noise.float()
    kwargs = dict(encoder_hidden_states=cond.text.to(device, dtype),
                  added_cond_kwargs={"text_embeds": cond.pooled.to(device, dtype), "time_ids": cond.time_ids.to(device, dtype)})
    hooks = applied(targets if targets is not None else diffusers_lora_targets(unet), list(terms)) if terms else None
    if hooks is not None:
        hooks.__enter__()
    try:
        for j, t in enumerate(ts):
            a = ac[t]
            a_prev = ac[ts[j + 1]] if j + 1 < len(ts) else torch.tensor(1.0, device=device)
            eps = unet(x.to(dtype), torch.full((b,), t, device=device, dtype=torch.long), **kwargs).sample.float()
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    finally:
        if hooks is not None:
            hooks.__exit__(None, None, None)
    return x


@torch.no_grad()
def decode(vae: nn.Module, latents: Tensor, *, chunk: int = 16) -> np.ndarray:
    """Latents ``[B, 4, h, w]`` (scaled) -> uint8 RGB ``[B, 8h, 8w, 3]`` through ``vae`` (diffusers AutoencoderKL)."""
    scale = float(vae.config.scaling_factor)  # type: ignore[union-attr]
    dtype = next(vae.parameters()).dtype
    out = []
    for i in range(0, latents.shape[0], chunk):
        img = vae.decode((latents[i:i + chunk] / scale).to(dtype)).sample.float().clamp(-1, 1)  # type: ignore[operator]
        out.append(((img + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu())
    return torch.cat(out).numpy()


def seeded_noise(shape: Sequence[int], seeds: Sequence[int]) -> Tensor:
    """One ``shape`` (``[4, h, w]``) noise per seed from ``torch.Generator().manual_seed(seed)``: ``[len(seeds), *shape]``."""
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds])


__all__ = ["Conditioning", "DEFAULT_STEPS", "ddim_sample", "ddim_timesteps", "decode", "seeded_noise"]
