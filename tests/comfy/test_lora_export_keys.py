"""An exported HyperLoRA LoRA is understood by ComfyUI's own LoRA loader, key for key.

Takes ComfyUI's real SDXL model class as ComfyUI detects it, on the ``meta``
device (no weights, no memory; ``tests/fixtures/sdxl.py``), asks
``comfy.lora.model_lora_keys_unet`` for its key map, and feeds the exported file
through ``comfy.lora.load_lora`` as the core LoraLoader does.  Skipped by
tests/comfy/conftest.py when COMFYUI_PATH is not a ComfyUI checkout.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from hyperlora.lora import weighted_sum
from hyperlora.lora_file import lora_metadata, save_lora_file
from tests.fixtures.hyperlora_models import sdxl_lora_module_specs
from tests.fixtures.loras import random_lora

pytestmark = pytest.mark.comfy


@pytest.fixture(scope="module")
def comfy_sdxl(comfy: Any) -> tuple[Any, Any, dict[str, str]]:
    """(comfy package, ComfyUI's SDXL model on meta, its LoRA key map)."""
    import comfy.lora

    from tests.fixtures.sdxl import meta_model

    model = meta_model(comfy, "SDXL")
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
        assert alpha == 4.0  # alpha = rank / 2 (format §5.6)
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


def test_a_misnamed_module_would_be_caught(tmp_path, comfy_sdxl, caplog):
    """The check above can fail: ComfyUI reports a key it cannot map, and so does this test."""
    comfy, _, key_map = comfy_sdxl
    lora = random_lora(sdxl_lora_module_specs()[:1], rank=2, seed=6)
    bad = {k.replace("transformer_blocks_0", "transformer_blocks_99"): v for k, v in lora.items()}
    path = tmp_path / "bad.safetensors"
    save_lora_file(bad, path)
    with pytest.raises(AssertionError, match="lora key not loaded: .*transformer_blocks_99"):
        _load_through_comfy(comfy, key_map, path, caplog)
