"""tests/comfy/memory.py: the sampler that reports the ComfyUI server's peak memory reads /proc correctly."""

from __future__ import annotations

import gc
import os
import sys

import pytest
import torch

from tests.comfy.memory import FIELDS, RssSampler, read_status

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def test_the_peak_sees_an_allocation_that_is_gone_again() -> None:
    """Compared with readings taken while the block lives and after it is freed (not with a reading before
    it: in a long test session the garbage collector may free other memory in between)."""
    gc.collect()
    sampler = RssSampler(os.getpid(), interval=0.01).start()
    block = torch.ones(300 * 1024 * 1024 // 4)       # 300 MB, touched
    alive = sampler.sample()
    del block
    gone = read_status(os.getpid())
    peak = sampler.stop()
    assert set(peak) == set(FIELDS)
    assert alive["RssAnon"] - gone["RssAnon"] >= 250e6           # the block was resident, and is given back
    assert peak["RssAnon"] >= alive["RssAnon"] and peak["RssAnon"] - gone["RssAnon"] >= 250e6
    assert peak["VmRSS"] >= peak["RssAnon"] and peak["VmHWM"] >= alive["VmRSS"] - 4096 * 1024
    assert "peak anonymous" in sampler.describe()


def test_a_gone_process_reads_as_zeros() -> None:
    assert read_status(2 ** 22 + 12345) == dict.fromkeys(FIELDS, 0)
