"""Run by tests/train/test_ddp.py under ``torchrun --nproc_per_node 2``: a short fit on the tiny UNet.

Every process writes ``OUT/rank<r>.json``: what fit reported and the process group its steps ran in.
``monitor`` as the second argument adds TensorBoard and a validation loss every 2 steps (tests/train/test_monitor.py).
Not a test module (no ``test_`` prefix).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from diffusers import DDPMScheduler

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from hyperlora.train.config import FitConfig  # noqa: E402
from hyperlora.train.fit import fit  # noqa: E402
from hyperlora.train.toy.sdxl import tiny_unet  # noqa: E402
from tests.train.test_hypernet import TINY, ToyDataset  # noqa: E402


def main() -> None:
    out = Path(sys.argv[1])
    monitored = sys.argv[2:] == ["monitor"]
    torch.set_num_threads(1)
    model = {k: v for k, v in TINY.items() if k != "clip_dim"}
    cfg = FitConfig.from_dict({"base_model": "unused", "shards": ["unused"], "out": str(out / "run"), "model": model,
                               "stages": [{"stage": 1, "steps": 2}, {"stage": 2, "steps": 2}, {"stage": 3, "steps": 2}],
                               "batch_size": 2, "lr": 1e-3, "checkpoint_every": 2, "keep_checkpoints": 10,
                               "seed": 0,
                               **({"trackers": ["tensorboard"], "validation_shards": ["held-out"],
                                   "validation_every": 2, "validation_samples": 3} if monitored else {})})
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)
    captured: dict = {}

    def grab(step: int) -> None:           # the process group the steps ran in
        dist = torch.distributed
        captured.update(step=step, group=dist.is_available() and dist.is_initialized())
        if captured["group"]:
            captured.update(world=dist.get_world_size(), backend=str(dist.get_backend()))
        if "bucket_view" not in captured:      # the DDP wrapper fit's accelerator made (its options)
            import gc

            ddp = [o for o in gc.get_objects() if isinstance(o, torch.nn.parallel.DistributedDataParallel)]
            captured.update(ddp=len(ddp), bucket_view=bool(ddp) and all(d.gradient_as_bucket_view for d in ddp),
                            unused=bool(ddp) and all(d.find_unused_parameters for d in ddp))

    res = fit(cfg, resume=False, dataset=ToyDataset(8), unet=tiny_unet(seed=0).requires_grad_(False).eval(),
              noise_scheduler=sched, on_step=grab, validation_dataset=ToyDataset(5, seed=9) if monitored else None)
    rank = int(os.environ["RANK"])
    (out / f"rank{rank}.json").write_text(json.dumps({"main": res.main_process, "steps": res.steps,
                                                       "export": None if res.export is None else str(res.export),
                                                       **captured}))


if __name__ == "__main__":
    main()
