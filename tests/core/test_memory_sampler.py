"""tests/comfy/memory.py: the sampler that reports the ComfyUI server's peak memory reads /proc correctly."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from tests.comfy.memory import FIELDS, RssSampler, read_status

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def test_the_peak_sees_an_allocation_that_is_gone_again() -> None:
    sampler = RssSampler(os.getpid(), interval=0.01).start()
    before = read_status(os.getpid())
    block = torch.ones(300 * 1024 * 1024 // 4)       # 300 MB, touched
    sampler.sample()
    del block
    peak = sampler.stop()
    assert set(peak) == set(FIELDS)
    assert peak["RssAnon"] - before["RssAnon"] >= 250e6
    assert peak["VmRSS"] >= peak["RssAnon"] and peak["VmHWM"] >= before["VmRSS"]
    assert "peak anonymous" in sampler.describe()


def test_a_gone_process_reads_as_zeros() -> None:
    assert read_status(2 ** 22 + 12345) == dict.fromkeys(FIELDS, 0)
