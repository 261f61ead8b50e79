"""``fit``'s run folder: the config check on resume, ``loss.csv``, checkpoints, Ctrl-C, and what a run did.

Layout of ``out``: ``config.json`` (the config the run was started with), ``checkpoints/step-XXXXXX/``
(``accelerator.save_state`` + ``generator.safetensors`` + ``distill_teacher.safetensors`` in the distil stage +
``trainer_state.json``, written last), ``loss.csv`` (:data:`CSV_HEADER`: one row per scenario per step),
``loss.png``, ``samples/``, ``export/<name>/``; with monitoring (:mod:`hyperlora.train.monitor`) also
``validation.csv`` and ``tensorboard/``.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import SettingError
from . import engine
from .ctrl_c import StopFlag
from .config import FitConfig
from .export import GENERATOR_FILE, STATE_FILE, arch_to_json
from .hypernet import TrainableHyperLoRA

log = logging.getLogger(__name__)

TEACHER_FILE = "distill_teacher.safetensors"
"""The distil stage's teacher (a frozen copy of the generator) in a checkpoint, so a resumed run has the same one."""
LOSS_CSV = "loss.csv"
CSV_HEADER = ("step", "stage", "scenario", "loss", "lr")
RESUME_FREE_KEYS = frozenset({"out", "max_steps", "checkpoint_every", "keep_checkpoints", "sample_every",
                              "num_workers", "trackers", "validation_shards", "validation_every", "validation_samples"})
"""Config keys a resumed run may change: where and how long it runs, how often it saves, what it reports;
nothing it learns."""


@dataclass
class FitResult:
    """What a run did: optimizer steps reached, the stage then, the export folder (None if interrupted)."""

    run: Path
    steps: int
    stage: str
    interrupted: bool
    export: Path | None
    last_losses: dict[str, float]
    main_process: bool = True
    """False in the other processes of a multi-process run (only the main one reports)."""


# --------------------------------------------------------------------------------- the config on resume


def flat_keys(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"rank": 8}}`` -> ``{"model.rank": 8}`` (lists, ``scenarios`` and ``scenario_weights`` stay
    values)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "scenarios" and k != "scenario_weights":
            out.update(flat_keys(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_resume_config(run: Path, cfg: FitConfig) -> None:
    """Refuse to resume the run in ``run`` with a config that differs from the one it was started with
    (``run/config.json``) in a key outside :data:`RESUME_FREE_KEYS`: the checkpoint holds a generator built and
    trained with the old values, and continuing would export it under the new ones.  Raises
    :class:`SettingError` naming each key with both values, and the fixes."""
    path = run / "config.json"
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SettingError(f"'{path}' (the config the run was started with) is unreadable ({exc}), so resuming its "
                           f"checkpoint cannot be checked; give a new --out, or --no-resume to start over in "
                           f"'{run}'.") from exc
    before, now = flat_keys(old), flat_keys(cfg.to_json())
    changed = sorted(k for k in before.keys() | now.keys()
                     if k.split(".")[0] not in RESUME_FREE_KEYS and before.get(k) != now.get(k))
    if changed:
        what = "; ".join(f"{k}: {json.dumps(before.get(k))} in the run, {json.dumps(now.get(k))} now" for k in changed)
        raise SettingError(
            f"the run folder '{run}' holds a checkpoint trained with another config ({what}). Resuming would "
            f"continue the old generator and export it as the new config. Give a new --out (or 'out') to start a "
            f"run with the new values, put the old values back to resume, or pass --no-resume to start over in "
            f"'{run}' (its checkpoints are then replaced).")


# --------------------------------------------------------------------------------- loss.csv


def write_loss_rows(path: Path, step: int, stage: str, losses: dict[str, float], lr: float) -> None:
    """Append one row per scenario of ``losses`` (``{scenario: mean loss}``, sorted by name) to ``loss.csv``
    (the header first when new); numbers with 6 significant digits."""
    new = not path.exists()
    with open(path, "a", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        if new:
            w.writerow(CSV_HEADER)
        w.writerows([(step, stage, s, f"{losses[s]:.6g}", f"{lr:.6g}") for s in sorted(losses)])


def truncate_csv(path: Path, step: int) -> None:
    """Drop the rows after ``step`` (written after the checkpoint a resumed run starts from)."""
    if not path.exists():
        return
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    keep = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= step]
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(keep)


# --------------------------------------------------------------------------------- checkpoints


def save_checkpoint(accel: Any, model: nn.Module, gen_model: TrainableHyperLoRA, teacher: TrainableHyperLoRA | None,
                    run: Path, cfg: FitConfig, *, step: int, micro: int, stage: str) -> Path:
    """Write ``run/checkpoints/step-XXXXXX/`` after optimizer step ``step`` (micro-batch counter ``micro``).

    ``accel`` is the run's ``Accelerator``, ``model`` the engine-wrapped generator, ``gen_model`` the unwrapped
    one, ``teacher`` the distil stage's (or None).  Every process calls it (the state is gathered collectively);
    the main process writes the files, ``trainer_state.json`` last, keeps the newest ``cfg.keep_checkpoints``
    and redraws ``loss.png``.  Returns the folder."""
    from ..safetensors_io import save_file_atomic
    from . import plot

    d = run / "checkpoints" / f"step-{step:06d}"
    accel.wait_for_everyone()
    accel.save_state(str(d))
    sd = accel.get_state_dict(model)
    if accel.is_main_process:
        save_file_atomic({k: v.detach().cpu().contiguous() for k, v in sd.items()}, d / GENERATOR_FILE)
        if teacher is not None:
            save_file_atomic({k: v.detach().cpu().contiguous() for k, v in teacher.state_dict().items()},
                             d / TEACHER_FILE)
        st = {"step": step, "micro": micro, "stage": stage, "seed": cfg.seed,
              "rng": "noise/timesteps/scenarios: torch.Generator seeded by (seed, process, micro-batch index); "
                     "batches: permutation seeded by (seed, epoch)",
              "torch_rng_state": torch.get_rng_state().tolist()[:16],
              "distilled_base": gen_model.distilled_base, "arch": arch_to_json(gen_model.arch),
              "time": time.time()}
        (d / STATE_FILE).write_text(json.dumps(st, indent=1), encoding="utf-8")
        old = sorted(p for p in (run / "checkpoints").glob("step-*") if p != d)
        for p in old[:max(0, len(old) - (cfg.keep_checkpoints - 1))]:
            shutil.rmtree(p, ignore_errors=True)
        plot.plot_losses(run / LOSS_CSV, run / "loss.png")
    accel.wait_for_everyone()
    return d


def load_teacher(ckpt: Path, gen_model: TrainableHyperLoRA, *, device: torch.device) -> TrainableHyperLoRA | None:
    """The distil stage's teacher saved in checkpoint folder ``ckpt`` (a plain copy of ``gen_model``'s
    architecture on ``device``), or None when the checkpoint has none."""
    if not (ckpt / TEACHER_FILE).is_file():
        return None
    from safetensors.torch import load_file

    return engine.plain_copy(gen_model, load_file(str(ckpt / TEACHER_FILE)), device=device)


# --------------------------------------------------------------------------------- Ctrl-C


__all__ = ["CSV_HEADER", "FitResult", "LOSS_CSV", "RESUME_FREE_KEYS", "StopFlag", "TEACHER_FILE",
           "check_resume_config", "flat_keys", "load_teacher", "save_checkpoint", "truncate_csv", "write_loss_rows"]
