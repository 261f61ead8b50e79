"""An exported HyperLoRA LoRA is understood by ComfyUI's own LoRA loader, key for key.

Builds ComfyUI's real SDXL model class on the ``meta`` device (no weights, no
memory), asks ``comfy.lora.model_lora_keys_unet`` for its key map, and feeds the
exported file through ``comfy.lora.load_lora`` as the core LoraLoader does.
Skipped when COMFYUI_PATH does not point at a ComfyUI checkout.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest
import torch

from hyperlora.lora import lora_metadata, save_lora_file, weighted_sum
from tests.fixtures.hyperlora_models import sdxl_lora_module_specs
from tests.fixtures.loras import random_lora

COMFY = os.environ.get("COMFYUI_PATH", "")
if not COMFY or not (Path(COMFY) / "comfy" / "lora.py").is_file():
    pytest.skip(
        "COMFYUI_PATH is not set to a ComfyUI checkout (needs comfy/lora.py); the ComfyUI tier is skipped",
        allow_module_level=True,
    )

pytestmark = pytest.mark.comfy

# ComfyUI's detected unet_config of an SDXL base checkpoint.
SDXL_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
    "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
    "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
    "context_dim": 2048, "num_head_channels": 64, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}


@pytest.fixture(scope="module")
def comfy_sdxl():
    """(comfy module namespace, SDXL model on meta, its LoRA key map)."""
    root = str(Path(COMFY).resolve())
    if root not in sys.path:
        sys.path.insert(0, root)
    from comfy.cli_args import args

    args.cpu = True  # this machine has no GPU; must be set before comfy.model_management is imported
    import comfy.lora
    import comfy.supported_models
    import comfy.utils

    config = comfy.supported_models.SDXL(dict(SDXL_UNET_CONFIG))
    with torch.device("meta"):
        model = config.get_model({}, device="meta")
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    return comfy, model, key_map


def _load_through_comfy(comfy, key_map, path: Path, caplog) -> dict:
    sd = comfy.utils.load_torch_file(str(path), safe_load=True)
    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(sd, key_map)
    not_loaded = [r.getMessage() for r in caplog.records if "not loaded" in r.getMessage()]
    assert not not_loaded, not_loaded[:3]
    return patches


def test_every_exported_module_maps_onto_an_sdxl_weight(tmp_path, comfy_sdxl, caplog):
    comfy, model, key_map = comfy_sdxl
    lora = random_lora(sdxl_lora_module_specs(), rank=8, seed=3, dtype=torch.float16)
    path = tmp_path / "hyperlora_test.safetensors"
    save_lora_file(lora, path, metadata=lora_metadata(title="test", num_images=1))
    patches = _load_through_comfy(comfy, key_map, path, caplog)
    assert len(patches) == 560
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    for weight_key, adapter in patches.items():
        up, down, alpha = adapter.weights[0], adapter.weights[1], adapter.weights[2]
        assert tuple(shapes[weight_key]) == (up.shape[0], down.shape[1]), weight_key
        assert alpha == 4.0  # alpha = rank / 2 (facts §5.6)
    targets = {k.split("diffusion_model.", 1)[1] for k in patches}
    assert sum(".attn2.to_k." in k for k in targets) == 70 and sum(".to_out.0." in k for k in targets) == 140


def test_combined_lora_maps_too(tmp_path, comfy_sdxl, caplog):
    comfy, _, key_map = comfy_sdxl
    a = random_lora(sdxl_lora_module_specs(), rank=8, seed=4, dtype=torch.float16)
    b = random_lora(sdxl_lora_module_specs(), rank=4, seed=5, dtype=torch.float16)
    path = tmp_path / "mix.safetensors"
    save_lora_file(weighted_sum([a, b], [0.6, 0.4]), path)
    patches = _load_through_comfy(comfy, key_map, path, caplog)
    assert len(patches) == 560
    first = next(iter(patches.values()))
    assert first.weights[1].shape[0] == 12 and first.weights[2] == 12.0
