"""Issue 19 A: ``--init-from`` a released HyperLoRA folder (no Base-LoRA, format §1).

The default schedule (fit_paper.json's three stages) starts with stage 1, which trains the Base-LoRA a
released folder does not have: fit refuses it in one line, before loading the UNet or the shards, naming the
folder and the config change that works (stage 3 alone). Stage 3 alone from that folder trains and exports a
folder without a Base-LoRA, like the release.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hyperlora.checkpoint import load_hyper_lora
from hyperlora.errors import SettingError
from hyperlora.spec import BASE_RESAMPLER_FILE
from hyperlora.train.__main__ import main as cli
from hyperlora.train.config import check_init_from
from hyperlora.train.export import export_folder
from hyperlora.train.fit import fit
from hyperlora.train.hypernet import unet_modules
from hyperlora.train.toy.sdxl import tiny_unet
from tests.fixtures.hyperlora_models import Preset, write_hyperlora_folder

from .test_fit import scheduler, toy_config
from .test_hypernet import CLIP_DIM, ToyDataset, tiny_generator
from .test_cli_paths import _one_line


@pytest.fixture(scope="module")
def unet() -> torch.nn.Module:
    return tiny_unet(seed=0).requires_grad_(False).eval()


def released_folder(unet: torch.nn.Module, folder: Path) -> Path:
    """A folder in the released layout for the tiny UNet, written by the fixture builder: fp16, no Base-LoRA, no
    heads metadata (so 12 heads, as released)."""
    preset = Preset(modules=tuple((m.name, m.hidden_size, m.cross_attention_dim) for m in unet_modules(unet)),
                    hyper_dim=8, rank=4, dim=32, depth=1, heads=12, dim_head=2, ff_mult=2, id_embed_dim=512,
                    num_id_tokens=4, id_token_dim=24, clip_dim=CLIP_DIM)
    return write_hyperlora_folder(folder, preset=preset, base=False, seed=3)


def _config_file(tmp_path: Path, **over: object) -> Path:
    """A fit JSON whose base model and shards do not exist: any loading would fail with another message."""
    raw = {"base_model": str(tmp_path / "no_such_sdxl.safetensors"), "shards": [str(tmp_path / "no_shards")],
           "out": str(tmp_path / "run"), **over}
    path = tmp_path / "fit.json"
    path.write_text(json.dumps(raw), encoding="utf-8")
    return path


def test_default_schedule_from_a_released_folder_is_refused_at_once(unet: torch.nn.Module, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    folder = released_folder(unet, tmp_path / "released")
    assert not (folder / BASE_RESAMPLER_FILE).exists()
    config = _config_file(tmp_path)                      # no "stages": the paper's three
    assert cli(["fit", "--config", str(config), "--init-from", str(folder)]) == 2
    assert _one_line(capsys.readouterr().err, "fit") == (
        f"fit: init_from '{folder}' is a released HyperLoRA folder without a Base-LoRA (no base_resampler.safetensors: "
        f"the release folded it into the ID-LoRA), but 'stages' has stage 1, which trains the Base-LoRA; to fine-tune "
        f"it, set \"stages\": [{{\"stage\": 3, \"steps\": 55000}}] in the fit JSON (stage 3 alone trains the ID-LoRA "
        f"from CLIP + ArcFace).")
    assert not (tmp_path / "run").exists()               # refused before the run folder, the UNet, the shards


def test_the_fix_names_the_configured_stage_3_length_and_distill(unet: torch.nn.Module, tmp_path: Path) -> None:
    folder = released_folder(unet, tmp_path / "released")
    cfg = toy_config(tmp_path / "run", init_from=str(folder), distill_base=0.25, distill_steps=10,
                     stages=[{"stage": 1, "steps": 5}, {"stage": 3, "steps": 7}])
    with pytest.raises(SettingError) as err:
        check_init_from(cfg)
    msg = str(err.value)
    assert "'stages' has stage 1, which trains the Base-LoRA and 'distill_base' is 0.25" in msg
    assert 'set "stages": [{"stage": 3, "steps": 7}] and remove "distill_base" in the fit JSON' in msg
    # distil alone (no stage 1) is refused too: there is no Base-LoRA to fold in
    cfg = toy_config(tmp_path / "run", init_from=str(folder), distill_base=0.25, distill_steps=10,
                     stages=[{"stage": 3, "steps": 7}])
    with pytest.raises(SettingError, match="'distill_base' is 0.25, which folds a Base-LoRA"):
        check_init_from(cfg)
    # a folder trained with a Base-LoRA (this pack's export) keeps the default schedule
    with_base = export_folder(tiny_generator(unet, seed=1), tmp_path / "with_base")
    assert (with_base / BASE_RESAMPLER_FILE).is_file()
    check_init_from(toy_config(tmp_path / "run", init_from=str(with_base)))
    # stage 0 steps of stage 1 is no stage 1
    check_init_from(toy_config(tmp_path / "run", init_from=str(folder),
                               stages=[{"stage": 1, "steps": 0}, {"stage": 3, "steps": 2}]))


def test_stage_3_alone_from_a_released_folder_trains_and_exports_without_base(unet: torch.nn.Module,
                                                                             tmp_path: Path) -> None:
    """The accepted case: all three scenarios (base_id then equals id_only: no Base-LoRA on either side)."""
    folder = released_folder(unet, tmp_path / "released")
    released = {**load_file(str(folder / "resampler.safetensors"))}
    cfg = toy_config(tmp_path / "run", init_from=str(folder), stages=[{"stage": 3, "steps": 3}],
                     checkpoint_every=0, scenarios={"recon": 0.4, "id_only": 0.3, "base_id": 0.3})
    result = fit(cfg, dataset=ToyDataset(6), unet=copy.deepcopy(unet), noise_scheduler=scheduler())
    assert result.steps == 3 and not result.interrupted and result.export is not None
    assert all(v == v and 0 < v < 1e3 for v in result.last_losses.values())
    assert not (result.export / BASE_RESAMPLER_FILE).exists()
    loaded = load_hyper_lora(result.export)
    assert loaded.arch.base_rank is None and loaded.arch.resampler.heads == 12
    trained = load_file(str(tmp_path / "run" / "checkpoints" / "step-000003" / "generator.safetensors"))
    # the CLIP branch is frozen in stage 3: exactly the released fp16 values; the ArcFace branch moved
    assert torch.equal(trained["resampler.proj_in_2.weight"], released["proj_in_2.weight"].float())
    assert not torch.equal(trained["resampler.proj_in.weight"], released["proj_in.weight"].float())
