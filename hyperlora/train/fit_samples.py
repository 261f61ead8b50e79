"""``fit``'s sample pictures (``samples/step-XXXXXX.png`` in the run folder, every ``sample_every`` steps on CUDA).

A row of pictures, one per sample, each made with the LoRA generated from that sample's own features: 20 DDIM
steps (eta 0) of the frozen UNet from seeded noise, decoded by the SDXL VAE.  (Evaluating identity in
pictures made on any device is :mod:`hyperlora.train.sampler` and :mod:`hyperlora.train.idsim`.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..lora_functional import LORA_SCALE, LoraTerm, applied, diffusers_lora_targets
from . import engine
from .config import FitConfig
from .data import collate
from .hypernet import TrainableHyperLoRA


@torch.no_grad()
def sample_images(cfg: FitConfig, model: TrainableHyperLoRA, unet: nn.Module, noise_scheduler: Any,
                  dataset: torch.utils.data.Dataset, path: Path, *, device: torch.device, is_main: bool = True,
                  count: int = 4, steps: int = 20) -> Path | None:
    """A row of ``count`` images: each of the first ``count`` samples with its own generated LoRA (ID +
    Base), its caption with trigger words, 20 DDIM steps (eta 0) from seeded noise, decoded by the VAE.

    Called every ``sample_every`` steps when CUDA is present (slow on a CPU, but it runs there too).
    Every process must call it: the generator runs on all of them (under FSDP2 its forward gathers the
    shards, a collective), then the main process alone runs the frozen UNet and the VAE.
    """
    from PIL import Image

    from .frozen import load_vae

    batch = collate([dataset[i] for i in range(min(count, len(dataset)))], device)
    b = batch["latents"].shape[0]
    idf, basef = model(batch["arcface"], batch["clip_id"], batch["clip_base"] if model.has_base else None,
                       want_base=model.has_base)
    engine.reshard(model)
    if not is_main:
        return None
    vae = load_vae(Path(cfg.base_model), device=device)
    terms = [LoraTerm(idf, LORA_SCALE)] + ([LoraTerm(basef, LORA_SCALE)] if basef is not None else [])
    targets = diffusers_lora_targets(unet)
    ac = noise_scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
    T = ac.shape[0]
    ts = list(range(T - 1, -1, -T // steps))
    x = torch.randn(batch["latents"].shape, generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    dtype = next(unet.parameters()).dtype
    with applied(targets, terms, strict=False):
        for j, t in enumerate(ts):
            a = ac[t]
            a_prev = ac[ts[j + 1]] if j + 1 < len(ts) else torch.tensor(1.0, device=device)
            eps = unet(x.to(dtype), torch.full((b,), t, device=device), encoder_hidden_states=batch["text"].to(dtype),
                       added_cond_kwargs={"text_embeds": batch["pooled"].to(dtype),
                                          "time_ids": batch["time_ids"].to(dtype)}).sample.float()
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    img = vae.decode(x / vae.config.scaling_factor).sample.float().clamp(-1, 1)
    img = ((img + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    row = Image.new("RGB", (img.shape[2] * b, img.shape[1]))
    for i in range(b):
        row.paste(Image.fromarray(img[i]), (i * img.shape[2], 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    row.save(path)
    return path


__all__ = ["sample_images"]
