"""Fixtures shared by the core tests: a tiny random CLIP vision model in the released HF layout."""

from __future__ import annotations

import pytest

from tests.fixtures.clip import make_clip_folder


@pytest.fixture(scope="module")
def clip_dirs(tmp_path_factory):
    """``.model`` / ``.processor`` folders of a tiny random CLIP vision model (one per test module)."""
    return make_clip_folder(tmp_path_factory.mktemp("hyper_lora"))


@pytest.fixture(scope="module")
def clip(clip_dirs):
    """The pack's encoder on :func:`clip_dirs` (fp32, the size check for ViT-L/14 off)."""
    from hyperlora.encoders import ClipVisionEncoder

    return ClipVisionEncoder.from_pretrained(clip_dirs.model, clip_dirs.processor, require_vit_l14=False)
