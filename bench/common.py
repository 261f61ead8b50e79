"""Timing helpers shared by the bench scripts (one process, interleaved against a baseline)."""

from __future__ import annotations

import time
from collections.abc import Callable


def interleaved(fns: dict[str, Callable[[], object]], repeat: int,
                sync: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Time every function ``repeat`` times, round-robin (one warm-up call each first).

    On a shared machine a burst of load from a neighbour then hits every function alike
    instead of skewing the one that happened to be measured at that moment.  ``sync`` (e.g.
    ``torch.cuda.synchronize``) runs before each clock reading, for asynchronous devices.
    """
    wait = sync or (lambda: None)
    for fn in fns.values():
        fn()
    out: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            wait()
            t0 = time.perf_counter()
            fn()
            wait()
            out[name].append(time.perf_counter() - t0)
    return out
