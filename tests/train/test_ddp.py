"""Two processes on the CPU train one generator with DDP (gloo), as `accelerate launch` runs GPUs.

``torchrun --nproc_per_node 2`` starts tests/train/ddp_fit_script.py; fit's Accelerator joins the
process group (on a machine without CUDA it asks for the CPU backend itself: without that, Accelerate
would run two independent trainings), the steps run inside it, only the main process exports and reports.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.train.torchrun import run_two

SCRIPT = Path(__file__).with_name("ddp_fit_script.py")


def test_two_cpu_processes_train_one_generator(tmp_path: Path) -> None:
    pytest.importorskip("diffusers")
    # fit must choose the CPU group by itself: no ACCELERATE_USE_CPU
    proc = run_two([str(SCRIPT), str(tmp_path)], drop_env=["ACCELERATE_USE_CPU"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert r["steps"] == 6 and r["step"] == 6
        assert r["group"] is True and r["world"] == 2 and r["backend"] == "gloo"
        # one DDP wrapper, gradients as views into its buckets (no second full-size copy), unused parts allowed
        assert r["ddp"] == 1 and r["bucket_view"] is True and r["unused"] is True
    assert ranks[0]["main"] is True and ranks[1]["main"] is False
    assert ranks[1]["export"] is None and ranks[0]["export"] is not None
    from hyperlora.checkpoint import load_hyper_lora

    model = load_hyper_lora(Path(ranks[0]["export"]))         # one export, through the strict loader
    assert model.arch.base_rank is not None
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == ["step-000002", "step-000004", "step-000006"]
    # freezing per stage under DDP: after each stage (2 steps each) the parts outside it are bit-identical
    # to the stage's start, and the stage's own parts moved
    from safetensors.torch import load_file

    from hyperlora.train.config import STAGE_PARTS
    from hyperlora.train.hypernet import TrainableHyperLoRA, unet_modules
    from hyperlora.train.toy.sdxl import tiny_unet
    from tests.train.test_hypernet import TINY

    start = TrainableHyperLoRA.new(unet_modules(tiny_unet(seed=0)), seed=0, **TINY)
    prev = start.state_dict()
    for stage, step in ((1, 2), (2, 4), (3, 6)):
        now = load_file(str(tmp_path / "run" / "checkpoints" / f"step-{step:06d}" / "generator.safetensors"))
        assert set(now) == set(prev)
        moved = {start.part_of(k) for k in now if not torch.equal(now[k], prev[k])}
        assert moved == set(STAGE_PARTS[stage]), (stage, moved)
        prev = now
