"""One-command GPU check: the pack's hot paths on a CUDA device, in one table (a few minutes).

    python bench/gpu_check.py [--repeat R] [--size 1024] [--smoke]
    COMFYUI_PATH=/path/to/ComfyUI python bench/gpu_check.py      # adds the sampling rows

On a machine without CUDA it says so and exits 0.  Otherwise, on ``cuda:0``:

1. LoRA build (``build_lora``, fp16 basis of the released size, 1.49e9 numbers = 2.97 GB, random
   weights) against the device's memory-bandwidth floor: the time of one streaming read of exactly
   the basis' bytes (one ``sum()`` per contiguous group buffer), measured interleaved with the build;
   the theoretical floor from the device's memory clock and bus width is printed where torch reports them.
2. Resampler: ``id_tokens`` for one photo (fp16, as the Loader's ``auto`` dtype gives on a GPU;
   token cache off), and for four photos.
3. Preprocessing with the CUDA execution provider of onnxruntime: face analysis (the tests' small
   stand-in AntelopeV2 models, so the time says that the provider works, not how fast the real
   models are) and CLIP ViT-L/14 (full size, random weights, fp16 on the GPU) for one photo.
4. Sampling step time at ``--size`` px (default 1024) with a random SDXL, merged HyperLoRA vs the
   plain model, blocks interleaved (needs ComfyUI: ``COMFYUI_PATH``, as bench/bench_sampling.py).
5. Peak GPU memory of each part (``torch.cuda.max_memory_allocated``).

The fixtures (3 GB HyperLoRA, 7 GB SDXL, 1.2 GB ViT-L/14, all random) are built on first use and
cached like the tests' (``HYPERLORA_TEST_CACHE``); building them is not part of the few minutes.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

NO_CUDA = "No CUDA device here (torch.cuda.is_available() is False): the GPU check needs an NVIDIA GPU"
GB = 1e9


class Table:
    """Rows of (part, measurement, value, ratio) printed as one Markdown table at the end."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str]] = []

    def add(self, part: str, what: str, value: str, ratio: str = "") -> None:
        self.rows.append((part, what, value, ratio))
        print(f"  {part}: {what}: {value} {ratio}".rstrip(), flush=True)

    def print(self) -> None:
        print("\n| part | measurement | value | ratio |\n|---|---|---|---|")
        for row in self.rows:
            print("| " + " | ".join(row) + " |")


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def _median(times: list[float]) -> float:
    return statistics.median(times)


def theoretical_bandwidth(props: object) -> float | None:
    """Bytes/s from the memory clock (kHz, double data rate) and bus width (bits), where torch reports them."""
    clock = getattr(props, "memory_clock_rate", None)
    bus = getattr(props, "memory_bus_width", None)
    return 2.0 * clock * 1e3 * bus / 8 if clock and bus else None


def lora_build(torch, table: Table, cache: Path, repeat: int, timer: Callable) -> None:
    from hyperlora.checkpoint import load_hyper_lora
    from hyperlora.lora import normalize_tokens
    from tests.fixtures.hyperlora_models import full_model_folder

    torch.cuda.reset_peak_memory_stats()
    folder = full_model_folder(cache)
    t0 = time.perf_counter()
    model = load_hyper_lora(folder, device="cuda")
    torch.cuda.synchronize()
    table.add("load", "full-size model to the GPU (fp16)", f"{time.perf_counter() - t0:.1f} s")
    bufs = [b for _, d, u in model.basis_groups("id") for b in (d, u)]
    basis_bytes = sum(b.numel() * b.element_size() for b in bufs)
    tokens = normalize_tokens(torch.randn(model.arch.num_tokens, model.arch.hyper_dim,
                                          generator=torch.Generator().manual_seed(0))).cuda()
    runs = timer({"build": lambda: model.build_lora(tokens), "read": lambda: [b.sum() for b in bufs]}, repeat)
    build, read = _median(runs["build"]), _median(runs["read"])
    table.add("LoRA build", f"build_lora (basis {basis_bytes / GB:.2f} GB)", _ms(build), f"{build / read:.2f}x floor")
    table.add("LoRA build", "floor: one streaming read of the basis", _ms(read),
              f"{basis_bytes / read / GB:.0f} GB/s")
    peak_bw = theoretical_bandwidth(torch.cuda.get_device_properties(0))
    if peak_bw:
        table.add("LoRA build", "theoretical floor (memory clock x bus width)", _ms(basis_bytes / peak_bw),
                  f"{build / (basis_bytes / peak_bw):.2f}x; {peak_bw / GB:.0f} GB/s")

    g = torch.Generator().manual_seed(1)
    for n in (1, 4):
        e = torch.nn.functional.normalize(torch.randn(n, 512, generator=g), dim=-1).cuda().half()
        c = torch.randn(n, 257, 1024, generator=g).cuda().half()
        t = timer({"tokens": lambda: model.id_tokens(id_embeds=e, clip_features=c, use_cache=False)}, repeat)
        table.add("resampler", f"id_tokens, {n} photo(s), fp16", _ms(_median(t["tokens"])),
                  f"{_median(t['tokens']) / n * 1000:.1f} ms / photo")
    table.add("memory", "peak GPU memory: model, build, resampler",
              f"{torch.cuda.max_memory_allocated() / GB:.2f} GB")
    # the model is freed when this function returns (the caller empties the CUDA cache)


def preprocessing(torch, table: Table, cache: Path, repeat: int, timer: Callable) -> None:
    from hyperlora.encoders import ClipVisionEncoder
    from hyperlora.errors import HyperLoRAError
    from hyperlora.faces.analysis import FaceAnalyzer
    from hyperlora.pipeline import extract_conditions
    from tests.comfy.models import astronaut
    from tests.fixtures.antelope import cached_antelopev2
    from tests.fixtures.clip import full_vit_l14_file

    torch.cuda.reset_peak_memory_stats()
    try:
        analyzer = FaceAnalyzer(cached_antelopev2(cache), provider="CUDA")
    except HyperLoRAError as exc:       # no onnxruntime-gpu: say so, go on with the rest
        table.add("preprocessing", "CUDA execution provider", f"unavailable: {exc}")
        return
    clip = ClipVisionEncoder.from_single_file(full_vit_l14_file(cache), dtype=torch.float16, device="cuda")
    photo = [astronaut()]

    def faces_only() -> object:
        return extract_conditions(photo, analyzer=analyzer, clip=None, need_id=True, need_clip=False,
                                  need_base=False, use_cache=False)

    def everything() -> object:
        return extract_conditions(photo, analyzer=analyzer, clip=clip, need_id=True, need_clip=True,
                                  need_base=False, use_cache=False)

    t = timer({"faces": faces_only, "all": everything}, repeat)
    table.add("preprocessing", f"face analysis with {', '.join(analyzer.providers)} (stand-in models)",
              _ms(_median(t["faces"])))
    table.add("preprocessing", "face analysis + CLIP ViT-L/14 fp16, 1 photo", _ms(_median(t["all"])))
    table.add("memory", "peak GPU memory: CLIP", f"{torch.cuda.max_memory_allocated() / GB:.2f} GB")


def sampling(table: Table, comfyui: str, size: int, repeat: int) -> None:
    from bench.bench_sampling import comfy_setup

    tmp = Path(tempfile.mkdtemp(prefix="hyperlora_gpu_check_"))
    try:
        s = comfy_setup(comfyui, tmp)
        torch, cn = s.torch, s.cn
        torch.cuda.reset_peak_memory_stats()
        latent = cn.EmptyLatentImage().generate(size, size, 1)[0]

        def step(m: object) -> float:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            cn.common_ksampler(m, 1, 1, 5.0, "euler", "normal", s.pos, s.neg, latent)
            torch.cuda.synchronize()
            return time.perf_counter() - t0

        times: dict[str, list[float]] = {"plain": [], "merged": []}
        for block in range(5):           # plain, merged, plain, merged, plain; first run after a switch untimed
            name, m = ("plain", s.model) if block % 2 == 0 else ("merged", s.patched)
            step(m)
            times[name] += [step(m) for _ in range(repeat)]
        plain, merged = _median(times["plain"]), _median(times["merged"])
        table.add("sampling", f"1 step at {size}x{size}, plain SDXL (random weights)", _ms(plain))
        table.add("sampling", f"1 step at {size}x{size}, HyperLoRA merged", _ms(merged),
                  f"{merged / plain:.3f}x plain (target 1.00 +/- 0.03)")
        table.add("memory", "peak GPU memory: sampling", f"{torch.cuda.max_memory_allocated() / GB:.2f} GB")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5, help="interleaved rounds per measurement")
    ap.add_argument("--size", type=int, default=1024, help="image size of the sampling rows (px)")
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH", ""), help="ComfyUI checkout")
    ap.add_argument("--cache", type=Path, default=None, help="fixture cache (default: the tests' cache)")
    ap.add_argument("--smoke", action="store_true",
                    help="one round, 256 px sampling rows: a quick run that the script works (CI; without CUDA it "
                         "says so and exits 0, as always)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.repeat, args.size = 1, 256

    import torch

    if not torch.cuda.is_available():
        print(f"{NO_CUDA} and a CUDA build of torch (this one: {torch.__version__}). Nothing was measured.")
        return 0
    from bench.common import interleaved
    from tests.conftest import test_cache_root

    def timer(fns: dict[str, Callable[[], object]], repeat: int) -> dict[str, list[float]]:
        with torch.inference_mode():
            return interleaved(fns, repeat, sync=torch.cuda.synchronize)

    cache = args.cache or test_cache_root()
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}, {props.total_memory / GB:.1f} GB, torch {torch.__version__}, CUDA {torch.version.cuda}")
    table = Table()
    t0 = time.perf_counter()
    for part in (lora_build, preprocessing):     # each frees its models on return
        part(torch, table, cache, args.repeat, timer)
        gc.collect()
        torch.cuda.empty_cache()
    if args.comfyui and (Path(args.comfyui) / "nodes.py").is_file():
        sampling(table, args.comfyui, args.size, max(1, args.repeat // 2))
    else:
        table.add("sampling", "merged / plain step time", "skipped: set COMFYUI_PATH to a ComfyUI checkout")
    table.add("total", "wall time of the check (fixtures cached)", f"{time.perf_counter() - t0:.0f} s")
    table.print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
