"""One-command GPU check: the pack's hot paths on a CUDA device, in one table (a few minutes).

    python bench/gpu_check.py [--repeat R] [--size 1024] [--smoke] [--cpu]
    COMFYUI_PATH=/path/to/ComfyUI python bench/gpu_check.py      # adds the sampling rows

On ``cuda:0``:

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

**Without CUDA** (so that the script cannot rot before a GPU machine runs it): ``--cpu``, and
``--smoke`` on a machine without CUDA, run every part end to end on the CPU instead (the resampler
and CLIP in the Loader's ``auto`` precision for the CPU, face analysis with the CPU provider); the
CUDA-only measurements (synchronisation, peak GPU memory, the theoretical bandwidth, the CUDA
execution provider) are skipped, each with a row saying so.  ``--smoke`` uses SDXL's 140 modules at
K=4 and a tiny CLIP instead of the full-size models; the sampling rows need ComfyUI and load the
random SDXL as always.  Without CUDA and without either flag it says so and exits 0.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

NO_CUDA = "No CUDA device here (torch.cuda.is_available() is False): the GPU check needs an NVIDIA GPU"
CUDA_ONLY = "skipped: CUDA only (this run is on the CPU)"
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


@dataclass
class Device:
    """Where the check runs: ``cuda`` (the real check) or ``cpu`` (every code path, CUDA-only rows skipped).

    ``dtype``: the precision of the resampler and CLIP (fp16 on CUDA as the Loader's ``auto`` gives
    there; on the CPU the Loader's ``auto`` for this CPU); ``provider``: onnxruntime's execution provider;
    ``small``: the smoke fixtures (SDXL's modules at K=4, tiny CLIP) instead of the full-size ones.
    """
    torch: Any
    type: str
    dtype: Any
    provider: str
    small: bool = False

    @property
    def cuda(self) -> bool:
        return self.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()

    def peak_memory(self) -> str:
        return f"{self.torch.cuda.max_memory_allocated() / GB:.2f} GB" if self.cuda else CUDA_ONLY

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()

    @property
    def dtype_name(self) -> str:
        from hyperlora.precision import dtype_name

        return dtype_name(self.dtype)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def _median(times: list[float]) -> float:
    return statistics.median(times)


def theoretical_bandwidth(props: object) -> float | None:
    """Bytes/s from the memory clock (kHz, double data rate) and bus width (bits), where torch reports them."""
    clock = getattr(props, "memory_clock_rate", None)
    bus = getattr(props, "memory_bus_width", None)
    return 2.0 * clock * 1e3 * bus / 8 if clock and bus else None


def lora_build(dev: Device, table: Table, cache: Path, repeat: int, timer: Callable) -> None:
    from hyperlora.checkpoint import load_hyper_lora
    from hyperlora.lora import normalize_tokens

    torch = dev.torch
    dev.reset_peak()
    folder, what = model_folder(cache, small=dev.small)
    t0 = time.perf_counter()
    model = load_hyper_lora(folder, device=dev.type, resampler_dtype=dev.dtype)
    dev.sync()
    table.add("load", f"{what} to the {dev.type} (basis fp16, resampler {dev.dtype_name})",
              f"{time.perf_counter() - t0:.1f} s")
    bufs = [b for _, d, u in model.basis_groups("id") for b in (d, u)]
    basis_bytes = sum(b.numel() * b.element_size() for b in bufs)
    tokens = normalize_tokens(torch.randn(model.arch.num_tokens, model.arch.hyper_dim,
                                          generator=torch.Generator().manual_seed(0))).to(dev.type)
    runs = timer({"build": lambda: model.build_lora(tokens), "read": lambda: [b.sum() for b in bufs]}, repeat)
    build, read = _median(runs["build"]), _median(runs["read"])
    table.add("LoRA build", f"build_lora (basis {basis_bytes / GB:.2f} GB)", _ms(build), f"{build / read:.2f}x floor")
    table.add("LoRA build", "floor: one streaming read of the basis", _ms(read),
              f"{basis_bytes / read / GB:.0f} GB/s")
    if dev.cuda:
        peak_bw = theoretical_bandwidth(torch.cuda.get_device_properties(0))
        if peak_bw:
            table.add("LoRA build", "theoretical floor (memory clock x bus width)", _ms(basis_bytes / peak_bw),
                      f"{build / (basis_bytes / peak_bw):.2f}x; {peak_bw / GB:.0f} GB/s")
    else:
        table.add("LoRA build", "theoretical floor (memory clock x bus width)", CUDA_ONLY)

    g = torch.Generator().manual_seed(1)
    arch = model.arch
    for n in (1, 4):
        e = torch.nn.functional.normalize(torch.randn(n, arch.id_embed_dim, generator=g), dim=-1)
        c = torch.randn(n, 257, arch.resampler.embed_dims[-1], generator=g)
        e, c = e.to(dev.type, dev.dtype), c.to(dev.type, dev.dtype)
        t = timer({"tokens": lambda: model.id_tokens(id_embeds=e, clip_features=c, use_cache=False)}, repeat)
        table.add("resampler", f"id_tokens, {n} photo(s), {dev.dtype_name}", _ms(_median(t["tokens"])),
                  f"{_median(t['tokens']) / n * 1000:.1f} ms / photo")
    table.add("memory", "peak GPU memory: model, build, resampler", dev.peak_memory())
    # the model is freed when this function returns (the caller empties the CUDA cache)


def model_folder(cache: Path, *, small: bool) -> tuple[Path, str]:
    """The released-size random model (cached), or with ``small`` SDXL's 140 modules at K=4 (a temp folder)."""
    if small:
        from tests.comfy.models import SDXL_SMALL
        from tests.fixtures.hyperlora_models import write_hyperlora_folder

        folder = write_hyperlora_folder(Path(tempfile.mkdtemp(prefix="gpu_check_")) / "sdxl_small",
                                        preset=SDXL_SMALL, seed=1)
        return folder, "SDXL's modules at K=4 (smoke)"
    from tests.fixtures.hyperlora_models import full_model_folder

    return full_model_folder(cache), "full-size model"


def preprocessing(dev: Device, table: Table, cache: Path, repeat: int, timer: Callable) -> None:
    from hyperlora.encoders import ClipVisionEncoder
    from hyperlora.errors import HyperLoRAError
    from hyperlora.faces.analysis import FaceAnalyzer
    from hyperlora.pipeline import extract_conditions
    from tests.comfy.models import astronaut
    from tests.fixtures.antelope import cached_antelopev2
    from tests.fixtures.clip import full_vit_l14_file, make_clip_folder

    dev.reset_peak()
    try:
        analyzer = FaceAnalyzer(cached_antelopev2(cache), provider=dev.provider)
    except HyperLoRAError as exc:       # no onnxruntime-gpu: say so, go on with the rest
        table.add("preprocessing", f"{dev.provider} execution provider", f"unavailable: {exc}")
        return
    if not dev.cuda:
        table.add("preprocessing", "CUDA execution provider of onnxruntime", CUDA_ONLY)
    if dev.small:
        dirs = make_clip_folder(Path(tempfile.mkdtemp(prefix="gpu_check_clip_")))
        clip = ClipVisionEncoder.from_pretrained(dirs.model, dirs.processor, dtype=dev.dtype, device=dev.type,
                                                 require_vit_l14=False)
        clip_name = "tiny CLIP (smoke)"
    else:
        clip = ClipVisionEncoder.from_single_file(full_vit_l14_file(cache), dtype=dev.dtype, device=dev.type)
        clip_name = "CLIP ViT-L/14"
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
    table.add("preprocessing", f"face analysis + {clip_name} {dev.dtype_name}, 1 photo", _ms(_median(t["all"])))
    table.add("memory", "peak GPU memory: CLIP", dev.peak_memory())


def sampling(dev: Device, table: Table, comfyui: str, size: int, repeat: int) -> None:
    from bench.bench_sampling import comfy_setup

    tmp = Path(tempfile.mkdtemp(prefix="hyperlora_gpu_check_"))
    try:
        s = comfy_setup(comfyui, tmp)
        cn = s.cn
        dev.reset_peak()
        latent = cn.EmptyLatentImage().generate(size, size, 1)[0]

        def step(m: object) -> float:
            dev.sync()
            t0 = time.perf_counter()
            cn.common_ksampler(m, 1, 1, 5.0, "euler", "normal", s.pos, s.neg, latent)
            dev.sync()
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
        table.add("memory", "peak GPU memory: sampling", dev.peak_memory())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5, help="interleaved rounds per measurement")
    ap.add_argument("--size", type=int, default=1024, help="image size of the sampling rows (px)")
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH", ""), help="ComfyUI checkout")
    ap.add_argument("--cache", type=Path, default=None, help="fixture cache (default: the tests' cache)")
    ap.add_argument("--cpu", action="store_true",
                    help="run every part on the CPU (CUDA-only rows skipped with a line saying so): checks the "
                         "script itself on a machine without a GPU")
    ap.add_argument("--smoke", action="store_true",
                    help="one round, small models, 64 px sampling rows: a quick run that the script works (CI; "
                         "without CUDA it runs on the CPU, as --cpu)")
    args = ap.parse_args(argv)

    import torch

    cuda = torch.cuda.is_available() and not args.cpu
    if not cuda and not (args.cpu or args.smoke):
        print(f"{NO_CUDA} and a CUDA build of torch (this one: {torch.__version__}). Nothing was measured. "
              f"(--cpu runs the check's code on the CPU.)")
        return 0
    if args.smoke:
        args.repeat, args.size = 1, (256 if cuda else 64)
    from bench.common import interleaved
    from hyperlora.precision import cpu_auto_precision
    from tests.conftest import test_cache_root

    if cuda:
        dev = Device(torch, "cuda", torch.float16, "CUDA", small=args.smoke)
        props = torch.cuda.get_device_properties(0)
        print(f"{props.name}, {props.total_memory / GB:.1f} GB, torch {torch.__version__}, CUDA {torch.version.cuda}")
    else:
        dev = Device(torch, "cpu", cpu_auto_precision().dtype, "CPU", small=args.smoke)
        why = "--cpu" if args.cpu else "no CUDA device here"
        print(f"On the CPU ({why}; torch {torch.__version__}): every part runs, the CUDA-only measurements are "
              f"skipped, each with a row saying so. Resampler and CLIP in {dev.dtype_name} "
              f"('auto' on this CPU: {cpu_auto_precision().reason}).")

    def timer(fns: dict[str, Callable[[], object]], repeat: int) -> dict[str, list[float]]:
        with torch.inference_mode():
            return interleaved(fns, repeat, sync=dev.sync if dev.cuda else None)

    cache = args.cache or test_cache_root()
    table = Table()
    t0 = time.perf_counter()
    for part in (lora_build, preprocessing):     # each frees its models on return
        part(dev, table, cache, args.repeat, timer)
        dev.free()
    if args.comfyui and (Path(args.comfyui) / "nodes.py").is_file():
        sampling(dev, table, args.comfyui, args.size, max(1, args.repeat // 2))
    else:
        table.add("sampling", "merged / plain step time", "skipped: set COMFYUI_PATH to a ComfyUI checkout")
    table.add("total", "wall time of the check (fixtures cached)", f"{time.perf_counter() - t0:.0f} s")
    table.print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
