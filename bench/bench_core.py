"""Benchmark of the HyperLoRA core on the full-size random fp16 checkpoint (issue 2).

    python bench/bench_core.py [--cache DIR] [--threads N] [--repeat R] [--tokens] [--smoke]

Everything is measured in this one process (except the load peak, see (c)):

(a) LoRA build time, fast path (``build_lora``, strategy "auto" = "native" on an x86-64 CPU with
    AVX2 and a C compiler, else "mv"; also "mv" and "bmm" explicitly)
    vs a straightforward per-matrix loop (one ``coeffs @ basis`` per matrix on the file layout
    ``[K, in*rank]``, then transpose/copy, one matrix at a time).
(b) fast path vs the memory-bandwidth floor: the fastest of several streaming passes over exactly
    the basis' bytes (one fp16 ``torch.mv`` per contiguous group buffer viewed with 128-, 1024- or
    8192-wide rows, or one ``sum()`` per buffer; 8 calls each).
    Target: fast <= 1.5x floor.  Peak extra memory of the build: Linux's peak-RSS counter
    (VmHWM) is reset through ``/proc/self/clear_refs`` ("5") right before the build and read
    right after; extra = VmHWM - VmRSS before (includes the returned LoRA itself).
    Target: <= 10% of the basis size.  (tracemalloc cannot see torch's allocations.)
(c) peak RAM of ``load_hyper_lora`` on the fp16 folder: a fresh subprocess reports
    ``ru_maxrss`` after ``import torch, hyperlora`` and after loading; target peak <= 1.3x
    the folder's file size.

The machine's load average is printed: on a shared box OpenMP threads that get descheduled
make every parallel region wait, so ``--threads 1`` can be faster than the default.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from hyperlora import cpu_kernel  # noqa: E402
from hyperlora.checkpoint import load_hyper_lora, model_files  # noqa: E402
from hyperlora.generate import batched_matvecs, normalize_tokens  # noqa: E402
from bench.common import interleaved  # noqa: E402
from tests.conftest import test_cache_root  # noqa: E402
from tests.fixtures.hyperlora_models import full_model_folder  # noqa: E402

GB = 1e9


def proc_status() -> dict[str, int]:
    """VmRSS / VmHWM of this process in bytes."""
    text = Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"{k}:\s+(\d+)", text).group(1)) * 1024 for k in ("VmRSS", "VmHWM")}


def reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def timed(fn, repeat: int) -> list[float]:
    return interleaved({"fn": fn}, repeat)["fn"]


LOAD_CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[2])
import torch
torch.set_num_threads(int(sys.argv[3]))
from hyperlora.checkpoint import load_hyper_lora
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t0 = time.perf_counter()
model = load_hyper_lora(sys.argv[1])
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"before": before, "peak": peak, "seconds": dt}))
"""


def measure_load(folder: Path, threads: int) -> dict[str, float]:
    res = subprocess.run([sys.executable, "-c", LOAD_CHILD, str(folder), str(REPO), str(threads)],
                         capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def naive_loop_seconds(model, tokens: torch.Tensor) -> float:
    """Per-matrix build on the file layout, one matrix at a time (re-laid out per group, untimed)."""
    t = tokens.to(model.basis_dtype)
    total = 0.0
    for g, down_b, up_b in model.basis_groups("id"):
        tok = getattr(model, g.token_buffer)
        for buf, shift, shape in ((down_b, 0, (g.in_features, g.rank)), (up_b, 1, (g.rank, g.out_features))):
            orig = buf.transpose(1, 2).contiguous()  # [M, K, in*rank]: the file's [K, in, rank] layout
            coeffs = t.index_select(0, tok + shift)
            t0 = time.perf_counter()
            for m in range(orig.shape[0]):
                flat = coeffs[m] @ orig[m]  # [K] @ [K, N]
                flat.view(shape).t().contiguous()
            total += time.perf_counter() - t0
            del orig
    return total


def loop_same_layout_seconds(model, tokens: torch.Tensor) -> float:
    """Per-matrix loop on the fast path's K-contiguous buffers, each matrix allocated and
    transposed on its own (isolates what grouping the outputs saves)."""
    t = tokens.to(model.basis_dtype)
    t0 = time.perf_counter()
    for g, down_b, up_b in model.basis_groups("id"):
        tok = getattr(model, g.token_buffer)
        for buf, shift, shape in ((down_b, 0, (g.in_features, g.rank)), (up_b, 1, (g.rank, g.out_features))):
            coeffs = t.index_select(0, tok + shift)
            for m in range(buf.shape[0]):
                torch.mv(buf[m], coeffs[m]).view(shape).t().contiguous()
    return time.perf_counter() - t0


def floor_passes(model) -> dict[str, Callable[[], object]]:
    """One streaming pass over every group buffer (the basis' exact bytes) for a few kernels.

    ``mv{c}``: a single fp16 ``torch.mv`` per contiguous buffer viewed as ``[-1, c]``
    (c = K is the shape of the LoRA math; wider rows suit the gemv kernel better);
    ``sum``: a plain reduction.  The floor is the fastest of them (median), whichever it is.
    """
    bufs = [b for _, d, u in model.basis_groups("id") for b in (d, u)]
    K = model.arch.hyper_dim
    out: dict[str, Callable[[], object]] = {}
    for cols in (K, 1024, 8192):
        if any(b.numel() % cols for b in bufs):
            continue
        views = [b.view(-1, cols) for b in bufs]
        vec = torch.randn(cols, dtype=bufs[0].dtype)
        out[f"mv{cols}"] = lambda views=views, vec=vec: [torch.mv(v, vec) for v in views]
    out["sum"] = lambda: [b.sum() for b in bufs]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=None, help="test-model cache dir (default: the tests' cache)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeat", type=int, default=11)
    ap.add_argument("--tokens", action="store_true", help="also time id_tokens for one image (fp16 resampler)")
    ap.add_argument("--smoke", action="store_true",
                    help="the tiny model, 2 rounds, 1 and 2 threads: a quick run that the script works (CI)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    if args.smoke:
        import tempfile

        from tests.fixtures.hyperlora_models import write_hyperlora_folder

        args.repeat = 2
        folder = write_hyperlora_folder(Path(tempfile.mkdtemp(prefix="bench_core_")) / "tiny_model")
        for threads in (1, 2):            # the single-thread path once crashed in inference mode ('mv')
            torch.set_num_threads(threads)
            model = load_hyper_lora(folder)
            tokens = normalize_tokens(torch.randn(model.arch.num_tokens, model.arch.hyper_dim))
            with torch.inference_mode():
                for strategy in ("auto", "mv", "bmm"):
                    model.build_lora(tokens, strategy=strategy)
        torch.set_num_threads(args.threads)
    else:
        folder = full_model_folder(args.cache or test_cache_root())
    file_bytes = sum(p.stat().st_size for p in model_files(folder))
    print(f"model: {folder}  files {file_bytes / GB:.2f} GB  threads {args.threads}  "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    kernel = cpu_kernel.status()
    print(f"native CPU kernel: {'yes' if kernel.available else 'no'} ({kernel.reason})")

    load = measure_load(folder, args.threads)  # (c) in a fresh process, before this one holds a copy
    load_ratio = load["peak"] / file_bytes
    print(f"(c) load: {load['seconds']:.1f} s, peak RSS {load['peak'] / GB:.2f} GB "
          f"(after imports {load['before'] / GB:.2f} GB) = {load_ratio:.2f}x the files")

    model = load_hyper_lora(folder)
    basis_bytes = sum(d.numel() * d.element_size() + u.numel() * u.element_size()
                      for _, d, u in model.basis_groups("id"))
    tokens = normalize_tokens(torch.randn(model.arch.num_tokens, model.arch.hyper_dim,
                                          generator=torch.Generator().manual_seed(0)))

    # (b) peak extra memory of the build, first big allocation after the load
    peak_ok = reset_peak_rss()
    rss0 = proc_status()["VmRSS"]
    lora = model.build_lora(tokens)
    extra = proc_status()["VmHWM"] - rss0 if peak_ok else float("nan")
    lora_bytes = sum(v.numel() * v.element_size() for v in lora.values())
    del lora

    # the fast path, its products alone, the mv kernel and every streaming pass, round-robin in one loop
    t16 = tokens.to(model.basis_dtype)
    pairs = [(b, t16.index_select(0, getattr(model, g.token_buffer) + shift))
             for g, d, u in model.basis_groups("id") for b, shift in ((d, 0), (u, 1))]
    runs = interleaved({"fast": lambda: model.build_lora(tokens), "products": lambda: batched_matvecs(pairs),
                        "mv": lambda: model.build_lora(tokens, strategy="mv"), **floor_passes(model)}, args.repeat)
    fast, products, mv = runs.pop("fast"), runs.pop("products"), runs.pop("mv")
    floors = runs
    bmm = timed(lambda: model.build_lora(tokens, strategy="bmm"), max(2, args.repeat // 2))
    naive = naive_loop_seconds(model, tokens)
    same = min(loop_same_layout_seconds(model, tokens) for _ in range(3))

    f_med, b_med, mv_med = statistics.median(fast), statistics.median(bmm), statistics.median(mv)
    best_key = min(floors, key=lambda k: statistics.median(floors[k]))   # the strictest streaming pass
    floor, fl_med = floors[best_key], statistics.median(floors[best_key])
    rows = [
        (f"fast path (auto = {'native AVX2 row-dot kernel' if kernel.available else 'per-matrix mv'})",
         f_med, min(fast)),
        ("its products alone (batched_matvecs over every group, no LoRA dict)", statistics.median(products),
         min(products)),
        ("fast path, strategy mv (torch.mv per matrix, 2 worker threads)", mv_med, min(mv)),
        ("fast path, strategy bmm (one bmm per group)", b_med, min(bmm)),
        ("per-matrix loop on the file layout", naive, naive),
        ("per-matrix loop on the K-contiguous layout, one output at a time", same, same),
    ]
    rows += [(f"streaming pass: 1 {k} per contiguous group buffer" if k != "sum"
              else "streaming pass: 1 sum() per contiguous group buffer",
              statistics.median(v), min(v)) for k, v in floors.items()]
    print(f"(a) fast / per-matrix loop: {f_med / naive:.3f}  (loop is {naive / f_med:.1f}x slower)")
    print(f"(b) fast / floor ({best_key}): {f_med / fl_med:.2f} (median), {min(fast) / min(floor):.2f} (best)  "
          f"target <= 1.5; mv / floor: {mv_med / fl_med:.2f}; bmm / floor: {b_med / fl_med:.2f}")
    print(f"(b) peak extra memory during build: {extra / 1e6:.1f} MB = {100 * extra / basis_bytes:.2f}% of the "
          f"basis ({basis_bytes / GB:.2f} GB)  target <= 10%; the LoRA itself is {lora_bytes / 1e6:.1f} MB")
    if args.tokens:
        g = torch.Generator().manual_seed(1)
        e = torch.nn.functional.normalize(torch.randn(1, 512, generator=g), dim=-1)
        c = torch.randn(1, 257, 1024, generator=g)
        tok_s = min(timed(lambda: model.id_tokens(id_embeds=e, clip_features=c), 2))
        rows.append(("id_tokens, 1 image (fp16 resampler)", tok_s, tok_s))
        model.resampler.float()  # what load_hyper_lora(resampler_dtype=torch.float32) gives
        model.id_projector.float()
        tok32 = min(timed(lambda: model.id_tokens(id_embeds=e, clip_features=c), 2))
        rows.append(("id_tokens, 1 image (fp32 resampler)", tok32, tok32))

    print(f"\n{args.threads} thread(s), load average {os.getloadavg()[0]:.1f}\n")
    print("| measurement | median | best | ratio |")
    print("|---|---|---|---|")
    for name, med, best in rows:
        print(f"| {name} | {med * 1000:.0f} ms | {best * 1000:.0f} ms | {med / fl_med:.2f}x floor |")
    print(f"| basis streamed by the floor | {basis_bytes / GB:.2f} GB | {basis_bytes / min(floor) / GB:.1f} GB/s | |")
    print(f"| peak extra RAM during build | {extra / 1e6:.0f} MB | | {100 * extra / basis_bytes:.2f}% of basis |")
    print(f"| load_hyper_lora peak RSS (fresh process) | {load['peak'] / GB:.2f} GB | {load['seconds']:.1f} s | "
          f"{load_ratio:.2f}x files ({file_bytes / GB:.2f} GB) |")


if __name__ == "__main__":
    main()
