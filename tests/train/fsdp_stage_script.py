"""Run by tests/train/test_fsdp.py under ``torchrun --nproc_per_node 2``: fit's stages under FSDP2 (gloo, CPU).

accelerate (1.16) does not offer FSDP on a CPU: ``Accelerator(cpu=True, fsdp_plugin=...)`` silently becomes
DDP (``MULTI_CPU``) and ``cpu=False`` without CUDA becomes a single process.  So this script shards the
generator with torch's own ``fully_shard`` (what accelerate's FSDP2 path calls for a ``NO_WRAP`` model) and
runs fit's own pieces on it: :class:`Trainer` (the loss), :mod:`hyperlora.train.engine` (the optimizer's
part groups, ``enter_stage``, the gathered state), the stage schedule with the distil stage (its teacher a
gathered plain copy), a BatchPlan per process, then fit's ``sample_images`` and ``export_run`` on every process.

Every process writes ``OUT/rank<r>.json`` (hashes of the gathered state after each stage) and ``OUT/states.pt``
is written by rank 0 (the gathered state before the run and after each stage).  Not a test module.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from diffusers import DDPMScheduler

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from hyperlora.train import engine  # noqa: E402
from hyperlora.train.config import FitConfig  # noqa: E402
from hyperlora.train.fit import BatchPlan, Trainer, collate, export_run, sample_images  # noqa: E402
from hyperlora.train.toy.sdxl import tiny_sdxl_folder, tiny_unet  # noqa: E402
from tests.train.test_hypernet import TINY, ToyDataset, tiny_generator  # noqa: E402


def digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    from torch.distributed.fsdp import fully_shard

    unet = tiny_unet(seed=0).requires_grad_(False).eval()
    gen = tiny_generator(unet, seed=1)                     # random up bases: every part changes the LoRA
    fully_shard(gen)
    model = {k: v for k, v in TINY.items() if k != "clip_dim"}
    cfg = FitConfig.from_dict({"base_model": "unused", "shards": ["unused"], "out": str(out / "run"), "model": model,
                               "stages": [{"stage": 1, "steps": 2}, {"stage": 2, "steps": 2}, {"stage": 3, "steps": 2}],
                               "distill_base": 0.25, "distill_steps": 2,
                               "batch_size": 2, "lr": 1e-2, "weight_decay": 0.1, "seed": 0})
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)
    optimizer = torch.optim.AdamW(engine.param_groups(gen, cfg.lr, cfg.weight_decay), lr=cfg.lr)
    trainer = Trainer(unet, gen, sched, cfg)
    dataset = ToyDataset(8)
    plan = BatchPlan(len(dataset), cfg.batch_size, seed=cfg.seed, rank=rank, world=world)
    sharded = engine.is_sharded(gen)
    states = {"start": engine.full_state_dict(gen)}
    stage_of = {}
    for step in range(cfg.total_steps):
        stage, parts = cfg.stage_at(step)
        stage_of[stage] = list(parts)
        if stage == "distill" and trainer.teacher is None:
            trainer.teacher = engine.plain_copy(gen)           # gathered collectively, not a deepcopy
        trainable = engine.enter_stage(gen, optimizer, parts, cfg.lr)
        batch = collate([dataset[i] for i in plan.indices(step)], torch.device("cpu"))
        trainer.loss(stage, batch, torch.Generator().manual_seed(1000 * rank + step), lambda loss: loss.backward())
        torch.nn.utils.clip_grad_norm_([p for p in trainable if p.grad is not None], cfg.max_grad_norm)
        frozen_grads = [n for n, p in gen.named_parameters() if p.grad is not None and gen.part_of(n) not in parts]
        if frozen_grads:
            raise RuntimeError(f"frozen parameters got gradients: {frozen_grads[:3]}")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step + 1 == cfg.total_steps or cfg.stage_at(step + 1)[0] != stage:
            states[stage] = engine.full_state_dict(gen)
    teacher_ok = trainer.teacher is not None and not engine.is_sharded(trainer.teacher)
    gen.distilled_base = cfg.distill_base                  # as fit does once the whole distil stage ran
    # fit's sample step and export with the sharded generator: every process calls them (the old sampler
    # returned at once on the other processes while the main one waited in the generator's all-gather)
    if rank == 0:
        cfg.base_model = str(tiny_sdxl_folder(out / "sdxl"))
    dist.barrier()
    png = sample_images(cfg, gen, unet, sched, dataset, out / "sample.png", device=torch.device("cpu"),
                        is_main=rank == 0, count=2, steps=2)
    export = export_run(gen, out / "export", is_main=rank == 0)
    (out / f"rank{rank}.json").write_text(json.dumps({
        "world": world, "sharded": sharded, "teacher_plain": teacher_ok, "parts": stage_of,
        "digests": {k: digest(v) for k, v in states.items()},
        "sample": None if png is None else str(png), "export": None if export is None else str(export)}))
    if rank == 0:
        torch.save(states, out / "states.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
