"""Peak memory of a whole ComfyUI graph with HyperLoRA against the same graph without it (real server).

    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_graph_memory.py [--model sdxl_small|sdxl_random_full]
        [--dtype auto] [--size 64] [--server-args "..."] [--checkpoint FILE] [--only plain|hyperlora] [--smoke]

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
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(1, str(REPO))

GB = 1e9


def graph(with_hyperlora: bool, model: str, dtype: str, size: int) -> dict[str, Any]:
    """The API prompt: plain SDXL text-to-image, or the same through HyperLoRA from one photo."""
    from tests.comfy import graphs as g
    from tests.comfy.models import CLIP_FILE, CLIP_FOLDER, FULL_MODEL

    p: dict[str, Any] = {"ckpt": g.checkpoint()}
    model_out: list = ["ckpt", 0]
    if with_hyperlora:
        clip = CLIP_FILE if model == FULL_MODEL else CLIP_FOLDER
        p.update({
            "hl": g.loader(model=model, clip_vision=clip, dtype=dtype),
            "img": g.load_image("astronaut.png"),
            "apply": {"class_type": "HyperLoRAStudioApplyFromImages", "inputs": {
                "model": ["ckpt", 0], "hyper_lora": ["hl", 0], "images": ["img", 0], "strength": 0.85, **g.FACE}},
        })
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
        t0 = time.perf_counter()
        server.run(prompt, timeout=1800)
        seconds = time.perf_counter() - t0
        time.sleep(1.0)
        peak = sampler.stop()
        after = read_status(server.proc.pid)
    finally:
        server.stop()
    return {"idle": idle, "peak_rss": max(peak["VmRSS"], peak["VmHWM"]), "peak_anon": peak["RssAnon"],
            "peak_file": peak["RssFile"], "after": after["VmRSS"], "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH", ""), help="ComfyUI checkout")
    ap.add_argument("--model", default="sdxl_random_full", help="HyperLoRA model folder of the tests' base")
    ap.add_argument("--dtype", default="auto", help="the Loader's dtype")
    ap.add_argument("--size", type=int, default=64, help="image size (px)")
    from tests.comfy.conftest import SERVER_ARGS

    ap.add_argument("--server-args", default=" ".join(SERVER_ARGS),
                    help="extra ComfyUI arguments (one string; default: the tests' server's)")
    ap.add_argument("--only", choices=("plain", "hyperlora"), default=None, help="run one of the two graphs")
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
        args.model, args.size, args.only = "sdxl_small", 64, "hyperlora"
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
        names = [n for n in ("plain", "hyperlora") if args.only in (None, n)]
        results = {}
        for name in names:
            sys.stdout.write(f"running the {name} graph in a fresh server ...\n")
            sys.stdout.flush()
            results[name] = run_one(root, tmp / "base", graph(name == "hyperlora", args.model, args.dtype, args.size),
                                    server_args)
        sys.stdout.write(f"\nComfyUI {root.name} with {args.server_args or 'no extra arguments'}; SDXL {ckpt.name} "
                         f"({ckpt.stat().st_size / GB:.2f} GB), "
                         f"{args.size} px, 1 step; HyperLoRA model {args.model}, dtype {args.dtype}\n\n"
                         "| graph | peak RSS | peak anonymous | peak file-backed | RSS after | idle server | time |\n"
                         "|---|---|---|---|---|---|---|\n")
        for name, r in results.items():
            sys.stdout.write(f"| {'t2i_one_photo (with HyperLoRA)' if name == 'hyperlora' else 'same graph without HyperLoRA'}"
                             f" | {r['peak_rss'] / GB:.2f} GB | {r['peak_anon'] / GB:.2f} GB | {r['peak_file'] / GB:.2f} GB"
                             f" | {r['after'] / GB:.2f} GB | {r['idle'] / GB:.2f} GB | {r['seconds']:.0f} s |\n")
        if len(results) == 2:
            d_rss = results["hyperlora"]["peak_rss"] - results["plain"]["peak_rss"]
            d_anon = results["hyperlora"]["peak_anon"] - results["plain"]["peak_anon"]
            d_after = results["hyperlora"]["after"] - results["plain"]["after"]
            sys.stdout.write(f"| HyperLoRA adds | {d_rss / GB:+.2f} GB | {d_anon / GB:+.2f} GB | | "
                             f"{d_after / GB:+.2f} GB | | |\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
