"""bench/bench_refine.py --smoke runs (it builds ComfyUI's SDXL UNet class, so it lives in the ComfyUI tier)."""

from __future__ import annotations

import re

import pytest

from tests.core.test_bench_quality import _script

pytestmark = pytest.mark.comfy


def test_bench_refine_smoke(comfy_root, capsys):
    from tests.comfy.conftest import comfy_checkout

    root, _reason = comfy_checkout()
    assert _script("bench_refine").main(["--smoke", "--comfyui", str(root)]) == 0
    out = capsys.readouterr().out
    for name in ("plain fwd+bwd", "lora step", "coefficients step"):
        assert re.search(rf"^{re.escape(name)}\s+[0-9.]+\s+[0-9.]+\s+[0-9.]+\s+[0-9.]+", out, re.M), out
    assert "coefficients / lora step:" in out
