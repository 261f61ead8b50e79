"""fit's monitoring (issue 19): accelerate's trackers (TensorBoard) log the numbers of loss.csv, the gradient
norm and the learning rate; a held-out validation loss goes to validation.csv; both survive a resume and
change nothing the run learns; a missing tracker package stops fit at once with one line."""

from __future__ import annotations

import contextlib
import copy
import csv
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hyperlora.errors import DependencyError, SettingError
from hyperlora.train import fit as fit_module
from hyperlora.train import monitor
from hyperlora.train.config import FitConfig
from hyperlora.train.fit import check_resume_config, fit, main
from hyperlora.train.toy.sdxl import tiny_unet
from tests.conftest import skip_or_fail
from tests.train.torchrun import run_two

from .test_fit import scheduler, toy_config
from .test_hypernet import ToyDataset

STAGES = [{"stage": 1, "steps": 1}, {"stage": 2, "steps": 2}, {"stage": 3, "steps": 1}]
MONITOR = {"trackers": ["tensorboard"], "validation_shards": ["held-out"], "validation_every": 2,
           "validation_samples": 3}
NAME = "hyper_lora_trained"                                   # FitConfig's default name: the TensorBoard sub-folder


def _event_accumulator():  # noqa: ANN202 - tensorboard's class
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        skip_or_fail("tensorboard is not installed (pip install -e \".[train]\" installs it)")
    return EventAccumulator


def _scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar TensorBoard shows for the run: tag -> [(step, value)], as TensorBoard reads the event files
    (orphaned events of an earlier process dropped)."""
    folder = run / monitor.TENSORBOARD_DIR / NAME
    assert list(folder.glob("events.out.tfevents.*")), f"no event file in {folder}"
    acc = _event_accumulator()(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _crash_after_step_3(step: int) -> None:
    """fit's ``on_step``: the run dies after step 3 (its rows and tracker points of step 3 already written)."""
    if step == 3:
        raise RuntimeError("simulated crash after step 3")


def _final(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(sorted((run / "checkpoints").glob("step-*"))[-1] / "generator.safetensors"))


@pytest.fixture(scope="module")
def unet() -> torch.nn.Module:
    return tiny_unet(seed=0).requires_grad_(False).eval()


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0])
def test_tensorboard_logs_the_loss_csv_numbers_and_monitoring_changes_nothing_learnt(
        unet: torch.nn.Module, tmp_path: Path, max_grad_norm: float) -> None:
    """The event file holds loss/<scenario> and lr at every step with loss.csv's values and a finite gradient
    norm; validation.csv has rows at steps 2 and 4; the generator and loss.csv equal a run without monitoring
    (with max_grad_norm 0 the norm is measured by a clip at infinity: the gradients must stay bit-identical)."""
    _event_accumulator()
    kw = dict(stages=STAGES, gradient_accumulation=2, warmup_steps=2, checkpoint_every=0, max_grad_norm=max_grad_norm)
    plain = tmp_path / "plain"
    fit(toy_config(plain, **kw), dataset=ToyDataset(6), unet=copy.deepcopy(unet), noise_scheduler=scheduler())
    run = tmp_path / "monitored"
    fit(toy_config(run, **kw, **MONITOR), dataset=ToyDataset(6), unet=copy.deepcopy(unet),
        noise_scheduler=scheduler(), validation_dataset=ToyDataset(5, seed=9))

    assert _rows(run / "loss.csv") == _rows(plain / "loss.csv")
    a, b = _final(plain), _final(run)
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []
    assert not (plain / monitor.VALIDATION_CSV).exists() and not (plain / monitor.TENSORBOARD_DIR).exists()

    scalars = _scalars(run)
    rows = _rows(run / "loss.csv")
    for r in rows:
        got = dict(scalars[f"loss/{r['scenario']}"])
        assert got[int(r["step"])] == pytest.approx(float(r["loss"]), rel=1e-5), r
        assert dict(scalars["lr"])[int(r["step"])] == pytest.approx(float(r["lr"]), rel=1e-5), r
    # one loss/<scenario> point per loss.csv row, nothing else
    assert sum(len(v) for k, v in scalars.items() if k.startswith("loss/")) == len(rows)
    assert [s for s, _ in scalars["lr"]] == [1, 2, 3, 4]
    norms = scalars["grad_norm"]
    assert [s for s, _ in norms] == [1, 2, 3, 4]
    assert all(math.isfinite(v) and v > 0 for _, v in norms)

    val = _rows(run / monitor.VALIDATION_CSV)
    assert [(int(r["step"]), r["stage"]) for r in val] == [(2, "2")] * 3 + [(4, "3")] * 3
    assert {r["scenario"] for r in val} == {"recon", "id_only", "base_id"}
    assert all(math.isfinite(float(r["loss"])) for r in val)
    for r in val:
        assert dict(scalars[f"validation/{r['scenario']}"])[int(r["step"])] == pytest.approx(float(r["loss"]), rel=1e-5)


def test_validation_and_trackers_after_a_crash_and_resume_equal_an_uninterrupted_run(
        unet: torch.nn.Module, tmp_path: Path) -> None:
    """A run that dies after step 3 (rows and TensorBoard points of step 3 already written, checkpoint at 2)
    and is resumed ends with the uninterrupted run's validation.csv, loss.csv and TensorBoard scalars."""
    _event_accumulator()
    kw = dict(stages=STAGES, checkpoint_every=2, **{**MONITOR, "validation_every": 1})
    straight = tmp_path / "straight"
    fit(toy_config(straight, **kw), dataset=ToyDataset(6), unet=copy.deepcopy(unet), noise_scheduler=scheduler(),
        validation_dataset=ToyDataset(5, seed=9))

    run = tmp_path / "resumed"

    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(toy_config(run, **kw), dataset=ToyDataset(6), unet=copy.deepcopy(unet), noise_scheduler=scheduler(),
            validation_dataset=ToyDataset(5, seed=9), on_step=_crash_after_step_3)
    assert {int(r["step"]) for r in _rows(run / monitor.VALIDATION_CSV)} == {1, 2, 3}
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000002"]
    fit(toy_config(run, **kw), dataset=ToyDataset(6), unet=copy.deepcopy(unet), noise_scheduler=scheduler(),
        validation_dataset=ToyDataset(5, seed=9))

    val = _rows(run / monitor.VALIDATION_CSV)
    assert val == _rows(straight / monitor.VALIDATION_CSV)
    assert [int(r["step"]) for r in val] == [1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    assert _rows(run / "loss.csv") == _rows(straight / "loss.csv")
    assert _scalars(run) == _scalars(straight)


def test_a_missing_tracker_package_stops_fit_at_once_with_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(monitor, "tracker_available", lambda name: False)
    path = tmp_path / "fit.json"
    path.write_text(json.dumps({"base_model": "sdxl", "shards": "shards", "out": "run", "trackers": ["tensorboard"]}),
                    encoding="utf-8")
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fit: ")
    assert "'tensorboard'" in err and "pip install tensorboard" in err
    assert not (tmp_path / "run").exists()                   # stopped before anything was loaded or written
    assert main(["--config", str(path), "--trackers", "wandb"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install wandb" in err and "'wandb'" in err
    with pytest.raises(DependencyError, match="pip install tensorboard"):
        fit(FitConfig.from_json(path))


def test_trackers_flag_and_config_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    seen: list[FitConfig] = []

    def fake_fit(cfg: FitConfig, **kw: object) -> fit_module.FitResult:
        seen.append(cfg)
        return fit_module.FitResult(run=Path(cfg.out), steps=0, stage="1", interrupted=False, export=None,
                                    last_losses={})

    monkeypatch.setattr(fit_module, "fit", fake_fit)
    path = tmp_path / "fit.json"
    path.write_text(json.dumps({"base_model": "sdxl", "shards": "shards", "out": "run", "trackers": "tensorboard"}),
                    encoding="utf-8")
    assert main(["--config", str(path)]) == 0
    assert main(["--config", str(path), "--trackers", "none"]) == 0
    assert main(["--config", str(path), "--trackers", "tensorboard,wandb,tensorboard"]) == 0
    assert [c.trackers for c in seen] == [["tensorboard"], [], ["tensorboard", "wandb"]]
    assert main(["--config", str(path), "--trackers", "tensorbord"]) == 2
    assert "unknown tracker 'tensorbord'; did you mean \"tensorboard\"?" in capsys.readouterr().err

    base = {"base_model": "b", "shards": ["s"], "out": "o"}
    assert FitConfig.from_dict(base).trackers == [] and FitConfig.from_dict(base).validation_every == 0
    with pytest.raises(SettingError, match="unknown tracker 'mlflow'"):
        FitConfig.from_dict({**base, "trackers": ["mlflow"]})
    with pytest.raises(SettingError, match="'validation_every' is 5 but 'validation_shards' is not set"):
        FitConfig.from_dict({**base, "validation_every": 5})
    with pytest.raises(SettingError, match="'validation_samples' must be a whole number >= 1"):
        FitConfig.from_dict({**base, "validation_shards": "v", "validation_every": 5, "validation_samples": 0})
    cfg = FitConfig.from_dict({**base, "validation_shards": "v", "validation_every": 5}, root=tmp_path)
    assert cfg.validation_shards == [str(tmp_path / "v")]


def test_monitoring_keys_may_change_on_resume(tmp_path: Path) -> None:
    """A run started before these keys existed (its config.json lacks them) or without monitoring resumes with it."""
    base = {"base_model": "b", "shards": ["s"], "out": str(tmp_path)}
    old = FitConfig.from_dict(base).to_json()
    for key in ("trackers", "validation_shards", "validation_every", "validation_samples"):
        del old[key]
    (tmp_path / "config.json").write_text(json.dumps(old), encoding="utf-8")
    check_resume_config(tmp_path, FitConfig.from_dict({**base, **MONITOR}))
    check_resume_config(tmp_path, FitConfig.from_dict(base))


def test_validation_samples_and_tracker_init(tmp_path: Path) -> None:
    assert monitor.spread_indices(10, 3) == [0, 4, 9]
    assert monitor.spread_indices(10, 1) == [0]
    assert monitor.spread_indices(4, 32) == [0, 1, 2, 3]
    assert len(set(monitor.spread_indices(1000, 999))) == 999
    assert monitor.tracker_init_kwargs(["tensorboard"], tmp_path, 0) == {}
    assert monitor.tracker_init_kwargs(["tensorboard"], tmp_path, 7) == {"tensorboard": {"purge_step": 8}}
    first = monitor.tracker_init_kwargs(["wandb"], tmp_path, 0)["wandb"]
    again = monitor.tracker_init_kwargs(["wandb"], tmp_path, 5)["wandb"]
    assert first["id"] == again["id"] and again["resume"] == "allow"          # one W&B run per run folder
    assert (tmp_path / monitor.WANDB_ID_FILE).read_text().strip() == first["id"]
    flat = monitor.tracker_config(toy_config(tmp_path, **MONITOR))
    assert flat["model.rank"] > 0 and flat["trackers"] == '["tensorboard"]' and flat["max_steps"] == "null"
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())


def test_shipped_configs() -> None:
    """fit_paper.json logs to TensorBoard and validates on held-out shards (path expanded); fit_toy.json (the
    demo's) keeps monitoring off."""
    configs = Path(fit_module.__file__).parent / "configs"
    paper = FitConfig.from_json(configs / "fit_paper.json")
    assert paper.trackers == ["tensorboard"] and paper.validation_every > 0 and paper.validation_samples >= 1
    assert all(Path(v).is_absolute() and "~" not in v for v in paper.validation_shards)
    assert not set(paper.validation_shards) & set(paper.shards)
    toy = FitConfig.from_json(configs / "fit_toy.json")
    assert toy.trackers == [] and toy.validation_every == 0


def test_two_processes_validate_and_log_once(tmp_path: Path) -> None:
    """Under torchrun (2 CPU processes, DDP over gloo): no deadlock, one set of validation.csv rows and one event
    file (the main process's), and the validation row of the last step is what one process computes from the
    generator the run saved at that step."""
    _event_accumulator()
    script = Path(__file__).with_name("ddp_fit_script.py")
    proc = run_two([str(script), str(tmp_path), "monitor"], drop_env=["ACCELERATE_USE_CPU"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    val = _rows(run / monitor.VALIDATION_CSV)
    assert [(int(r["step"]), r["stage"], r["scenario"]) for r in val] == [
        (2, "1", "base"), (4, "2", "base_id"), (4, "2", "id_only"), (4, "2", "recon"),
        (6, "3", "base_id"), (6, "3", "id_only"), (6, "3", "recon")]
    assert len(list((run / monitor.TENSORBOARD_DIR / NAME).glob("events.out.tfevents.*"))) == 1
    scalars = _scalars(run)
    for r in _rows(run / "loss.csv"):
        assert dict(scalars[f"loss/{r['scenario']}"])[int(r["step"])] == pytest.approx(float(r["loss"]), rel=1e-5)
    assert [s for s, _ in scalars["grad_norm"]] == [1, 2, 3, 4, 5, 6]

    from hyperlora.train.fit import Trainer, load_generator_from_checkpoint
    from tests.train.test_hypernet import TINY

    model = {k: v for k, v in TINY.items() if k != "clip_dim"}
    cfg = FitConfig.from_dict({"base_model": "unused", "shards": ["unused"], "out": str(run), "model": model,
                               "stages": [{"stage": 1, "steps": 2}, {"stage": 2, "steps": 2}, {"stage": 3, "steps": 2}],
                               "batch_size": 2, "lr": 1e-3, "seed": 0, **MONITOR})
    gen = load_generator_from_checkpoint(run / "checkpoints" / "step-000006")
    unet = tiny_unet(seed=0).requires_grad_(False).eval()
    held_out = monitor.Validation(ToyDataset(5, seed=9), cfg, clip_dim=TINY["clip_dim"]).run(
        Trainer(unet, gen, scheduler(), cfg), "3", gen, device=torch.device("cpu"), autocast=contextlib.nullcontext)
    for r in val[-3:]:   # base_id is a near-zero MSE (1.9e-6): float32 rounding across processes shows in rel terms
        assert float(r["loss"]) == pytest.approx(held_out[r["scenario"]], rel=1e-5, abs=1e-9), r


def test_validation_and_grad_norm_with_an_fsdp2_sharded_generator(tmp_path: Path) -> None:
    """Two processes shard the generator with FSDP2: every process runs the validation (the forward's all-gathers
    need them all; no deadlock) and reads the DTensor gradient norm; both get what one process gets unsharded."""
    script = Path(__file__).with_name("fsdp_validation_script.py")
    proc = run_two([str(script), str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1] and ranks[0]["dtensor"]
    assert set(ranks[0]["validation"]) == {"1", "2", "3"}

    from tests.train.fsdp_validation_script import measure
    from tests.train.test_hypernet import tiny_generator

    unet = tiny_unet(seed=0).requires_grad_(False).eval()
    plain = measure(tiny_generator(unet, seed=1), unet)
    for stage, losses in plain["validation"].items():
        assert ranks[0]["validation"][stage] == pytest.approx(losses, rel=1e-5), stage
    assert ranks[0]["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-5)


def test_validation_set_errors_name_the_fix(tmp_path: Path) -> None:
    cfg = toy_config(tmp_path / "run", **{**MONITOR, "validation_shards": [str(tmp_path / "missing")]})
    with pytest.raises(SettingError, match="'validation_shards' folder .*missing' does not exist; prepare held-out"):
        monitor.open_validation_dataset(cfg)
    with pytest.raises(SettingError, match="CLIP features of width .* prepare both with the same encoders"):
        monitor.Validation(ToyDataset(2), cfg, clip_dim=7)
    with pytest.raises(SettingError, match="hold no samples"):
        monitor.Validation(ToyDataset(0), cfg, clip_dim=7)
    width = int(ToyDataset(1)[0]["clip_id"].shape[-1])
    v = monitor.Validation(ToyDataset(9), cfg, clip_dim=width)
    assert v.indices == [0, 4, 8] and v.scenarios("1") == ["base"] and v.scenarios("distill") == ["distill"]
    assert v.scenarios("2") == ["recon", "id_only", "base_id"]
    only = monitor.Validation(ToyDataset(9), toy_config(tmp_path, **MONITOR, scenarios={"recon": 1.0}), clip_dim=width)
    assert only.scenarios("3") == ["recon"]          # a scenario never drawn is not validated either


def test_fit_command_with_tensorboard_and_held_out_shards_on_disk(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m hyperlora.train fit --trackers tensorboard`` on a diffusers SDXL folder, training shards and a
    held-out shard folder: validation.csv from the shards on disk, the event file beside it."""
    _event_accumulator()
    from hyperlora.train.__main__ import main as cli
    from hyperlora.train.toy.sdxl import tiny_sdxl_folder

    from .test_cli import MODEL, _config, _shards

    tiny_sdxl_folder(tmp_path / "sdxl")
    _shards(tmp_path / "shards")
    _shards(tmp_path / "held-out", n=3)
    path = _config(tmp_path, model=MODEL, stages=[{"stage": 1, "steps": 1}, {"stage": 2, "steps": 1}],
                   batch_size=2, checkpoint_every=0, name=NAME, validation_shards="held-out", validation_every=1)
    assert cli(["fit", "--config", str(path), "--trackers", "tensorboard"]) == 0
    assert "fit: 2 steps done; exported" in capsys.readouterr().out
    run = tmp_path / "run"
    val = _rows(run / monitor.VALIDATION_CSV)
    assert [(r["step"], r["stage"]) for r in val] == [("1", "1")] + [("2", "2")] * 3
    scalars = _scalars(run)
    assert {"loss/base", "lr", "grad_norm", "validation/base", "validation/recon"} <= set(scalars)
    assert json.loads((run / "config.json").read_text())["trackers"] == ["tensorboard"]


def test_wandb_offline_logs_the_loss_csv_numbers_and_a_resumed_run_keeps_its_run(
        unet: torch.nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """W&B through accelerate, offline (no account, no network): what fit logs to the W&B run (recorded on the way
    into wandb's own ``Run.log``) is loss.csv's loss of every row's scenario and learning rate at its step; a run
    that dies after step 3 marks its W&B part failed, and the resumed run logs into the same W&B run (the id kept
    in wandb_run_id.txt), from step 3 on, each part written by wandb into the run folder."""
    try:
        import wandb
    except ImportError:
        skip_or_fail("wandb is not installed (pip install -e \".[test]\" installs it)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logged: list[tuple[str, int, dict[str, float]]] = []
    finished: list[tuple[str, int]] = []
    real_log, real_finish = wandb.sdk.wandb_run.Run.log, wandb.sdk.wandb_run.Run.finish

    def log(self, data, step=None, **kw):  # noqa: ANN001, ANN202 - wandb's signature
        logged.append((self.id, step, dict(data)))
        return real_log(self, data, step=step, **kw)

    def finish(self, exit_code=None, **kw):  # noqa: ANN001, ANN202
        finished.append((self.id, exit_code))
        return real_finish(self, exit_code=exit_code, **kw)

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", log)
    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "finish", finish)
    kw = dict(stages=STAGES, checkpoint_every=2, trackers=["wandb"])
    run = tmp_path / "run"

    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(toy_config(run, **kw), dataset=ToyDataset(6), unet=copy.deepcopy(unet), noise_scheduler=scheduler(),
            on_step=_crash_after_step_3)
    run_id = (run / monitor.WANDB_ID_FILE).read_text(encoding="utf-8").strip()
    assert len(run_id) == 16 and finished == [(run_id, 1)]            # the dead part is closed, as failed
    first = len(logged)
    fit(toy_config(run, **kw), dataset=ToyDataset(6), unet=copy.deepcopy(unet), noise_scheduler=scheduler())
    assert (run / monitor.WANDB_ID_FILE).read_text(encoding="utf-8").strip() == run_id
    assert finished[1:] == [(run_id, None)] and {i for i, _, _ in logged} == {run_id}

    losses = {(s, k): v for _, s, d in logged[first:] for k, v in d.items()}
    assert min(s for _, s, _ in logged[first:]) == 3 and max(s for _, s, _ in logged) == 4
    rows = _rows(run / "loss.csv")
    for r in rows:
        if int(r["step"]) >= 3:                                        # the resumed part
            assert losses[(int(r["step"]), f"loss/{r['scenario']}")] == pytest.approx(float(r["loss"]), rel=1e-5)
            assert losses[(int(r["step"]), "lr")] == pytest.approx(float(r["lr"]), rel=1e-5)
    assert all(math.isfinite(losses[(s, "grad_norm")]) for s in (3, 4))
    parts = sorted((run / "wandb").glob("offline-run-*"))
    assert len(parts) == 2 and all((p / f"run-{run_id}.wandb").is_file() for p in parts), parts
