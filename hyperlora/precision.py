"""The Loader's ``auto`` precision: the fastest one on this device whose result stays close to fp32.

``auto`` sets the precision of the resampler, the ID projector and CLIP (the LoRA basis keeps the
files' fp16 either way: its build is memory-bound).  A precision is a *candidate* only when its
measured error against fp32 is within :data:`TOLERANCE`; among the candidates the fastest one for
the device wins:

* **CPU**: decided once per process from what the CPU can do (torch's ``torch.cpu`` reports and the
  ``/proc/cpuinfo`` flags): bf16 where the CPU has bf16 matrix hardware (AMX-BF16 or AVX512-BF16),
  fp16 where it has fp16 matrix hardware (AMX-FP16 or AVX512-FP16) but no bf16, else fp32.  Without
  that hardware bf16 and fp16 are emulated and much slower than fp32 (measured on an AVX-512 Xeon
  without BF16: fp32 191, bf16 57, fp16 1.9 GFLOP/s on a 512x1024x1280 matmul; identity + LoRA of one
  photo 2.6x (bf16) and 3.8x (fp16) the fp32 time, bench/bench_precision.py).  The choice and why
  are logged once.
* **CUDA and other accelerators**: what ComfyUI would run there (its fp16/bf16 choice, passed in by
  the node), if within tolerance, else fp32.

``fp32`` stays available and exact (the parity tests run in fp32).
"""

from __future__ import annotations

import logging
import platform
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

TOLERANCE = 0.02
"""Largest relative error (Frobenius norm of the difference over the norm of the fp32 result) of the
identity tokens and of the LoRA that ``auto`` accepts.  SDXL itself runs in fp16/bf16 on GPUs; 2 % of
the LoRA is far below the effect of a 0.05 change of the LoRA strength."""

MEASURED_REL_ERROR: dict[str, dict[str, float]] = {
    # bench/bench_precision.py on the released-size model (random weights), the full-size ViT-L/14
    # (random weights) and one photo; CLIP, ID projector and resampler in that precision, basis fp16.
    "bf16": {"identity tokens": 1.22e-2, "LoRA": 1.73e-2},
    "fp16": {"identity tokens": 5.75e-3, "LoRA": 8.15e-3},
}
"""Relative error against fp32, measured (see the README's Performance section)."""

CPUINFO = Path("/proc/cpuinfo")
BF16_HARDWARE = ("amx_bf16", "avx512_bf16")
FP16_HARDWARE = ("amx_fp16", "avx512_fp16")


def within_tolerance(name: str) -> bool:
    """True when the measured errors of precision ``name`` against fp32 are all within :data:`TOLERANCE`."""
    if name == "fp32":
        return True
    return max(MEASURED_REL_ERROR[name].values()) <= TOLERANCE


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bf16"`` (the names of :data:`PRECISIONS`)."""
    for name, d in PRECISIONS.items():
        if d == dtype:
            return name
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class CpuFeatures:
    """What the CPU offers for matrix maths.

    ``capability``: ``torch.backends.cpu.get_cpu_capability()`` ("DEFAULT", "AVX2", "AVX512", "SVE256", ...);
    ``flags``: lower-case feature names as in ``/proc/cpuinfo`` (e.g. ``avx512_bf16``, ``amx_bf16``).
    """
    machine: str
    capability: str
    flags: frozenset[str]
    model: str = ""


def _cpuinfo() -> tuple[set[str], str]:
    """Flags and model name from ``/proc/cpuinfo`` (empty where there is none, e.g. Windows, macOS)."""
    try:
        text = CPUINFO.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set(), ""
    flags: set[str] = set()
    model = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("flags", "features") and not flags:
            flags = set(value.lower().split())
        elif key == "model name" and not model:
            model = value.strip()
    return flags, model


def _torch_flags() -> set[str]:
    """The CPU features torch itself reports (through cpuinfo, also on Windows/macOS)."""
    checks = {"avx2": "_is_avx2_supported", "avx512f": "_is_avx512_supported",
              "avx512_bf16": "_is_avx512_bf16_supported", "amx_tile": "_is_amx_tile_supported",
              "amx_fp16": "_is_amx_fp16_supported"}
    found: set[str] = set()
    for flag, fn_name in checks.items():
        fn = getattr(torch.cpu, fn_name, None)
        if fn is not None and fn():
            found.add(flag)
    if "amx_tile" in found and hasattr(torch.cpu, "_is_amx_tile_supported"):
        found.add("amx_bf16")   # every CPU with AMX tiles has AMX-BF16 (Sapphire Rapids and later)
    return found


def read_cpu_features() -> CpuFeatures:
    """This machine's :class:`CpuFeatures` (torch's reports joined with ``/proc/cpuinfo``)."""
    flags, model = _cpuinfo()
    return CpuFeatures(machine=platform.machine().lower(), capability=torch.backends.cpu.get_cpu_capability(),
                       flags=frozenset(flags | _torch_flags()), model=model or platform.processor())


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision ``auto`` runs in and a sentence saying why."""
    dtype: torch.dtype
    reason: str


def cpu_precision(features: CpuFeatures) -> PrecisionChoice:
    """The fastest precision within :data:`TOLERANCE` on a CPU with ``features`` (pure function)."""
    flags = features.flags
    where = f"{features.capability}; {features.model}" if features.model else features.capability
    has_bf16 = sorted(f for f in BF16_HARDWARE if f in flags)
    has_fp16 = sorted(f for f in FP16_HARDWARE if f in flags)
    if has_bf16 and within_tolerance("bf16"):
        return PrecisionChoice(torch.bfloat16, f"bf16: the CPU has bf16 matrix hardware ({', '.join(has_bf16)}; "
                                               f"{where})")
    if has_fp16 and within_tolerance("fp16"):
        return PrecisionChoice(torch.float16, f"fp16: the CPU has fp16 matrix hardware ({', '.join(has_fp16)}) "
                                              f"but no bf16 hardware ({where})")
    return PrecisionChoice(torch.float32, f"fp32: the CPU has no bf16/fp16 matrix hardware (no "
                                          f"{'/'.join(BF16_HARDWARE + FP16_HARDWARE)}; {where}), so bf16 and fp16 "
                                          f"would be emulated and slower than fp32")


_lock = threading.Lock()
_cpu_choice: PrecisionChoice | None = None


def cpu_auto_precision() -> PrecisionChoice:
    """:func:`cpu_precision` of this machine, decided on the first call and logged once."""
    global _cpu_choice
    with _lock:
        if _cpu_choice is None:
            _cpu_choice = cpu_precision(read_cpu_features())
            log.info("HyperLoRA: 'auto' precision on the CPU is %s", _cpu_choice.reason)
        return _cpu_choice


def reset() -> None:
    """Forget the CPU decision so the next call decides (and logs) again (tests)."""
    global _cpu_choice
    with _lock:
        _cpu_choice = None


def auto_precision(device: torch.device | str, *, device_prefers: Sequence[torch.dtype] = ()) -> PrecisionChoice:
    """The ``auto`` precision on ``device``.

    CPU: :func:`cpu_auto_precision`.  Other devices: the first of ``device_prefers`` (what the host
    application would run there, fastest first, e.g. ComfyUI's fp16 or bf16) that is within
    :data:`TOLERANCE`, else fp32.
    """
    device = torch.device(device)
    if device.type == "cpu":
        return cpu_auto_precision()
    for dtype in device_prefers:
        name = dtype_name(dtype)
        if dtype == torch.float32 or (name in MEASURED_REL_ERROR and within_tolerance(name)):
            return PrecisionChoice(dtype, f"{name}: as ComfyUI runs on {device}")
    return PrecisionChoice(torch.float32, f"fp32: no faster precision within tolerance on {device}")


__all__ = ["BF16_HARDWARE", "FP16_HARDWARE", "MEASURED_REL_ERROR", "PRECISIONS", "TOLERANCE", "CpuFeatures",
           "PrecisionChoice", "auto_precision", "cpu_auto_precision", "cpu_precision", "dtype_name",
           "read_cpu_features", "reset", "within_tolerance"]
