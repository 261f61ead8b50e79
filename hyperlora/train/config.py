"""The ``fit`` configuration: one JSON file, checked key by key.

Example (the paper's schedule; every key but ``base_model``, ``shards`` and ``out`` is optional)::

    {
      "base_model": "models/checkpoints/sd_xl_base_1.0.safetensors",
      "shards": ["data/shards"],
      "out": "runs/hyperlora",
      "name": "my_hyper_lora",
      "model": {"rank": 8, "base_rank": 4, "hyper_dim": 128, "heads": 12, "dim": 1024, "depth": 4,
                "dim_head": 64, "ff_mult": 4, "num_id_tokens": 16},
      "stages": [{"stage": 1, "steps": 20000}, {"stage": 2, "steps": 15000}, {"stage": 3, "steps": 55000}],
      "scenarios": {"recon": 0.5, "id_only": 0.25, "base_id": 0.25},
      "lr": 1e-4, "batch_size": 1, "gradient_accumulation": 1, "mixed_precision": "bf16",
      "gradient_checkpointing": true, "checkpoint_every": 1000, "sample_every": 0, "seed": 0
    }

Stages (see :mod:`hyperlora.train.stages`): ``1`` Base-LoRA only, ``2`` ID-LoRA from CLIP features,
``3`` ArcFace tokens added.  A stage may name the parts it trains (``"train": [...]``, names from
:data:`hyperlora.train.hypernet.PARTS`); the defaults are :data:`STAGE_PARTS`.
Scenarios (each its own loss term, drawn per sample with these probabilities in stages 2 and 3):
``recon`` (trigger words, Base + ID reconstruct the image), ``id_only`` (no trigger words, the ID-LoRA
alone matches the frozen UNet), ``base_id`` (no trigger words, Base + ID match the Base-only prediction).

``id_photo`` (not in the paper, default ``"same"`` = the paper): ``"other"`` feeds the ID branch the
ArcFace and CLIP features of *another* photo of the same identity (drawn per sample, deterministically),
so the ID-LoRA can only carry what the photos of a person share; the Base branch keeps the photo's own
blurred-face features.  Samples whose identity has one photo keep their own.  ``"shuffled"`` is a control
(it must fail the identity tests): the ID branch reads the features of a photo of *another* identity, drawn
per sample, so nothing in them tells who is in the picture.

Monitoring (none by default; see docs/training.md, "Monitoring"): ``"trackers": ["tensorboard"]`` (and/or
``"wandb"``) logs every step's loss per scenario, gradient norm and learning rate through accelerate's
trackers; ``"validation_shards"`` (folders prepared from held-out photos) with ``"validation_every": N``
writes a validation loss every N steps to ``validation.csv`` (and the trackers), on at most
``"validation_samples"`` samples with fixed noise and timesteps.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SettingError
from ..spec import (DEFAULT_HEADS, RELEASED_BASE_RANK, RELEASED_DIM_HEAD, RELEASED_FF_MULT, RELEASED_HYPER_DIM,
                    RELEASED_ID_TOKENS, RELEASED_RANK, RELEASED_RESAMPLER_DEPTH, RELEASED_RESAMPLER_DIM)
from .hypernet import PARTS
from .stages import DISTILL, NUMBERED, SCENARIOS

log = logging.getLogger(__name__)

STAGE_PARTS: dict[int, tuple[str, ...]] = {n: s.parts for n, s in NUMBERED.items()}
"""What each paper stage trains by default (everything else, the UNet included, is frozen); read from the stage
objects of :mod:`hyperlora.train.stages`."""
DISTILL_PARTS = DISTILL.parts
PAPER_STAGES = ((1, 20000), (2, 15000), (3, 55000))
MIXED_PRECISION = ("no", "bf16")
ID_PHOTO = ("same", "other", "shuffled")
"""Where the ID branch's features come from: the training photo itself (paper) or another photo of its identity."""
TRACKERS = ("tensorboard", "wandb")
"""Experiment trackers ``fit`` can log to (accelerate's names)."""
DEFAULT_VALIDATION_SAMPLES = 32


@dataclass
class ModelConfig:
    """Sizes of the generator (the released ones by default)."""

    rank: int = RELEASED_RANK
    base_rank: int = RELEASED_BASE_RANK
    hyper_dim: int = RELEASED_HYPER_DIM
    heads: int = DEFAULT_HEADS
    dim: int = RELEASED_RESAMPLER_DIM
    depth: int = RELEASED_RESAMPLER_DEPTH
    dim_head: int = RELEASED_DIM_HEAD
    ff_mult: int = RELEASED_FF_MULT
    num_id_tokens: int = RELEASED_ID_TOKENS
    id_token_dim: int | None = None    # E_x; None = the CLIP width, as released


@dataclass
class StageConfig:
    stage: int
    steps: int
    train: tuple[str, ...] = ()

    @property
    def parts(self) -> tuple[str, ...]:
        return self.train or STAGE_PARTS[self.stage]


@dataclass
class FitConfig:
    """Everything ``fit`` needs; read it with :meth:`from_json` (paths relative to the JSON file)."""

    base_model: str
    shards: list[str]
    out: str
    name: str = "hyper_lora_trained"
    model: ModelConfig = field(default_factory=ModelConfig)
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig(s, n) for s, n in PAPER_STAGES])
    scenarios: dict[str, float] = field(default_factory=lambda: {"recon": 0.5, "id_only": 0.25, "base_id": 0.25})
    scenario_weights: dict[str, float] = field(default_factory=lambda: {s: 1.0 for s in SCENARIOS})
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    batch_size: int = 1
    gradient_accumulation: int = 1
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    sample_every: int = 0
    seed: int = 0
    init_from: str | None = None
    max_steps: int | None = None
    distill_base: float = 0.0
    distill_steps: int = 0
    num_workers: int = 0
    identities: list[str] | None = None
    id_photo: str = "same"
    trackers: list[str] = field(default_factory=list)
    validation_shards: list[str] = field(default_factory=list)
    validation_every: int = 0
    validation_samples: int = DEFAULT_VALIDATION_SAMPLES

    # ------------------------------------------------------------------------- derived

    @property
    def total_steps(self) -> int:
        total = sum(s.steps for s in self.stages) + (self.distill_steps if self.distill_base > 0 else 0)
        return min(total, self.max_steps) if self.max_steps is not None else total

    def schedule(self) -> list[tuple[str, int, tuple[str, ...]]]:
        """``[(stage name, steps, parts), ...]`` in order; the distil stage is named ``"distill"``."""
        out = [(NUMBERED[s.stage].name, s.steps, s.parts) for s in self.stages if s.steps > 0]
        if self.distill_base > 0 and self.distill_steps > 0:
            out.append((DISTILL.name, self.distill_steps, DISTILL.parts))
        return out

    def stage_at(self, step: int) -> tuple[str, tuple[str, ...]]:
        """Stage name and parts of optimizer step ``step`` (0-based)."""
        start = 0
        sched = self.schedule()
        for name, n, parts in sched:
            if step < start + n:
                return name, parts
            start += n
        return sched[-1][0], sched[-1][2]

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for s in d["stages"]:
            s["train"] = list(s["train"])
        return d

    # ------------------------------------------------------------------------- reading

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> FitConfig:
        """Read and check a config file; relative paths are resolved against its folder.

        Raises :class:`SettingError` naming the file, the key and the fix.
        """
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SettingError(f"config file '{path}' does not exist; pass --config with the path of a fit JSON "
                               f"(see hyperlora/train/configs/fit_toy.json).") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SettingError(f"config file '{path}' is not valid JSON ({exc}); fix the syntax.") from exc
        return cls.from_dict(raw, where=str(path), root=path.parent)

    @classmethod
    def from_dict(cls, raw: Any, *, where: str = "config", root: Path | None = None) -> FitConfig:
        if not isinstance(raw, dict):
            raise SettingError(f"{where}: the config must be a JSON object of settings, got {type(raw).__name__}.")
        _unknown(raw, [f.name for f in dataclasses.fields(cls)], where)
        for key in ("base_model", "shards", "out"):
            if key not in raw:
                raise SettingError(f"{where}: required key '{key}' is missing; add it "
                                   f"({_HELP[key]}).")

        def p(v: str) -> str:
            q = Path(os.path.expanduser(v))
            return str(q if q.is_absolute() or root is None else (root / q))

        kw: dict[str, Any] = {}
        kw["base_model"] = p(_typed(raw, "base_model", str, where))
        shards = raw["shards"]
        if isinstance(shards, str):
            shards = [shards]
        if not isinstance(shards, list) or not shards or not all(isinstance(s, str) for s in shards):
            raise SettingError(f"{where}: 'shards' must be a folder path or a non-empty list of folder paths "
                               f"(outputs of 'python -m hyperlora.train prepare'), got {shards!r}.")
        kw["shards"] = [p(s) for s in shards]
        kw["out"] = p(_typed(raw, "out", str, where))
        if "name" in raw:
            name = _typed(raw, "name", str, where)
            if not name or any(c in name for c in "/\\:") or name.startswith("."):
                raise SettingError(f"{where}: 'name' is {name!r}; use a plain folder name like 'my_hyper_lora'.")
            kw["name"] = name
        if "model" in raw:
            m = raw["model"]
            if not isinstance(m, dict):
                raise SettingError(f"{where}: 'model' must be an object of sizes, e.g. {{\"rank\": 8}}.")
            _unknown(m, [f.name for f in dataclasses.fields(ModelConfig)], f"{where}: model")
            mk: dict[str, Any] = {}
            for f in dataclasses.fields(ModelConfig):
                if f.name in m:
                    v = m[f.name]
                    if f.name == "id_token_dim" and v is None:
                        mk[f.name] = None
                        continue
                    lo = 0 if f.name == "base_rank" else 1
                    mk[f.name] = _int(m, f.name, f"{where}: model", lo=lo)
            kw["model"] = ModelConfig(**mk)
            if kw["model"].heads * kw["model"].dim_head <= 0:
                raise SettingError(f"{where}: model heads x dim_head must be positive.")
        if "stages" in raw:
            kw["stages"] = _stages(raw["stages"], where)
        if "scenarios" in raw:
            kw["scenarios"] = _scenarios(raw["scenarios"], "scenarios", where, probabilities=True)
        if "scenario_weights" in raw:
            kw["scenario_weights"] = {**{s: 1.0 for s in SCENARIOS},
                                      **_scenarios(raw["scenario_weights"], "scenario_weights", where,
                                                   probabilities=False)}
        for key, lo in (("lr", 0.0), ("weight_decay", 0.0), ("max_grad_norm", 0.0), ("distill_base", 0.0)):
            if key in raw:
                kw[key] = _float(raw, key, where, lo=lo, strict=key == "lr")
        for key, lo in (("warmup_steps", 0), ("batch_size", 1), ("gradient_accumulation", 1),
                        ("checkpoint_every", 0), ("sample_every", 0), ("seed", 0), ("distill_steps", 0),
                        ("num_workers", 0), ("keep_checkpoints", 1), ("validation_every", 0),
                        ("validation_samples", 1)):
            if key in raw:
                kw[key] = _int(raw, key, where, lo=lo)
        if raw.get("max_steps") is not None:
            kw["max_steps"] = _int(raw, "max_steps", where, lo=1)
        if "mixed_precision" in raw:
            mp = raw["mixed_precision"]
            if mp not in MIXED_PRECISION:
                raise SettingError(f"{where}: 'mixed_precision' is {mp!r}; use \"no\" (float32) or \"bf16\".")
            kw["mixed_precision"] = mp
        if "id_photo" in raw:
            if raw["id_photo"] not in ID_PHOTO:
                raise SettingError(f"{where}: 'id_photo' is {raw['id_photo']!r}; use \"same\" (the ID features of the "
                                   f"training photo itself, as in the paper), \"other\" (of another photo of the same "
                                   f"identity) or \"shuffled\" (of a photo of another identity: a control).")
            kw["id_photo"] = raw["id_photo"]
        if "gradient_checkpointing" in raw:
            kw["gradient_checkpointing"] = _typed(raw, "gradient_checkpointing", bool, where)
        if raw.get("init_from") is not None:
            kw["init_from"] = p(_typed(raw, "init_from", str, where))
        if raw.get("identities") is not None:
            ids = raw["identities"]
            if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
                raise SettingError(f"{where}: 'identities' must be a list of identity names to train on (or null).")
            kw["identities"] = ids
        if raw.get("trackers") is not None:
            kw["trackers"] = tracker_list(raw["trackers"], f"{where}: 'trackers'")
        if raw.get("validation_shards") is not None:
            vs = raw["validation_shards"]
            if isinstance(vs, str):
                vs = [vs]
            if not isinstance(vs, list) or not all(isinstance(v, str) for v in vs):
                raise SettingError(f"{where}: 'validation_shards' must be a folder path or a list of folder paths "
                                   f"(prepared from held-out photos by 'python -m hyperlora.train prepare'), got "
                                   f"{vs!r}.")
            kw["validation_shards"] = [p(v) for v in vs]
        cfg = cls(**kw)
        if cfg.validation_every > 0 and not cfg.validation_shards:
            raise SettingError(f"{where}: 'validation_every' is {cfg.validation_every} but 'validation_shards' is not "
                               f"set; add 'validation_shards' (a folder prepared from held-out photos by 'python -m "
                               f"hyperlora.train prepare') or set 'validation_every' to 0.")
        if cfg.distill_base > 0 and cfg.distill_steps == 0:
            raise SettingError(f"{where}: 'distill_base' is {cfg.distill_base} but 'distill_steps' is 0; set "
                               f"'distill_steps' (e.g. 2000) so the distil stage can fold the Base-LoRA in.")
        if cfg.model.base_rank == 0:
            if any(s.stage == 1 and s.steps > 0 for s in cfg.stages):
                raise SettingError(f"{where}: model 'base_rank' is 0 (no Base-LoRA) but stage 1 trains the Base-LoRA; "
                                   f"drop stage 1 or set base_rank (e.g. 4).")
            if cfg.distill_base > 0:
                raise SettingError(f"{where}: 'distill_base' needs a Base-LoRA; set model 'base_rank' or drop it.")
        if not cfg.schedule():
            raise SettingError(f"{where}: every stage has 0 steps; give at least one stage some steps.")
        return cfg


def tracker_list(value: Any, where: str) -> list[str]:
    """``value`` (a tracker name or a list of them, from :data:`TRACKERS`; ``"none"`` or ``[]`` for none) as a list
    without repeats, in the order given; :class:`SettingError` naming ``where`` and the choices otherwise."""
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise SettingError(f"{where} must be a list of tracker names from {', '.join(map(json.dumps, TRACKERS))} "
                           f"(e.g. [\"tensorboard\"]), got {value!r}.")
    out: list[str] = []
    for name in names:
        name = name.strip().lower()
        if name in ("", "none"):
            continue
        if name not in TRACKERS:
            near = difflib.get_close_matches(name, TRACKERS, n=1)
            hint = f"did you mean {json.dumps(near[0])}? " if near else ""
            raise SettingError(f"{where}: unknown tracker {name!r}; {hint}use {' or '.join(map(json.dumps, TRACKERS))} "
                               f"(or none).")
        if name not in out:
            out.append(name)
    return out


_HELP = {
    "base_model": "the SDXL UNet: a single-file .safetensors checkpoint or a diffusers folder",
    "shards": "the folder(s) written by 'python -m hyperlora.train prepare'",
    "out": "the run folder for checkpoints, loss.csv and the export",
}


def _unknown(raw: dict[str, Any], known: list[str], where: str) -> None:
    for key in raw:
        if key not in known:
            near = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean '{near[0]}'?" if near else f"known keys: {', '.join(known)}"
            raise SettingError(f"{where}: unknown key '{key}'; {hint}")


def _typed(raw: dict[str, Any], key: str, typ: type, where: str) -> Any:
    v = raw[key]
    if not isinstance(v, typ) or (typ is not bool and isinstance(v, bool)):
        raise SettingError(f"{where}: '{key}' must be a {typ.__name__}, got {v!r}.")
    return v


def _int(raw: dict[str, Any], key: str, where: str, *, lo: int) -> int:
    v = raw[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise SettingError(f"{where}: '{key}' must be a whole number >= {lo}, got {v!r}.")
    return v


def _float(raw: dict[str, Any], key: str, where: str, *, lo: float, strict: bool) -> float:
    v = raw[key]
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (v > lo if strict else v >= lo)
    if not ok:
        raise SettingError(f"{where}: '{key}' must be a number {'>' if strict else '>='} {lo}, got {v!r}.")
    return float(v)


def _stages(raw: Any, where: str) -> list[StageConfig]:
    if not isinstance(raw, list) or not raw:
        raise SettingError(f"{where}: 'stages' must be a list like [{{\"stage\": 1, \"steps\": 20000}}, ...].")
    out: list[StageConfig] = []
    for j, s in enumerate(raw):
        w = f"{where}: stages[{j}]"
        if not isinstance(s, dict):
            raise SettingError(f"{w} must be an object like {{\"stage\": 2, \"steps\": 15000}}.")
        _unknown(s, ["stage", "steps", "train"], w)
        if s.get("stage") not in STAGE_PARTS:
            choices = [f"{n} ({st.title})" for n, st in NUMBERED.items()]
            raise SettingError(f"{w}: 'stage' is {s.get('stage')!r}; use {', '.join(choices[:-1])} or "
                               f"{choices[-1]}.")
        if "steps" not in s:
            raise SettingError(f"{w}: 'steps' is missing; give the number of optimizer steps of this stage.")
        steps = _int(s, "steps", w, lo=0)
        train = s.get("train", [])
        if not isinstance(train, list) or any(t not in PARTS for t in train):
            raise SettingError(f"{w}: 'train' must be a list of parts from {', '.join(PARTS)}, got {train!r}.")
        out.append(StageConfig(stage=s["stage"], steps=steps, train=tuple(train)))
    if [s.stage for s in out] != sorted(s.stage for s in out):
        raise SettingError(f"{where}: 'stages' must be in order 1, 2, 3 (got {[s.stage for s in out]}).")
    return out


def _scenarios(raw: Any, key: str, where: str, *, probabilities: bool) -> dict[str, float]:
    if not isinstance(raw, dict):
        raise SettingError(f"{where}: '{key}' must be an object like {{\"recon\": 0.5, \"id_only\": 0.25, "
                           f"\"base_id\": 0.25}}.")
    _unknown(raw, list(SCENARIOS), f"{where}: {key}")
    out = {s: _float(raw, s, f"{where}: {key}", lo=0.0, strict=False) for s in raw}
    if probabilities:
        out = {s: out.get(s, 0.0) for s in SCENARIOS}
        if not sum(out.values()) > 0:
            raise SettingError(f"{where}: '{key}' gives every scenario probability 0; give at least one a positive value.")
        total = sum(out.values())
        out = {s: v / total for s, v in out.items()}
    return out


def check_init_from(cfg: FitConfig) -> None:
    """Check ``cfg.init_from`` against the schedule before any heavy work (reads the folder's headers only).

    A released HyperLoRA folder has no Base-LoRA (the authors folded it into the ID-LoRA: no
    ``base_resampler.safetensors``, no base basis), so a schedule with stage 1 (which trains the Base-LoRA)
    or a distil stage (which folds it in) cannot run from it.  Raises :class:`SettingError` in one line
    naming the folder, the setting and the change that works (stage 3 alone); a damaged folder raises
    :class:`~hyperlora.errors.ModelFileError` naming the file.  Stage 2 with a trained ArcFace branch only
    logs a warning (it runs, but feeds that branch zeros: see
    :meth:`hyperlora.train.hypernet.TrainableHyperLoRA.id_tokens`).
    """
    if not cfg.init_from:
        return
    from ..checkpoint import read_architecture
    from ..spec import BASE_RESAMPLER_FILE

    arch = read_architecture(cfg.init_from)
    stage_steps = {s.stage: s.steps for s in cfg.stages}
    if arch.base_rank is None:
        problems = []
        if stage_steps.get(1, 0) > 0:
            problems.append("'stages' has stage 1, which trains the Base-LoRA")
        if cfg.distill_base > 0:
            problems.append(f"'distill_base' is {cfg.distill_base}, which folds a Base-LoRA into the ID-LoRA")
        if problems:
            steps = stage_steps.get(3) or dict(PAPER_STAGES)[3]
            fix = f'set "stages": [{{"stage": 3, "steps": {steps}}}]'
            if cfg.distill_base > 0:
                fix += ' and remove "distill_base"'
            raise SettingError(
                f"init_from '{cfg.init_from}' is a released HyperLoRA folder without a Base-LoRA (no "
                f"{BASE_RESAMPLER_FILE}: the release folded it into the ID-LoRA), but {' and '.join(problems)}; "
                f"to fine-tune it, {fix} in the fit JSON (stage 3 alone trains the ID-LoRA from CLIP + ArcFace).")
    if stage_steps.get(2, 0) > 0 and arch.id_embed_dim is not None:
        log.warning("init_from '%s': stage 2 feeds zeros to the trained ArcFace branch of these weights (a constant "
                    "offset while the rest moves); fine-tuning usually runs stage 3 alone.", cfg.init_from)


__all__ = ["DEFAULT_VALIDATION_SAMPLES", "DISTILL_PARTS", "FitConfig", "ID_PHOTO", "MIXED_PRECISION", "ModelConfig",
           "PAPER_STAGES", "SCENARIOS", "STAGE_PARTS", "StageConfig", "TRACKERS", "check_init_from", "tracker_list"]
