"""Ours (the Loader's ``auto``) against the authors' ComfyUI-HyperLoRA plugin, one table, one run.

    python bench/bench_vs_authors.py [--authors DIR] [--authors-dtype fp16] [--also bf16] [--repeat 2]
                                     [--threads N] [--smoke]

The workload of issue 21: the released-size model (random weights), the full-size ViT-L/14 (random
weights), the tests' stand-in AntelopeV2 models, one photo (the astronaut).

* **identity + LoRA from one photo**, uncached, with its breakdown: face analysis, CLIP, resampler,
  build (median of ``--repeat`` rounds after a warm-up);
* **load model + CLIP + faces** (cold for the process, files in the page cache);
* the ratio of ours to the authors';
* each stage against its floor: FLOPs over the matmul throughput this machine measures in that
  precision (CLIP ViT-L/14 and the resampler: analytic FLOP counts), and for the build the basis'
  bytes over the measured memory bandwidth (a streaming pass over the basis).  The face models are
  stand-ins (no floor).

The authors' plugin (``--authors``, ``$HYPERLORA_AUTHORS_PLUGIN``, or the vendored copy in
``../shared/vendor`` beside the repository) runs in a separate process (``--authors-child``) through its
own node classes inside ComfyUI's modules (``$COMFYUI_PATH`` or the vendored ComfyUI), in its default
precision fp16 unless ``--authors-dtype``; without it, or without ComfyUI / diffusers, its column says
why.  The CPU model and flags are printed.  ``--smoke``: SDXL's modules at K=4, tiny CLIP, one round,
no authors' run (CI).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GB = 1e9
STAGES = ("face analysis", "CLIP", "resampler", "build")
VIT_L14_LAYERS = 24
AUTHORS_ENV = "HYPERLORA_AUTHORS_PLUGIN"


# --------------------------------------------------------------------------- floors


def clip_flops(layers: int, tokens: int = 257, width: int = 1024, mlp: int = 4096, patch_in: int = 3 * 14 * 14) -> int:
    """Multiply-adds x 2 of a ViT forward for one image: patch embedding, then per layer q/k/v/out
    projections, attention scores and values, and the MLP."""
    per_layer = 2 * tokens * width * width * 4 + 2 * 2 * tokens * tokens * width + 2 * 2 * tokens * width * mlp
    return 2 * (tokens - 1) * patch_in * width + layers * per_layer


def matmul_throughput(dtype: Any, *, seconds: float = 0.5, n: int = 1024) -> float:
    """FLOP/s of a ``[n, n] @ [n, 4n]`` matmul in ``dtype`` (best of a short series)."""
    import torch

    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, 4 * n).to(dtype)
    a @ b
    best = float("inf")
    end = time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() > end:
            break
    return 2 * n * n * 4 * n / best


def stream_bandwidth(model: Any, repeat: int = 3) -> float:
    """Bytes/s of the fastest streaming pass over the model's basis (bench/bench_core.py's floor)."""
    from bench.bench_core import floor_passes

    bufs = [b for _, d, u in model.basis_groups("id") for b in (d, u)]
    nbytes = sum(b.numel() * b.element_size() for b in bufs)
    best = float("inf")
    for fn in floor_passes(model).values():
        fn()
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
    return nbytes / best


# --------------------------------------------------------------------------- ours


def run_ours(fx: Any, dtype: Any, repeat: int) -> dict[str, Any]:
    """Load (model + CLIP + faces) and identity + LoRA of one photo, the Loader's way, in ``dtype``."""
    from bench.bench_precision import identity_and_lora, load_clip
    from hyperlora.checkpoint import load_hyper_lora
    from hyperlora.faces.analysis import FaceAnalyzer

    t0 = time.perf_counter()
    model = load_hyper_lora(fx.model_folder, resampler_dtype=dtype)      # basis fp16 as stored (auto)
    clip = load_clip(fx, dtype)
    analyzer = FaceAnalyzer(fx.antelope, provider="CPU")
    load = time.perf_counter() - t0
    res = identity_and_lora(model, clip, analyzer, fx.photo, repeat)
    out = {"load": load, **{s: res.median(s) for s in STAGES}, "model": model}
    del clip, analyzer
    return out


# --------------------------------------------------------------------------- the authors' plugin


def find_authors(arg: str | None) -> Path | None:
    for cand in (arg, os.environ.get(AUTHORS_ENV), REPO.parent / "shared" / "vendor" / "authors-ComfyUI-HyperLoRA",
                 REPO.parents[1] / "shared" / "vendor" / "authors-ComfyUI-HyperLoRA"):
        if cand and (Path(cand) / "hyperlora" / "nodes.py").is_file():
            return Path(cand).resolve()
    return None


def find_comfyui() -> Path | None:
    for cand in (os.environ.get("COMFYUI_PATH"), REPO.parent / "shared" / "vendor" / "ComfyUI-0.3.64",
                 REPO.parents[1] / "shared" / "vendor" / "ComfyUI-0.3.64"):
        if cand and (Path(cand) / "folder_paths.py").is_file():
            return Path(cand).resolve()
    return None


def authors_base(base: Path, fx: Any) -> dict[str, str]:
    """The authors' folder layout under ``base/models`` (links to the same fixture files as ours)."""
    from transformers import CLIPVisionConfig

    from tests.fixtures.clip import VIT_L14
    from hyperlora.standins import PROCESSOR_CONFIG

    models = base / "models"
    hl = models / "hyper_lora"
    (hl / "hyper_lora").mkdir(parents=True, exist_ok=True)
    os.symlink(fx.model_folder, hl / "hyper_lora" / "model")
    vit = hl / "clip_vit" / "clip_vit_large_14"
    vit.mkdir(parents=True)
    CLIPVisionConfig(**VIT_L14, hidden_act="quick_gelu").save_pretrained(vit)
    os.symlink(fx.clip_file, vit / "model.safetensors")     # keys vision_model.* + visual_projection.weight
    proc = hl / "clip_processor" / "clip_vit_large_14_processor"
    proc.mkdir(parents=True)
    (proc / "preprocessor_config.json").write_text(json.dumps(PROCESSOR_CONFIG), encoding="utf-8")
    (models / "insightface" / "models").mkdir(parents=True)
    os.symlink(fx.antelope, models / "insightface" / "models" / "antelopev2")
    photo = base / "photo.npy"
    import numpy as np

    np.save(photo, fx.photo)
    return {"models": str(models), "photo": str(photo)}


AUTHORS_CONFIG = {   # the released model's settings in the authors' config node (their README's values)
    "image_processor": "clip_vit_large_14_processor", "image_encoder": "clip_vit_large_14",
    "resampler.dim": 1024, "resampler.dim_head": 64, "resampler.heads": 12, "resampler.depth": 4,
    "resampler.ff_mult": 4, "encoder_types": "clip + arcface", "face_analyzer": "antelopev2", "id_embed_dim": 512,
    "num_id_tokens": 16, "hyper_dim": 128, "lora_rank": 8, "has_base_lora": False,
}


def authors_child(spec: dict[str, Any]) -> dict[str, Any]:
    """In a separate process: the authors' nodes, timed from outside (their code is only called)."""
    import contextlib
    import io

    import numpy as np
    import torch

    from tests.fixtures.sdxl import import_comfy

    torch.set_num_threads(spec["threads"])
    import_comfy(spec["comfyui"])          # ComfyUI's root first on sys.path, CPU selected
    import folder_paths

    folder_paths.models_dir = spec["models"]
    pkg = "authors_hyperlora_plugin"
    init = Path(spec["authors"]) / "__init__.py"
    module_spec = importlib.util.spec_from_file_location(pkg, init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[pkg] = module
    with contextlib.redirect_stdout(io.StringIO()):
        module_spec.loader.exec_module(module)
    nodes = sys.modules[f"{pkg}.hyperlora.nodes"]
    quiet = contextlib.redirect_stdout(io.StringIO())
    t0 = time.perf_counter()
    with quiet:
        (config,) = nodes.HyperLoRAConfigNode().execute(**AUTHORS_CONFIG)
        (hl,) = nodes.HyperLoRALoaderNode().execute(config, "model", spec["dtype"])
    load = time.perf_counter() - t0
    images = torch.from_numpy(np.load(spec["photo"])).float().div(255.0)[None]
    spent = {"CLIP": 0.0, "resampler": 0.0}

    def timed(owner: Any, stage: str) -> None:
        forward = owner.forward

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return forward(*args, **kwargs)
            finally:
                spent[stage] += time.perf_counter() - t
        owner.forward = wrapper

    timed(hl.image_encoder, "CLIP")
    timed(hl.resampler, "resampler")
    rounds: dict[str, list[float]] = {s: [] for s in STAGES}
    for round_ in range(spec["repeat"] + 1):
        spent.update({"CLIP": 0.0, "resampler": 0.0})
        with contextlib.redirect_stdout(io.StringIO()):
            t0 = time.perf_counter()
            (attrs,) = nodes.HyperLoRAFaceAttrNode().execute(hl, images)
            id_cond, _ = nodes.HyperLoRAIDCondNode().execute(hl, images, attrs, False, True)
            t1 = time.perf_counter()
            (lora,) = nodes.HyperLoRAGenerateIDLoRANode().execute(hl, id_cond)
            t2 = time.perf_counter()
        if round_ == 0:
            if not lora:
                raise RuntimeError("the authors' plugin returned no LoRA (no face found?)")
            continue
        rounds["face analysis"].append(t1 - t0)
        rounds["CLIP"].append(spent["CLIP"])
        rounds["resampler"].append(spent["resampler"])
        rounds["build"].append(t2 - t1 - spent["CLIP"] - spent["resampler"])
    return {"load": load, **{s: statistics.median(v) for s, v in rounds.items()}}


def run_authors(fx: Any, args: argparse.Namespace, work: Path) -> dict[str, Any] | str:
    """The authors' figures from a child process, or a sentence why there are none."""
    authors, comfyui = find_authors(args.authors), find_comfyui()
    if authors is None:
        return f"not installed (set {AUTHORS_ENV} or --authors)"
    if comfyui is None:
        return "needs ComfyUI's modules (set COMFYUI_PATH)"
    missing = [m for m in ("diffusers", "insightface", "cv2") if importlib.util.find_spec(m) is None]
    if missing:
        return f"needs {', '.join(missing)} (pip install)"
    spec = {**authors_base(work, fx), "authors": str(authors), "comfyui": str(comfyui), "dtype": args.authors_dtype,
            "repeat": args.repeat, "threads": args.threads}
    res = subprocess.run([sys.executable, __file__, "--authors-child", json.dumps(spec)], capture_output=True,
                         text=True, timeout=3600)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        tail = " ".join((res.stderr or res.stdout).strip().splitlines()[-3:])[:300]
        return f"failed (exit {res.returncode}): {tail}"
    return json.loads(lines[-1])


# --------------------------------------------------------------------------- table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--authors", default=None, help="the authors' ComfyUI-HyperLoRA checkout")
    ap.add_argument("--authors-dtype", default="fp16", choices=("fp16", "bf16", "fp32"),
                    help="the authors' Loader dtype (their default: fp16)")
    ap.add_argument("--also", nargs="*", default=[], choices=("fp32", "bf16", "fp16"),
                    help="more columns of ours in a forced precision")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=None, help="fixture cache (default: the tests' cache)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--smoke", action="store_true", help="small model, tiny CLIP, one round, no authors' run (CI)")
    ap.add_argument("--authors-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.authors_child:
        sys.stdout.write(json.dumps(authors_child(json.loads(args.authors_child))) + "\n")
        return 0

    import torch

    from bench.bench_precision import fixtures
    from bench.bench_resampler import RELEASED, resampler_flops
    from hyperlora import precision
    from tests.conftest import test_cache_root

    args.threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(args.threads)
    if args.smoke:
        args.repeat = 1
    fx = fixtures(args.cache or test_cache_root(), smoke=args.smoke)
    features = precision.read_cpu_features()
    auto = precision.cpu_auto_precision()
    flags = sorted(f for f in features.flags if f.startswith(("avx", "amx", "f16c", "fma")))
    sys.stdout.write(f"CPU: {features.model or 'unknown'}; {os.cpu_count()} logical CPUs, {args.threads} threads, "
                     f"torch {torch.__version__} (capability {features.capability}), load average "
                     f"{os.getloadavg()[0]:.1f}\nflags: {' '.join(flags) or 'none'}\n"
                     f"ours 'auto' on this CPU: {auto.reason}\nworkload: {fx.description}, one photo\n\n")
    sys.stdout.flush()

    # the authors' plugin first, in its own process, while this one holds no model (one at a time in RAM)
    authors_key = f"authors' plugin ({args.authors_dtype})"
    with tempfile.TemporaryDirectory(prefix="bench_vs_authors_") as work:
        if args.smoke:
            authors_col: dict[str, Any] | str = "not run with --smoke"
        else:
            sys.stdout.write(f"the authors' plugin ({args.authors_dtype}, separate process) ...\n")
            sys.stdout.flush()
            authors_col = run_authors(fx, args, Path(work))
    columns: dict[str, dict[str, Any] | str] = {}
    dtypes = {"auto": auto.dtype, **{n: precision.PRECISIONS[n] for n in args.also}}
    model = None
    for name, dtype in dtypes.items():
        sys.stdout.write(f"ours {name} ({precision.dtype_name(dtype)}) ...\n")
        sys.stdout.flush()
        model = None
        res = run_ours(fx, dtype, args.repeat)
        model = res.pop("model")
        columns[f"ours {name} ({precision.dtype_name(dtype)})"] = res
    columns[authors_key] = authors_col

    # floors: throughput in each precision used, bandwidth over the basis
    used = {auto.dtype, *dtypes.values()}
    flops_per_s = {d: matmul_throughput(d) for d in used}
    bandwidth = stream_bandwidth(model)
    basis_bytes = sum(b.numel() * b.element_size() for _, d, u in model.basis_groups("id") for b in (d, u))
    clip_layers = VIT_L14_LAYERS - 1      # penultimate features: ours drops the last layer
    work_flops = {"CLIP": clip_flops(clip_layers), "resampler": resampler_flops(RELEASED, 16, 257)}
    if args.smoke:
        work_flops = {"CLIP": None, "resampler": None}

    names = list(columns)
    header = "| stage | " + " | ".join(names) + " | floor of ours auto |\n|---|" + "---|" * (len(names) + 1) + "\n"
    out = [header]
    auto_key = names[0]

    def cell(col: dict[str, Any] | str, key: str) -> str:
        return "n/a" if isinstance(col, str) else f"{col[key]:.2f} s"

    def floor_of(stage: str) -> str:
        if stage == "build":
            fl = basis_bytes / bandwidth
            return f"{fl:.2f} s ({basis_bytes / GB:.2f} GB at {bandwidth / GB:.1f} GB/s); ours {columns[auto_key][stage] / fl:.1f}x"
        if stage in work_flops and work_flops[stage]:
            rate = flops_per_s[auto.dtype]
            fl = work_flops[stage] / rate
            return (f"{fl:.2f} s ({work_flops[stage] / 1e9:.0f} GFLOP at {rate / 1e9:.0f} GFLOP/s "
                    f"{precision.dtype_name(auto.dtype)}); ours {columns[auto_key][stage] / fl:.1f}x")
        return "no floor (stand-in face models)" if stage == "face analysis" else "n/a (smoke)"

    total = {n: (c if isinstance(c, str) else sum(c[s] for s in STAGES)) for n, c in columns.items()}
    out.append("| **identity + LoRA from one photo** | " + " | ".join(
        "n/a" if isinstance(t, str) else f"**{t:.2f} s**" for t in total.values()) + " | |\n")
    for stage in STAGES:
        out.append(f"| - {stage} | " + " | ".join(cell(c, stage) for c in columns.values()) + f" | {floor_of(stage)} |\n")
    out.append("| load model + CLIP + faces | " + " | ".join(cell(c, "load") for c in columns.values()) + " | |\n")
    authors = [n for n in names if n.startswith("authors")]
    ref = columns[authors[0]] if authors else None
    if isinstance(ref, dict):
        ref_total = sum(ref[s] for s in STAGES)
        out.append("| ratio to the authors', identity + LoRA | " + " | ".join(
            f"{total[n] / ref_total:.2f}x" if not isinstance(total[n], str) else "" for n in names) + " | |\n")
        out.append("| ratio to the authors', load | " + " | ".join(
            f"{columns[n]['load'] / ref['load']:.2f}x" if isinstance(columns[n], dict) else "" for n in names)
            + " | |\n")
    sys.stdout.write("\n" + "".join(out))
    if not isinstance(ref, dict):
        sys.stdout.write(f"\nno ratio to the authors' plugin: {ref if ref else 'not run'}\n")
    sys.stdout.write("\nmatmul throughput ([1024,1024] @ [1024,4096]): " + ", ".join(
        f"{precision.dtype_name(d)} {r / 1e9:.0f} GFLOP/s" for d, r in flops_per_s.items()) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
