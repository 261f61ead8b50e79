"""The Loader's ``auto`` precision inside ComfyUI (in-process): the CPU decision of hyperlora.precision,
from the CPU's capabilities; ``fp32`` stays fp32."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.comfy.models import ANTELOPE, CLIP_FOLDER, SMALL_MODEL

pytestmark = pytest.mark.comfy


def _load(pack: Any, dtype: str) -> Any:
    handle, _info = pack.nodes["HyperLoRAStudioLoader"]().load(model=SMALL_MODEL, clip_vision=CLIP_FOLDER,
                                                                insightface=ANTELOPE, dtype=dtype, provider="CPU")
    return handle


@pytest.mark.parametrize("flags, expected", [
    ({"avx2", "avx512f"}, torch.float32),                       # AVX-512 without bf16 hardware (this CI box)
    ({"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}, torch.bfloat16),   # Sapphire Rapids
])
def test_auto_follows_the_cpu_capabilities(pack: Any, monkeypatch: pytest.MonkeyPatch, flags: set[str],
                                           expected: torch.dtype) -> None:
    precision = pack.core("precision")
    features = precision.CpuFeatures("x86_64", "AVX512", frozenset(flags), "faked")
    monkeypatch.setattr(precision, "read_cpu_features", lambda: features)
    precision.reset()
    try:
        handle = _load(pack, "auto")
        assert handle.model.module_dtype == expected          # resampler / ID projector
        assert handle.clip.dtype == expected
        assert handle.model.basis_dtype == torch.float16       # the basis stays as stored
    finally:
        precision.reset()


def test_fp32_stays_fp32(pack: Any) -> None:
    handle = _load(pack, "fp32")
    assert handle.model.module_dtype == torch.float32 and handle.model.basis_dtype == torch.float32
    assert handle.clip.dtype == torch.float32
