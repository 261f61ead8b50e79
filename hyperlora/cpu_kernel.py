"""Optional native CPU kernel for building fp16 LoRAs at the memory-bandwidth floor.

The LoRA build is 1,120 mat-vecs with 128-wide rows over a 3 GB fp16 basis.  PyTorch's fp16
mat-vec spends more time per 128-element row than memory needs to deliver it (about 21 GB/s on
two cores where a plain streaming pass reaches about 40 GB/s), so on x86-64 CPUs with AVX2 and
F16C we compile ``cpu_kernel.c`` once with the system C compiler and call it through ``ctypes``
(which releases the GIL, so worker threads run it in parallel).  Same math, fp32 accumulation,
one rounding to fp16 per value; see the C file for the exact summation order.

Nothing here is required: without a compiler (Windows, slim containers), on other CPUs, when
``HYPERLORA_NATIVE_KERNEL=0`` is set, or when the built library fails its self-test, ``status()``
says why and ``generate.batched_matvec`` keeps PyTorch's ``torch.mv``.

The library is cached per source and compiler in ``$HYPERLORA_KERNEL_CACHE`` (default
``$XDG_CACHE_HOME/hyperlora/kernels``, i.e. ``~/.cache/hyperlora/kernels``); a corrupt or stale
file is rebuilt.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernel.c")
ABI = 1
ENV_SWITCH = "HYPERLORA_NATIVE_KERNEL"   # "0"/"off"/"false" disables the kernel
ENV_CACHE = "HYPERLORA_KERNEL_CACHE"
COMPILE_TIMEOUT_S = 120
K_MULTIPLE = 8                          # the kernel needs K % 8 == 0 (released K = 128)


@dataclass(frozen=True)
class KernelStatus:
    """Whether the native kernel is in use; ``reason`` is a sentence for logs and the README.

    ``unexpected``: a compiler was there but the build or the self-test failed (logged as a warning;
    the expected cases - switched off, no compiler, other CPU - are logged at INFO).
    """
    available: bool
    reason: str
    library: Path | None = None
    unexpected: bool = False


_lock = threading.Lock()
_state: tuple[KernelStatus, ctypes.CDLL | None] | None = None


def cache_dir() -> Path:
    """Folder of the compiled libraries (``$HYPERLORA_KERNEL_CACHE`` or the user cache)."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hyperlora" / "kernels"


def find_compiler() -> list[str] | None:
    """The C compiler command: ``$CC`` (may hold arguments) or the first of cc, gcc, clang on PATH."""
    cc = os.environ.get("CC", "").split()
    if cc:
        exe = shutil.which(cc[0])
        return [exe, *cc[1:]] if exe else None
    for name in ("cc", "gcc", "clang"):
        exe = shutil.which(name)
        if exe:
            return [exe]
    return None


def _library_path(cache: Path, cc: list[str]) -> Path:
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), str(ABI).encode(), " ".join(cc).encode(), platform.machine().encode(),
                 sys.platform.encode()):
        h.update(part)
        h.update(b"\0")
    return cache / f"hyperlora-rowdot-{h.hexdigest()[:16]}.so"


def compile_library(cc: list[str], dest: Path) -> None:
    """Compile ``cpu_kernel.c`` into ``dest`` (written to a temporary name, then renamed atomically).

    Raises ``RuntimeError`` with the compiler's message when it fails.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    cmd = [*cc, "-O2", "-shared", "-fPIC", "-o", str(tmp), str(SOURCE)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"could not run the C compiler {cc[0]}: {e}") from e
    if res.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        msg = (res.stderr or res.stdout).strip().splitlines()
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {res.returncode}): {' '.join(msg[:3])[:400]}")
    os.replace(tmp, dest)


def _open(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.hl_abi.restype = ctypes.c_int
    lib.hl_abi.argtypes = []
    lib.hl_cpu_supported.restype = ctypes.c_int
    lib.hl_cpu_supported.argtypes = []
    lib.hl_rowdot_f16.restype = ctypes.c_int
    lib.hl_rowdot_f16.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                  ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]
    if lib.hl_abi() != ABI:
        raise OSError(f"{path} has ABI {lib.hl_abi()}, expected {ABI}")
    return lib


def _self_test(lib: ctypes.CDLL) -> str | None:
    """Compare the kernel with float64 math on odd shapes; returns a failure sentence or None."""
    g = torch.Generator().manual_seed(1234)
    basis = torch.randn(3, 21, 24, generator=g).to(torch.float16)
    coeffs = torch.randn(3, 24, generator=g)
    out = torch.full((3, 21), float("nan"), dtype=torch.float16)
    rc = lib.hl_rowdot_f16(basis.data_ptr(), coeffs.data_ptr(), out.data_ptr(), 21, 24, 0, 63)
    if rc != 0:
        return f"the self-test call returned {rc}"
    want = torch.einsum("mnk,mk->mn", basis.double(), coeffs.double())
    # one fp16 ulp, plus fp32 accumulation error relative to the terms (matters where they cancel)
    terms = torch.einsum("mnk,mk->mn", basis.double().abs(), coeffs.double().abs())
    tol = torch.finfo(torch.float16).eps * want.abs().clamp_min(2.0 ** -14) + 2.0 ** -20 * terms
    if not bool(((out.double() - want).abs() <= tol).all()):
        return "the self-test results differ from float64 math by more than one fp16 ulp"
    return None


def _load() -> tuple[KernelStatus, ctypes.CDLL | None]:
    if os.environ.get(ENV_SWITCH, "").strip().lower() in ("0", "off", "false", "no"):
        return KernelStatus(False, f"disabled by {ENV_SWITCH}={os.environ[ENV_SWITCH]}"), None
    machine = platform.machine().lower()
    if machine not in ("x86_64", "amd64"):
        return KernelStatus(False, f"the kernel is written for x86-64 CPUs, this one is {machine or 'unknown'}"), None
    if os.name == "nt":
        return KernelStatus(False, "not built on Windows (no C compiler is assumed there)"), None
    cc = find_compiler()
    if cc is None:
        return KernelStatus(False, "no C compiler found (set CC or install gcc or clang)"), None
    path = _library_path(cache_dir(), cc)
    lib = None
    if path.is_file():
        try:
            lib = _open(path)
        except OSError as e:
            log.info("HyperLoRA: rebuilding the native CPU kernel, the cached %s is unusable (%s)", path, e)
    if lib is None:
        t0 = time.perf_counter()
        try:
            compile_library(cc, path)
            lib = _open(path)
        except (RuntimeError, OSError) as e:
            return KernelStatus(False, f"the native CPU kernel did not build: {e}", path, unexpected=True), None
        log.info("HyperLoRA: built the native CPU kernel %s in %.1f s", path, time.perf_counter() - t0)
    if lib.hl_cpu_supported() != 1:
        return KernelStatus(False, "this CPU lacks AVX2/FMA/F16C (or the OS does not enable AVX)", path), None
    failure = _self_test(lib)
    if failure:
        return KernelStatus(False, f"the native CPU kernel {path} failed its self-test: {failure}", path,
                            unexpected=True), None
    return KernelStatus(True, f"native AVX2 kernel {path}", path), lib


def _get() -> tuple[KernelStatus, ctypes.CDLL | None]:
    global _state
    with _lock:
        if _state is None:
            _state = _load()
            st = _state[0]
            if not st.available:
                log.log(logging.WARNING if st.unexpected else logging.INFO,
                        "HyperLoRA: fp16 LoRA builds on CPU use PyTorch's mat-vec (about 1.7x slower): %s", st.reason)
        return _state


def status() -> KernelStatus:
    """Load (building on first use) and report the native kernel; cheap after the first call."""
    return _get()[0]


def reset() -> None:
    """Forget the loaded kernel so the next call looks again (tests, changed environment)."""
    global _state
    with _lock:
        _state = None


def supports(basis: Tensor, coeffs: Tensor) -> bool:
    """True when ``rowdot_f16`` can take this basis ``[M, N, K]`` / coeffs ``[M, K]`` pair."""
    return (basis.device.type == "cpu" and basis.dtype == torch.float16 and basis.dim() == 3
            and basis.shape[2] % K_MULTIPLE == 0 and basis.numel() > 0 and basis.is_contiguous()
            and tuple(coeffs.shape) == (basis.shape[0], basis.shape[2])
            and not (torch.is_grad_enabled() and (basis.requires_grad or coeffs.requires_grad))
            and status().available)


CHUNK_ROWS = 8192   # rows per work item (2 MiB of basis at K = 128): small enough to balance busy cores


def _check(basis: Tensor, coeffs32: Tensor, out: Tensor) -> None:
    m, n, k = basis.shape
    if not (basis.dtype == out.dtype == torch.float16 and coeffs32.dtype == torch.float32
            and basis.device.type == coeffs32.device.type == out.device.type == "cpu"
            and basis.is_contiguous() and coeffs32.is_contiguous() and out.is_contiguous()
            and tuple(coeffs32.shape) == (m, k) and tuple(out.shape) == (m, n) and k % K_MULTIPLE == 0):
        raise ValueError(f"rowdot_f16: bad arguments basis {tuple(basis.shape)} {basis.dtype}, coeffs "
                         f"{tuple(coeffs32.shape)} {coeffs32.dtype}, out {tuple(out.shape)} {out.dtype}")


def rowdot_f16(jobs: list[tuple[Tensor, Tensor, Tensor]], *, workers: int = 1,
               pool: Executor | None = None) -> None:
    """``out[m] = basis[m] @ coeffs32[m]`` for every ``(basis, coeffs32, out)`` in ``jobs``.

    basis ``[M, N, K]`` fp16, coeffs32 ``[M, K]`` fp32, out ``[M, N]`` fp16, all contiguous on the
    CPU (checked here: a wrong pointer would crash the process).  The rows of all jobs are cut into
    ``CHUNK_ROWS`` pieces that ``workers`` threads (this one plus ``workers - 1`` from ``pool``)
    take in turn, so a core that is busy with something else just takes fewer pieces.  Returns
    when every piece is done, also when one fails (the tensors must outlive the threads).
    """
    lib = _get()[1]
    if lib is None:
        raise RuntimeError(f"native CPU kernel unavailable: {status().reason}")
    pieces: list[tuple[int, int, int, int, int, int, int]] = []
    for basis, coeffs32, out in jobs:
        _check(basis, coeffs32, out)
        m, n, k = basis.shape
        ptrs = (basis.data_ptr(), coeffs32.data_ptr(), out.data_ptr())
        pieces += [(*ptrs, n, k, r, min(r + CHUNK_ROWS, m * n)) for r in range(0, m * n, CHUNK_ROWS)]
    fn = lib.hl_rowdot_f16
    lock = threading.Lock()
    cursor = [0]

    def drain() -> None:
        while True:
            with lock:
                i = cursor[0]
                cursor[0] += 1
            if i >= len(pieces):
                return
            rc = fn(*pieces[i])
            if rc != 0:
                with lock:
                    cursor[0] = len(pieces)   # the others stop too
                raise RuntimeError(f"native CPU kernel returned {rc} for rows {pieces[i][5]}:{pieces[i][6]}")

    helpers = [pool.submit(drain) for _ in range(min(workers, len(pieces)) - 1)] if pool is not None else []
    try:
        drain()
    finally:
        for f in helpers:
            f.exception()   # wait for every helper before the caller may free the tensors
    for f in helpers:
        f.result()
