"""When the loaded HyperLoRA weights leave RAM while SDXL samples, and how freed memory goes back to the system.

The loaded model (the 3 GB fp16 basis, the resampler, CLIP ViT-L/14 and the face models: about 4.8 GB for the
release with ``auto`` on a CPU) is only needed to *make* a LoRA. Once the LoRA is built, SDXL sampling needs none
of it, yet ComfyUI keeps the loaded model in its node cache for the next run. On a CPU nothing else frees it
(ComfyUI frees memory for a model load only on a GPU), so a whole text-to-image graph held it beside SDXL
(bench/bench_graph_memory.py). The Loader's ``memory`` setting decides, as sampling starts, whether to drop it;
it is read back from disk the next time an input changes (a few seconds with the files in the page cache).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

from .errors import check_choice

log = logging.getLogger(__name__)

MEMORY_CHOICES = ("auto", "keep", "release while sampling")
"""The Loader's ``memory`` setting: ``auto`` releases only when RAM is short (:func:`should_release`)."""

SAMPLING_HEADROOM = 4 * 2**30
"""``auto`` keeps the weights while the free RAM, as sampling starts, is at least their size plus this much
(bytes): room for ComfyUI's merged-LoRA copies of the SDXL attention weights (1.9 GB in fp16, 3.8 GB in fp32)
and the sampling's activations, with the weights still counted as releasable."""


def human_bytes(n: float) -> str:
    """``n`` bytes in decimal units with three significant digits (``1.95 MB``, ``8.59 TB``)."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def should_release(policy: str, *, held_bytes: int, free_bytes: int | None, where: str = "memory") -> bool:
    """Whether to release ``held_bytes`` of loaded weights as sampling starts, with ``free_bytes`` of RAM free
    (``None``: unknown, then ``auto`` keeps).  ``policy`` is one of :data:`MEMORY_CHOICES` (SettingError naming
    ``where`` otherwise)."""
    policy = check_choice(policy, MEMORY_CHOICES, where)
    if policy == "keep" or held_bytes <= 0:
        return False
    if policy == "release while sampling":
        return True
    return free_bytes is not None and free_bytes < held_bytes + SAMPLING_HEADROOM


def trim_freed_memory() -> bool:
    """Give memory freed inside the process back to the system (glibc's ``malloc_trim``): tensors of a few MB
    come from the heap, which glibc keeps after a free.  Returns whether it could (False off glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):       # musl and other C libraries have no malloc_trim
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
    return True


__all__ = ["MEMORY_CHOICES", "SAMPLING_HEADROOM", "human_bytes", "should_release", "trim_freed_memory"]
