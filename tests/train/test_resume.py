"""(c) Ctrl-C mid-run saves a checkpoint; resuming gives bit-identical parameters to an uninterrupted run."""

from __future__ import annotations

import copy
import csv
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hyperlora.train.fit import fit

from .test_fit import scheduler, toy_config
from .test_hypernet import ToyDataset
from hyperlora.train.toy.sdxl import tiny_unet

STAGES = [{"stage": 1, "steps": 1}, {"stage": 2, "steps": 2}, {"stage": 3, "steps": 1}]


def _final(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / "step-000004" / "generator.safetensors"))


def _optimizer(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "step-000004" / "optimizer.bin", weights_only=False)


def test_interrupted_and_resumed_run_is_bit_identical(tmp_path: Path) -> None:
    unet = tiny_unet(seed=0).requires_grad_(False).eval()
    handler_before = signal.getsignal(signal.SIGINT)   # SIG_IGN when the suite runs as a background job
    kw = dict(stages=STAGES, gradient_accumulation=2, checkpoint_every=0, warmup_steps=2)
    straight = toy_config(tmp_path / "straight", **kw)
    fit(straight, dataset=ToyDataset(6), unet=copy.deepcopy(unet), noise_scheduler=scheduler())

    run = tmp_path / "resumed"
    cfg = toy_config(run, **kw)

    def ctrl_c(step: int) -> None:          # a real SIGINT in the middle of stage 2 (after step 2)
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    first = fit(cfg, dataset=ToyDataset(6), unet=copy.deepcopy(unet), noise_scheduler=scheduler(), on_step=ctrl_c)
    assert first.interrupted and first.steps == 2 and first.export is None
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000002"]
    assert signal.getsignal(signal.SIGINT) is handler_before                # handler restored
    # rows a crashed run might have written after its checkpoint are dropped on resume
    with open(run / "loss.csv", "a") as f:
        f.write("3,2,recon,9.9,0.001\n")
    second = fit(cfg, dataset=ToyDataset(6), unet=copy.deepcopy(unet), noise_scheduler=scheduler())
    assert not second.interrupted and second.steps == 4 and second.export is not None

    a, b = _final(tmp_path / "straight"), _final(run)
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert diff == []
    oa, ob = _optimizer(tmp_path / "straight"), _optimizer(run)
    for i, st in oa["state"].items():
        for name, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(ob["state"][i][name])), (i, name)

    def rows(p: Path) -> list[list[str]]:
        with open(p / "loss.csv", newline="") as f:
            return list(csv.reader(f))

    assert rows(run) == rows(tmp_path / "straight")


def test_resume_false_starts_again(tmp_path: Path) -> None:
    unet = tiny_unet(seed=0).requires_grad_(False).eval()
    cfg = toy_config(tmp_path / "run", stages=[{"stage": 2, "steps": 1}], checkpoint_every=0)
    fit(cfg, dataset=ToyDataset(4), unet=copy.deepcopy(unet), noise_scheduler=scheduler())
    again = fit(cfg, dataset=ToyDataset(4), unet=copy.deepcopy(unet), noise_scheduler=scheduler())
    assert again.steps == 1                                  # resumed at the end: nothing more to do
    fresh = fit(cfg, resume=False, dataset=ToyDataset(4), unet=copy.deepcopy(unet), noise_scheduler=scheduler())
    assert fresh.steps == 1


def test_resume_from_another_base_model_is_refused(tmp_path: Path) -> None:
    from hyperlora.errors import SettingError
    from diffusers import UNet2DConditionModel

    unet = tiny_unet(seed=0).requires_grad_(False).eval()
    cfg = toy_config(tmp_path / "run", stages=[{"stage": 2, "steps": 1}], checkpoint_every=0)
    fit(cfg, dataset=ToyDataset(4), unet=copy.deepcopy(unet), noise_scheduler=scheduler())
    from hyperlora.train.toy.sdxl import unet_config

    other = UNet2DConditionModel(**{**unet_config(), "block_out_channels": (32, 64, 64),
                                    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                                    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")})
    with pytest.raises(SettingError, match="another base model"):
        fit(cfg, dataset=ToyDataset(4), unet=other, noise_scheduler=scheduler())


def test_resume_with_another_model_config_is_refused_naming_the_keys(tmp_path: Path) -> None:
    """Issue 18: resuming with rank 4 -> 8 exported the rank-4 checkpoint and rewrote config.json to say 8."""
    from hyperlora.errors import SettingError
    from .test_fit import MODEL

    unet = tiny_unet(seed=0).requires_grad_(False).eval()
    run = tmp_path / "run"
    kw = dict(stages=[{"stage": 2, "steps": 1}], checkpoint_every=0)
    fit(toy_config(run, **kw), dataset=ToyDataset(4), unet=copy.deepcopy(unet), noise_scheduler=scheduler())
    written = (run / "config.json").read_text()
    changed = toy_config(run, **kw, model={**MODEL, "rank": MODEL["rank"] * 2}, lr=5e-4)
    with pytest.raises(SettingError) as ei:
        fit(changed, dataset=ToyDataset(4), unet=copy.deepcopy(unet), noise_scheduler=scheduler())
    msg = str(ei.value)
    assert f"model.rank: {MODEL['rank']} in the run, {MODEL['rank'] * 2} now" in msg
    assert "lr: 0.001 in the run, 0.0005 now" in msg and "new --out" in msg and "put the old values back" in msg
    assert (run / "config.json").read_text() == written                     # the run's record is kept
    # keys that do not change what is learnt may differ; --no-resume starts over with the new values
    again = fit(toy_config(run, **kw, keep_checkpoints=5, max_steps=1), dataset=ToyDataset(4),
                unet=copy.deepcopy(unet), noise_scheduler=scheduler())
    assert again.steps == 1
    fresh = fit(changed, resume=False, dataset=ToyDataset(4), unet=copy.deepcopy(unet), noise_scheduler=scheduler())
    assert fresh.steps == 1 and '"rank": %d' % (MODEL["rank"] * 2) in (run / "config.json").read_text()
