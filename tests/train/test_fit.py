"""fit: (d) stage freezing, the scenarios' targets, the run folder (loss.csv / loss.png / export), distil."""

from __future__ import annotations

import copy
import csv
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler
from safetensors.torch import load_file

from hyperlora.checkpoint import load_hyper_lora
from hyperlora.errors import SettingError
from hyperlora.lora_functional import LORA_SCALE, LoraTerm, applied, diffusers_lora_targets
from hyperlora.spec import BASE_RESAMPLER_FILE
from hyperlora.train.config import STAGE_PARTS, FitConfig
from hyperlora.train.fit import BatchPlan, Trainer, collate, fit, load_generator_from_checkpoint
from hyperlora.train.toy.sdxl import tiny_unet

from .test_hypernet import TINY, ToyDataset, tiny_generator

MODEL = {k: v for k, v in TINY.items() if k != "clip_dim"}


def scheduler() -> DDPMScheduler:
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)


def toy_config(out: Path, **over: object) -> FitConfig:
    raw = {"base_model": "unused", "shards": ["unused"], "out": str(out), "model": MODEL,
           "stages": [{"stage": 1, "steps": 2}, {"stage": 2, "steps": 2}, {"stage": 3, "steps": 2}],
           "batch_size": 2, "lr": 1e-3, "checkpoint_every": 2, "keep_checkpoints": 10, "seed": 0}
    raw.update(over)
    return FitConfig.from_dict(raw)


@pytest.fixture(scope="module")
def unet() -> torch.nn.Module:
    return tiny_unet(seed=0).requires_grad_(False).eval()


def test_stages_change_only_their_parts(unet: torch.nn.Module, tmp_path: Path) -> None:
    """(d) Each stage changes exactly its parts; the UNet never changes; the run folder is complete."""
    before_unet = copy.deepcopy(unet.state_dict())
    cfg = toy_config(tmp_path / "run")
    result = fit(cfg, dataset=ToyDataset(8), unet=unet, noise_scheduler=scheduler())
    assert result.steps == 6 and not result.interrupted
    gen = load_generator_from_checkpoint(tmp_path / "run" / "checkpoints" / "step-000002")
    states = {s: load_file(str(tmp_path / "run" / "checkpoints" / f"step-{s:06d}" / "generator.safetensors"))
              for s in (2, 4, 6)}
    from hyperlora.train.hypernet import TrainableHyperLoRA, unet_modules

    start = TrainableHyperLoRA.new(unet_modules(unet), seed=cfg.seed, **{**TINY}).state_dict()
    prev = {k: v.clone() for k, v in start.items()}
    for stage, s in ((1, 2), (2, 4), (3, 6)):
        changed = {gen.part_of(k) for k, v in states[s].items() if not torch.equal(v, prev[k])}
        assert changed == set(STAGE_PARTS[stage]), (stage, changed)
        prev = states[s]
    # inside stage 3 the CLIP branch is frozen but the ArcFace branch moved away from its zero start
    assert torch.equal(states[6]["resampler.layers.0.attn3.to_q.weight"], states[4]["resampler.layers.0.attn3.to_q.weight"])
    assert float(states[6]["resampler.layers.0.attn2.to_out.0.weight"].abs().max()) > 0
    assert float(states[4]["resampler.layers.0.attn2.to_out.0.weight"].abs().max()) == 0
    after = unet.state_dict()
    assert all(torch.equal(before_unet[k], after[k]) for k in before_unet)

    with open(tmp_path / "run" / "loss.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows if r["stage"] == "1"] == [1, 2]
    assert {r["scenario"] for r in rows if r["stage"] == "1"} == {"base"}
    assert {r["scenario"] for r in rows if r["stage"] in "23"} <= {"recon", "id_only", "base_id"}
    assert {int(r["step"]) for r in rows} == set(range(1, 7))
    png = tmp_path / "run" / "loss.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.export is not None and (result.export / BASE_RESAMPLER_FILE).is_file()
    loaded = load_hyper_lora(result.export)
    assert loaded.arch.resampler.heads == TINY["heads"]


def _trainer(unet: torch.nn.Module, gen: torch.nn.Module, scen: dict[str, float], tmp_path: Path) -> Trainer:
    cfg = toy_config(tmp_path, scenarios=scen)
    return Trainer(unet, gen, scheduler(), cfg)


def _zero(gen: torch.nn.Module, kind: str) -> None:
    with torch.no_grad():
        for _, _, up in gen.basis_groups(kind):
            up.zero_()


@pytest.mark.parametrize("stage", ["2", "3"])
def test_scenario_targets(unet: torch.nn.Module, tmp_path: Path, stage: str) -> None:
    """id_only: ID alone vs the frozen UNet; base_id: Base + ID vs Base only; recon: Base + ID vs the noise.

    With a zero ID-LoRA and a non-zero Base-LoRA, id_only and base_id must give exactly 0 (Base is not
    applied in id_only, and is applied to both sides in base_id); recon is checked against a direct
    computation; a non-zero ID-LoRA makes id_only > 0.
    """
    ds = ToyDataset(4, seed=3)
    batch = collate([ds[i] for i in range(3)], torch.device("cpu"))
    gen = tiny_generator(unet, seed=4)
    _zero(gen, "id")
    for scen in ("id_only", "base_id"):
        tr = _trainer(unet, gen, {scen: 1.0}, tmp_path)
        out = tr.loss(stage, batch, torch.Generator().manual_seed(0), lambda loss: None)
        assert set(out) == {scen} and out[scen][1] == 3
        assert out[scen][0] < 1e-10, scen          # rounding only (ranks concatenated)
    tr = _trainer(unet, gen, {"recon": 1.0}, tmp_path)
    got = tr.loss(stage, batch, torch.Generator().manual_seed(0), lambda loss: None)["recon"][0] / 3
    noisy, noise, t = tr.noise(batch, torch.Generator().manual_seed(0))
    with torch.no_grad():
        idf, basef = gen(batch["arcface"] if stage == "3" else None, batch["clip_id"], batch["clip_base"])
        with applied(diffusers_lora_targets(unet), [LoraTerm(idf, LORA_SCALE), LoraTerm(basef, LORA_SCALE)]):
            pred = unet(noisy, t, encoder_hidden_states=batch["text"],
                        added_cond_kwargs={"text_embeds": batch["pooled"], "time_ids": batch["time_ids"]}).sample
    assert got == pytest.approx(float((pred - noise).square().mean()), rel=1e-5)
    gen2 = tiny_generator(unet, seed=4)
    tr = _trainer(unet, gen2, {"id_only": 1.0}, tmp_path)
    assert tr.loss(stage, batch, torch.Generator().manual_seed(0), lambda loss: None)["id_only"][0] > 1e-6


def test_batch_plan_is_a_partition_per_epoch() -> None:
    plan = BatchPlan(10, 2, seed=1, rank=0, world=2)
    other = BatchPlan(10, 2, seed=1, rank=1, world=2)
    assert plan.per_epoch == 2
    epoch0 = plan.indices(0) + other.indices(0) + plan.indices(1) + other.indices(1)
    assert len(set(epoch0)) == 8 and set(epoch0) <= set(range(10))
    assert plan.indices(2) != plan.indices(0) or plan.indices(3) != plan.indices(1)    # a new permutation
    assert BatchPlan(10, 2, seed=1).indices(7) == BatchPlan(10, 2, seed=1).indices(7)


def test_distil_stage_folds_base_and_exports_without_it(unet: torch.nn.Module, tmp_path: Path) -> None:
    cfg = toy_config(tmp_path / "run", stages=[{"stage": 1, "steps": 1}, {"stage": 2, "steps": 1}],
                     distill_base=0.25, distill_steps=2, checkpoint_every=0)
    result = fit(cfg, dataset=ToyDataset(4), unet=unet, noise_scheduler=scheduler())
    assert result.stage == "distill" and result.steps == 4
    assert not (result.export / BASE_RESAMPLER_FILE).exists()
    assert load_hyper_lora(result.export).arch.base_rank is None
    ck = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))[-1]
    assert load_generator_from_checkpoint(ck).distilled_base == 0.25
    assert (ck / "distill_teacher.safetensors").is_file()


def test_gradient_checkpointing_and_accumulation_run(unet: torch.nn.Module, tmp_path: Path) -> None:
    """Same seed: gradient checkpointing changes nothing but memory (same parameters after a step of 2 micro-batches)."""
    res = {}
    for gc in (False, True):
        cfg = toy_config(tmp_path / f"gc{gc}", stages=[{"stage": 2, "steps": 1}], gradient_checkpointing=gc,
                         gradient_accumulation=2, checkpoint_every=0)
        u = copy.deepcopy(unet)
        fit(cfg, dataset=ToyDataset(8), unet=u, noise_scheduler=scheduler())
        res[gc] = load_file(str(tmp_path / f"gc{gc}" / "checkpoints" / "step-000001" / "generator.safetensors"))
    assert res[True].keys() == res[False].keys()
    for k in res[True]:
        torch.testing.assert_close(res[True][k], res[False][k], atol=1e-6, rtol=1e-5)
    moved = [k for k in res[True] if k.startswith("id_up_")]
    assert moved and all(float(res[True][k].abs().max()) > 0 for k in moved)


def test_init_from_a_released_folder_and_bf16(unet: torch.nn.Module, tmp_path: Path) -> None:
    """--init-from: the run starts from the folder's weights (bf16 autocast step on CPU); a folder made for
    another UNet is refused with the fix."""
    from hyperlora.errors import SettingError
    from hyperlora.train.export import export_folder
    from tests.fixtures.hyperlora_models import write_hyperlora_folder

    start = tiny_generator(unet, seed=9)
    released = export_folder(start, tmp_path / "released", dtype=torch.float32)
    cfg = toy_config(tmp_path / "run", stages=[{"stage": 3, "steps": 1}], checkpoint_every=0, lr=1e-9,
                     mixed_precision="bf16", init_from=str(released))
    result = fit(cfg, dataset=ToyDataset(4), unet=copy.deepcopy(unet), noise_scheduler=scheduler())
    trained = load_file(str(tmp_path / "run" / "checkpoints" / "step-000001" / "generator.safetensors"))
    ref = start.state_dict()
    # the frozen parts are exactly the released weights; the trained ones moved by at most lr-sized steps
    assert torch.equal(trained["base_up_0"], ref["base_up_0"].detach())
    assert torch.equal(trained["resampler.proj_in_2.weight"], ref["resampler.proj_in_2.weight"].detach())
    assert float((trained["id_up_0"] - ref["id_up_0"]).abs().max()) < 1e-6
    assert not torch.equal(trained["id_up_0"], ref["id_up_0"].detach())
    assert result.last_losses and all(v == v and abs(v) < 1e3 for v in result.last_losses.values())
    other = write_hyperlora_folder(tmp_path / "other", preset="tiny")
    cfg2 = toy_config(tmp_path / "run2", stages=[{"stage": 3, "steps": 1}], init_from=str(other))
    with pytest.raises(SettingError, match="was made for another UNet"):
        fit(cfg2, dataset=ToyDataset(4), unet=copy.deepcopy(unet), noise_scheduler=scheduler())


def test_sample_images_code_path(unet: torch.nn.Module, tmp_path: Path) -> None:
    """fit calls this every sample_every steps on CUDA only; the code path itself runs anywhere."""
    from PIL import Image

    from hyperlora.train.fit import sample_images
    from hyperlora.train.toy.sdxl import tiny_sdxl_folder

    folder = tiny_sdxl_folder(tmp_path / "sdxl")
    cfg = toy_config(tmp_path / "run")
    cfg.base_model = str(folder)
    gen = tiny_generator(unet, seed=2)
    path = sample_images(cfg, gen, unet, scheduler(), ToyDataset(3), tmp_path / "s.png", device=torch.device("cpu"),
                         count=2, steps=2)
    img = Image.open(path)
    assert img.size == (2 * 64, 64)                      # two 8x8-latent samples side by side
    import numpy as np

    px = torch.from_numpy(np.asarray(img, dtype=np.float32))
    assert float(px.std()) > 1.0                         # not a blank image


def test_loader_workers_change_nothing(unet: torch.nn.Module, tmp_path: Path) -> None:
    """num_workers reads ahead in the same plan: the same parameters as reading in the main process."""
    res = []
    for workers in (0, 1):
        cfg = toy_config(tmp_path / f"w{workers}", stages=[{"stage": 2, "steps": 2}], checkpoint_every=0,
                         num_workers=workers)
        fit(cfg, dataset=ToyDataset(4), unet=copy.deepcopy(unet), noise_scheduler=scheduler())
        res.append(load_file(str(tmp_path / f"w{workers}" / "checkpoints" / "step-000002" / "generator.safetensors")))
    assert all(torch.equal(res[0][k], res[1][k]) for k in res[0])


@pytest.mark.parametrize("mode, photos, swaps", [
    ("other", 4, ((0, 2), (2, 0), (1, 3), (3, 1))),      # id0: 0, 2   id1: 1, 3: another photo of the same person
    ("shuffled", 2, ((0, 1), (1, 0))),                   # id0: 0      id1: 1: the control, the other person's photo
])
def test_id_photo_feeds_the_id_branch_the_chosen_photo(unet: torch.nn.Module, tmp_path: Path, mode: str, photos: int,
                                                       swaps: tuple) -> None:
    """"id_photo": "other" (two photos per identity) and the "shuffled" control (one photo per identity, two
    identities: always the other identity's) train exactly like "same" on a dataset whose ArcFace and CLIP-ID
    features were swapped by hand (stages 2 and 3 read both); they differ from "same" on the unswapped data."""
    data = ToyDataset(photos, ids=2)
    swapped = ToyDataset(photos, ids=2)
    for i, j in swaps:
        swapped.items[i] = {**data.items[i], "arcface": data.items[j]["arcface"], "clip_id": data.items[j]["clip_id"]}
    stages = [{"stage": 2, "steps": 2}, {"stage": 3, "steps": 2}]
    runs = {}
    for name, ds, id_photo in ((mode, data, mode), ("by_hand", swapped, "same"), ("same", data, "same")):
        cfg = toy_config(tmp_path / name, stages=stages, checkpoint_every=0, id_photo=id_photo)
        fit(cfg, dataset=ds, unet=copy.deepcopy(unet), noise_scheduler=scheduler())
        runs[name] = load_file(str(tmp_path / name / "checkpoints" / "step-000004" / "generator.safetensors"))
    assert all(torch.equal(runs[mode][k], runs["by_hand"][k]) for k in runs[mode])
    assert any(not torch.equal(runs[mode][k], runs["same"][k]) for k in runs[mode])
    with pytest.raises(SettingError, match="id_photo.*shuffled"):
        toy_config(tmp_path / "bad", id_photo="another")
