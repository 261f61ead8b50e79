"""Sampling cost with a merged HyperLoRA vs without: KSampler steps in one process, ratio printed.

HyperLoRA merges its LoRA into the SDXL weights (W + s * 0.5 * up @ down), so a sampling step
must cost the same as without it (target ratio 1.00 +/- 0.03): no extra attention, no hooks.
The one-time merge happens when ComfyUI loads the patched model; it is timed separately.

    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_sampling.py [--size 64] [--steps 2] [--repeat 5] [--smoke]

Uses the random SDXL checkpoint and HyperLoRA fixtures of the test suite (cached; built on first
use, about 7 GB) unless --checkpoint / --hyper-lora point at real files.  CPU only here; needs
about 10 GB of RAM for SDXL in fp16.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(1, str(REPO))


def comfy_setup(comfyui: str, tmp: Path, *, checkpoint: str = "", unet_dtype: str = "fp16", strength: float = 0.85,
                threads: int | None = None) -> SimpleNamespace:
    """ComfyUI in this process with the pack loaded from a fixture base directory ``tmp``; the SDXL
    checkpoint (random unless ``checkpoint``), an identity of the astronaut photo merged at ``strength``.

    Returns ``torch``, ``cn`` (ComfyUI's nodes module), ``model`` (plain), ``patched`` (merged),
    ``pos`` / ``neg`` (encoded prompts).  Also used by bench/gpu_check.py.
    """
    from tests.fixtures.sdxl import import_comfy

    comfy = import_comfy(comfyui)
    import comfy.cli_args  # noqa: F811  (the submodule)

    setattr(comfy.cli_args.args, f"{unet_dtype}_unet", unet_dtype != "fp32")
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    from tests.comfy import graphs
    from tests.comfy.inprocess import load_pack
    from tests.comfy.models import CHECKPOINT, astronaut, build_base
    from tests.conftest import test_cache_root

    build_base(tmp, cache_dir=test_cache_root(), comfy=comfy, repo=REPO)
    if checkpoint:
        link = tmp / "models" / "checkpoints" / CHECKPOINT
        link.unlink()
        link.symlink_to(Path(checkpoint).resolve())
    pack = load_pack(Path(comfyui), tmp)
    cn = pack.comfy_nodes
    t0 = time.perf_counter()
    model, clip, _vae = cn.CheckpointLoaderSimple().load_checkpoint(CHECKPOINT)[:3]
    print(f"checkpoint loaded in {time.perf_counter() - t0:.1f} s ({type(model.model).__name__})")
    loader = graphs.loader()["inputs"]
    handle, _info = pack.nodes["HyperLoRAStudioLoader"]().load(**loader)
    photo = torch.from_numpy(astronaut()).float().div(255.0)[None]
    identity, _ = pack.nodes["HyperLoRAStudioIdentityFromImages"]().run(handle, photo, **graphs.FACE)
    (lora,) = pack.nodes["HyperLoRAStudioBuildLoRA"]().run(handle, identity, "id")
    (patched,) = pack.nodes["HyperLoRAStudioApply"]().run(model, lora, strength)
    pos = cn.CLIPTextEncode().encode(clip, graphs.PROMPT)[0]
    neg = cn.CLIPTextEncode().encode(clip, "")[0]
    return SimpleNamespace(torch=torch, cn=cn, model=model, patched=patched, pos=pos, neg=neg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH", ""), help="ComfyUI checkout")
    ap.add_argument("--size", type=int, default=64, help="image size in pixels (latent = size / 8)")
    ap.add_argument("--steps", type=int, default=2, help="KSampler steps per timed run")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per block")
    ap.add_argument("--blocks", type=int, default=2, help="merged blocks (plain blocks = blocks + 1, interleaved)")
    ap.add_argument("--strength", type=float, default=0.85)
    ap.add_argument("--checkpoint", default="", help="an SDXL .safetensors (default: the random test checkpoint)")
    ap.add_argument("--unet-dtype", choices=("fp16", "bf16", "fp32"), default="fp16")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 = least noise on a shared machine)")
    ap.add_argument("--smoke", action="store_true",
                    help="1 step, 1 timed run, 1 merged block: a quick run that the script works (CI; still loads "
                         "the 7 GB random SDXL checkpoint)")
    args = ap.parse_args()
    if args.smoke:
        args.size, args.steps, args.repeat, args.blocks = 64, 1, 1, 1
    if not args.comfyui or not (Path(args.comfyui) / "nodes.py").is_file():
        sys.exit("Set COMFYUI_PATH (or --comfyui) to a ComfyUI checkout.")

    tmp = Path(tempfile.mkdtemp(prefix="hyperlora_bench_"))
    try:
        setup = comfy_setup(args.comfyui, tmp, checkpoint=args.checkpoint, unet_dtype=args.unet_dtype,
                            strength=args.strength, threads=args.threads)
        torch, cn, model, patched = setup.torch, setup.cn, setup.model, setup.patched
        pos, neg = setup.pos, setup.neg
        latent = cn.EmptyLatentImage().generate(args.size, args.size, 1)[0]

        def run(m) -> tuple[float, float]:
            """(wall, CPU) seconds per step; CPU time of this process is what other load hardly changes."""
            t, c = time.perf_counter(), time.process_time()
            cn.common_ksampler(m, 1, args.steps, 5.0, "euler", "normal", pos, neg, latent)
            return (time.perf_counter() - t) / args.steps, (time.process_time() - c) / args.steps

        # Blocks alternate (plain, merged, plain, ...) so drift from other load on the machine hits
        # both sides; the first run after each switch merges / un-merges the weights and is not timed.
        times: dict[str, list[tuple[float, float]]] = {"plain": [], "merged": []}
        merge_times: list[float] = []
        for block in range(2 * args.blocks + 1):
            name, m = ("plain", model) if block % 2 == 0 else ("merged", patched)
            first = run(m)
            if name == "merged":
                merge_times.append(first[0])
            times[name] += [run(m) for _ in range(args.repeat)]
            if name == "merged":
                # deterministic proof of "merged, no extra work per step": right after sampling the
                # patched model is loaded; no module may carry an on-the-fly (lowvram) weight patch
                on_the_fly = sum(1 for mod in patched.model.modules() if getattr(mod, "weight_function", None))
                lowvram = bool(getattr(patched.model, "model_lowvram", False))
                print(f"merged model loaded: lowvram={lowvram}, modules patched per step: {on_the_fly} "
                      f"(0 = the LoRA is merged into the weights)")
        print(f"UNet {args.unet_dtype}, {args.size}x{args.size}, cfg 5, {args.steps} step(s) per run, "
              f"{len(times['plain'])} plain / {len(times['merged'])} merged runs, {torch.get_num_threads()} thread(s), "
              f"load average {os.getloadavg()[0]:.1f}")
        ratios = {}
        for i, clock in enumerate(("wall", "CPU")):
            p_med = statistics.median(t[i] for t in times["plain"])
            h_med = statistics.median(t[i] for t in times["merged"])
            ratios[clock] = h_med / p_med
            print(f"{clock:>4} time per step: without HyperLoRA {p_med * 1000:.0f} ms, with {h_med * 1000:.0f} ms "
                  f"(medians), ratio {h_med / p_med:.3f}")
        print(f"first run after switching to the merged model (merge included): "
              f"{statistics.median(merge_times) * args.steps * 1000:.0f} ms wall")
        print(f"ratio with / without HyperLoRA (CPU time): {ratios['CPU']:.3f}  (target 1.00 +/- 0.03)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
