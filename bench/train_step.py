"""One training step of the UNet with per-sample HyperLoRA against the same step without it.

    python bench/train_step.py [--smoke] [--cases tiny sdxl cuda] [--batch B] [--size PX] [--repeat R]
                               [--hyper-dim K] [--threads N] [--no-resampler]

For each case, in one process and interleaved round-robin (the machine is shared and noisy,
:func:`bench.common.interleaved`), it times these steps (forward + backward; the UNet is frozen,
no optimizer step):

* ``unet``      the frozen UNet, backward to the noisy latents: the activation gradients every
  adapter training pays, and nothing else;
* ``lora``      the same with one shared, trainable rank-12 LoRA on every attention projection
  (``to_q``, ``to_k``, ``to_v``, ``to_out.0``), applied through :func:`hyperlora.lora_functional.applied`:
  a classic LoRA training step;
* ``hyperlora`` per-sample HyperLoRA: coefficient tokens ``[B, Q, K]`` (a leaf tensor with
  ``requires_grad``, standing in for the resampler's output) and the trainable ID (rank 8) and Base
  (rank 4) bases of :class:`hyperlora.train.hypernet.TrainableHyperLoRA` (grouped layout) ->
  :func:`hyperlora.lora_functional.basis_factors` -> applied per sample; gradients reach the tokens
  and the bases (checked before timing);
* ``factors``   the factor building alone (basis_factors forward + backward, no UNet): the part of
  ``hyperlora`` that grows with K;
* ``resampler`` the generator's token path alone, forward + backward for the batch: ArcFace -> ID
  projector -> ID resampler (with the CLIP features), and the Base resampler on the blurred-face CLIP
  features; released sizes for SDXL.  It does not depend on the image size, so it has its own row;
* ``full``      a whole training step's forward + backward: ``TrainableHyperLoRA.forward`` (both LoRAs
  from the conditions) + the UNet with them applied (what fit runs per step, minus the optimizer).

It prints the median seconds per step, the ratios ``hyperlora / unet`` (target <= 1.3) and
``hyperlora / lora``, and the peak memory of one step of each kind:

* on CPU, the peak resident set size (``VmHWM``, reset through ``/proc/self/clear_refs`` after
  ``malloc_trim``; glibc's mmap threshold is pinned at 1 MiB so freed tensors leave the process) above
  the resident size before the step, plus that resident size (model, bases, inputs).  torch's CPU
  allocator is invisible to ``tracemalloc``, hence RSS.  Where ``clear_refs`` cannot be written the
  process-wide ``ru_maxrss`` is printed instead and said so;
* on CUDA, ``torch.cuda.max_memory_allocated`` over the step (after ``reset_peak_memory_stats``).

Cases:

* ``tiny``: the toy UNet (:func:`hyperlora.train.toy.sdxl.tiny_unet`, 14 modules) at 128 px, K = 128.
* ``sdxl``: a full-size SDXL UNet (SDXL base 1.0's config, 2.57 B parameters, random weights, built
  offline) at reduced resolution on CPU (default 256 px = 32 x 32 latents, batch 2).  It needs about
  12-13 GB: run it under ``flock /tmp/bigmem.lock``.  The full bases at K = 128 (ID 1.49 B + Base 0.74 B
  numbers, 8.9 GB in fp32, as much again for their gradients) do not fit beside it in a small machine, so this case uses
  ``--hyper-dim`` (default 16): the hooks' cost does not depend on K; an upper bound at K = 128 is printed
  with the ``factors`` row scaled by 128 / K (only part of that row grows with K).
* ``cuda`` (when a CUDA device is present): SDXL at 1024 px, bf16 (UNet weights bf16, bases and
  tokens fp32 under autocast), K = 128, without and with gradient checkpointing.

Also printed: the UNet's FLOPs per sample at the case's size and at 1024 px, counted by
``torch.utils.flop_counter`` on the meta device (forward, and forward + backward to the activations),
which docs/training.md uses for the paper-scale estimate.

``--smoke`` runs the tiny case only, small batch, one round, K = 16 (a few seconds; CI runs it).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import re
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from bench.common import interleaved  # noqa: E402
from hyperlora.lora import normalize_tokens  # noqa: E402
from hyperlora.lora_functional import LORA_SCALE, LoraTerm, applied, diffusers_lora_targets  # noqa: E402
from hyperlora.spec import (DEFAULT_HEADS, FACE_EMBEDDING_DIM, LORA_LAYERS, RELEASED_BASE_RANK,  # noqa: E402
                            RELEASED_DIM_HEAD, RELEASED_FF_MULT, RELEASED_HYPER_DIM, RELEASED_ID_TOKENS, RELEASED_RANK,
                            RELEASED_RESAMPLER_DEPTH, RELEASED_RESAMPLER_DIM, VIT_L14_WIDTH, LoraModuleSpec,
                            kohya_prefix)
from hyperlora.train.hypernet import TrainableHyperLoRA, unet_modules  # noqa: E402
from hyperlora.train.toy.sdxl import tiny_unet  # noqa: E402

SDXL_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=128, in_channels=4, out_channels=4, act_fn="silu", layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048, use_linear_projection=True, norm_num_groups=32, norm_eps=1e-5,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    flip_sin_to_cos=True, freq_shift=0,
)
"""SDXL base 1.0's ``unet/config.json`` values (facts, not fetched).  When helper data's shipped copy
``hyperlora/train/configs/sdxl_unet_config.json`` exists, that one is used."""

SHIPPED_SDXL_CONFIG = REPO / "hyperlora" / "train" / "configs" / "sdxl_unet_config.json"
ID_TOKENS, CLIP_TOKENS, CLIP_DIM = RELEASED_ID_TOKENS, 257, VIT_L14_WIDTH   # ID projector tokens, ViT-L/14 patches + class
ID_RANK, BASE_RANK, PLAIN_RANK, PAPER_K = RELEASED_RANK, RELEASED_BASE_RANK, 12, RELEASED_HYPER_DIM
CPU_SDXL_K = 16


# --------------------------------------------------------------------------------------- models


def sdxl_unet_config() -> dict[str, Any]:
    """SDXL's UNet config: the shipped JSON when present (keys starting with ``_`` dropped), else the built-in."""
    if SHIPPED_SDXL_CONFIG.is_file():
        cfg = json.loads(SHIPPED_SDXL_CONFIG.read_text(encoding="utf-8"))
        return {k: v for k, v in cfg.items() if not k.startswith("_")}
    return dict(SDXL_UNET_CONFIG)


def build_unet(kind: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               seed: int = 0) -> nn.Module:
    """``tiny``: the toy UNet; ``sdxl``: SDXL's UNet with random weights (built in place, nothing fetched)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    if kind == "tiny":
        unet = tiny_unet(seed=seed)
    else:
        # built on the meta device, then given memory and random weights one tensor at a time: the peak is the
        # model itself (10.3 GB in fp32), not the model plus diffusers' init temporaries
        with torch.device("meta"):
            unet = UNet2DConditionModel(**sdxl_unet_config())
        if str(device) != "meta":
            unet = unet.to_empty(device=device)
            random_init(unet, seed=seed)
    unet = unet.to(device=device) if dtype == torch.float32 else unet.to(device=device, dtype=dtype)
    return unet.requires_grad_(False).eval()


@torch.no_grad()
def random_init(module: nn.Module, *, seed: int = 0) -> None:
    """PyTorch-default-like random weights in place: weights ~ N(0, 1/(3 fan_in)) (the variance of the
    default uniform init), biases 0, norm weights 1."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        for name, p in m.named_parameters(recurse=False):
            if isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
                p.fill_(1.0 if name == "weight" else 0.0)
            elif name == "bias" or p.dim() < 2:
                p.zero_()
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).mul_((3 * fan_in) ** -0.5))


def unet_inputs(unet: nn.Module, batch: int, side: int, *, device: torch.device, dtype: torch.dtype,
                seed: int = 0) -> dict[str, Any]:
    """Random SDXL-style inputs: latents ``[B, 4, side, side]``, timesteps, context ``[B, 77, C]``,
    pooled text ``[B, P]`` and time ids ``[B, 6]`` (sizes from the UNet's config)."""
    cfg = unet.config
    g = torch.Generator().manual_seed(seed)
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    px = side * 8

    def rnd(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    return dict(
        sample=rnd(batch, cfg.in_channels, side, side),
        noise=rnd(batch, cfg.in_channels, side, side),
        timestep=torch.randint(0, 1000, (batch,), generator=g).to(device),
        encoder_hidden_states=rnd(batch, 77, cfg.cross_attention_dim),
        added_cond_kwargs={"text_embeds": rnd(batch, pooled),
                           "time_ids": torch.tensor([[px, px, 0, 0, px, px]] * batch, dtype=dtype, device=device)},
    )


def count_flops(kind: str, side: int, *, hyper_dim: int | None = None) -> tuple[float, float]:
    """(forward, forward + backward) FLOPs of one sample at ``side`` latents, counted on the meta device
    (no memory, no weights).  Without ``hyper_dim``: the plain UNet, backward to the input latents.  With it:
    the step with per-sample HyperLoRA (ID rank 8 + Base rank 4 factors built from tokens and bases of that K,
    applied through the hooks), backward to the tokens and bases."""
    import contextlib

    from torch.utils.flop_counter import FlopCounterMode

    meta = torch.device("meta")
    unet = build_unet(kind, device="meta")
    inp = unet_inputs(unet, 1, side, device=meta, dtype=torch.float32)
    ctx: Any = contextlib.nullcontext()
    with FlopCounterMode(display=False) as fc:
        x = inp["sample"]
        if hyper_dim is None:
            x = x.requires_grad_(True)
        else:
            modules = unet_modules(unet)
            net = TrainableHyperLoRA.new(modules, rank=ID_RANK, base_rank=BASE_RANK, hyper_dim=hyper_dim,
                                         device="meta", **hypernet_sizes(kind))
            tokens = torch.randn(1, 8 * len(modules), hyper_dim, device=meta, requires_grad=True)
            targets = diffusers_lora_targets(unet, [kohya_prefix(m, layer) for m in modules for layer in LORA_LAYERS])
            ctx = applied(targets, [LoraTerm(net.id_factors(tokens), LORA_SCALE),
                                    LoraTerm(net.base_factors(tokens), LORA_SCALE)])
        with ctx:
            out = unet(x, inp["timestep"], inp["encoder_hidden_states"], added_cond_kwargs=inp["added_cond_kwargs"]).sample
            fwd = fc.get_total_flops()
            out.square().mean().backward()
            both = fc.get_total_flops()
    return float(fwd), float(both)


# --------------------------------------------------------------------------------------- memory


_LIBC: Any = None


def _libc() -> Any:
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = False
    return _LIBC


def pin_mmap_threshold() -> bool:
    """glibc: large blocks (>= 1 MiB) always come from mmap, so a freed tensor leaves the RSS at once."""
    libc = _libc()
    return bool(libc) and libc.mallopt(-3, 1 << 20) == 1     # M_MMAP_THRESHOLD


def _status_kib(field_name: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field_name}:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) if m else None


@dataclass
class MemoryProbe:
    """Peak memory of one call: CUDA allocator peak, or CPU resident-set peak above the start."""

    device: torch.device
    exact: bool = field(default=False, init=False)    # CPU: True when VmHWM could be reset

    def measure(self, fn: Callable[[], object], before: Callable[[], object] | None = None) -> tuple[float, float]:
        """-> (peak above the start, resident/allocated at the start), bytes.  ``before`` (e.g. dropping the
        previous step's gradients) runs first, so the start does not hold another step's leftovers."""
        if before is not None:
            before()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            return float(torch.cuda.max_memory_allocated() - start), float(start)
        libc = _libc()
        if libc:
            libc.malloc_trim(0)
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.exact = True
        except OSError:
            self.exact = False
        start = _status_kib("VmRSS")
        fn()
        if self.exact and start is not None:
            peak = _status_kib("VmHWM") or start
            return float(peak - start) * 1024, float(start) * 1024
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return float(peak_kib) * 1024, float(start or 0) * 1024


# --------------------------------------------------------------------------------------- the steps


@dataclass
class Case:
    name: str
    kind: str           # tiny | sdxl
    device: torch.device
    batch: int
    side: int           # latent side (px / 8)
    hyper_dim: int
    dtype: torch.dtype = torch.float32          # UNet weights and inputs
    checkpointing: bool = False
    resampler: bool = True


def hypernet_sizes(kind: str) -> dict[str, int]:
    """Resampler sizes of the generator: the released ones for SDXL, small ones for the tiny UNet."""
    if kind == "sdxl":
        return dict(clip_dim=CLIP_DIM, dim=RELEASED_RESAMPLER_DIM, depth=RELEASED_RESAMPLER_DEPTH, heads=DEFAULT_HEADS,
                    dim_head=RELEASED_DIM_HEAD, ff_mult=RELEASED_FF_MULT, num_id_tokens=ID_TOKENS)
    return dict(clip_dim=128, dim=64, depth=1, heads=2, dim_head=32, ff_mult=2, num_id_tokens=4)


def build_hypernet(modules: tuple[LoraModuleSpec, ...], kind: str, k: int, *, seed: int = 0) -> TrainableHyperLoRA:
    """The trainable generator with ID rank 8, Base rank 4, K ``k``; every basis element random
    (``down ~ N(0, 1/in)``, ``up ~ N(0, 0.02^2)``: :meth:`TrainableHyperLoRA.new` starts ``up`` at zero,
    which would leave the down bases without a gradient in a one-step bench; the work is the same)."""
    net = TrainableHyperLoRA.new(modules, rank=ID_RANK, base_rank=BASE_RANK, hyper_dim=k, seed=seed,
                                 **hypernet_sizes(kind))
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for kind_ in ("id", "base"):
            for grp, down, up in net.basis_groups(kind_):
                down.copy_(torch.randn(down.shape, generator=g) * grp.in_features ** -0.5)
                up.copy_(torch.randn(up.shape, generator=g) * 0.02)
    return net.train()


class StepBench:
    """The frozen UNet with the kinds of step of the module docstring, on one fixed batch."""

    def __init__(self, case: Case, unet: nn.Module, *, seed: int = 0) -> None:
        self.case, self.unet = case, unet
        dev = case.device
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else None
        self.modules = unet_modules(unet)
        self.targets = diffusers_lora_targets(unet, [kohya_prefix(m, layer) for m in self.modules for layer in LORA_LAYERS])
        k, b = case.hyper_dim, case.batch
        self.hyper = build_hypernet(self.modules, case.kind, k, seed=seed)
        self.hyper.to(dev)
        if not case.resampler:    # no resampler rows: only the bases need to live on the device / in memory
            for name in ("resampler", "base_resampler", "id_projector"):
                if getattr(self.hyper, name, None) is not None:
                    getattr(self.hyper, name).to("meta")
        self.arch = self.hyper.arch
        self.groups = {kind: self.hyper.basis_groups(kind) for kind in ("id", "base")}
        g = torch.Generator().manual_seed(seed)

        def param(*shape: int, std: float) -> nn.Parameter:
            return nn.Parameter((torch.randn(*shape, generator=g) * std).to(dev))

        q = self.arch.num_tokens
        self.tokens = {kind: normalize_tokens(torch.randn(b, q, k, generator=g)).to(dev).requires_grad_(True)
                       for kind in ("id", "base")}
        self.plain = {p: (param(1, PLAIN_RANK, lin.in_features, std=lin.in_features ** -0.5),
                          param(1, lin.out_features, PLAIN_RANK, std=0.02)) for p, lin in self.targets.items()}
        self.inputs = unet_inputs(unet, b, case.side, device=dev, dtype=case.dtype, seed=seed + 1)
        e = self.arch.resampler.embed_dims[-1]
        self.conditions = (F.normalize(torch.randn(b, FACE_EMBEDDING_DIM, generator=g), dim=-1).to(dev),
                           torch.randn(b, CLIP_TOKENS, e, generator=g).to(dev),
                           torch.randn(b, CLIP_TOKENS, e, generator=g).to(dev))
        if case.checkpointing:
            unet.enable_gradient_checkpointing()
            unet.train()    # diffusers checkpoints only with grad enabled; train() also matches fit's mode
        else:
            if hasattr(unet, "disable_gradient_checkpointing"):
                unet.disable_gradient_checkpointing()
            unet.eval()

    def _params(self) -> list[Tensor]:
        out: list[Tensor] = [*self.tokens.values()]
        for d, u in self.plain.values():
            out += [d, u]
        return out + [p for p in self.hyper.parameters() if p.device.type != "meta"]

    def zero_grad(self) -> None:
        for p in self._params():
            p.grad = None

    def _unet_loss(self, sample: Tensor) -> Tensor:
        inp = self.inputs
        with self._autocast():
            pred = self.unet(sample, inp["timestep"], inp["encoder_hidden_states"],
                             added_cond_kwargs=inp["added_cond_kwargs"]).sample
        return F.mse_loss(pred.float(), inp["noise"].float())

    def step_unet(self) -> None:
        self.zero_grad()
        sample = self.inputs["sample"].detach().requires_grad_(True)
        self._unet_loss(sample).backward()

    def step_lora(self) -> None:
        self.zero_grad()
        with applied(self.targets, [LoraTerm(self.plain, LORA_SCALE)]):
            self._unet_loss(self.inputs["sample"]).backward()

    def factors(self) -> tuple[dict, dict]:
        return self.hyper.id_factors(self.tokens["id"]), self.hyper.base_factors(self.tokens["base"])

    def step_hyperlora(self) -> None:
        self.zero_grad()
        id_f, base_f = self.factors()
        with applied(self.targets, [LoraTerm(id_f, LORA_SCALE), LoraTerm(base_f, LORA_SCALE)]):
            self._unet_loss(self.inputs["sample"]).backward()

    def step_factors(self) -> None:
        """basis_factors forward + backward alone (a cheap scalar of every factor as the loss)."""
        self.zero_grad()
        id_f, base_f = self.factors()
        loss = sum(d.float().sum() + u.float().sum() for f in (id_f, base_f) for d, u in f.values())
        loss.backward()

    def _autocast(self) -> Any:
        return self.autocast if self.autocast is not None else _null()

    def step_resampler(self) -> None:
        """The generator's token path alone: ArcFace + CLIP -> ID tokens, blurred CLIP -> Base tokens."""
        self.zero_grad()
        arcface, clip, clip_base = self.conditions
        with self._autocast():
            t_id = self.hyper.id_tokens(arcface, clip).float()
            t_base = self.hyper.base_tokens(clip_base).float()
        (t_id.square().sum() + t_base.square().sum()).backward()

    def step_full(self) -> None:
        """A whole training step's forward + backward: generator (both LoRAs from the conditions) + UNet."""
        self.zero_grad()
        arcface, clip, clip_base = self.conditions
        with self._autocast():
            id_f, base_f = self.hyper(arcface, clip, clip_base)
        with applied(self.targets, [LoraTerm(id_f, LORA_SCALE), LoraTerm(base_f, LORA_SCALE)]):
            self._unet_loss(self.inputs["sample"]).backward()

    def steps(self) -> dict[str, Callable[[], object]]:
        out: dict[str, Callable[[], object]] = {"unet": self.step_unet, "lora": self.step_lora,
                                                "hyperlora": self.step_hyperlora, "factors": self.step_factors}
        if self.case.resampler:
            out["resampler"] = self.step_resampler
            out["full"] = self.step_full
        return out

    def check_gradients(self) -> None:
        """After a hyperlora step: gradients reached the tokens and every basis (else the bench is void)."""
        self.step_hyperlora()
        bad = [kind for kind, t in self.tokens.items() if t.grad is None or not bool(t.grad.abs().sum() > 0)]
        bad += [f"{kind} basis {grp.index}" for kind, groups in self.groups.items() for grp, d, u in groups
                if d.grad is None or u.grad is None or not bool(d.grad.abs().sum() > 0)]
        if bad:
            raise RuntimeError(f"no gradient reached {bad}: the HyperLoRA step does not train them")

    def basis_numbers(self) -> int:
        return sum(d.numel() + u.numel() for groups in self.groups.values() for _, d, u in groups)


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


# --------------------------------------------------------------------------------------- report


def _mb(x: float) -> str:
    return f"{x / 2**20:,.0f} MB"


def run_case(case: Case, repeat: int) -> dict[str, Any]:
    """Times and measures one case; prints its table; returns the figures."""
    t0 = time.perf_counter()
    unet = build_unet(case.kind, device=case.device, dtype=case.dtype)
    bench = StepBench(case, unet)
    built = time.perf_counter() - t0
    sync = torch.cuda.synchronize if case.device.type == "cuda" else None
    bench.check_gradients()
    n_params = sum(p.numel() for p in unet.parameters())
    print(f"\n## {case.name}: {case.kind} UNet {n_params / 1e6:,.1f} M params ({case.dtype}), {case.device.type}, "
          f"{case.side * 8} px ({case.side}x{case.side} latents), batch {case.batch}, "
          f"{len(bench.modules)} modules, K {case.hyper_dim}, ID rank {ID_RANK} + Base rank {BASE_RANK}, "
          f"bases {bench.basis_numbers() / 1e6:,.1f} M numbers, gradient checkpointing "
          f"{'on' if case.checkpointing else 'off'} (built in {built:.1f} s)")
    times = interleaved(bench.steps(), repeat, sync)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    probe = MemoryProbe(case.device)
    mem = {name: probe.measure(fn, before=bench.zero_grad) for name, fn in bench.steps().items()}
    what = ("CUDA max_memory_allocated above the allocated start" if case.device.type == "cuda" else
            "peak RSS (VmHWM) above the RSS at the start" if probe.exact else
            "process ru_maxrss (clear_refs not writable: NOT a per-step figure)")
    print(f"| step | median s | min s | rounds | peak memory of one step ({what}) | at start |")
    print("|---|---|---|---|---|---|")
    for name in times:
        print(f"| {name} | {med[name]:.4f} | {min(times[name]):.4f} | {len(times[name])} | {_mb(max(mem[name][0], 0.0))} | "
              f"{_mb(mem[name][1])} |")
    ratio = med["hyperlora"] / med["unet"]
    print(f"ratio hyperlora/unet {ratio:.3f} (target <= 1.3: {'met' if ratio <= 1.3 else 'NOT met'}), "
          f"hyperlora/lora {med['hyperlora'] / med['lora']:.3f}, lora/unet {med['lora'] / med['unet']:.3f}")
    fast = {name: min(ts) for name, ts in times.items()}
    print(f"fastest-round ratios (less sensitive to load from other processes): hyperlora/unet "
          f"{fast['hyperlora'] / fast['unet']:.3f}, hyperlora/lora {fast['hyperlora'] / fast['lora']:.3f}"
          + (f", full/unet {fast['full'] / fast['unet']:.3f}" if "full" in fast else ""))
    paired = statistics.median(h / u for h, u in zip(times["hyperlora"], times["unet"]))
    print(f"paired ratio hyperlora/unet (median over rounds of the ratio within a round): {paired:.3f}")
    scaled = None
    if case.hyper_dim != PAPER_K:
        scaled = med["hyperlora"] + med["factors"] * (PAPER_K / case.hyper_dim - 1)
        print(f"upper bound at K {PAPER_K} (factors row x {PAPER_K / case.hyper_dim:g}; only part of it grows with K): hyperlora "
              f"{scaled:.4f} s, ratio hyperlora/unet {scaled / med['unet']:.3f} (fastest rounds: "
              f"{(fast['hyperlora'] + fast['factors'] * (PAPER_K / case.hyper_dim - 1)) / fast['unet']:.3f})")
    if "full" in med:
        print(f"ratio full/unet {med['full'] / med['unet']:.3f} (generator + UNet step; the resampler row does not "
              f"shrink with the image: at 1024 px its share is smaller)")
    result = {"case": case.name, "median": med, "fastest": fast, "paired": paired, "memory": mem, "ratio": ratio, "scaled_hyperlora": scaled}
    del bench, unet
    gc.collect()
    if case.device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", choices=("tiny", "sdxl", "cuda"), default=None,
                    help="default: tiny, plus cuda when a CUDA device is present (sdxl on CPU needs ~13 GB: ask for it)")
    ap.add_argument("--batch", type=int, default=2, help="samples per step (tiny, sdxl)")
    ap.add_argument("--size", type=int, default=256, help="image side in px of the CPU sdxl case (multiple of 64)")
    ap.add_argument("--cuda-size", type=int, default=1024, help="image side in px of the cuda case")
    ap.add_argument("--cuda-batch", type=int, default=1)
    ap.add_argument("--cuda-hyper-dim", type=int, default=PAPER_K, help="K of the cuda case (128 needs about 18 GB "
                    "for the bases and their gradients beside the 5 GB bf16 UNet: lower it on a small GPU)")
    ap.add_argument("--hyper-dim", type=int, default=CPU_SDXL_K, help="K of the CPU sdxl case's bases (tiny and "
                    "cuda use 128); the factors row is also printed scaled to 128")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved rounds (after one warm-up round)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--no-resampler", action="store_true", help="leave out the resampler row")
    ap.add_argument("--smoke", action="store_true", help="tiny case only, batch 2, one round, K 16 (seconds)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    pinned = pin_mmap_threshold()
    cuda = torch.cuda.is_available()
    cases_wanted = args.cases or (["tiny", "cuda"] if cuda else ["tiny"])
    if args.smoke:
        cases_wanted, args.repeat = ["tiny"], 1
    if args.size % 64:
        ap.error(f"--size {args.size} must be a multiple of 64 (SDXL's UNet halves the latents three times)")
    print(f"train_step bench: torch {torch.__version__}, {args.threads} thread(s), load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs, CUDA {'yes: ' + torch.cuda.get_device_name() if cuda else 'no'}, "
          f"glibc mmap threshold pinned: {'yes' if pinned else 'no'}")
    cpu = torch.device("cpu")
    cases: list[Case] = []
    for name in cases_wanted:
        if name == "tiny":
            cases.append(Case("tiny", "tiny", cpu, args.batch, 16, 16 if args.smoke else PAPER_K,
                              resampler=not args.no_resampler))
        elif name == "sdxl":
            cases.append(Case("sdxl-cpu", "sdxl", cpu, args.batch, args.size // 8, args.hyper_dim,
                              resampler=not args.no_resampler))
        elif name == "cuda":
            if not cuda:
                print("\n## cuda: no CUDA device here; nothing measured")
                continue
            dev = torch.device("cuda")
            for ckpt in (False, True):
                cases.append(Case(f"sdxl-cuda{'-checkpointing' if ckpt else ''}", "sdxl", dev, args.cuda_batch,
                                  args.cuda_size // 8, args.cuda_hyper_dim, dtype=torch.bfloat16, checkpointing=ckpt,
                                  resampler=not args.no_resampler))
    results = [run_case(c, args.repeat) for c in cases]
    for kind, side in sorted({(c.kind, c.side) for c in cases} | ({("sdxl", 128)} if not args.smoke else set())):
        fwd, both = count_flops(kind, side)
        print(f"flops {kind} {side * 8} px per sample: forward {fwd / 1e9:.5g} GFLOP, forward+backward "
              f"{both / 1e9:.5g} GFLOP (torch.utils.flop_counter, meta device)")
        k = 16 if args.smoke else PAPER_K
        hf, hb = count_flops(kind, side, hyper_dim=k)
        print(f"flops {kind} {side * 8} px per sample with per-sample HyperLoRA (K {k}, factors included): forward "
              f"{hf / 1e9:.5g} GFLOP, forward+backward {hb / 1e9:.5g} GFLOP, ratio to the plain UNet {hb / both:.4f}")
    worst = max(r["ratio"] for r in results) if results else float("nan")
    print(f"train_step: {len(results)} case(s), worst ratio hyperlora/unet {worst:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
