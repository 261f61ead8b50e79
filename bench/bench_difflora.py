"""DiffLoRA against HyperLoRA: time, FLOPs and peak memory to make one LoRA from the same face features.

    python bench/bench_difflora.py [--sizes tiny paper] [--steps 30] [--guidance 1] [--photos 1]
                                   [--repeat 5] [--threads N] [--device auto|cpu|cuda]
                                   [--dtype auto|fp32|bf16|fp16] [--smoke]

Both generators are built in memory with random weights (no model files) and make a LoRA of the same
layout from the same precomputed features of ``--photos`` reference photos (ArcFace ``[N, 512]``, CLIP
ViT-L/14 hidden states ``[N, 257, 1024]``; random, unit-norm ArcFace rows):

* **DiffLoRA** (``hyperlora.difflora``): ``mixed_image_features`` -> ``DiffLoraModel.loras_from_mif`` with
  one seed: the MIF encoder, ``--steps`` Euler steps of the DiT (two passes per step when ``--guidance`` is
  not 1), the LAE decoder, the kohya LoRA (float32, on the CPU: what the model's API returns);
* **HyperLoRA** (the pack's generator): ``id_tokens`` (ID projector + resampler, uncached) -> ``build_lora``
  (float32), as the DiffLoRA demo times its HyperLoRA baseline (``hyperlora.train.evaluate.identity_loras``).

In one process and interleaved round-robin (:func:`bench.common.interleaved`; the machine is shared and
noisy) it prints, per size, the median time per LoRA and DiffLoRA's ratio to HyperLoRA, the FLOPs per LoRA
and their ratio, and the peak memory of making one LoRA.

**FLOPs** (2 per multiply-add of every matrix product; elementwise work is not counted): DiffLoRA = MIF
encoder + steps x :func:`hyperlora.difflora.dit.flops_per_step` + :func:`hyperlora.difflora.lae.decoder_flops`;
HyperLoRA = ID projector + resampler (:func:`bench.bench_resampler.resampler_flops`, the first layer's
self-attention once per chunk of photos as the pack runs it) + the build (2 per basis number).  Both totals are
checked against ``torch.utils.flop_counter.FlopCounterMode`` on one real call each (math attention kernel,
LAE layers outside PyTorch's fused inference path, HyperLoRA's build with the ``bmm`` strategy: the counter
sees every product only so); a difference above 1 % fails the run.

**Memory**: on the CPU the process's peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``:
:class:`bench.train_step.MemoryProbe`) during one LoRA above the resident set before it; on CUDA
``torch.cuda.max_memory_allocated`` above the allocated start.  Each generator's weights are listed beside
it (both are resident while either runs).

**Sizes** (each generator makes the LoRA layout of the HyperLoRA model of that size):

* ``tiny``: the tests' sizes.  HyperLoRA: ``tests/fixtures/hyperlora_models.TINY`` (5 modules, K 6, rank 4);
  DiffLoRA: the LAE, DiT and MIF widths of ``tests/fixtures/difflora_synth.tiny_config`` on that layout.
* ``paper``: what the DiffLoRA paper states is only that it makes LoRAs for **SDXL**
  (``../shared/docs/difflora-paper-facts.md`` section 1; no layer list, rank, LAE or DiT size is given).  So:
  the SDXL ID-LoRA of the released HyperLoRA (140 attention modules x q/k/v/out, rank 8: 560 LoRA modules,
  the layout ``difflora-dataset`` fits by default), HyperLoRA at its released sizes
  (``tests/fixtures/hyperlora_models.FULL``: K 128, resampler 1024 wide, depth 4, basis fp16), and DiffLoRA at
  ``difflora-fit``'s default sizes (LAE defaults: one 16-channel latent token per module, width 128, depth
  2; DiT width 256, depth 6; MIF 4 ArcFace + 5 CLIP tokens of width 256) with ``share_projections`` on (our
  choice: with per-module input maps and heads this LAE has 374 M parameters, shared 3.7 M; the FLOPs are the
  same either way).

``--steps`` defaults to 30, the DiffLoRA nodes' default (guidance 1: one pass per step).  The precision
(``--dtype auto``) is the Loader's ``auto`` for the device (``hyperlora.precision``), for both generators'
networks; HyperLoRA's basis stays fp16 as stored.  ``--device auto`` runs on CUDA when present.

``--smoke``: the tiny size, 3 steps, one round (seconds; CI runs it).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from bench.bench_resampler import resampler_flops  # noqa: E402
from bench.common import interleaved  # noqa: E402
from bench.train_step import MemoryProbe, pin_mmap_threshold  # noqa: E402
from hyperlora import precision  # noqa: E402
from hyperlora.difflora.condition import MifSpec, mixed_image_features  # noqa: E402
from hyperlora.difflora.dit import DitConfig, LatentDiT, flops_per_step  # noqa: E402
from hyperlora.difflora.lae import LaeConfig, LoraAutoencoder, decoder_flops  # noqa: E402
from hyperlora.difflora.lora_space import LoraLayout, LoraModule  # noqa: E402
from hyperlora.difflora.model import DiffLoraModel  # noqa: E402
from hyperlora.generate import HyperLoRAModel  # noqa: E402
from hyperlora.spec import (FACE_EMBEDDING_DIM, LORA_LAYERS, HyperLoRAArchitecture, LoraModuleSpec,  # noqa: E402
                            ResamplerConfig, kohya_prefix)
from tests.fixtures.difflora_synth import tiny_config  # noqa: E402
from tests.fixtures.hyperlora_models import FULL, TINY, Preset  # noqa: E402

NODE_STEPS = 30
"""The DiffLoRA nodes' default number of sampling steps (nodes/difflora.py, ``STEPS``)."""
CLIP_TOKENS = 257
"""CLIP ViT-L/14 hidden states per photo: the class token and 16 x 16 patches."""
FLOP_TOLERANCE = 0.01
"""Largest relative difference between an analytic FLOP total and torch's FLOP counter."""
MB = 2**20


# --------------------------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class Size:
    """One size of the comparison: the HyperLoRA preset (whose LoRA layout both generators make) and DiffLoRA's
    LAE config, DiT fields (``DitConfig`` without tokens/channels/condition) and MIF fields."""

    name: str
    hyperlora: Preset
    lae: LaeConfig
    dit: dict[str, Any]
    mif: dict[str, Any]
    source: str


def sizes() -> dict[str, Size]:
    from hyperlora.train.difflora_fit import DiffLoraFitConfig

    synth = tiny_config(Path("data"), Path("out"))
    fit = DiffLoraFitConfig(data="data", out="out")
    return {
        "tiny": Size("tiny", TINY, LaeConfig.from_dict(synth["lae"]), dict(synth["dit"]), dict(synth["mif"]),
                     "the tests' sizes: HyperLoRA tests/fixtures/hyperlora_models.TINY, DiffLoRA "
                     "tests/fixtures/difflora_synth.tiny_config on its layout"),
        "paper": Size("paper", FULL, LaeConfig.from_dict({**fit.lae, "share_projections": True}), dict(fit.dit),
                      dict(fit.mif),
                      "SDXL (the one size the DiffLoRA paper states): the released HyperLoRA's SDXL ID-LoRA layout and "
                      "sizes; DiffLoRA at difflora-fit's defaults, share_projections on"),
    }


def lora_layout(p: Preset) -> LoraLayout:
    """The ID-LoRA layout ``HyperLoRAModel.build_lora`` makes for preset ``p`` (modules x q/k/v/out, its order)."""
    mods = []
    for name, hidden, cross in p.modules:
        spec = LoraModuleSpec(name, hidden, cross)
        mods += [LoraModule(kohya_prefix(spec, layer), spec.out_features(layer), spec.in_features(layer), p.rank)
                 for layer in LORA_LAYERS]
    return LoraLayout(tuple(mods))


def hyperlora_arch(p: Preset) -> HyperLoRAArchitecture:
    """The released two-condition layout (ID projector + resampler on ID tokens and CLIP), no Base-LoRA."""
    res = ResamplerConfig(dim=p.dim, depth=p.depth, heads=p.heads, dim_head=p.dim_head, ff_mult=p.ff_mult,
                          num_queries=p.num_queries, output_dim=p.hyper_dim, embed_dims=(p.id_token_dim, p.clip_dim))
    return HyperLoRAArchitecture(modules=tuple(LoraModuleSpec(*m) for m in p.modules), hyper_dim=p.hyper_dim,
                                 rank=p.rank, base_rank=None, resampler=res, base_resampler=None,
                                 id_embed_dim=p.id_embed_dim, num_id_tokens=p.num_id_tokens)


# --------------------------------------------------------------------------------------- random models


@torch.no_grad()
def _randomise(module: nn.Module, g: torch.Generator) -> None:
    """Every parameter random (norm weights near 1, the rest N(0, 0.02^2)), including the zero-initialised
    adaLN and output layers of the DiT, so no path is trivially zero."""
    for name, p in module.named_parameters():
        if "norm" in name and name.endswith("weight"):
            p.copy_(torch.empty(p.shape).uniform_(0.8, 1.2, generator=g))
        else:
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def build_hyperlora(p: Preset, device: torch.device, dtype: torch.dtype, seed: int = 0) -> HyperLoRAModel:
    """A HyperLoRA model of preset ``p`` with random weights, made in memory: networks in ``dtype``, basis fp16."""
    g = torch.Generator().manual_seed(seed)
    model = HyperLoRAModel(hyperlora_arch(p), name=f"random {p.hyper_dim}", device=device, dtype=torch.float16,
                           resampler_dtype=dtype)
    for part in (model.resampler, model.id_projector):
        part.to_empty(device=device)
        _randomise(part, g)
    with torch.no_grad():
        for _, down, up in model.basis_groups("id"):
            for buf in (down, up):
                for m in range(buf.shape[0]):          # one matrix at a time: no fp32 copy of the 3 GB basis
                    buf[m].copy_(torch.randn(buf.shape[1:], generator=g) * 0.02)
    return model.requires_grad_(False).eval()


def build_difflora(size: Size, device: torch.device, dtype: torch.dtype, seed: int = 0) -> DiffLoraModel:
    """A DiffLoRA model of ``size`` with random weights on the LoRA layout of ``size.hyperlora``."""
    p = size.hyperlora
    spec = MifSpec(arcface_dim=p.id_embed_dim, clip_dim=p.clip_dim, **size.mif)
    torch.manual_seed(seed)
    lae = LoraAutoencoder(size.lae, lora_layout(p))
    dit = LatentDiT(DitConfig(tokens=lae.num_tokens, channels=size.lae.latent_channels, cond_dim=spec.width,
                              cond_tokens=spec.num_tokens, **size.dit), spec)
    g = torch.Generator().manual_seed(seed + 1)
    _randomise(lae, g)
    _randomise(dit, g)
    return DiffLoraModel(lae.to(device=device, dtype=dtype), dit.to(device=device, dtype=dtype), 1.0,
                         name=f"random {size.name}")


def weight_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


# --------------------------------------------------------------------------------------- FLOPs


def mif_encoder_flops(spec: MifSpec) -> int:
    """The MIF encoder's products for one sample: ArcFace -> tokens, CLIP tokens -> width."""
    return 2 * spec.arcface_dim * spec.arcface_tokens * spec.width + 2 * spec.clip_tokens * spec.clip_dim * spec.width


def difflora_flops(model: DiffLoraModel, steps: int, guidance: float) -> dict[str, int]:
    dit = model.dit
    guided = guidance != 1
    return {"MIF encoder": mif_encoder_flops(dit.mif_spec),
            "DiT": steps * flops_per_step(dit.config, 1, guided=guided),
            "LAE decoder": decoder_flops(model.lae.config, model.lae.layout)}


def hyperlora_flops(model: HyperLoRAModel, photos: int, chunk: int = 4) -> dict[str, int]:
    """ID projector + resampler (the first layer's self-attention runs once per chunk of ``chunk`` photos) + build."""
    arch, cfg = model.arch, model.arch.resampler
    q, d, inner = cfg.num_queries, cfg.dim, cfg.heads * cfg.dim_head
    self_attention = 2 * q * d * 3 * inner + 2 * 2 * q * q * inner + 2 * q * inner * d
    chunks = math.ceil(photos / chunk)
    resampler = resampler_flops(cfg, arch.num_id_tokens, CLIP_TOKENS, photos) - (photos - chunks) * self_attention
    projector = photos * 2 * arch.id_embed_dim * cfg.embed_dims[0] * arch.num_id_tokens
    build = sum(2 * (down.numel() + up.numel()) for _, down, up in model.basis_groups("id"))
    return {"ID projector": projector, "resampler": resampler, "build": build}


def counted(fn: Callable[[], object]) -> int:
    """FLOPs of ``fn()`` seen by torch's counter, with the math attention kernel (the fused CPU kernels are not
    counted)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


# --------------------------------------------------------------------------------------- one size


def _ms(s: float) -> str:
    return f"{s * 1000:.1f}" if s < 0.1 else f"{s * 1000:,.0f}"


def run_size(size: Size, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    import time

    t0 = time.perf_counter()
    hyper = build_hyperlora(size.hyperlora, device, dtype)
    diff = build_difflora(size, device, dtype)
    built = time.perf_counter() - t0
    g = torch.Generator().manual_seed(7)
    arcface = torch.randn(args.photos, FACE_EMBEDDING_DIM, generator=g)
    arcface = arcface / arcface.norm(dim=1, keepdim=True)
    clip = torch.randn(args.photos, CLIP_TOKENS, size.hyperlora.clip_dim, generator=g)
    spec = diff.dit.mif_spec

    def make_difflora() -> dict[str, Tensor]:
        mif = mixed_image_features(arcface, clip if spec.clip_tokens else None, spec)
        return diff.loras_from_mif(mif, seeds=[0], steps=args.steps, guidance=args.guidance)[0]

    def make_hyperlora(strategy: str = "auto") -> dict[str, Tensor]:
        tokens = hyper.id_tokens(id_embeds=arcface, clip_features=clip, use_cache=False)
        return hyper.build_lora(tokens, dtype=torch.float32, strategy=strategy)

    with torch.inference_mode():
        a, b = make_difflora(), make_hyperlora()
    for lora, who in ((a, "DiffLoRA"), (b, "HyperLoRA")):
        bad = [k for k, v in lora.items() if not bool(torch.isfinite(v).all())]
        if bad:
            raise RuntimeError(f"{who}'s random LoRA has NaN/inf in '{bad[0]}': the bench's random weights are broken")
    shapes_a = {k: tuple(v.shape) for k, v in a.items() if not k.endswith(".alpha")}
    shapes_b = {k: tuple(v.shape) for k, v in b.items() if not k.endswith(".alpha")}
    if shapes_a != shapes_b:
        raise RuntimeError("the two generators make LoRAs of different layouts; the comparison would be void")
    layout = diff.lae.layout
    n_diff = sum(t.numel() for t in (*diff.lae.parameters(), *diff.dit.parameters()))
    n_hyper = sum(t.numel() for t in hyper.parameters()) + sum(
        d.numel() + u.numel() for _, d, u in hyper.basis_groups("id"))
    print(f"\n## {size.name}: {size.source}")
    print(f"LoRA: {len(layout)} modules, rank {layout.max_rank}, {layout.num_params:,} numbers; "
          f"{args.photos} photo(s); built in {built:.1f} s")
    print(f"DiffLoRA: LAE {size.lae.to_dict()}, DiT {diff.dit.config.to_dict()}, MIF {spec.to_dict()}; "
          f"{n_diff / 1e6:,.2f} M parameters; {args.steps} steps, guidance {args.guidance:g}")
    print(f"HyperLoRA: K {size.hyperlora.hyper_dim}, resampler {hyper.arch.resampler.dim} wide x "
          f"{hyper.arch.resampler.depth}, {n_hyper / 1e6:,.1f} M numbers (basis fp16)")

    # FLOPs: analytic, checked against torch's counter on one call each
    fd, fh = difflora_flops(diff, args.steps, args.guidance), hyperlora_flops(hyper, args.photos)
    diff.lae.train()            # dropout is 0: the same products, outside the fused inference path the counter misses
    try:
        cd = counted(make_difflora)
    finally:
        diff.lae.eval()
    ch = counted(lambda: make_hyperlora("bmm"))
    td, th = sum(fd.values()), sum(fh.values())
    mismatch = [f"{who}: analytic {t:,} vs counted {c:,}" for who, t, c in (("DiffLoRA", td, cd), ("HyperLoRA", th, ch))
                if abs(t - c) > FLOP_TOLERANCE * c]
    print(f"FLOPs per LoRA: DiffLoRA {td / 1e9:,.4g} G = " + " + ".join(f"{k} {v / 1e9:,.4g}" for k, v in fd.items())
          + f" (DiT {flops_per_step(diff.dit.config, 1, guided=args.guidance != 1) / 1e9:,.4g} G per step); "
          f"HyperLoRA {th / 1e9:,.4g} G = " + " + ".join(f"{k} {v / 1e9:,.4g}" for k, v in fh.items()))
    print(f"checked against torch.utils.flop_counter.FlopCounterMode: DiffLoRA counted {cd / 1e9:,.4g} G "
          f"(analytic / counted {td / cd:.4f}), HyperLoRA counted {ch / 1e9:,.4g} G ({th / ch:.4f})")

    # time, interleaved
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    with torch.inference_mode():
        times = interleaved({"DiffLoRA": make_difflora, "HyperLoRA": make_hyperlora}, args.repeat, sync)
    # memory of one LoRA each (after the warm-up above: kernels compiled, allocator pools filled)
    probe = MemoryProbe(device)
    with torch.inference_mode():
        mem = {"DiffLoRA": probe.measure(make_difflora), "HyperLoRA": probe.measure(make_hyperlora)}
    weights = {"DiffLoRA": weight_bytes(diff.lae) + weight_bytes(diff.dit), "HyperLoRA": weight_bytes(hyper)}
    what = ("CUDA max_memory_allocated above the allocated start" if device.type == "cuda" else
            "peak RSS (VmHWM) above the RSS before" if probe.exact else
            "process ru_maxrss (clear_refs not writable: NOT a per-LoRA figure)")
    med = {k: statistics.median(v) for k, v in times.items()}
    fast = {k: min(v) for k, v in times.items()}
    flops = {"DiffLoRA": td, "HyperLoRA": th}
    paired = statistics.median(d / h for d, h in zip(times["DiffLoRA"], times["HyperLoRA"]))
    print(f"\n| {size.name} | ms / LoRA (median of {args.repeat}) | fastest | vs HyperLoRA | GFLOP / LoRA | vs HyperLoRA "
          f"| GFLOP/s | weights | peak memory of one LoRA ({what}) | weights + peak |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for k in ("DiffLoRA", "HyperLoRA"):
        print(f"| {k} | {_ms(med[k])} | {_ms(fast[k])} | {med[k] / med['HyperLoRA']:.2f}x | {flops[k] / 1e9:,.4g} | "
              f"{flops[k] / th:.2f}x | {flops[k] / med[k] / 1e9:,.1f} | {weights[k] / MB:,.1f} MB | "
              f"{max(mem[k][0], 0.0) / MB:,.1f} MB | {(weights[k] + max(mem[k][0], 0.0)) / MB:,.1f} MB |")
    print(f"DiffLoRA / HyperLoRA time: {med['DiffLoRA'] / med['HyperLoRA']:.2f}x (medians), "
          f"{paired:.2f}x (median of the per-round ratios), {fast['DiffLoRA'] / fast['HyperLoRA']:.2f}x (fastest rounds); "
          f"resident at the start of the memory probe: {mem['DiffLoRA'][1] / MB:,.0f} MB")
    if device.type == "cuda":
        print("(on CUDA DiffLoRA's LoRA is copied to the CPU, as DiffLoraModel returns it; HyperLoRA's stays on the device)")
    result = {"size": size.name, "median": med, "fastest": fast, "flops": flops, "memory": mem, "weights": weights,
              "mismatch": mismatch}
    del hyper, diff
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


# --------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", choices=("tiny", "paper"), default=["tiny", "paper"])
    ap.add_argument("--steps", type=int, default=NODE_STEPS, help="DiT sampling steps (the nodes' default: 30)")
    ap.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance (1: one pass per step)")
    ap.add_argument("--photos", type=int, default=1, help="reference photos the features come from")
    ap.add_argument("--repeat", type=int, default=5, help="interleaved rounds (after one warm-up call each)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when present")
    ap.add_argument("--dtype", choices=("auto", *precision.PRECISIONS), default="auto",
                    help="both generators' networks (auto: the Loader's choice on the device); the basis stays fp16")
    ap.add_argument("--smoke", action="store_true", help="tiny size, 3 steps, one round (seconds; CI runs it)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.sizes, args.steps, args.repeat = ["tiny"], 3, 1
    if args.steps < 1 or args.photos < 1 or args.repeat < 1:
        ap.error("--steps, --photos and --repeat must be at least 1")
    cuda = torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        ap.error("--device cuda: no CUDA device here")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and cuda) else "cpu")
    torch.set_num_threads(args.threads)
    pinned = pin_mmap_threshold()
    if args.dtype == "auto":
        choice = precision.auto_precision(device, device_prefers=(torch.float16, torch.bfloat16))
        dtype, why = choice.dtype, choice.reason
    else:
        dtype, why = precision.PRECISIONS[args.dtype], "as asked"
    features = precision.read_cpu_features()
    print(f"bench_difflora: CPU: {features.model or 'unknown'}; {os.cpu_count()} logical CPUs, {args.threads} "
          f"thread(s), load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}; device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
          + f"; networks {precision.dtype_name(dtype)} ({why}); glibc mmap threshold pinned: {'yes' if pinned else 'no'}")
    table = sizes()
    results = [run_size(table[name], args, device, dtype) for name in args.sizes]
    bad = [m for r in results for m in r["mismatch"]]
    if bad:
        print("FLOP counts differ from torch's counter by more than 1 %: " + "; ".join(bad))
        return 1
    print("\nbench_difflora: " + ", ".join(
        f"{r['size']} DiffLoRA/HyperLoRA time {r['median']['DiffLoRA'] / r['median']['HyperLoRA']:.2f}x, "
        f"FLOPs {r['flops']['DiffLoRA'] / r['flops']['HyperLoRA']:.2f}x" for r in results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
