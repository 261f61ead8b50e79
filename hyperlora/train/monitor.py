"""Monitoring of ``fit``: accelerate's experiment trackers and the held-out validation loss.

**Trackers** (``"trackers"`` in the fit config, ``--trackers`` on the command line; none by default).
``fit`` hands the names to ``Accelerator(log_with=..., project_config=...)``, starts them with
``init_trackers`` (main process only, as accelerate does) and logs after every optimizer step
(:func:`step_scalars`): ``loss/<scenario>`` (the numbers of ``loss.csv``), ``grad_norm`` (the total norm
of the trained parameters' gradients before clipping) and ``lr``; every validation adds
``validation/<scenario>``.  TensorBoard writes into ``<run>/tensorboard/<name>/``; a resumed run tells it to
drop what an earlier process logged after the checkpoint (``purge_step``).  W&B logs to the project
``<name>``, one W&B run per run folder (its id is kept in ``<run>/wandb_run_id.txt``, so a resumed run
continues it).

**Validation** (``"validation_shards"`` + ``"validation_every": N``): at most ``"validation_samples"``
samples, evenly spread over the held-out shards, get the loss of the current stage's scenarios (every
scenario with a positive probability in stages 2 and 3, each on every sample) with noise and timesteps
drawn from generators seeded by the config's seed and the batch number alone, so the numbers of two
steps (or of a resumed and an uninterrupted run) differ only by the generator's weights.  It runs under
``no_grad`` on the unwrapped generator and draws from no generator training uses: enabling it changes
nothing the run learns.  Every process computes the same numbers (under FSDP2 the generator's forward
gathers its shards, which needs them all); only the main process writes ``validation.csv``.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import math
import uuid
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import DependencyError, SettingError
from .config import FitConfig
from .stages import stage_named

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"
"""Sub-folder of the run folder that TensorBoard's event files go into (one more level: the config's name)."""
WANDB_ID_FILE = "wandb_run_id.txt"
VALIDATION_CSV = "validation.csv"
VALIDATION_CSV_HEADER = ("step", "stage", "scenario", "loss")
VALIDATION_SEED = 700_001
"""Offset of the validation's noise generators, apart from the training's."""

_PACKAGES: dict[str, tuple[tuple[str, ...], str]] = {
    # tracker -> (modules any one of which makes it work, what to install)
    "tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"),
    "wandb": (("wandb",), "wandb"),
}


# --------------------------------------------------------------------------------- trackers


def tracker_available(name: str) -> bool:
    """Whether the package that accelerate's tracker ``name`` imports is installed (without importing it)."""
    modules, _ = _PACKAGES[name]
    return any(importlib.util.find_spec(m) is not None for m in modules)


def check_trackers(names: Sequence[str]) -> None:
    """Raise :class:`DependencyError` (one line: the package and the pip command) for the first tracker of
    ``names`` whose package is missing; accelerate itself would only drop it silently."""
    for name in names:
        if not tracker_available(name):
            package = _PACKAGES[name][1]
            extra = " (then `wandb login`, or set WANDB_MODE=offline)" if name == "wandb" else ""
            raise DependencyError(f"the tracker '{name}' needs the Python package '{package}', which is not installed; "
                                  f"install it with `pip install {package}`{extra}, or remove \"{name}\" from "
                                  f"'trackers' (or give --trackers none).")


def tracker_config(cfg: FitConfig) -> dict[str, bool | int | float | str]:
    """The fit config flattened for the trackers' hyper-parameter view: ``{"model.rank": 8, ...}``; lists,
    objects and ``null`` as JSON text (TensorBoard takes only numbers, strings and booleans)."""
    out: dict[str, bool | int | float | str] = {}

    def walk(d: dict[str, Any], prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict) and k not in ("scenarios", "scenario_weights"):
                walk(v, f"{prefix}{k}.")
            elif isinstance(v, (bool, int, float, str)):
                out[f"{prefix}{k}"] = v
            else:
                out[f"{prefix}{k}"] = json.dumps(v)

    walk(cfg.to_json(), "")
    return out


def wandb_run_id(run: Path) -> str:
    """The W&B run id of the run folder ``run``: read from :data:`WANDB_ID_FILE`, made (and written) the first time."""
    path = run / WANDB_ID_FILE
    if path.is_file():
        text = path.read_text(encoding="utf-8").strip()
        if text:
            return text
    new = uuid.uuid4().hex[:16]
    path.write_text(new + "\n", encoding="utf-8")
    return new


def tracker_init_kwargs(names: Sequence[str], run: Path, step: int) -> dict[str, dict[str, Any]]:
    """``init_kwargs`` of ``Accelerator.init_trackers`` for a run folder starting at optimizer step ``step``
    (0, or the checkpoint a resumed run starts from).  Main process only (it may write :data:`WANDB_ID_FILE`)."""
    out: dict[str, dict[str, Any]] = {}
    if "tensorboard" in names and step > 0:
        out["tensorboard"] = {"purge_step": step + 1}     # TensorBoard hides what an earlier process logged after it
    if "wandb" in names:
        out["wandb"] = {"name": run.name, "dir": str(run), "id": wandb_run_id(run), "resume": "allow"}
    return out


def scalar(value: Any) -> float | None:
    """A gradient norm from ``Accelerator.clip_grad_norm_`` (a tensor, a DTensor under FSDP2, a number or None)
    as a float.  Every process must call it: a DTensor's ``full_tensor`` may be a collective."""
    if value is None:
        return None
    if hasattr(value, "full_tensor"):
        value = value.full_tensor()
    return float(value)


def step_scalars(losses: dict[str, float], lr: float, grad_norm: float | None) -> dict[str, float]:
    """What the trackers get after an optimizer step: ``loss/<scenario>`` (as in ``loss.csv``), ``lr`` and
    ``grad_norm`` (left out when the engine gives none)."""
    out = {f"loss/{s}": float(v) for s, v in sorted(losses.items())}
    out["lr"] = float(lr)
    if grad_norm is not None:
        out["grad_norm"] = float(grad_norm)
    return out


# --------------------------------------------------------------------------------- validation


def spread_indices(n: int, count: int) -> list[int]:
    """``count`` indices evenly spread over ``range(n)`` (first and last included); all of them if ``count >= n``."""
    if count >= n:
        return list(range(n))
    if count == 1:
        return [0]
    return [(i * (n - 1)) // (count - 1) for i in range(count)]


def open_validation_dataset(cfg: FitConfig) -> torch.utils.data.Dataset:
    """The samples of ``cfg.validation_shards`` (all identities: they are meant to be held out)."""
    from .data import ShardDataset

    parts = []
    for folder in cfg.validation_shards:
        if not Path(folder).is_dir():
            raise SettingError(f"'validation_shards' folder '{folder}' does not exist; prepare held-out photos into it "
                               f"with `python -m hyperlora.train prepare --out {folder} ...`, fix the path, or set "
                               f"'validation_every' to 0.")
        parts.append(ShardDataset(Path(folder)))
    return parts[0] if len(parts) == 1 else torch.utils.data.ConcatDataset(parts)


def _no_backward(loss: Tensor) -> None:
    """The validation's stand-in for ``backward``: nothing."""


class Validation:
    """The held-out loss of :mod:`hyperlora.train.fit`'s generator on fixed samples, noise and timesteps."""

    def __init__(self, dataset: torch.utils.data.Dataset, cfg: FitConfig, *, clip_dim: int) -> None:
        n = len(dataset)
        if n == 0:
            raise SettingError(f"the validation shards {cfg.validation_shards} hold no samples; prepare held-out "
                               f"photos into them, or set 'validation_every' to 0.")
        theirs = int(torch.as_tensor(dataset[0]["clip_id"]).shape[-1])
        if theirs != clip_dim:
            raise SettingError(f"the validation shards {cfg.validation_shards} hold CLIP features of width {theirs}, "
                               f"the training shards of width {clip_dim}; prepare both with the same encoders.")
        if set(cfg.validation_shards) & set(cfg.shards):
            log.warning("'validation_shards' names training shards (%s): the validation loss is then not held out",
                        sorted(set(cfg.validation_shards) & set(cfg.shards)))
        self.dataset = dataset
        self.cfg = cfg
        self.indices = spread_indices(n, cfg.validation_samples)

    def scenarios(self, stage: str) -> list[str]:
        """The scenarios whose loss a validation in ``stage`` reports."""
        return stage_named(stage).validation_scenarios(self.cfg.scenarios)

    @torch.no_grad()
    def run(self, trainer: Any, stage: str, net: nn.Module, *, device: torch.device,
            autocast: Callable[[], AbstractContextManager[Any]]) -> dict[str, float]:
        """Mean loss per scenario of ``stage`` over the validation samples, the generator ``net`` (unwrapped)
        making the LoRAs; ``trainer`` is fit's :class:`~hyperlora.train.trainer.Trainer`.  Every process calls it."""
        from . import engine
        from .data import collate

        bs = self.cfg.batch_size
        sums: dict[str, list[float]] = {}
        for c, start in enumerate(range(0, len(self.indices), bs)):
            batch = collate([self.dataset[i] for i in self.indices[start:start + bs]], device)
            for scen in self.scenarios(stage):
                gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + VALIDATION_SEED + c)
                with autocast():
                    res = trainer.loss(stage, batch, gen, _no_backward, scenario=scen, net=net)
                for s, (v, k) in res.items():
                    acc = sums.setdefault(s, [0.0, 0])
                    acc[0] += v
                    acc[1] += k
        engine.reshard(net)
        out = {s: v / max(k, 1) for s, (v, k) in sums.items()}
        if not all(math.isfinite(v) for v in out.values()):
            log.warning("the validation loss is not finite: %s", out)
        return out


def write_validation_rows(path: Path, step: int, stage: str, losses: dict[str, float]) -> None:
    """Append one row per scenario to ``validation.csv`` (header first when new)."""
    new = not path.exists()
    with open(path, "a", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        if new:
            w.writerow(VALIDATION_CSV_HEADER)
        w.writerows((step, stage, s, f"{losses[s]:.6g}") for s in sorted(losses))


__all__ = ["TENSORBOARD_DIR", "VALIDATION_CSV", "VALIDATION_CSV_HEADER", "Validation", "WANDB_ID_FILE",
           "check_trackers", "open_validation_dataset", "scalar", "spread_indices", "step_scalars", "tracker_available",
           "tracker_config", "tracker_init_kwargs", "wandb_run_id", "write_validation_rows"]
