"""Cost of the Loader's integrity check (hyperlora.integrity) on the full-size model, in one process.

    python bench/bench_integrity.py [--rounds 5] [--smoke]

A Loader run here is what the Loader node does with the HyperLoRA folder: ``verify_folder`` (the
SHA-256 recorded at download, see hyperlora/integrity.py) and ``load_hyper_lora``.  Printed:

* load without the check (median of ``--rounds``);
* load with the first check (a fresh verified cache: every file is hashed once);
* load with the cached check (the files are only ``stat``ed: device, inode, size, modification and
  status-change times, see ``integrity.file_state``) - interleaved with the plain load, round by round
  and in alternating order (ABBA), so the machine's drift hits both; the median of the per-round ratios;
* the cached check alone (median of many calls) as a fraction of the load.  Target: <= 2 % of a load.

The CPU, the core count and the load average are printed with the results.

The folder is the tests' cached random full-size model (3 GB, built on first use), seen through a
temporary folder of symlinks that carries the checksum file, so the shared fixture is not changed.
``--smoke`` uses the tiny model and two rounds (seconds; what CI runs so the script cannot rot).
Full size needs about 4 GB of RAM: run it under the machine's lock for big fixtures.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hyperlora import integrity  # noqa: E402
from hyperlora.checkpoint import load_hyper_lora, model_files  # noqa: E402
from tests.conftest import test_cache_root  # noqa: E402
from tests.fixtures.hyperlora_models import full_model_folder, write_hyperlora_folder  # noqa: E402


def linked_copy(source: Path, target: Path) -> Path:
    """``target`` with a symlink to each model file of ``source`` and its own checksum file."""
    target.mkdir(parents=True)
    for f in model_files(source):
        (target / f.name).symlink_to(f.resolve())
    integrity.write_checksums(target, integrity.record_files(target, [f.name for f in model_files(target)],
                                                             source="local"))
    return target


def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo`` on Linux, else what ``platform`` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds of plain and checked loads")
    ap.add_argument("--smoke", action="store_true", help="tiny model, 2 rounds: a quick run that the script works")
    args = ap.parse_args()
    rounds = 2 if args.smoke else args.rounds
    work = Path(tempfile.mkdtemp(prefix="bench_integrity_"))
    try:
        run(work, rounds, args.smoke)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(work: Path, rounds: int, smoke: bool) -> None:
    source = (write_hyperlora_folder(work / "tiny_source", base=True) if smoke
              else full_model_folder(test_cache_root()))
    folder = linked_copy(source, work / "checked" / source.name)
    size = sum(f.stat().st_size for f in model_files(folder))
    print(f"model: {source.name}, {size / 1e9:.2f} GB in {len(model_files(folder))} files")
    print(f"CPU: {cpu_name()}, {os.cpu_count()} logical cores, load average {os.getloadavg()[0]:.1f} at start; "
          f"Python {platform.python_version()}")

    def load() -> None:
        model = load_hyper_lora(folder)
        del model
        gc.collect()

    def check(cache: integrity.VerifiedCache) -> integrity.IntegrityReport:
        return integrity.verify_folder(folder, uses=[f.name for f in model_files(folder)], cache=cache)

    load()                                                   # warm the page cache and allocator
    first_caches = [integrity.VerifiedCache(work / f"first{i}.json") for i in range(max(1, rounds // 2))]
    first_check = [timed(lambda c=c: check(c)) for c in first_caches]
    cache = integrity.VerifiedCache(work / "cache.json")
    assert check(cache).hashed                               # filled once
    plain, checked = [], []

    def checked_load() -> None:
        report = check(integrity.VerifiedCache(cache.path))  # a fresh process' view of the cache
        assert report.cached and not report.hashed           # the cached path is what is timed
        load()

    for i in range(rounds):                                  # ABBA: neither kind always runs first
        if i % 2 == 0:
            plain.append(timed(load))
            checked.append(timed(checked_load))
        else:
            checked.append(timed(checked_load))
            plain.append(timed(load))
    report = check(integrity.VerifiedCache(cache.path))
    assert report.state == "verified" and not report.hashed and report.cached
    alone = [timed(lambda: check(integrity.VerifiedCache(cache.path))) for _ in range(5 if smoke else 50)]

    p, c = statistics.median(plain), statistics.median(checked)
    f, a = statistics.median(first_check), statistics.median(alone)
    ratio = statistics.median(ck / pl for ck, pl in zip(checked, plain))
    print(f"\n| Loader run (HyperLoRA folder) | median of {rounds} | vs plain load |")
    print("|---|---|---|")
    print(f"| load_hyper_lora, no check | {p:.3f} s | 1.000 |")
    print(f"| with the first check (hash every file, {size / 1e9:.2f} GB) | {p + f:.3f} s | {(p + f) / p:.3f} |")
    print(f"| with the cached check (stat only), interleaved | {c:.3f} s | {c / p:.3f} |")
    print(f"\nfirst check alone: {f:.3f} s ({size / f / 1e9:.2f} GB/s hashed)")
    print(f"checked / plain load, median of the {rounds} interleaved round ratios: {ratio:.4f} "
          f"(round to round spread of the plain load: {100 * (max(plain) - min(plain)) / p:.1f} %)")
    print(f"cached check alone: {a * 1000:.2f} ms = {100 * a / p:.3f} % of the load (target <= 2 %: "
          f"{'met' if a / p <= 0.02 else 'NOT met'})")


if __name__ == "__main__":
    main()
