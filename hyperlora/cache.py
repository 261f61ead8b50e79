"""A small bounded, thread-safe LRU map and a digest of tensors/arrays for cache keys.

Used by the two caches that make a re-queue cost nothing: :mod:`hyperlora.pipeline` (face
analysis and CLIP per photo) and :mod:`hyperlora.generate` (resampler tokens per set of features).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

import numpy as np
import torch
from torch import Tensor

V = TypeVar("V")


class LRU(Generic[V]):
    """At most ``size`` entries; ``get`` refreshes an entry, ``put`` drops the least recently used."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._data: OrderedDict[Hashable, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
            return value

    def put(self, key: Hashable, value: V) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)

    def pop(self, key: Hashable) -> None:
        with self._lock:
            self._data.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


def digest(*items: Tensor | np.ndarray | None) -> str:
    """SHA-256 of the shapes, dtypes and bytes of ``items`` (None allowed), wherever they live.

    Tensors on another device are copied to the CPU first, so the digest of equal values is the
    same on every device.  (sha256 is hardware-accelerated on current CPUs: ~2x blake2b here.)
    """
    h = hashlib.sha256()
    for item in items:
        if item is None:
            h.update(b"none;")
            continue
        if isinstance(item, Tensor):
            t = item.detach().to("cpu").contiguous()
            h.update(repr((tuple(t.shape), str(t.dtype))).encode())
            # bytes of any dtype (bf16 has no numpy equivalent): view the storage as uint8
            h.update(t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b"")
        else:
            h.update(repr((item.shape, item.dtype.str)).encode())
            h.update(np.ascontiguousarray(item).data)
    return h.hexdigest()


__all__ = ["LRU", "digest"]
