"""Peak memory of a whole ComfyUI graph with HyperLoRA against the same graph without it (real server).

    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_graph_memory.py [--model sdxl_small|sdxl_random_full]
        [--dtype auto] [--size 64] [--server-args "..."] [--checkpoint FILE] [--graphs plain,keep,release] [--smoke]

Each graph runs in a fresh ComfyUI server (so its peak is its own), started as the tests start theirs
(tests/comfy/conftest.py, unless ``--server-args``): the random SDXL checkpoint of the tests, text encoding, an empty latent, KSampler (1 step), VAE decode, SaveImage; "with HyperLoRA" adds
the graph of ``example_workflows/t2i_one_photo`` in API form (Loader -> Apply from images with one photo
-> KSampler).  The server's ``/proc/<pid>/status`` is sampled every 0.2 s (tests/comfy/memory.py):

* peak RSS (and the kernel's high-water mark ``VmHWM``): everything resident, including the pages of the
  checkpoint that ComfyUI reads through a memory map (the kernel drops those under memory pressure);
* peak anonymous memory: what the machine must really hold;
* RSS once the graph finished (what the server keeps for the next run).

The difference of the two graphs is what HyperLoRA adds.  ``--smoke``: only the graph with HyperLoRA,
the small HyperLoRA model, 64 px (one server; it still loads the 7 GB random SDXL, as
bench/bench_sampling.py does).  Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(1, str(REPO))

GB = 1e9


SAMPLING_MARKER = re.compile(r"^Requested to load SDXL\s*$", re.M)
"""The line ComfyUI logs as a KSampler loads the SDXL UNet (not ``SDXLClipModel``, the text encoder): the LoRA is
built by then ("once the LoRA is built")."""
GRAPHS = {"plain": None, "lorafile": None, "keep": "keep", "release": "release while sampling", "auto": "auto"}
"""The graphs a run can measure: the plain one; the plain one with a LoRA file of the same layout through ComfyUI's
own LoraLoaderModelOnly (what merging any LoRA costs); t2i_one_photo with each setting of the Loader's memory."""
LORA_FILE = "bench_same_layout_lora.safetensors"


def write_same_layout_lora(model_folder: Path, out: Path) -> Path:
    """A kohya LoRA file with the modules, shapes and rank of the LoRAs ``model_folder`` makes (random values)."""
    import torch
    from safetensors.torch import save_file

    from hyperlora.bundle import architecture_target_shapes
    from hyperlora.checkpoint import read_architecture
    from hyperlora.lora import DOWN_SUFFIX, UP_SUFFIX

    arch = read_architecture(model_folder)
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for prefix, (n_out, n_in) in architecture_target_shapes(arch).items():
        tensors[prefix + DOWN_SUFFIX] = (torch.randn(arch.rank, n_in, generator=g) * 0.01).half()
        tensors[prefix + UP_SUFFIX] = (torch.randn(n_out, arch.rank, generator=g) * 0.01).half()
        tensors[prefix + ".alpha"] = torch.tensor(float(arch.rank))
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out))
    return out


def graph(name: str, model: str, dtype: str, size: int) -> dict[str, Any]:
    """The API prompt of graph ``name`` (a key of :data:`GRAPHS`): plain SDXL text-to-image, the same with the
    LoRA file, or the same through HyperLoRA from one photo with the Loader's ``memory`` setting of that name."""
    from tests.comfy import graphs as g
    from tests.comfy.models import CLIP_FILE, CLIP_FOLDER, FULL_MODEL

    p: dict[str, Any] = {"ckpt": g.checkpoint()}
    model_out: list = ["ckpt", 0]
    if name == "lorafile":
        p["lora"] = {"class_type": "LoraLoaderModelOnly",
                     "inputs": {"model": ["ckpt", 0], "lora_name": LORA_FILE, "strength_model": 0.85}}
        model_out = ["lora", 0]
    elif GRAPHS[name] is not None:
        clip = CLIP_FILE if model == FULL_MODEL else CLIP_FOLDER
        p.update({
            "hl": g.loader(model=model, clip_vision=clip, dtype=dtype),
            "img": g.load_image("astronaut.png"),
            "apply": {"class_type": "HyperLoRAStudioApplyFromImages", "inputs": {
                "model": ["ckpt", 0], "hyper_lora": ["hl", 0], "images": ["img", 0], "strength": 0.85, **g.FACE}},
        })
        p["hl"]["inputs"]["memory"] = GRAPHS[name]
        model_out = ["apply", 0]
    return g.sampling(p, model=model_out, ckpt="ckpt", prefix="memory", size=size)


def run_one(root: Path, base: Path, prompt: dict[str, Any], server_args: list[str]) -> dict[str, float]:
    """Start a server, run ``prompt``, return its memory figures (bytes) and the wall time."""
    from tests.comfy.client import ComfyServer, free_port
    from tests.comfy.memory import RssSampler, read_status

    server = ComfyServer(root=root, base=base, port=free_port(), log_path=base / f"server-{time.time_ns()}.log",
                         extra_args=tuple(server_args))
    server.start()
    try:
        idle = read_status(server.proc.pid)["VmRSS"]
        sampler = RssSampler(server.proc.pid).start()
        marker: list[float] = []
        done = threading.Event()

        def watch() -> None:      # when the KSampler starts loading SDXL (the LoRA is built by then)
            while not done.wait(0.1):
                if SAMPLING_MARKER.search(server.log_text()):
                    marker.append(time.monotonic())
                    return

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        t0 = time.perf_counter()
        server.run(prompt, timeout=1800)
        seconds = time.perf_counter() - t0
        time.sleep(1.0)
        done.set()
        watcher.join(timeout=5)
        peak = sampler.stop()
        after = read_status(server.proc.pid)
        log = server.log_text()
    finally:
        server.stop()
    return {"idle": idle, "peak_rss": max(peak["VmRSS"], peak["VmHWM"]), "peak_anon": peak["RssAnon"],
            "peak_file": peak["RssFile"], "after": after["VmRSS"], "seconds": seconds,
            "sampling_anon": sampler.peak_since(marker[0]) if marker else 0,
            "released": next((line.split("HyperLoRA Studio: ", 1)[-1] for line in log.splitlines()
                              if "of HyperLoRA weights while SDXL samples" in line), "")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH", ""), help="ComfyUI checkout")
    ap.add_argument("--model", default="sdxl_random_full", help="HyperLoRA model folder of the tests' base")
    ap.add_argument("--dtype", default="auto", help="the Loader's dtype")
    ap.add_argument("--size", type=int, default=64, help="image size (px)")
    from tests.comfy.conftest import SERVER_ARGS

    ap.add_argument("--server-args", default=" ".join(SERVER_ARGS),
                    help="extra ComfyUI arguments (one string; default: the tests' server's)")
    ap.add_argument("--graphs", default="plain,keep,release",
                    help=f"comma-separated graphs to run, of {', '.join(GRAPHS)} (the last three: t2i_one_photo with "
                         "the Loader's memory keep / release while sampling / auto)")
    ap.add_argument("--checkpoint", default="", help="an SDXL .safetensors instead of the tests' random one")
    ap.add_argument("--smoke", action="store_true",
                    help="the graph with HyperLoRA only, small HyperLoRA model, 64 px (CI; loads the SDXL)")
    args = ap.parse_args(argv)
    if not args.comfyui or not (Path(args.comfyui) / "main.py").is_file():
        sys.stdout.write("Set COMFYUI_PATH (or --comfyui) to a ComfyUI checkout.\n")
        return 2
    if not Path("/proc/self/status").is_file():
        sys.stdout.write("This bench reads /proc (Linux only).\n")
        return 2
    if args.smoke:
        args.model, args.size, args.graphs = "sdxl_small", 64, "release"
    from tests.comfy.models import CHECKPOINT, build_base
    from tests.conftest import test_cache_root
    from tests.fixtures.sdxl import import_comfy

    root = Path(args.comfyui).resolve()
    comfy = import_comfy(root)
    tmp = Path(tempfile.mkdtemp(prefix="hyperlora_graph_memory_"))
    try:
        os.environ.setdefault("HYPERLORA_CACHE", str(tmp / "cache"))
        build_base(tmp / "base", cache_dir=test_cache_root(), comfy=comfy, repo=REPO)
        if args.checkpoint:
            link = tmp / "base" / "models" / "checkpoints" / CHECKPOINT
            link.unlink()
            link.symlink_to(Path(args.checkpoint).resolve())
        ckpt = (tmp / "base" / "models" / "checkpoints" / CHECKPOINT).resolve()
        server_args = shlex.split(args.server_args)
        names = [n.strip() for n in args.graphs.split(",") if n.strip()]
        unknown = [n for n in names if n not in GRAPHS]
        if unknown:
            sys.stdout.write(f"--graphs: unknown {unknown}; choose from {', '.join(GRAPHS)}\n")
            return 2
        results = {}
        for name in names:
            sys.stdout.write(f"running the {name} graph in a fresh server ...\n")
            sys.stdout.flush()
            if name == "lorafile":
                write_same_layout_lora(tmp / "base" / "models" / "hyper_lora" / "hyper_lora" / args.model,
                                       tmp / "base" / "models" / "loras" / LORA_FILE)
            prompt = graph(name, args.model, args.dtype, args.size)
            results[name] = run_one(root, tmp / "base", prompt, server_args)
        from hyperlora.precision import read_cpu_features

        sys.stdout.write(f"\nComfyUI {root.name} with {args.server_args or 'no extra arguments'}; SDXL {ckpt.name} "
                         f"({ckpt.stat().st_size / GB:.2f} GB), "
                         f"{args.size} px, 1 step; HyperLoRA model {args.model}, dtype {args.dtype}; CPU "
                         f"{read_cpu_features().model or 'unknown'}, {os.cpu_count()} logical CPUs\n\n"
                         "| graph | peak RSS | peak anonymous | peak anonymous while sampling | peak file-backed "
                         "| RSS after | idle server | time |\n|---|---|---|---|---|---|---|---|\n")
        for name, r in results.items():
            label = ("same graph without HyperLoRA" if name == "plain" else
                     "same graph with a LoRA file of the same layout (core LoraLoaderModelOnly)" if name == "lorafile" else
                     f"t2i_one_photo, memory '{GRAPHS[name]}'" + (" (released)" if r["released"] else " (kept)"))
            sys.stdout.write(f"| {label} | {r['peak_rss'] / GB:.2f} GB | {r['peak_anon'] / GB:.2f} GB | "
                             f"{r['sampling_anon'] / GB:.2f} GB | {r['peak_file'] / GB:.2f} GB"
                             f" | {r['after'] / GB:.2f} GB | {r['idle'] / GB:.2f} GB | {r['seconds']:.0f} s |\n")
        for name, r in results.items():
            if r["released"]:
                sys.stdout.write(f"\n{name}: {r['released']}\n")
        if "plain" in results:
            base = results["plain"]
            for name, r in results.items():
                if name == "plain":
                    continue
                sys.stdout.write(f"| {'the LoRA file' if name == 'lorafile' else f'HyperLoRA ({name})'} adds | {(r['peak_rss'] - base['peak_rss']) / GB:+.2f} GB | "
                                 f"{(r['peak_anon'] - base['peak_anon']) / GB:+.2f} GB | "
                                 f"**{(r['sampling_anon'] - base['sampling_anon']) / GB:+.2f} GB** | | "
                                 f"{(r['after'] - base['after']) / GB:+.2f} GB | | |\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
