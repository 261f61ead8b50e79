"""The resampler forward against its FLOP count and against a plain fp32 matmul on this CPU.

    python bench/bench_resampler.py [--threads N] [--repeat R] [--images 1 4] [--also bf16 fp16] [--smoke]

The released resampler (two conditions: 16 ID tokens and 257 CLIP tokens, dim 1024, depth 4,
12 x 64 heads, ff x4, 1120 queries, K 128) is built with random weights in memory: no model files
are needed.  Its FLOPs are counted from the config (:func:`resampler_flops`: every matmul,
2 FLOPs per multiply-add; LayerNorm, softmax, GELU and adds are left out, so the achieved rate is a
slight underestimate).  In one process and interleaved round-robin (the machine is shared and
noisy), it times

* the pack's forward (fused q/k/v projections, first-layer self-attention once per batch),
* the straightforward forward it replaced (one Linear per projection, every layer on the full
  batch), kept here as the baseline,
* a plain ``[S, S] @ [S, S]`` fp32 matmul (S = 2048), the CPU's practical GEMM rate,

and prints GFLOP/s of each and the ratios.  ``--also bf16 fp16`` adds those precisions to the rounds.
Results are compared to the same module run in float64 (max relative difference).

``--smoke`` runs a tiny config once (a few seconds; CI runs it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.common import interleaved  # noqa: E402
from hyperlora.resampler import Attention, Resampler  # noqa: E402
from hyperlora.spec import (DEFAULT_HEADS, RELEASED_DIM_HEAD, RELEASED_FF_MULT, RELEASED_HYPER_DIM,  # noqa: E402
                            RELEASED_RESAMPLER_DEPTH, RELEASED_RESAMPLER_DIM, VIT_L14_WIDTH, ResamplerConfig)

RELEASED = ResamplerConfig(dim=RELEASED_RESAMPLER_DIM, depth=RELEASED_RESAMPLER_DEPTH, heads=DEFAULT_HEADS,
                           dim_head=RELEASED_DIM_HEAD, ff_mult=RELEASED_FF_MULT, num_queries=1120,
                           output_dim=RELEASED_HYPER_DIM, embed_dims=(VIT_L14_WIDTH, VIT_L14_WIDTH))
ID_TOKENS, CLIP_TOKENS = 16, 257      # the ID projector's tokens and CLIP ViT-L/14's 256 patches + class token
SMOKE = ResamplerConfig(dim=64, depth=1, heads=2, dim_head=32, ff_mult=2, num_queries=32, output_dim=8,
                        embed_dims=(48, 40))


def resampler_flops(cfg: ResamplerConfig, lx: int, ly: int | None, n: int = 1) -> int:
    """Matmul FLOPs of one forward for ``n`` images with contexts of ``lx`` (and ``ly``) tokens."""
    q, d, inner, k = cfg.num_queries, cfg.dim, cfg.heads * cfg.dim_head, cfg.output_dim

    def attention(lq: int, lc: int) -> int:
        return 2 * lq * d * inner + 2 * 2 * lc * d * inner + 2 * 2 * lq * lc * inner + 2 * lq * inner * d

    layer = attention(q, q) + attention(q, lx) + 2 * 2 * q * d * d * cfg.ff_mult
    proj = 2 * lx * cfg.embed_dims[0] * d + 2 * q * d * k
    if ly is not None:
        layer += attention(q, ly)
        proj += 2 * ly * cfg.embed_dims[1] * d
    return n * (cfg.depth * layer + proj)


def _attention_unfused(attn: Attention, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    n, lq, _ = query.shape
    lc, h, d = context.shape[1], attn.heads, attn.dim_head
    q = attn.to_q(query).view(n, lq, h, d).transpose(1, 2)
    k = attn.to_k(context).view(n, lc, h, d).transpose(1, 2)
    v = attn.to_v(context).view(n, lc, h, d).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, scale=d**-0.5)
    return attn.to_out[0](out.transpose(1, 2).reshape(n, lq, h * d))


def forward_unfused(r: Resampler, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """The forward before the fused paths: one Linear per projection, every layer on the whole batch."""
    x = r.proj_in(x)
    y = r.proj_in_2(y) if y is not None else None
    latents = r.latents.expand(x.shape[0], -1, -1)
    for layer in r.layers:
        h = layer.norm_attn1(latents)
        latents = latents + _attention_unfused(layer.attn1, h, h)
        latents = latents + _attention_unfused(layer.attn2, layer.norm_attn2_l(latents), layer.norm_attn2_x(x))
        if y is not None:
            latents = latents + _attention_unfused(layer.attn3, layer.norm_attn3_l(latents), layer.norm_attn3_y(y))
        latents = latents + layer.ff(layer.norm_ff(latents))
    return r.proj_out(latents)


def random_resampler(cfg: ResamplerConfig, seed: int = 0) -> Resampler:
    torch.manual_seed(seed)
    r = Resampler(cfg)
    with torch.no_grad():
        for name, p in r.named_parameters():
            if ".norm" in name and name.endswith(".weight"):
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0.0, 0.02 if p.dim() > 1 else 0.01)
    return r.eval().requires_grad_(False)


def max_rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref).abs().max() / ref.abs().max())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeat", type=int, default=5, help="interleaved rounds")
    ap.add_argument("--images", type=int, nargs="+", default=[1, 4], help="batch sizes (photos of one person)")
    ap.add_argument("--matmul", type=int, default=2048, help="side of the square fp32 matmul baseline")
    ap.add_argument("--also", nargs="*", choices=("bf16", "fp16"), default=[],
                    help="also time the resampler in these precisions, first batch size only (on CPUs without "
                         "native bf16/fp16 matmuls, e.g. AVX2 only, they are several times slower than fp32)")
    ap.add_argument("--smoke", action="store_true", help="tiny config, one round (seconds)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg, lx, ly = RELEASED, ID_TOKENS, CLIP_TOKENS
    if args.smoke:
        cfg, lx, ly, args.repeat, args.images, args.matmul = SMOKE, 4, 9, 1, [1, 2], 256

    r = random_resampler(cfg)
    r64 = random_resampler(cfg).double()
    g = torch.Generator().manual_seed(1)
    size = args.matmul
    a, b = torch.randn(size, size, generator=g), torch.randn(size, size, generator=g)
    mm_flops = 2 * size**3
    print(f"resampler {cfg}\n{args.threads} thread(s), load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")

    rows: list[tuple[str, int, float, float]] = []   # (path, images, median seconds, flops)
    mm_times: list[float] = []
    for n in args.images:
        x = torch.randn(n, lx, cfg.embed_dims[0], generator=g)
        y = torch.randn(n, ly, cfg.embed_dims[1], generator=g)
        with torch.inference_mode():
            ref = r64(x.double(), y.double())
            fused, plain = r(x, y), forward_unfused(r, x, y)
        print(f"N={n}: max relative difference to float64: fused {max_rel(fused, ref):.2e}, "
              f"unfused {max_rel(plain, ref):.2e}")
        fns: dict[str, Callable[[], object]] = {
            "fused": lambda: r(x, y), "unfused": lambda: forward_unfused(r, x, y), "matmul": lambda: a @ b}
        if n == args.images[0]:
            for name in sorted(set(args.also) | ({"bf16"} if args.smoke else set())):
                dt = {"bf16": torch.bfloat16, "fp16": torch.float16}[name]
                rl, xl, yl = random_resampler(cfg).to(dt), x.to(dt), y.to(dt)
                fns[f"{name} fused"] = lambda rl=rl, xl=xl, yl=yl: rl(xl, yl)
        with torch.inference_mode():
            times = interleaved(fns, args.repeat)
        mm_times += times.pop("matmul")
        flops = resampler_flops(cfg, lx, ly, n)
        rows += [(k, n, statistics.median(v), flops) for k, v in times.items()]

    mm_rate = mm_flops / statistics.median(mm_times)
    print(f"\nplain fp32 matmul {size}x{size}x{size}: {statistics.median(mm_times) * 1000:.0f} ms = "
          f"{mm_rate / 1e9:.1f} GFLOP/s (median of {len(mm_times)}, interleaved with the rows below)")
    print(f"resampler forward: {resampler_flops(cfg, lx, ly) / 1e9:.1f} GFLOP per image (matmuls only)\n")
    print("| path | images | ms / image | GFLOP/s | of the matmul rate | vs unfused |")
    print("|---|---|---|---|---|---|")
    base = {n: s for k, n, s, _ in rows if k == "unfused"}
    for k, n, s, flops in rows:
        rate = flops / s
        print(f"| {k} | {n} | {s / n * 1000:.0f} | {rate / 1e9:.1f} | {rate / mm_rate:.2f} | {base[n] / s:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
