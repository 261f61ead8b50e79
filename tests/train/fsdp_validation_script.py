"""Run by tests/train/test_monitor.py under ``torchrun --nproc_per_node 2``: fit's validation loss and gradient
norm with the generator sharded by FSDP2 (gloo, CPU; accelerate offers no FSDP on a CPU, so, as
tests/train/fsdp_stage_script.py does, torch's ``fully_shard`` shards it and fit's pieces run on it).

Every process runs :class:`hyperlora.train.monitor.Validation` (the generator's forward gathers the shards:
all must take part) in stages 1, 2 and 3, then one backward and ``clip_grad_norm_`` (a DTensor norm) read
with :func:`hyperlora.train.monitor.scalar`; it writes ``OUT/rank<r>.json``.  Not a test module.
"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from diffusers import DDPMScheduler

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from hyperlora.train import monitor  # noqa: E402
from hyperlora.train.config import FitConfig  # noqa: E402
from hyperlora.train.fit import Trainer, collate  # noqa: E402
from hyperlora.train.toy.sdxl import tiny_unet  # noqa: E402
from tests.train.test_hypernet import TINY, ToyDataset, tiny_generator  # noqa: E402

CONFIG = {"base_model": "unused", "shards": ["unused"], "out": "unused",
          "model": {k: v for k, v in TINY.items() if k != "clip_dim"},
          "stages": [{"stage": 1, "steps": 1}, {"stage": 2, "steps": 1}, {"stage": 3, "steps": 1}],
          "batch_size": 2, "seed": 0, "validation_shards": ["held-out"], "validation_every": 1,
          "validation_samples": 3}


def scheduler() -> DDPMScheduler:
    """SDXL's training noise schedule."""
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)


def measure(gen: torch.nn.Module, unet: torch.nn.Module) -> dict:
    """The validation losses of stages 1-3 and the gradient norm of one stage-2 batch (the same on every process)."""
    import contextlib

    cfg = FitConfig.from_dict(CONFIG)
    trainer = Trainer(unet, gen, scheduler(), cfg)
    validation = monitor.Validation(ToyDataset(5, seed=9), cfg, clip_dim=TINY["clip_dim"])
    out = {stage: validation.run(trainer, stage, gen, device=torch.device("cpu"), autocast=contextlib.nullcontext)
           for stage in ("1", "2", "3")}
    batch = collate([ToyDataset(4)[i] for i in range(2)], torch.device("cpu"))
    trainer.loss("2", batch, torch.Generator().manual_seed(5), lambda loss: loss.backward())
    norm = torch.nn.utils.clip_grad_norm_([p for p in gen.parameters() if p.grad is not None], float("inf"))
    return {"validation": out, "grad_norm": monitor.scalar(norm), "dtensor": hasattr(norm, "full_tensor")}


def main() -> None:
    """Shard a tiny generator over the processes and :func:`measure` it."""
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    from torch.distributed.fsdp import fully_shard

    unet = tiny_unet(seed=0).requires_grad_(False).eval()
    gen = tiny_generator(unet, seed=1)
    fully_shard(gen)
    result = measure(gen, unet)
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
