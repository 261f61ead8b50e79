"""The native CPU kernel (hyperlora/cpu_kernel.c): exact summation order, agreement with float64
math, thread-count independence, and every fallback (switched off, no compiler, failing
compiler, corrupt cache, unsupported tensors).

The kernel must be available on a machine like CI's (x86-64 with AVX2/FMA/F16C and a C compiler):
there the tests fail instead of skipping, so a broken build cannot hide behind the fallback.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from hyperlora import cpu_kernel
from hyperlora.errors import LoraError
from hyperlora.generate import batched_matvec, batched_matvecs
from tests.conftest import skip_or_fail

REPO = Path(__file__).resolve().parents[2]


def machine_can_build() -> tuple[bool, str]:
    """Independent of cpu_kernel: x86-64 Linux/macOS, AVX2+FMA+F16C in /proc/cpuinfo, a compiler."""
    if platform.machine().lower() not in ("x86_64", "amd64") or os.name == "nt":
        return False, f"no native kernel on {platform.machine()} / {os.name}"
    if not any(shutil.which(c) for c in ("cc", "gcc", "clang")):
        return False, "no C compiler on PATH"
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False, "cannot read /proc/cpuinfo"
    missing = [f for f in ("avx2", "fma", "f16c") if f not in flags]
    return (not missing, f"CPU lacks {missing}") if missing else (True, "")


CAN_BUILD, WHY_NOT = machine_can_build()
needs_kernel = pytest.mark.skipif(not CAN_BUILD, reason=f"native kernel not buildable here: {WHY_NOT}")


def test_ci_can_build_the_kernel_on_x86_64() -> None:
    """Under CI=true on x86-64 the kernel tests must run: a missing compiler fails instead of skipping them."""
    if platform.machine().lower() in ("x86_64", "amd64") and os.name != "nt" and not CAN_BUILD:
        skip_or_fail(f"the native-kernel tests would be skipped: {WHY_NOT}")


@pytest.fixture
def fresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A kernel state of its own: empty cache dir, default switches; restored afterwards."""
    monkeypatch.setenv(cpu_kernel.ENV_CACHE, str(tmp_path / "kernels"))
    monkeypatch.delenv(cpu_kernel.ENV_SWITCH, raising=False)
    monkeypatch.delenv("CC", raising=False)
    cpu_kernel.reset()
    yield tmp_path / "kernels"
    cpu_kernel.reset()


def rand_case(m: int, n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, n, k, generator=g).half(), torch.randn(m, k, generator=g).half()


def documented_order(basis: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """Slow emulation of the order stated in cpu_kernel.c, in numpy fp32 with exact products.

    Chunk q (values 8q .. 8q+7) goes into accumulator q % 2 by FMA in increasing q (fp16 x fp32
    products are exact in float64, one rounding to fp32 per step); lanes l = even + odd; then
    ((l0+l1)+(l2+l3)) + ((l4+l5)+(l6+l7)) in fp32; then one rounding to fp16.
    """
    b = basis.double().numpy()
    c = coeffs.float().double().numpy()
    m, n, k = b.shape
    acc = [np.zeros((m, n, 8), dtype=np.float32) for _ in range(2)]
    for q in range(k // 8):
        prod = b[:, :, 8 * q:8 * q + 8] * c[:, None, 8 * q:8 * q + 8]           # exact
        acc[q % 2] = (prod + acc[q % 2].astype(np.float64)).astype(np.float32)  # fma: one rounding
    l = acc[0] + acc[1]
    s = ((l[..., 0] + l[..., 1]) + (l[..., 2] + l[..., 3])) + ((l[..., 4] + l[..., 5]) + (l[..., 6] + l[..., 7]))
    return torch.from_numpy(s.astype(np.float32)).half()


@needs_kernel
def test_kernel_is_available_where_it_can_build(fresh: Path) -> None:
    st = cpu_kernel.status()
    assert st.available, st.reason
    assert st.library is not None and st.library.parent == fresh and st.library.is_file()


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 1, 8), (3, 21, 24), (5, 1003, 128), (2, 8, 128), (4, 17, 136),
                                   (2, 13, 16), (3, 9, 40)])
def test_kernel_follows_its_documented_summation_order_bit_for_bit(fresh: Path, shape) -> None:
    basis, coeffs = rand_case(*shape, seed=sum(shape))
    got = batched_matvec(basis, coeffs, strategy="native")
    want = documented_order(basis, coeffs)
    assert got.dtype == torch.float16 and got.shape == shape[:2]
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


@needs_kernel
def test_kernel_is_within_one_rounding_of_float64_math(fresh: Path) -> None:
    basis, coeffs = rand_case(6, 777, 128, seed=7)
    got = batched_matvec(basis, coeffs, strategy="native").double()
    exact = torch.einsum("mnk,mk->mn", basis.double(), coeffs.double())
    terms = torch.einsum("mnk,mk->mn", basis.double().abs(), coeffs.double().abs())
    _, e = torch.frexp(exact.abs().clamp_min(2.0 ** -14))
    half_ulp = torch.ldexp(torch.ones_like(exact), e - 12)        # fp16 has 11 significant bits
    assert bool(((got - exact).abs() <= half_ulp + 2.0 ** -21 * terms).all())
    # and it agrees with PyTorch's own fp16 mat-vec to within one fp16 ulp
    mv = batched_matvec(basis, coeffs, strategy="mv").double()
    assert bool(((got - mv).abs() <= 2 * half_ulp + 2.0 ** -20 * terms).all())


@needs_kernel
def test_result_does_not_depend_on_threads_or_chunking(fresh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pairs = [rand_case(3, 101, 128, seed=1), rand_case(2, 64, 16, seed=2)]
    one = batched_matvecs(pairs, strategy="native", workers=1)
    for chunk in (3, 8, 64, 100_000):
        monkeypatch.setattr(cpu_kernel, "CHUNK_ROWS", chunk)
        for w in (1, 2, 3, 5):
            got = batched_matvecs(pairs, strategy="native", workers=w)
            assert all(torch.equal(a, b) for a, b in zip(got, one)), (chunk, w)


@needs_kernel
def test_auto_picks_native_for_fp16_and_mv_otherwise(fresh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = cpu_kernel.rowdot_f16
    monkeypatch.setattr(cpu_kernel, "rowdot_f16", lambda jobs, **kw: (calls.append(len(jobs)), real(jobs, **kw)))
    basis, coeffs = rand_case(2, 40, 16, seed=3)
    batched_matvec(basis, coeffs)
    assert calls == [1]
    batched_matvec(basis.float(), coeffs.float())          # fp32: MKL's sgemv is already at the floor
    batched_matvec(basis.bfloat16(), coeffs.bfloat16())
    batched_matvec(*rand_case(2, 40, 12, seed=4))          # K not a multiple of 8
    batched_matvec(basis.transpose(1, 2).contiguous().transpose(1, 2), coeffs)  # not contiguous
    assert calls == [1]
    with pytest.raises(LoraError, match="K a multiple of 8.*use strategy 'auto' or 'mv'"):
        batched_matvec(*rand_case(2, 40, 12, seed=4), strategy="native")
    with pytest.raises(LoraError, match="fp16 CPU basis"):
        batched_matvec(basis.float(), coeffs.float(), strategy="native")


@needs_kernel
def test_autograd_inputs_keep_pytorch_kernel(fresh: Path) -> None:
    basis, coeffs = rand_case(2, 40, 16, seed=5)
    coeffs = coeffs.float().requires_grad_()
    assert not cpu_kernel.supports(basis.float(), coeffs)
    with torch.no_grad():
        assert cpu_kernel.supports(basis, coeffs.detach().half())


@needs_kernel
def test_rowdot_refuses_tensors_it_cannot_address(fresh: Path) -> None:
    basis, coeffs = rand_case(2, 16, 16, seed=6)
    c32 = coeffs.float()
    out = torch.empty(2, 16, dtype=torch.float16)
    with pytest.raises(ValueError, match="bad arguments"):
        cpu_kernel.rowdot_f16([(basis, coeffs, out)])                  # fp16 coeffs
    with pytest.raises(ValueError, match="bad arguments"):
        cpu_kernel.rowdot_f16([(basis, c32, torch.empty(16, 2, dtype=torch.float16).t())])
    with pytest.raises(ValueError, match="bad arguments"):
        cpu_kernel.rowdot_f16([(basis, c32[:1], out)])
    cpu_kernel.rowdot_f16([(basis, c32, out)])
    assert torch.equal(out, documented_order(basis, coeffs))


def test_switch_off_falls_back_to_mv(fresh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cpu_kernel.ENV_SWITCH, "0")
    st = cpu_kernel.status()
    assert not st.available and "HYPERLORA_NATIVE_KERNEL=0" in st.reason
    basis, coeffs = rand_case(3, 50, 16, seed=8)
    assert torch.equal(batched_matvec(basis, coeffs), batched_matvec(basis, coeffs, strategy="mv"))
    with pytest.raises(LoraError, match="disabled by HYPERLORA_NATIVE_KERNEL=0"):
        batched_matvec(basis, coeffs, strategy="native")
    assert not fresh.exists()   # nothing compiled


def test_missing_compiler_is_reported(fresh: Path, monkeypatch: pytest.MonkeyPatch,
                                      caplog: pytest.LogCaptureFixture) -> None:
    if not CAN_BUILD:
        skip_or_fail(WHY_NOT)
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with caplog.at_level(logging.INFO, logger="hyperlora.cpu_kernel"):
        st = cpu_kernel.status()
    assert not st.available and not st.unexpected and "no C compiler found" in st.reason
    assert "PyTorch's mat-vec" in caplog.text and "no C compiler found" in caplog.text


def test_failing_compiler_warns_once_and_falls_back(fresh: Path, monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    if not CAN_BUILD:
        skip_or_fail(WHY_NOT)
    fake = fresh.parent / "badcc"
    fake.write_text("#!/bin/sh\necho 'badcc: fatal error: no space left on device' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    with caplog.at_level(logging.INFO, logger="hyperlora.cpu_kernel"):
        st = cpu_kernel.status()
        cpu_kernel.status()
    assert not st.available and st.unexpected
    assert "did not build" in st.reason and "no space left on device" in st.reason
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    basis, coeffs = rand_case(2, 30, 16, seed=9)
    assert torch.equal(batched_matvec(basis, coeffs), batched_matvec(basis, coeffs, strategy="mv"))
    assert not any(p.suffix == ".so" for p in fresh.iterdir())   # no half-written library left


def run_status(cache: Path) -> str:
    """``status()`` in a fresh interpreter (a library loaded here must never be rewritten in place)."""
    code = ("import logging, sys; sys.path.insert(0, %r); logging.basicConfig(level=logging.INFO, stream=sys.stdout); "
            "from hyperlora import cpu_kernel; s = cpu_kernel.status(); print('STATUS', s.available, s.reason)"
            % str(REPO))
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, cpu_kernel.ENV_CACHE: str(cache)},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


@needs_kernel
def test_cache_is_reused_and_a_corrupt_library_rebuilt(tmp_path: Path) -> None:
    cache = tmp_path / "kernels"
    first = run_status(cache)
    assert "STATUS True" in first and "built the native CPU kernel" in first
    (lib,) = cache.glob("*.so")
    stamp = lib.stat().st_mtime_ns
    again = run_status(cache)
    assert "STATUS True" in again and "built the native" not in again and lib.stat().st_mtime_ns == stamp
    lib.write_bytes(b"not a shared library")
    fixed = run_status(cache)
    assert "STATUS True" in fixed and "is unusable" in fixed and "built the native CPU kernel" in fixed
    assert lib.stat().st_size > 1000


@needs_kernel
def test_threads_and_processes_building_at_once(fresh: Path) -> None:
    """Four threads ask at once (one build), and two fresh processes share one empty cache."""
    results: list[bool] = []
    threads = [threading.Thread(target=lambda: results.append(cpu_kernel.status().available)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 4 and len(list(fresh.glob("*.so"))) == 1
    other = fresh.parent / "other-cache"
    code = ("import sys; sys.path.insert(0, %r); from hyperlora import cpu_kernel; "
            "s = cpu_kernel.status(); print(s.available, s.reason)" % str(REPO))
    env = {**os.environ, cpu_kernel.ENV_CACHE: str(other)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert all(o.startswith("True") for o, _ in outs), outs
    assert len(list(other.glob("*.so"))) == 1 and not list(other.glob("*.tmp"))


@needs_kernel
def test_small_fp16_model_builds_through_native_and_matches_reference(tmp_path: Path, fresh: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiny model with K = 16 (the tiny fixture's K = 6 keeps torch.mv): every matrix vs float64."""
    from dataclasses import replace

    from hyperlora.checkpoint import load_hyper_lora
    from hyperlora.lora import normalize_tokens
    from tests.core import ref_hyperlora as ref
    from tests.fixtures.hyperlora_models import TINY, write_hyperlora_folder

    folder = write_hyperlora_folder(tmp_path / "k16", preset=replace(TINY, hyper_dim=16), base=True)
    model = load_hyper_lora(folder, dtype=torch.float16)
    calls: list[int] = []
    real = cpu_kernel.rowdot_f16
    monkeypatch.setattr(cpu_kernel, "rowdot_f16", lambda jobs, **kw: (calls.append(len(jobs)), real(jobs, **kw)))
    toks = normalize_tokens(torch.randn(model.arch.num_tokens, 16, generator=torch.Generator().manual_seed(0)))
    for kind in ("id", "base"):
        fast = model.build_lora(toks, kind=kind)
        want = ref.lora(folder, toks, kind=kind)
        assert fast.keys() == want.keys()
        for key, w in want.items():
            assert fast[key].dtype == torch.float16 and fast[key].shape == w.shape, key
            if not key.endswith(".alpha"):
                assert ref.max_rel_diff(fast[key], w) < 2e-3, key
    n_groups = len(model.groups["id"]), len(model.groups["base"])
    assert calls == [2 * n_groups[0], 2 * n_groups[1]]   # one dispatch per LoRA, down + up of every group
