"""bench/train_step.py --smoke (what CI runs): it measures every kind of step on the tiny UNet, checks that
gradients reach the tokens and bases, and prints lines that parse; the ratios agree with the table."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ROW = re.compile(r"^\| (unet|lora|hyperlora|factors|resampler|full) \| (\d+\.\d{4}) \| (\d+\.\d{4}) \| (\d+) \| "
                 r"([\d,]+) MB \| ([\d,]+) MB \|$")


@pytest.fixture(scope="module")
def smoke() -> str:
    proc = subprocess.run([sys.executable, "bench/train_step.py", "--smoke", "--threads", "1"], cwd=REPO,
                          capture_output=True, text=True, timeout=240, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_smoke_prints_one_row_per_step_kind(smoke):
    rows = {m.group(1): m for m in map(ROW.match, smoke.splitlines()) if m}
    assert set(rows) == {"unet", "lora", "hyperlora", "factors", "resampler", "full"}, smoke
    for name, m in rows.items():
        median, fastest, rounds = float(m.group(2)), float(m.group(3)), int(m.group(4))
        assert rounds == 1 and 0 < fastest <= median < 60, (name, m.group(0))
        start = int(m.group(6).replace(",", ""))
        assert start > 100, f"{name}: the resident size before the step ({start} MB) cannot hold torch"
    assert "peak RSS (VmHWM) above the RSS at the start" in smoke or "ru_maxrss" in smoke


def test_smoke_header_names_the_case(smoke):
    header = next(ln for ln in smoke.splitlines() if ln.startswith("## tiny:"))
    assert "128 px (16x16 latents), batch 2" in header and "14 modules" in header and "K 16" in header
    assert re.search(r"bases [\d.]+ M numbers", header)


def test_smoke_ratios_agree_with_the_table(smoke):
    med = {m.group(1): float(m.group(2)) for m in map(ROW.match, smoke.splitlines()) if m}
    ratio = re.search(r"^ratio hyperlora/unet (\d+\.\d+) \(target <= 1\.3: (met|NOT met)\), hyperlora/lora (\d+\.\d+), "
                      r"lora/unet (\d+\.\d+)$", smoke, re.M)
    assert ratio, smoke
    assert float(ratio.group(1)) == pytest.approx(med["hyperlora"] / med["unet"], rel=0.01, abs=2e-3)
    assert (ratio.group(2) == "met") == (float(ratio.group(1)) <= 1.3)
    assert float(ratio.group(3)) == pytest.approx(med["hyperlora"] / med["lora"], rel=0.01, abs=2e-3)
    scaled = re.search(r"^upper bound at K 128 \(factors row x 8; only part of it grows with K\): hyperlora (\d+\.\d+) s",
                       smoke, re.M)
    assert scaled and float(scaled.group(1)) == pytest.approx(med["hyperlora"] + 7 * med["factors"], rel=0.01, abs=2e-3)
    full = re.search(r"^ratio full/unet (\d+\.\d+) ", smoke, re.M)
    assert full and float(full.group(1)) == pytest.approx(med["full"] / med["unet"], rel=0.01, abs=2e-3)
    last = smoke.strip().splitlines()[-1]
    worst = re.fullmatch(r"train_step: 1 case\(s\), worst ratio hyperlora/unet (\d+\.\d+)", last)
    assert worst and worst.group(1) == ratio.group(1)


def test_smoke_counts_flops_of_the_tiny_unet(smoke):
    m = re.search(r"^flops tiny 128 px per sample: forward ([\d.]+) GFLOP, forward\+backward ([\d.]+) GFLOP",
                  smoke, re.M)
    assert m, smoke
    fwd, both = float(m.group(1)), float(m.group(2))
    assert 0 < fwd < both            # the backward adds work


def test_smoke_counts_the_hyperlora_flops_above_the_plain_unet(smoke):
    plain = re.search(r"^flops tiny 128 px per sample: forward ([\d.]+) GFLOP, forward\+backward ([\d.]+) GFLOP", smoke, re.M)
    hyper = re.search(r"^flops tiny 128 px per sample with per-sample HyperLoRA \(K 16, factors included\): forward "
                      r"([\d.]+) GFLOP, forward\+backward ([\d.]+) GFLOP, ratio to the plain UNet ([\d.]+)$", smoke, re.M)
    assert plain and hyper, smoke
    assert float(hyper.group(1)) > float(plain.group(1)) and float(hyper.group(2)) > float(plain.group(2))
    assert float(hyper.group(3)) == pytest.approx(float(hyper.group(2)) / float(plain.group(2)), rel=1e-3)
    assert 1.0 < float(hyper.group(3)) < 1.5          # the LoRA work is a small addition to the UNet's
