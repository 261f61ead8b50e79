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
from hyperlora.spec import PACK_FOLDER as PACK_DIR_NAME  # noqa: E402
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
    (models / "loras").mkdir(parents=True, exist_ok=True)
    inp = base / "input"
    inp.mkdir(parents=True, exist_ok=True)
    Image.fromarray(astronaut()).save(inp / "astronaut.png")
    Image.fromarray(faceless_photo()).save(inp / "noface.png")
    return SimpleNamespace(base=base, models=models, input=inp, output=base / "output")


# The face settings the node tests pass (the nodes' defaults, spelled out)
FACE = dict(face_choice="largest", face_index=0, remove_background=True, grayscale=False, no_face="skip",
            det_size="640")
