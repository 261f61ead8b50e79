"""Every LoRA-build strategy on every path it can run on: 1 and several torch threads, inference
mode / no_grad / grad mode, fp16 / bf16 / fp32, against a float64 reference.

The ``mv`` strategy is what runs without a C compiler, on ARM and for fp32/bf16 bases; with one
worker thread inside inference mode it once wrote into an inference tensor outside inference mode
and crashed ("Inplace update to inference tensor outside InferenceMode is not allowed").
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from hyperlora import cpu_kernel
from hyperlora.checkpoint import load_hyper_lora
from hyperlora.errors import LoraError
from hyperlora.generate import batched_matvec, batched_matvecs
from tests.core import ref_hyperlora as ref
from tests.fixtures.hyperlora_models import write_hyperlora_folder

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# relative error of one rounding of the output to the dtype (fp32 accumulation inside), with margin
REL_TOL = {"fp16": 2e-3, "bf16": 1.6e-2, "fp32": 1e-5}
MODES = ("inference", "no_grad", "grad")
THREADS = (1, 2, 3)


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def mode(name: str) -> contextlib.AbstractContextManager:
    return {"inference": torch.inference_mode(), "no_grad": torch.no_grad(), "grad": torch.enable_grad()}[name]


def _pair(dtype: torch.dtype, seed: int = 0, m: int = 7, n: int = 96, k: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, n, k, generator=g).to(dtype), torch.randn(m, k, generator=g).to(dtype)


def _rel_err(got: torch.Tensor, basis: torch.Tensor, coeffs: torch.Tensor) -> float:
    want = torch.einsum("mnk,mk->mn", basis.double(), coeffs.double())
    return float((got.double() - want).abs().max() / want.abs().max())


def _native_ok(dtype: torch.dtype) -> bool:
    return dtype == torch.float16 and cpu_kernel.status().available


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("mode_name", MODES)
@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("strategy", ["mv", "bmm", "native", "auto"])
def test_batched_matvec_every_strategy_thread_count_mode_and_dtype(strategy, n_threads, mode_name, dtype):
    basis, coeffs = _pair(DTYPES[dtype])
    with threads(n_threads), mode(mode_name):
        if strategy == "native" and not _native_ok(DTYPES[dtype]):
            with pytest.raises(LoraError, match="native CPU kernel needs"):
                batched_matvec(basis, coeffs, strategy=strategy)
            return
        got = batched_matvec(basis, coeffs, strategy=strategy)
        if strategy != "bmm":   # the explicit-output path the 'mv' crash was on
            out = torch.empty(basis.shape[:2], dtype=basis.dtype)
            assert batched_matvec(basis, coeffs, strategy=strategy, out=out) is out
            assert torch.equal(out, got)
    assert got.shape == basis.shape[:2] and got.dtype == basis.dtype
    assert _rel_err(got, basis, coeffs) <= REL_TOL[dtype], (strategy, n_threads, mode_name, dtype)
    assert got.is_inference() == (mode_name == "inference")


@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("mode_name", MODES)
def test_mv_is_bit_identical_for_any_thread_count_in_any_mode(n_threads, mode_name):
    basis, coeffs = _pair(torch.float16, seed=3, m=9)
    one = torch.stack([torch.mv(basis[m], coeffs[m]) for m in range(9)])
    with threads(n_threads), mode(mode_name):
        for workers in (None, 1, 2, 4):
            assert torch.equal(batched_matvec(basis, coeffs, strategy="mv", workers=workers), one)


@pytest.mark.parametrize("mode_name", MODES)
@pytest.mark.parametrize("n_threads", (1, 2))
def test_batched_matvecs_mixes_native_and_fallback_pairs(n_threads, mode_name):
    """One call with an fp16 pair (native where available) and an fp32 pair (always mv)."""
    p16, p32 = _pair(torch.float16, seed=4), _pair(torch.float32, seed=5)
    with threads(n_threads), mode(mode_name):
        got16, got32 = batched_matvecs([p16, p32])
    assert _rel_err(got16, *p16) <= REL_TOL["fp16"] and _rel_err(got32, *p32) <= REL_TOL["fp32"]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_hyperlora_folder(tmp_path_factory.mktemp("strategies") / "tiny_model")


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("n_threads", (1, 2))
@pytest.mark.parametrize("strategy", ["mv", "bmm", "auto"])
def test_build_lora_in_inference_mode_with_every_strategy(tiny_folder, strategy, n_threads, dtype):
    """What the nodes run (bundle builds inside inference mode), at 1 and 2 threads, per basis dtype."""
    model = load_hyper_lora(tiny_folder, dtype=DTYPES[dtype], resampler_dtype=torch.float32)
    g = torch.Generator().manual_seed(7)
    tokens = torch.nn.functional.normalize(torch.randn(model.arch.num_tokens, model.arch.hyper_dim, generator=g),
                                           dim=-1)
    with threads(n_threads), torch.inference_mode():
        lora = model.build_lora(tokens, strategy=strategy)
    slow = ref.lora(tiny_folder, tokens.to(DTYPES[dtype]).float())
    assert list(lora) == list(slow)
    for key, want in slow.items():
        if not key.endswith("alpha"):
            assert ref.max_rel_diff(lora[key], want) <= 5 * REL_TOL[dtype] + 1e-6, (key, strategy, dtype)

