"""The Loader's ``auto`` precision (hyperlora/precision.py): decided from the CPU's capabilities, logged
once, within the measured tolerance of fp32; fp32 stays exact."""

from __future__ import annotations

import logging

import pytest
import torch

from hyperlora import precision
from hyperlora.precision import CpuFeatures, auto_precision, cpu_precision

AVX2_LAPTOP = CpuFeatures("x86_64", "AVX2", frozenset({"sse4_2", "avx", "avx2", "fma", "f16c"}), "Core i7-8550U")
AVX512_NO_BF16 = CpuFeatures("x86_64", "AVX512", frozenset({"avx2", "avx512f", "avx512bw", "avx512vl",
                                                            "avx512_vnni"}), "Xeon Cascade Lake")
AVX512_BF16 = CpuFeatures("x86_64", "AVX512", AVX512_NO_BF16.flags | {"avx512_bf16"}, "Xeon Cooper Lake")
SAPPHIRE_RAPIDS = CpuFeatures("x86_64", "AVX512", AVX512_BF16.flags | {"amx_tile", "amx_bf16", "amx_int8",
                                                                       "avx512_fp16"}, "Xeon Sapphire Rapids")
FP16_ONLY = CpuFeatures("x86_64", "AVX512", AVX512_NO_BF16.flags | {"avx512_fp16"}, "made up")
ARM = CpuFeatures("aarch64", "DEFAULT", frozenset({"fp", "asimd"}), "")


@pytest.mark.parametrize("features, expected", [
    (AVX2_LAPTOP, torch.float32),
    (AVX512_NO_BF16, torch.float32),
    (AVX512_BF16, torch.bfloat16),
    (SAPPHIRE_RAPIDS, torch.bfloat16),
    (FP16_ONLY, torch.float16),
    (ARM, torch.float32),
])
def test_cpu_decision_from_capabilities(features: CpuFeatures, expected: torch.dtype) -> None:
    choice = cpu_precision(features)
    assert choice.dtype == expected
    assert choice.reason.startswith(precision.dtype_name(expected) + ":")
    assert features.capability in choice.reason


def test_a_precision_outside_the_tolerance_is_never_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(precision.MEASURED_REL_ERROR, "bf16", {"identity tokens": 0.5, "LoRA": 0.001})
    assert not precision.within_tolerance("bf16")
    assert cpu_precision(SAPPHIRE_RAPIDS).dtype == torch.float16        # next fastest within tolerance
    assert cpu_precision(AVX512_BF16).dtype == torch.float32
    assert auto_precision("cuda", device_prefers=(torch.bfloat16,)).dtype == torch.float32
    assert auto_precision("cuda", device_prefers=(torch.bfloat16, torch.float16)).dtype == torch.float16


def test_accelerators_follow_the_host_choice() -> None:
    assert auto_precision("cuda:0", device_prefers=(torch.float16,)).dtype == torch.float16
    assert auto_precision("cuda:0", device_prefers=(torch.bfloat16,)).dtype == torch.bfloat16
    assert auto_precision("cuda:0").dtype == torch.float32


def test_measured_errors_are_filled_in_and_within_tolerance() -> None:
    for name in ("bf16", "fp16"):
        errors = precision.MEASURED_REL_ERROR[name]
        assert set(errors) == {"identity tokens", "LoRA"}
        assert all(0.0 < e <= precision.TOLERANCE for e in errors.values()), (name, errors)


def test_the_cpu_choice_is_decided_and_logged_once(monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    calls = []

    def fake_features() -> CpuFeatures:
        calls.append(1)
        return SAPPHIRE_RAPIDS

    monkeypatch.setattr(precision, "read_cpu_features", fake_features)
    precision.reset()
    try:
        with caplog.at_level(logging.INFO, logger="hyperlora.precision"):
            first = auto_precision("cpu")
            second = auto_precision(torch.device("cpu"))
            third = precision.cpu_auto_precision()
        assert first is second is third
        assert first.dtype == torch.bfloat16
        assert len(calls) == 1
        records = [r for r in caplog.records if r.name == "hyperlora.precision"]
        assert len(records) == 1 and "bf16" in records[0].getMessage() and "amx_bf16" in records[0].getMessage()
    finally:
        precision.reset()


def test_this_machine_is_read() -> None:
    features = precision.read_cpu_features()
    assert features.capability == torch.backends.cpu.get_cpu_capability()
    if torch.cpu._is_avx2_supported():
        assert "avx2" in features.flags
    assert cpu_precision(features).dtype in (torch.float32, torch.bfloat16, torch.float16)


def test_cpuinfo_parsing(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu avx2 AVX512_BF16 amx_bf16\n\n"
                    "processor\t: 1\nmodel name\t: Test CPU 9000\nflags\t\t: fpu\n")
    monkeypatch.setattr(precision, "CPUINFO", info)
    features = precision.read_cpu_features()
    assert {"avx512_bf16", "amx_bf16", "avx2"} <= features.flags
    assert features.model == "Test CPU 9000"
    assert cpu_precision(features).dtype == torch.bfloat16
    monkeypatch.setattr(precision, "CPUINFO", tmp_path / "missing")
    assert precision.read_cpu_features().capability == torch.backends.cpu.get_cpu_capability()


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_reduced_precision_stays_within_the_tolerance(tmp_path, name: str) -> None:
    """The premise of ``auto``: the resampler and ID projector in bf16/fp16 give tokens and a LoRA within
    TOLERANCE of fp32 (the tiny model; the README's numbers are the full size's)."""
    from bench.bench_precision import lora_relative_error, relative_error, set_module_precision
    from hyperlora.checkpoint import load_hyper_lora
    from hyperlora.generate import clear_token_cache
    from tests.fixtures.hyperlora_models import write_hyperlora_folder

    model = load_hyper_lora(write_hyperlora_folder(tmp_path / "m", preset="tiny", seed=3),
                            resampler_dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    e = torch.nn.functional.normalize(torch.randn(1, 512, generator=g), dim=-1)
    c = torch.randn(1, 257, model.arch.resampler.embed_dims[-1], generator=g)
    out = {}
    for dtype in (torch.float32, precision.PRECISIONS[name]):
        set_module_precision(model, dtype)
        with torch.inference_mode():
            tokens = model.id_tokens(id_embeds=e.to(dtype), clip_features=c.to(dtype), use_cache=False).float()
            out[dtype] = (tokens, {k: v.float() for k, v in model.build_lora(tokens).items()})
    clear_token_cache()
    (t32, l32), (tp, lp) = out[torch.float32], out[precision.PRECISIONS[name]]
    tok_err, lora_err = relative_error(tp, t32), lora_relative_error(lp, l32)
    assert 0.0 < tok_err <= precision.TOLERANCE
    assert 0.0 < lora_err <= precision.TOLERANCE
    assert precision.within_tolerance(name)
