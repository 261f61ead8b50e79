"""One-command GPU check of fit's scale paths: DDP, FSDP2 and DeepSpeed ZeRO-2, each through its shipped YAML.

    python bench/engine_check.py [--engines ddp fsdp deepspeed] [--gpus N] [--size 1024] [--hyper-dim 32]
    python bench/engine_check.py --smoke        # CPU, one process, the tiny UNet (CI): the same checks

FSDP through accelerate and DeepSpeed do not run on a CPU (tests/train/test_fsdp.py covers FSDP2 with
torch's ``fully_shard`` on CPU processes; DeepSpeed has no CPU test), so this script is their check.
On a machine without CUDA (and without ``--smoke``) it says so and exits 0.  Otherwise it prints one table:

1. **Step time at ``--size`` px** (default 1024), batch 1, bf16, K 128: the plain SDXL UNet's training
   step against the step with per-sample HyperLoRA, without and with gradient checkpointing, and the peak
   memory of each (bench/train_step.py's ``cuda`` case, interleaved).
2. **Per engine**, ``accelerate launch --config_file hyperlora/train/configs/<yaml> --num_processes N`` of
   this file's worker, which runs fit three times in one launch on a random full-size SDXL UNet with
   synthetic samples at ``--size`` px (stages 1, 2, 3 and distil, ``--steps`` each, a sample step inside
   stage 2, checkpoints at every stage end):

   * run A uninterrupted: the median fit step time and the peak memory per GPU
     (``torch.cuda.max_memory_allocated``, the largest over the processes);
   * frozen parts: between the checkpoints at the stage ends, every part outside the stage is bit-identical
     and every part of the stage moved;
   * resume: run B stops one step into the distil stage and resumes from its checkpoint; its final
     generator against run A's (GPU kernels are not bitwise deterministic: the max difference is printed,
     "ok" below 1e-2 relative).

``--hyper-dim`` (default 32, the paper's is 128) keeps checkpoints small enough for the few minutes;
the step-time rows use K 128.  Expected run time on 8 A100: about 8 minutes (not measured here: no GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CONFIGS = REPO / "hyperlora" / "train" / "configs"
YAML = {"ddp": "accelerate_8gpu.yaml", "fsdp": "accelerate_fsdp.yaml", "deepspeed": "accelerate_deepspeed_zero2.yaml"}
NO_CUDA = ("No CUDA device here (torch.cuda.is_available() is False): the engine check needs NVIDIA GPUs "
           "(run --smoke for the CPU version)")
STAGES = ("1", "2", "3", "distill")


class Table:
    """Rows of (part, measurement, value) printed as one Markdown table at the end."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str]] = []

    def add(self, part: str, what: str, value: str) -> None:
        self.rows.append((part, what, value))
        sys.stdout.write(f"  {part}: {what}: {value}\n")
        sys.stdout.flush()

    def print(self) -> None:
        sys.stdout.write("\n| part | measurement | value |\n|---|---|---|\n")
        for row in self.rows:
            sys.stdout.write("| " + " | ".join(row) + " |\n")


# --------------------------------------------------------------------------------- worker (one per process)


class Synthetic:
    """``n`` random training samples in the shard format, SDXL sizes at ``side`` latents (or the tiny ones)."""

    def __init__(self, n: int, side: int, *, tiny: bool, seed: int = 0) -> None:
        import torch

        from bench.train_step import CLIP_DIM, CLIP_TOKENS

        g = torch.Generator().manual_seed(seed)
        if tiny:
            from tests.train.test_hypernet import ToyDataset

            self.items = ToyDataset(n, seed=seed).items
            return
        px = float(side * 8)
        self.items = []
        for i in range(n):
            a = torch.randn(512, generator=g)
            self.items.append(dict(
                arcface=a / a.norm(), clip_id=torch.randn(CLIP_TOKENS, CLIP_DIM, generator=g).half(),
                clip_base=torch.randn(CLIP_TOKENS, CLIP_DIM, generator=g).half(),
                latents=torch.randn(4, side, side, generator=g),
                time_ids=torch.tensor([px, px, 0, 0, px, px]), text=torch.randn(77, 2048, generator=g).half(),
                pooled=torch.randn(1280, generator=g).half(), text_plain=torch.randn(77, 2048, generator=g).half(),
                pooled_plain=torch.randn(1280, generator=g).half(), identity=f"id{i % 4}"))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def _fit_config(out: Path, args: argparse.Namespace, base_model: Path, **over: object):
    from hyperlora.train.config import FitConfig

    tiny = args.smoke
    model = (dict(rank=4, base_rank=2, hyper_dim=8, heads=4, dim=32, depth=2, dim_head=8, ff_mult=2,
                  num_id_tokens=4, id_token_dim=24) if tiny else dict(hyper_dim=args.hyper_dim))
    n = args.steps
    raw = {"base_model": str(base_model), "shards": ["unused"], "out": str(out), "model": model,
           "stages": [{"stage": s, "steps": n} for s in (1, 2, 3)], "distill_base": 0.25, "distill_steps": n,
           "batch_size": 1, "lr": 1e-4, "weight_decay": 0.01, "checkpoint_every": n, "keep_checkpoints": 20,
           "sample_every": 0 if tiny else n + 1, "seed": 0,
           "mixed_precision": "no" if tiny else "bf16", "gradient_checkpointing": not tiny}
    raw.update(over)
    return FitConfig.from_dict(raw)


def worker(args: argparse.Namespace) -> int:
    """Runs A (uninterrupted) and B (stopped inside the distil stage, then resumed); writes rank<r>.json."""
    import torch
    from diffusers import DDPMScheduler

    from bench.train_step import build_unet
    from hyperlora.train.fit import fit
    from hyperlora.train.toy.sdxl import tiny_sdxl_folder

    out = Path(args.out)
    rank = int(os.environ.get("RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    unet = build_unet("tiny" if args.smoke else "sdxl", device=device,
                      dtype=torch.float32 if args.smoke else torch.bfloat16)
    base = out / "tiny_sdxl"                                   # its VAE decodes the sample step's latents
    if rank == 0:
        tiny_sdxl_folder(base)
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    data = Synthetic(4 * world, args.size // 8, tiny=args.smoke)
    while rank != 0 and not (base / "vae").exists():          # the main process writes the folder
        time.sleep(0.5)
    times: list[float] = []

    def tick(step: int) -> None:
        times.append(time.perf_counter())

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    cfg_a = _fit_config(out / "run_a", args, base)
    a = fit(cfg_a, resume=False, dataset=data, unet=unet, noise_scheduler=sched, on_step=tick)
    peak = torch.cuda.max_memory_allocated(device) if cuda else 0
    steps_a = [t1 - t0 for t0, t1 in zip(times, times[1:])]
    total = cfg_a.total_steps
    cfg_b = _fit_config(out / "run_b", args, base, checkpoint_every=0)
    cfg_b.max_steps = total - args.steps + 1                   # one step into the distil stage
    b1 = fit(cfg_b, resume=False, dataset=data, unet=unet, noise_scheduler=sched)
    cfg_b.max_steps = None
    b2 = fit(cfg_b, resume=True, dataset=data, unet=unet, noise_scheduler=sched)
    (out / f"rank{rank}.json").write_text(json.dumps({
        "peak": peak, "step_median": statistics.median(steps_a) if steps_a else None, "steps_a": a.steps,
        "b_stop": b1.steps, "b_end": b2.steps, "total": total, "world": world}), encoding="utf-8")
    return 0


# --------------------------------------------------------------------------------- checks (parent)


def frozen_check(run: Path, steps: int) -> tuple[bool, str]:
    """Between consecutive stage-end checkpoints, parts outside the stage are bit-identical, the stage's moved."""
    from safetensors.torch import load_file

    from hyperlora.train.config import DISTILL_PARTS, STAGE_PARTS
    from hyperlora.train.export import load_generator_from_checkpoint

    ck = run / "checkpoints"
    gen = load_generator_from_checkpoint(ck / f"step-{steps:06d}")
    parts = {"1": STAGE_PARTS[1], "2": STAGE_PARTS[2], "3": STAGE_PARTS[3], "distill": DISTILL_PARTS}
    prev = load_file(str(ck / f"step-{steps:06d}" / "generator.safetensors"))
    notes, ok = [], True
    for i, stage in enumerate(STAGES[1:], start=2):
        now = load_file(str(ck / f"step-{i * steps:06d}" / "generator.safetensors"))
        moved = {gen.part_of(k) for k in now if not bool((now[k] == prev[k]).all())}
        frozen_moved = moved - set(parts[stage])
        ok = ok and not frozen_moved and moved == set(parts[stage])
        notes.append(f"stage {stage}: frozen moved {sorted(frozen_moved) or 'none'}, "
                     f"stage parts unmoved {sorted(set(parts[stage]) - moved) or 'none'}")
        prev = now
    return ok, "; ".join(notes)


def resume_check(out: Path) -> tuple[bool, str]:
    from hyperlora.train.export import latest_checkpoint
    from safetensors.torch import load_file

    a = load_file(str(latest_checkpoint(out / "run_a") / "generator.safetensors"))
    b = load_file(str(latest_checkpoint(out / "run_b") / "generator.safetensors"))
    worst = max(float((a[k].float() - b[k].float()).abs().max() / (a[k].float().abs().max() + 1e-12)) for k in a)
    return worst < 1e-2, f"max relative difference resumed vs uninterrupted {worst:.2e}"


def run_engine(engine: str, args: argparse.Namespace, table: Table) -> None:
    out = Path(tempfile.mkdtemp(prefix=f"engine-{engine}-"))
    try:
        if args.smoke:
            cmd = [sys.executable, str(Path(__file__)), "--worker", "--out", str(out), "--smoke",
                   "--steps", str(args.steps)]
        else:
            accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
            cmd = [accelerate, "launch", "--config_file", str(CONFIGS / YAML[engine]), "--num_processes",
                   str(args.gpus), "--num_machines", "1", "--machine_rank", "0", str(Path(__file__)), "--worker",
                   "--out", str(out), "--size", str(args.size), "--hyper-dim", str(args.hyper_dim),
                   "--steps", str(args.steps)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if args.smoke:
            engine = "smoke (CPU, 1 process)"
        if proc.returncode != 0:
            table.add(engine, "run", f"FAILED (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
            sys.stderr.write(proc.stderr[-4000:])
            return
        ranks = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(out.glob("rank*.json"))]
        r0 = ranks[0]
        table.add(engine, "processes, launch wall time (3 fits)", f"{r0['world']}, {wall:.0f} s")
        med = r0["step_median"]
        table.add(engine, f"fit step time, {args.size} px, batch 1 per process",
                  f"{med:.3f} s" if med is not None else "n/a")
        table.add(engine, "peak memory per GPU (max over processes)",
                  f"{max(r['peak'] for r in ranks) / 1e9:.2f} GB" if r0["peak"] else "n/a (CPU)")
        ok, note = frozen_check(out / "run_a", args.steps)
        table.add(engine, "frozen parts bit-identical per stage", ("ok" if ok else "FAILED") + f" ({note})")
        ok_r, note_r = resume_check(out)
        table.add(engine, f"resume (stopped at step {r0['b_stop']}, resumed to {r0['b_end']})",
                  ("ok" if ok_r and r0["b_end"] == r0["total"] else "FAILED") + f" ({note_r})")
    finally:
        shutil.rmtree(out, ignore_errors=True)


def step_time_rows(args: argparse.Namespace, table: Table) -> None:
    import torch

    from bench.train_step import PAPER_K, Case, run_case

    for ckpt in (False, True):
        case = Case(f"sdxl-cuda{'-checkpointing' if ckpt else ''}", "sdxl", torch.device("cuda"), 1, args.size // 8,
                    PAPER_K, dtype=torch.bfloat16, checkpointing=ckpt)
        res = run_case(case, 3)
        label = f"{args.size} px, checkpointing {'on' if ckpt else 'off'}"
        med, mem = res["median"], res["memory"]
        table.add("step time", f"plain UNet, {label}", f"{med['unet']:.3f} s, peak {mem['unet'][0] / 1e9:.2f} GB")
        table.add("step time", f"HyperLoRA, {label}",
                  f"{med['hyperlora']:.3f} s, peak {mem['hyperlora'][0] / 1e9:.2f} GB, ratio {res['ratio']:.3f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", nargs="+", choices=sorted(YAML), default=["ddp", "fsdp", "deepspeed"])
    ap.add_argument("--gpus", type=int, default=0, help="processes per engine (default: every visible GPU)")
    ap.add_argument("--size", type=int, default=1024, help="image side in px (multiple of 64)")
    ap.add_argument("--hyper-dim", type=int, default=32, help="K of the engine runs' generator (paper: 128)")
    ap.add_argument("--steps", type=int, default=2, help="optimizer steps per stage")
    ap.add_argument("--skip-step-time", action="store_true", help="leave out the step-time rows")
    ap.add_argument("--smoke", action="store_true", help="CPU, one process, tiny UNet: the checks themselves (CI)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.size % 64:
        ap.error(f"--size {args.size} must be a multiple of 64 (SDXL's UNet halves the latents three times)")
    if args.steps < 2:
        ap.error(f"--steps {args.steps}: give at least 2 (run B stops one step into the distil stage)")
    if args.worker:
        return worker(args)
    import torch

    if args.smoke:
        args.engines, args.size = ["ddp"], 64
    elif not torch.cuda.is_available():
        sys.stdout.write(NO_CUDA + "\n")
        return 0
    else:
        args.gpus = args.gpus or torch.cuda.device_count()
    table = Table()
    if not args.smoke and not args.skip_step_time:
        step_time_rows(args, table)
    for engine in args.engines:
        run_engine(engine, args, table)
    table.print()
    failed = [r for r in table.rows if "FAILED" in r[2]]
    sys.stdout.write(f"engine_check: {len(table.rows)} rows, {len(failed)} failed\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
