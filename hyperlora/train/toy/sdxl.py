"""A tiny random SDXL in the diffusers folder layout, built offline in about a second.

:func:`tiny_sdxl_folder` writes ``unet/ vae/ text_encoder/ text_encoder_2/ tokenizer/ tokenizer_2/
scheduler/`` and ``model_index.json``; every part loads with ``from_pretrained(folder, subfolder=...)``
without a network.  The shapes follow SDXL with small widths:

* UNet: SDXL's three levels and block types (``DownBlock2D``, ``CrossAttnDownBlock2D`` x2 /
  ``CrossAttnUpBlock2D`` x2, ``UpBlock2D``), one transformer block per attention, so self- and
  cross-attention exist at two levels and in the mid block (14 HyperLoRA modules, kohya names as in
  SDXL: ``lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1`` ...);
  ``cross_attention_dim`` = 32 + 32 (both text encoders' hidden sizes, concatenated as SDXL does),
  ``addition_embed_type="text_time"`` with the pooled width of text encoder 2 (32) and six time ids.
  As in SDXL, GroupNorms have 32 groups and attention heads are 64 wide (here one head per block), so
  ComfyUI's own SDXL model class built with the same sizes computes exactly the same function
  (tests/comfy/test_train_demo_tree.py).
  A forward + backward pass at 16 x 16 latents, batch 4, takes a few tens of milliseconds on a CPU.
* VAE: ``AutoencoderKL`` with four levels (factor 8) and 4 latent channels; its ``scaling_factor``
  is chosen so that latents of toy images (:data:`TOY_SIZE` px) have roughly unit spread.
* Text encoders: a ``CLIPTextModel`` and a ``CLIPTextModelWithProjection`` (hidden 32, 2 layers)
  over a one-token-per-character CLIP tokenizer (:func:`write_tiny_tokenizer`).
* Scheduler: SDXL's ``EulerDiscreteScheduler`` config (scaled_linear 0.00085..0.012, 1000 steps,
  epsilon prediction, ``timestep_spacing="leading"``, ``steps_offset=1``).

The weights are random (seeded); training code treats them as the frozen base model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ...standins import TEXT_HIDDEN, tiny_text_config, write_tiny_tokenizer

if TYPE_CHECKING:  # pragma: no cover
    from diffusers import AutoencoderKL, UNet2DConditionModel

TOY_SIZE = 128
"""Side of a toy image in pixels; latents are ``TOY_SIZE // 8`` = 16 pixels wide."""
VAE_FACTOR = 8
LATENT_CHANNELS = 4
POOLED_DIM = 32
"""Projection width of text encoder 2 (the pooled text embedding)."""
TIME_EMBED_DIM = 8
"""``addition_time_embed_dim``: width of the sinusoidal embedding of each of the six time ids."""
VAE_SCALING_FACTOR = 1.0
"""Set by :func:`_calibrated_vae` from the toy images' latent spread; see there."""

SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "interpolation_type": "linear", "steps_offset": 1,
    "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
    "clip_sample": False, "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
}
"""SDXL base 1.0's ``scheduler/scheduler_config.json`` values (facts, not fetched)."""


def unet_config() -> dict[str, Any]:
    """``UNet2DConditionModel`` keyword arguments of the tiny SDXL-shaped UNet."""
    return dict(
        sample_size=TOY_SIZE // VAE_FACTOR, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64), layers_per_block=1, transformer_layers_per_block=1,
        attention_head_dim=(1, 1, 1), norm_num_groups=32, cross_attention_dim=2 * TEXT_HIDDEN,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=POOLED_DIM + 6 * TIME_EMBED_DIM,
    )


def tiny_unet(*, seed: int = 0) -> UNet2DConditionModel:
    """The tiny SDXL-shaped UNet with seeded random weights (the same as in :func:`tiny_sdxl_folder`).

    Inputs: sample ``[B, 4, h, w]`` (h, w multiples of 4), timestep, encoder_hidden_states ``[B, L, 64]``,
    ``added_cond_kwargs={"text_embeds": [B, 32], "time_ids": [B, 6]}``; output ``.sample [B, 4, h, w]``.
    """
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_config())
    return unet


def vae_config() -> dict[str, Any]:
    """``AutoencoderKL`` keyword arguments: four levels (three downsamplings: factor 8), 4 latent channels."""
    return dict(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, block_out_channels=(16, 16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=8, sample_size=TOY_SIZE, scaling_factor=VAE_SCALING_FACTOR,
    )


def _calibrated_vae(seed: int) -> AutoencoderKL:
    """The random VAE with ``scaling_factor`` = 1 / std of the latent means of a smooth test pattern,
    so that ``latents * scaling_factor`` has about unit spread (as SDXL's 0.13025 does for real photos)."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**vae_config())
    y, x = torch.meshgrid(torch.linspace(-1, 1, TOY_SIZE), torch.linspace(-1, 1, TOY_SIZE), indexing="ij")
    pattern = torch.stack([x, y, (x * y * 3).sin()]).unsqueeze(0) * 0.8
    with torch.no_grad():
        latents = vae.encode(pattern).latent_dist.mean
    std = float(latents.std())
    vae.register_to_config(scaling_factor=round(1.0 / max(std, 1e-6), 5))
    return vae


def tiny_sdxl_folder(folder: Path, *, seed: int = 0) -> Path:
    """Write a diffusers-layout tiny SDXL into ``folder`` (created) and return it.

    Layout: ``unet/ vae/ text_encoder/ text_encoder_2/ tokenizer/ tokenizer_2/ scheduler/ model_index.json``;
    each part loads with ``from_pretrained(folder, subfolder=...)`` offline, and
    ``StableDiffusionXLPipeline.from_pretrained(folder)`` assembles them.  Same ``seed`` -> same weights.
    """
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tiny_unet(seed=seed).save_pretrained(folder / "unet")
    _calibrated_vae(seed).save_pretrained(folder / "vae")
    for i, (name, cls, extra) in enumerate((("", CLIPTextModel, {}),
                                            ("_2", CLIPTextModelWithProjection, {"projection_dim": POOLED_DIM}))):
        tok = write_tiny_tokenizer(folder / f"tokenizer{name}")
        tok.save_pretrained(folder / f"tokenizer{name}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 2 + i)
            model = cls(CLIPTextConfig(**tiny_text_config(tok, **extra)))
        model.save_pretrained(folder / f"text_encoder{name}")
    scheduler = diffusers.EulerDiscreteScheduler.from_config(
        {k: v for k, v in SCHEDULER_CONFIG.items() if not k.startswith("_")})
    scheduler.save_pretrained(folder / "scheduler")
    index = {
        "_class_name": "StableDiffusionXLPipeline", "_diffusers_version": diffusers.__version__,
        "force_zeros_for_empty_prompt": True, "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


__all__ = ["LATENT_CHANNELS", "POOLED_DIM", "SCHEDULER_CONFIG", "TEXT_HIDDEN", "TOY_SIZE", "VAE_FACTOR",
           "tiny_sdxl_folder", "tiny_text_config", "tiny_unet", "unet_config", "vae_config", "write_tiny_tokenizer"]
