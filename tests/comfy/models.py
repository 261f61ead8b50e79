"""The ComfyUI base directory of the tests: this pack in custom_nodes/ and fixture models.

```
custom_nodes/ComfyUI-HyperLoRA-Studio -> the repository
models/hyper_lora/hyper_lora/sdxl_small/       SDXL's 140 modules at their real sizes, K=4, rank 2, with Base-LoRA;
                                               small resampler reading the tiny CLIP (128 wide)
models/hyper_lora/hyper_lora/tiny/             5 small modules (do NOT fit SDXL) - for the size-mismatch error
models/hyper_lora/hyper_lora/sdxl_random_full  -> released sizes (3 GB, cached)
models/hyper_lora/clip_vit/clip_vit_large_14/  tiny random CLIP (Hugging Face layout) + clip_processor/
models/clip_vision/vit_l14_random.safetensors  -> full-size random ViT-L/14 (cached)
models/insightface/models/antelopev2/          -> fake AntelopeV2 pack (cached)
models/checkpoints/sdxl_random.safetensors     -> random SDXL checkpoint (cached, 7 GB)
input/astronaut.png                            skimage.data.astronaut() (a real photo)
input/noface.png                               a photo without a face
```
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from PIL import Image

from tests.fixtures.antelope import blank_image, cached_antelopev2
from tests.fixtures.clip import full_vit_l14_file, make_clip_folder
from tests.fixtures.hyperlora_models import Preset, full_model_folder, sdxl_lora_module_specs, write_hyperlora_folder
from tests.fixtures.sdxl import sdxl_checkpoint

SDXL_SMALL = Preset(
    modules=tuple(sdxl_lora_module_specs()),
    hyper_dim=4, rank=2, dim=32, depth=1, heads=12, dim_head=4, ff_mult=2,
    id_embed_dim=512, num_id_tokens=4, id_token_dim=48, clip_dim=128,
)
from hyperlora.difflora.condition import MifSpec  # noqa: E402
from hyperlora.difflora.dit import DitConfig, LatentDiT  # noqa: E402
from hyperlora.difflora.format import save_difflora_folder  # noqa: E402
from hyperlora.difflora.lae import LaeConfig, LoraAutoencoder  # noqa: E402
from hyperlora.difflora.lora_space import LoraLayout, LoraModule  # noqa: E402
from hyperlora.spec import PACK_FOLDER as PACK_DIR_NAME  # noqa: E402
from hyperlora.standins import TINY as TINY_CLIP  # noqa: E402
SMALL_MODEL = "sdxl_small"
TINY_MODEL = "tiny"
FULL_MODEL = "sdxl_random_full"
CLIP_FOLDER = "clip_vit_large_14"
CLIP_FILE = "clip_vision/vit_l14_random.safetensors"
ANTELOPE = "antelopev2"
CHECKPOINT = "sdxl_random.safetensors"


def _link(target: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(target, link)


def astronaut() -> np.ndarray:
    """``skimage.data.astronaut()``: a real 512x512 portrait (uint8 RGB)."""
    from skimage import data

    return np.ascontiguousarray(data.astronaut())


def faceless_photo() -> np.ndarray:
    """A plain background photo (no face); same size as the astronaut so they batch."""
    return blank_image(512, 512)


# kohya prefix -> (out, in) of three SDXL UNet layers (see test_inprocess.KNOWN_TARGETS)
DIFFLORA_MODULES = {
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q": (640, 640),
    "lora_unet_down_blocks_2_attentions_1_transformer_blocks_5_attn2_to_v": (1280, 2048),
    "lora_unet_up_blocks_1_attentions_1_transformer_blocks_1_attn1_to_v": (640, 640),
}
DIFFLORA_RANK = 2
DIFFLORA_MODEL = "tiny_difflora"
"""The DiffLoRA model folder in the base's models/difflora (its CLIP width is the test CLIP's)."""


def write_tiny_difflora(folder: Path, clip_dim: int, seed: int = 0) -> Path:
    """A random DiffLoRA model folder: LAE (4 latent channels) + DiT (width 32) over :data:`DIFFLORA_MODULES` at rank 2."""
    torch.manual_seed(seed)
    layout = LoraLayout(tuple(LoraModule(p, o, i, DIFFLORA_RANK) for p, (o, i) in DIFFLORA_MODULES.items()))
    lae_config = LaeConfig(latent_channels=4, width=32, depth=1, heads=2)
    lae = LoraAutoencoder(lae_config, layout)
    spec = MifSpec(clip_dim=clip_dim, clip_tokens=5, arcface_tokens=2, width=32)
    tokens, channels = lae.latent_shape
    dit_config = DitConfig(tokens=tokens, channels=channels, width=32, depth=1, heads=2, mlp_ratio=2.0,
                           cond_dim=spec.width, cond_tokens=spec.num_tokens)
    dit = LatentDiT(dit_config, spec)
    for p in dit.parameters():          # the DiT's zero-initialised output layers would make its velocity zero
        if p.dim() > 1 and not bool(p.any()):
            torch.nn.init.normal_(p, std=0.02)
    return save_difflora_folder(folder, lae=lae, lae_config=lae_config, layout=layout, dit_state=dit.state_dict(),
                                dit_config=dit_config.to_dict(), condition=spec.to_dict(), latent_scale=0.5)


def build_base(base: Path, *, cache_dir: Path, comfy: Any, repo: Path) -> SimpleNamespace:
    _link(repo, base / "custom_nodes" / PACK_DIR_NAME)
    models = base / "models"
    hl = models / "hyper_lora"
    write_hyperlora_folder(hl / "hyper_lora" / SMALL_MODEL, preset=SDXL_SMALL, base=True, seed=1)
    write_hyperlora_folder(hl / "hyper_lora" / TINY_MODEL, preset="tiny", seed=2)
    _link(full_model_folder(cache_dir), hl / "hyper_lora" / FULL_MODEL)
    make_clip_folder(hl, name=CLIP_FOLDER)
    _link(full_vit_l14_file(cache_dir), models / CLIP_FILE)
    _link(cached_antelopev2(cache_dir), models / "insightface" / "models" / ANTELOPE)
    _link(sdxl_checkpoint(cache_dir, comfy), models / "checkpoints" / CHECKPOINT)
    write_tiny_difflora(models / "difflora" / DIFFLORA_MODEL, TINY_CLIP["hidden_size"])
    (models / "loras").mkdir(parents=True, exist_ok=True)
    inp = base / "input"
    inp.mkdir(parents=True, exist_ok=True)
    Image.fromarray(astronaut()).save(inp / "astronaut.png")
    Image.fromarray(faceless_photo()).save(inp / "noface.png")
    return SimpleNamespace(base=base, models=models, input=inp, output=base / "output")


# The face settings the node tests pass (the nodes' defaults, spelled out)
FACE = dict(face_choice="largest", face_index=0, remove_background=True, grayscale=False, no_face="skip",
            det_size="640")
