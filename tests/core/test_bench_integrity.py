"""bench/bench_integrity.py --smoke runs and prints what issue 18 asks: the CPU, the interleaved ratio against a
plain load in the same process, and the cached check's share of a load against the 2 % target."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import REPO_ROOT


def test_bench_integrity_smoke_prints_cpu_ratio_and_target() -> None:
    out = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "bench_integrity.py"), "--smoke"], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=600, check=True).stdout
    assert re.search(r"^CPU: .+, \d+ logical cores, load average [\d.]+ at start", out, re.M), out
    ratio = re.search(r"checked / plain load, median of the 2 interleaved round ratios: ([\d.]+)", out)
    assert ratio is not None and 0.5 < float(ratio.group(1)) < 2.0, out
    share = re.search(r"cached check alone: [\d.]+ ms = ([\d.]+) % of the load \(target <= 2 %: (met|NOT met)\)", out)
    assert share is not None and float(share.group(1)) > 0, out
