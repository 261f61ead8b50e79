"""tests/comfy/memory.py: the sampler that reports the ComfyUI server's peak memory reads /proc correctly.

The allocation is made in a child process of its own (a private anonymous map: a shared one counts as RssShmem,
not RssAnon): in the test session's own process a freed block may
stay resident (an allocator keeps it for reuse), so "given back" could not be observed there.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.comfy.memory import FIELDS, RssSampler, read_status

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

CHILD = r"""
import mmap, sys
sys.stdout.write("ready\n"); sys.stdout.flush(); sys.stdin.readline()
block = mmap.mmap(-1, 300 * 1024 * 1024, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # private: RssAnon
for i in range(0, len(block), 4096):
    block[i] = 1                                   # touched: resident
sys.stdout.write("alive\n"); sys.stdout.flush(); sys.stdin.readline()
block.close()
sys.stdout.write("gone\n"); sys.stdout.flush(); sys.stdin.readline()
"""


def _step(child: subprocess.Popen, expect: str) -> None:
    assert child.stdout is not None and child.stdin is not None
    line = child.stdout.readline().strip()
    assert line == expect, f"child said {line!r}, expected {expect!r}"


def _go(child: subprocess.Popen) -> None:
    assert child.stdin is not None
    child.stdin.write("\n")
    child.stdin.flush()


def test_the_peak_sees_an_allocation_that_is_gone_again() -> None:
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        _step(child, "ready")
        before = read_status(child.pid)
        sampler = RssSampler(child.pid, interval=0.01).start()
        _go(child)
        _step(child, "alive")
        time.sleep(0.05)
        alive = sampler.sample()
        _go(child)
        _step(child, "gone")
        time.sleep(0.05)
        gone = read_status(child.pid)
        peak = sampler.stop()
        _go(child)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert set(peak) == set(FIELDS)
    assert alive["RssAnon"] - before["RssAnon"] >= 250e6          # the block was resident
    assert alive["RssAnon"] - gone["RssAnon"] >= 250e6            # and is given back
    assert peak["RssAnon"] >= alive["RssAnon"] and peak["RssAnon"] - gone["RssAnon"] >= 250e6
    assert peak["VmRSS"] >= peak["RssAnon"] and peak["VmHWM"] >= alive["VmRSS"] - 4096 * 1024
    assert "peak anonymous" in sampler.describe()


def test_a_gone_process_reads_as_zeros() -> None:
    assert read_status(2 ** 22 + 12345) == dict.fromkeys(FIELDS, 0)
