"""difflora-fit / difflora-export on the synthetic LoRA family (tests/fixtures/difflora_synth.py): exact resume,
run folder contents, the CLI's one-line errors, dataset refusals.  The quality of a full fit is tested in
tests/core/test_difflora_model.py; here the runs are 40 steps long."""

from __future__ import annotations

import csv
import json
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hyperlora.errors import LoraError, ModelFileError, SettingError
from hyperlora.train import difflora_export, difflora_fit
from hyperlora.train.difflora_fit import (
    DiffLoraFitConfig,
    export,
    fit,
    latest_checkpoint,
    load_dataset,
    save_mif_file,
)
from tests.fixtures.difflora_synth import (
    TRAIN_Z,
    held_out_retrieval,
    lora_of,
    mif_of,
    tiny_config,
    write_dataset,
)

SHORT = {"lae_steps": 20, "dit_steps": 20, "batch_size": 8}


@pytest.fixture(autouse=True, scope="module")
def one_thread():                                         # type: ignore[no-untyped-def]
    """Tiny models: one intra-op thread is several times faster than two on a busy machine (restored after)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("dlfit") / "data", TRAIN_Z[:12])


def _cfg(data: Path, out: Path, **over: object) -> DiffLoraFitConfig:
    return DiffLoraFitConfig.from_dict(tiny_config(data, out, **{**SHORT, **over}))


def _weights(run: Path) -> dict[str, torch.Tensor]:
    ckpt = latest_checkpoint(run)
    assert ckpt is not None
    return {**{f"lae.{k}": v for k, v in load_file(str(ckpt / "lae.safetensors")).items()},
            **{f"dit.{k}": v for k, v in load_file(str(ckpt / "dit.safetensors")).items()},
            **{f"opt.{k}": v for k, v in load_file(str(ckpt / "optimizer.safetensors")).items()}}


def _csv(run: Path) -> list[list[str]]:
    with open(run / "loss.csv", newline="") as f:
        return list(csv.reader(f))


@pytest.mark.parametrize(("stop", "how"), [(13, "max_steps"), (31, "max_steps"), (17, "ctrl-c")])
def test_interrupted_and_resumed_run_equals_uninterrupted(data: Path, tmp_path: Path, stop: int, how: str) -> None:
    """Stopped inside the LAE phase / inside the DiT phase by --max-steps, or by Ctrl-C (a real SIGINT)."""
    ds = load_dataset(data)
    whole = fit(_cfg(data, tmp_path / "whole"), data=ds)
    assert whole.finished and whole.steps == 40
    if how == "ctrl-c":
        def on_step(step: int) -> None:
            if step == stop:
                signal.raise_signal(signal.SIGINT)      # handled by fit: checkpoint after this step, then return
        before = signal.getsignal(signal.SIGINT)     # default_int_handler, or SIG_IGN under nohup / a background job
        part = fit(_cfg(data, tmp_path / "part"), data=ds, on_step=on_step)
        assert signal.getsignal(signal.SIGINT) is before                          # fit put the handler back
    else:
        part = fit(_cfg(data, tmp_path / "part", max_steps=stop), data=ds)
    assert not part.finished and part.steps == stop
    assert latest_checkpoint(tmp_path / "part").name == f"step-{stop:06d}"
    # something that is not the checkpoint's state happens in between: other global RNG draws, a stray csv row
    torch.manual_seed(999)
    with open(tmp_path / "part" / "loss.csv", "a") as f:
        f.write(f"{stop + 1},lae,lae,123,0.001\n")
    resumed = fit(_cfg(data, tmp_path / "part"), data=ds)
    assert resumed.finished and resumed.steps == 40
    assert resumed.latent_scale == whole.latent_scale
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "part")
    assert a.keys() == b.keys() and len(a) > 20
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, diff[:5]
    assert _csv(tmp_path / "whole") == _csv(tmp_path / "part")


def test_run_folder_csv_checkpoints_and_export(data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = fit(_cfg(data, run, checkpoint_every=10, keep_checkpoints=2), data=load_dataset(data))
    assert result.finished
    rows = _csv(run)
    assert rows[0] == ["step", "stage", "scenario", "loss", "lr"]        # fit's columns: plot draws both
    assert [int(r[0]) for r in rows[1:]] == list(range(1, 41))
    assert {(r[1], r[2]) for r in rows[1:21]} == {("lae", "lae")} and {r[1] for r in rows[21:]} == {"dit"}
    assert all(float(r[3]) >= 0 for r in rows[1:]) and {r[4] for r in rows[21:]} == {"0.002"}
    assert (run / "loss.png").stat().st_size > 1000
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000030", "step-000040"]
    assert not list((run / "checkpoints").glob(".*"))          # no temporary folder left
    state = json.loads((run / "checkpoints" / "step-000040" / "state.json").read_text())
    assert state["step"] == 40 and state["latent_scale"] > 0
    folder = export(run, tmp_path / "model")
    assert sorted(p.name for p in folder.iterdir()) == ["difflora.json", "dit.safetensors", "lae.safetensors"]
    body = json.loads((folder / "difflora.json").read_text())
    assert body["latent_scale"] == state["latent_scale"] and body["condition"]["arcface_dim"] == 16
    assert body["dit"]["tokens"] == 3 and body["condition"]["clip_tokens"] == 1


def test_cli_fit_export_and_one_line_errors(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(tiny_config(data, tmp_path / "unused", **SHORT)))
    run = tmp_path / "run"
    assert difflora_fit.main(["--config", str(cfg_path), "--out", str(run), "--max-steps", "10"]) == 0
    assert "stopped at step 10" in capsys.readouterr().out
    assert difflora_export.main(["--run", str(run), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "before its DiT was trained" in err
    assert difflora_fit.main(["--config", str(cfg_path), "--out", str(run)]) == 0
    assert "40 steps done" in capsys.readouterr().out
    assert difflora_export.main(["--run", str(run), "--out", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "difflora.json").is_file()
    # a changed learning setting on resume is refused, naming it
    assert difflora_fit.main(["--config", str(cfg_path), "--out", str(run), "--data", str(data)]) == 0
    raw = tiny_config(data, run, **{**SHORT, "dit_lr": 1.0})
    cfg_path.write_text(json.dumps(raw))
    assert difflora_fit.main(["--config", str(cfg_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "dit_lr" in err and "--no-resume" in err
    cfg_path.write_text(json.dumps({**raw, "lae_stpes": 3}))
    assert difflora_fit.main(["--config", str(cfg_path)]) == 2
    assert "unknown key(s) ['lae_stpes']" in capsys.readouterr().err
    assert difflora_export.main(["--run", str(tmp_path / "nothing"), "--out", str(tmp_path / "m2")]) == 2
    assert "has no checkpoint" in capsys.readouterr().err
    # the common entry point knows both commands
    from hyperlora.train.__main__ import COMMANDS
    from hyperlora.train.__main__ import main as train_main

    assert COMMANDS["difflora-fit"][0] == "difflora_fit" and COMMANDS["difflora-export"][0] == "difflora_export"
    assert train_main(["difflora-export", "--run", str(tmp_path / "nothing"), "--out", str(tmp_path / "m2")]) == 2
    assert "difflora-export: the run folder" in capsys.readouterr().err
    assert train_main([]) == 2 and "difflora-fit     train a DiffLoRA model" in capsys.readouterr().out


def test_dataset_refusals_and_manifest(tmp_path: Path) -> None:
    folder = write_dataset(tmp_path / "d", TRAIN_Z[:3])
    ds = load_dataset(folder)
    assert ds.names == ["id000", "id001", "id002"] and tuple(ds.face.shape) == (3, 16)
    assert ds.clip is not None and tuple(ds.clip.shape) == (3, 1, 8)
    assert torch.equal(ds.face[1], mif_of(TRAIN_Z[1]).face) and torch.equal(ds.clip[2], mif_of(TRAIN_Z[2]).clip)
    # save_mif_file writes the same file (the dataset tool's way to add MIFs)
    save_mif_file(mif_of(TRAIN_Z[1]), folder / "id001.mif.safetensors")
    assert torch.equal(load_dataset(folder).clip, ds.clip)
    with pytest.raises(SettingError, match="is not"):
        save_mif_file(mif_of(TRAIN_Z[1]), folder / "id001.safetensors")
    # the manifest (difflora-dataset's) chooses the identities and their files
    (folder / "manifest.json").write_text(json.dumps({"format": "hyperlora.difflora.dataset", "complete": True,
                                                      "identities": {"id002": {"file": "id002.safetensors"},
                                                                     "id000": {"file": "id000.safetensors"}}}))
    assert load_dataset(folder).names == ["id000", "id002"]
    (folder / "manifest.json").unlink()
    (folder / "id001.mif.safetensors").unlink()
    with pytest.raises(SettingError, match=r"id001\.mif\.safetensors' is missing"):
        load_dataset(folder)
    save_file({"face": torch.zeros(3), "clip": torch.zeros(1, 8)}, str(folder / "id001.mif.safetensors"))
    with pytest.raises(SettingError, match="other shapes"):
        load_dataset(folder)
    save_file({"face": torch.ones(16), "extra": torch.zeros(1)}, str(folder / "id001.mif.safetensors"))
    with pytest.raises(SettingError, match="must hold 'face'"):
        load_dataset(folder)
    (folder / "id001.mif.safetensors").unlink()
    from hyperlora.lora_file import save_lora_file

    other = {k: (v[:2] if k.endswith("down.weight") and k.startswith("lora_unet_a") else v)
             for k, v in lora_of(TRAIN_Z[0]).items()}
    other["lora_unet_a.lora_up.weight"] = other["lora_unet_a.lora_up.weight"][:, :2]
    save_lora_file(other, folder / "id001.safetensors", dtype=None)
    with pytest.raises(LoraError, match=r"id001\.safetensors'.*lora_unet_a"):
        load_dataset(folder)
    with pytest.raises(SettingError, match="does not exist"):
        load_dataset(tmp_path / "none")
    with pytest.raises(SettingError, match="drop_prob"):
        _cfg(folder, tmp_path / "o", drop_prob=2)
    with pytest.raises(SettingError, match=r"'dit' has unknown field\(s\) \['tokens'\]"):
        _cfg(folder, tmp_path / "o", dit={"tokens": 4})


def test_fit_export_load_samples_held_out_people(tmp_path: Path) -> None:
    """The whole pipeline: difflora-fit (150 LAE + 250 DiT steps on 32 LoRAs), difflora-export, DiffLoraModel:
    samples for held-out MIFs are their own identity's LoRA; the folder's untrained-DiT control fails."""
    from hyperlora.difflora.dit import LatentDiT
    from hyperlora.difflora.model import DiffLoraModel

    data = write_dataset(tmp_path / "data")
    result = fit(DiffLoraFitConfig.from_dict(tiny_config(data, tmp_path / "run")))
    assert result.finished and result.steps == 400
    model = DiffLoraModel.from_folder(export(tmp_path / "run", tmp_path / "model"))
    assert model.latent_scale == result.latent_scale
    hits, total, dists = held_out_retrieval(model, [0, 1])
    assert hits == total == 12, dists
    control = DiffLoraModel(model.lae, LatentDiT(model.dit.config, model.dit.mif_spec), model.latent_scale)
    c_hits, c_total, c_dists = held_out_retrieval(control, [0, 1])
    assert c_hits < c_total // 2, c_dists


def test_damaged_checkpoint_is_refused_naming_it(data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    fit(_cfg(data, run, max_steps=5), data=load_dataset(data))
    ckpt = latest_checkpoint(run)
    assert ckpt is not None and ckpt.name == "step-000005"
    state = load_file(str(ckpt / "dit.safetensors"))
    state.pop("x_out.bias")
    save_file(state, str(ckpt / "dit.safetensors"))
    with pytest.raises(ModelFileError, match=r"step-000005/dit\.safetensors' lacks 'x_out\.bias'.*state\.json.*"
                                             r"delete its folder.*--no-resume"):
        fit(_cfg(data, run), data=load_dataset(data))
    # a checkpoint folder without state.json (a save that never finished) is not a checkpoint
    (ckpt / "state.json").unlink()
    assert latest_checkpoint(run) is None
    assert fit(_cfg(data, run, max_steps=3), data=load_dataset(data)).steps == 3
