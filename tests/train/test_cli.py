"""(e) ``python -m hyperlora.train``: dispatch, clear errors (naming the key / file and the fix), fit + export
end to end through the CLI on a tiny diffusers SDXL folder and real shards."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hyperlora.checkpoint import load_hyper_lora
from hyperlora.errors import SettingError
from hyperlora.train.__main__ import main as cli
from hyperlora.train.config import FitConfig
from tests.conftest import REPO_ROOT

from .test_hypernet import TINY, sample

MODEL = {k: v for k, v in TINY.items() if k != "clip_dim"}


def _config(tmp_path: Path, **over: object) -> Path:
    raw = {"base_model": "sdxl", "shards": "shards", "out": "run", **over}
    path = tmp_path / "fit.json"
    path.write_text(json.dumps(raw), encoding="utf-8")
    return path


def test_module_entry_point_prints_usage() -> None:
    proc = subprocess.run([sys.executable, "-m", "hyperlora.train", "--help"], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=120)
    assert proc.returncode == 0
    for name in ("prepare", "fit", "export", "demo"):
        assert name in proc.stdout


def test_unknown_command_and_no_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["train"]) == 2
    assert "unknown command 'train'" in capsys.readouterr().err
    assert cli([]) == 2
    assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("over, message", [
    ({"batchsize": 2}, "unknown key 'batchsize'; did you mean 'batch_size'?"),
    ({"mixed_precision": "fp16"}, "'mixed_precision' is 'fp16'; use \"no\" (float32) or \"bf16\""),
    ({"lr": 0}, "'lr' must be a number > 0.0"),
    ({"batch_size": 0}, "'batch_size' must be a whole number >= 1"),
    ({"stages": [{"stage": 4, "steps": 10}]}, "'stage' is 4; use 1 (Base-LoRA), 2 (ID from CLIP) or 3"),
    ({"stages": [{"stage": 2}]}, "stages[0]: 'steps' is missing"),
    ({"stages": [{"stage": 3, "steps": 1}, {"stage": 2, "steps": 1}]}, "must be in order 1, 2, 3"),
    ({"stages": [{"stage": 2, "steps": 1, "train": ["unet"]}]}, "'train' must be a list of parts from"),
    ({"scenarios": {"recon": 0, "id_only": 0}}, "gives every scenario probability 0"),
    ({"scenarios": {"reconstruct": 1}}, "unknown key 'reconstruct'; did you mean 'recon'?"),
    ({"model": {"rank": 8, "base_rank": 0}}, "'base_rank' is 0 (no Base-LoRA) but stage 1 trains the Base-LoRA"),
    ({"model": {"ranks": 8}}, "model: unknown key 'ranks'; did you mean 'rank'?"),
    ({"distill_base": 0.25}, "'distill_steps' is 0"),
    ({"name": "a/b"}, "'name' is 'a/b'; use a plain folder name"),
    ({"gradient_checkpointing": "yes"}, "'gradient_checkpointing' must be a bool"),
])
def test_config_errors_name_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str], over: dict,
                                    message: str) -> None:
    path = _config(tmp_path, **over)
    with pytest.raises(SettingError) as err:
        FitConfig.from_json(path)
    assert message in str(err.value) and str(path) in str(err.value)
    assert cli(["fit", "--config", str(path)]) == 2                       # the CLI: message, no traceback
    out = capsys.readouterr()
    assert message in out.err and "Traceback" not in out.err


def test_config_file_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["fit", "--config", str(tmp_path / "nope.json")]) == 2
    assert "does not exist; pass --config with the path of a fit JSON" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{\"lr\": 1e-4,}")
    assert cli(["fit", "--config", str(bad)]) == 2
    assert "is not valid JSON" in capsys.readouterr().err
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps({"shards": "s", "out": "o"}))
    assert cli(["fit", "--config", str(missing)]) == 2
    assert "required key 'base_model' is missing" in capsys.readouterr().err
    good = _config(tmp_path)
    assert cli(["fit", "--config", str(good), "--init-from", str(tmp_path / "nowhere")]) == 2
    assert "--init-from" in capsys.readouterr().err
    assert cli(["fit", "--config", str(good), "--distill-base", "0.25"]) == 2
    assert "'distill_steps' is 0" in capsys.readouterr().err
    assert cli(["fit", "--config", str(good), "--max-steps", "0"]) == 2
    assert "--max-steps is 0" in capsys.readouterr().err
    cfg = FitConfig.from_json(good)
    assert cfg.base_model == str(tmp_path / "sdxl") and cfg.shards == [str(tmp_path / "shards")]
    assert [(s.stage, s.steps) for s in cfg.stages] == [(1, 20000), (2, 15000), (3, 55000)]
    assert (cfg.model.rank, cfg.model.base_rank, cfg.model.hyper_dim) == (8, 4, 128)


def test_export_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["export", "--out", str(tmp_path / "x")]) == 2
    assert "export needs --run RUN_DIR" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    assert cli(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "x")]) == 2
    assert "has no complete checkpoint" in capsys.readouterr().err
    assert cli(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "x")]) == 2
    assert "is not a complete fit checkpoint" in capsys.readouterr().err


def _shards(folder: Path, n: int = 4) -> Path:
    from hyperlora.train.shards import rebuild_manifest, write_shard

    g = torch.Generator().manual_seed(0)
    items = []
    for i in range(n):
        s = sample(g, f"id{i % 2}", latent=8)
        s["text"] = torch.randn(77, 64, generator=g).half()
        s["text_plain"] = torch.randn(77, 64, generator=g).half()
        s.pop("identity")
        items.append(s)
    meta = [{"key": f"k{i}", "identity": f"id{i % 2}", "caption": "a photo"} for i in range(n)]
    write_shard(folder / "shard-00000.safetensors", items, meta)
    rebuild_manifest(folder, planned=1, encoders={}, sizes={}, settings={})
    return folder


def test_fit_and_export_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A diffusers SDXL folder + shards on disk -> ``fit`` (2 steps, stages 1 and 2) -> ``export`` -> the loader."""
    from hyperlora.train.toy.sdxl import tiny_sdxl_folder

    tiny_sdxl_folder(tmp_path / "sdxl")
    _shards(tmp_path / "shards")
    path = _config(tmp_path, model=MODEL, stages=[{"stage": 1, "steps": 1}, {"stage": 2, "steps": 1}],
                   batch_size=2, checkpoint_every=0, name="cli_model")
    assert cli(["fit", "--config", str(path), "--max-steps", "2"]) == 0
    assert "fit: 2 steps done; exported" in capsys.readouterr().out
    export = tmp_path / "run" / "export" / "cli_model"
    assert load_hyper_lora(export).arch.rank == TINY["rank"]
    out = tmp_path / "again"
    assert cli(["export", "--run", str(tmp_path / "run"), "--out", str(out), "--dtype", "fp32"]) == 0
    loaded = load_hyper_lora(out)
    assert loaded.basis_dtype == torch.float32
    assert loaded.arch == load_hyper_lora(export).arch


def test_demo_size_options_reach_the_run_and_the_vae_choice_reaches_prepare(monkeypatch, tmp_path: Path) -> None:
    """``demo --identities --pretrain-steps --vae whole`` (the measured whole-VAE set-up of docs/training.md):
    the run gets the default size with those three changed, and the toy set-up trains the whole VAE."""
    from dataclasses import replace

    from hyperlora.train import demo
    from hyperlora.train.toy import decoder

    seen: dict = {}

    def fake_run(out, *, work, size, stages, seed, name):
        seen["size"] = size
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "run_demo", fake_run)
    demo.main(["--out", str(tmp_path / "t"), "--identities", "16", "--pretrain-steps", "6000", "--vae", "whole"])
    assert seen["size"] == replace(demo.FULL, identities=16, pretrain_steps=6000, whole_vae=True)
    demo.main(["--out", str(tmp_path / "t"), "--quick"])
    assert seen["size"] == demo.QUICK and not demo.QUICK.whole_vae
    with pytest.raises(SystemExit, match="--identities must be at least 2"):
        demo.main(["--out", str(tmp_path / "t"), "--identities", "1"])

    class Stop(Exception):
        pass

    def fake_install(folder, *, seed, settings, progress):
        seen["vae"] = settings
        raise Stop

    monkeypatch.setattr(decoder, "install_decoder", fake_install)
    for whole, want in ((True, decoder.WHOLE), (False, decoder.DecoderTraining())):
        with pytest.raises(Stop):
            demo.prepare_toy(tmp_path / f"m{whole}", size=replace(demo.QUICK, whole_vae=whole), progress=False)
        assert seen["vae"] == want
