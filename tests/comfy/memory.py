"""Memory of a running process (the ComfyUI server of the tests and benches), read from ``/proc``.

:class:`RssSampler` reads ``/proc/<pid>/status`` every ``interval`` seconds in a thread and keeps the
peaks of ``VmRSS`` (everything resident), ``RssAnon`` (the process's own memory: what a machine must
really hold) and ``RssFile`` (pages of mapped files, e.g. a safetensors checkpoint ComfyUI reads through
a memory map: the kernel can drop them under pressure).  ``VmHWM`` is the kernel's own peak of
``VmRSS``, exact even between two samples.  Linux only; elsewhere every number is 0.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from typing import Any

GB = 1e9
FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile")


def read_status(pid: int) -> dict[str, int]:
    """``{field: bytes}`` of :data:`FIELDS` for process ``pid`` (zeros when it is gone or not on Linux)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text(encoding="utf-8")
    except OSError:
        return dict.fromkeys(FIELDS, 0)
    out = {}
    for key in FIELDS:
        m = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
        out[key] = int(m.group(1)) * 1024 if m else 0
    return out


class RssSampler:
    """Peaks of a process's resident memory, sampled in a daemon thread (``start``/``stop``/``peaks``)."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = dict.fromkeys(FIELDS, 0)
        self.label = ""
        """What the process is (the tier's summary names each server's peaks with it)."""
        self.history: list[tuple[float, dict[str, int]]] = []
        """``(time.monotonic(), status)`` of every sample, for peaks over a part of the run (:meth:`peak_since`)."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> dict[str, int]:
        now = read_status(self.pid)
        self.history.append((time.monotonic(), now))
        for key, value in now.items():
            self.peak[key] = max(self.peak[key], value)
        return now

    def peak_since(self, start: float, key: str = "RssAnon") -> int:
        """Peak of ``key`` over the samples taken at or after ``start`` (a ``time.monotonic()``); 0 if none."""
        return max((s[key] for t, s in self.history if t >= start), default=0)

    def reset(self) -> None:
        """Forget the peaks so far (``VmHWM`` is the kernel's and cannot be reset from outside)."""
        self.peak = dict.fromkeys(FIELDS, 0)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def start(self) -> "RssSampler":
        self.sample()
        self._thread = threading.Thread(target=self._run, name=f"rss-{self.pid}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict[str, int]:
        self.sample()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        return dict(self.peak)

    def describe(self) -> str:
        p = self.peak
        return (f"peak RSS {p['VmRSS'] / GB:.2f} GB (kernel high-water mark {p['VmHWM'] / GB:.2f} GB), "
                f"peak anonymous {p['RssAnon'] / GB:.2f} GB, peak file-backed {p['RssFile'] / GB:.2f} GB")


SERVERS: list[tuple[Any, RssSampler]] = []
"""``(server, sampler)`` of every ComfyUI server process of this test session, for the tier's memory summary."""


def watch_memory(server: Any, label: str) -> RssSampler:
    """Sample the memory of ``server``'s current process (a tests.comfy.client.ComfyServer) until the tier ends;
    the summary prints its peaks under ``label``."""
    sampler = RssSampler(server.proc.pid).start()
    sampler.label = label
    SERVERS.append((server, sampler))
    return sampler
