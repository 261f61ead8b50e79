"""``python -m hyperlora.train difflora-fit``: train a DiffLoRA model (LAE, then DiT) on a LoRA dataset folder.

**Input folder** (what ``difflora-dataset`` writes, plus one MIF file per identity):

* ``<identity>.safetensors``: one kohya LoRA per identity, all of the same layout (modules, shapes, rank);
  with a ``manifest.json`` (``difflora-dataset``'s) the identities are the manifest's ``identities`` and their
  ``file``; without one, every ``*.safetensors`` that is not a MIF file;
* ``<identity>.mif.safetensors``: the identity's **mixed image features** (:mod:`hyperlora.difflora.condition`):
  ``face`` ``[A]`` (the L2-normalised mean ArcFace embedding, A = 512) and, optionally, ``clip`` ``[Mc, E]``
  (the pooled CLIP tokens of :func:`~hyperlora.difflora.condition.mixed_image_features`, e.g. ``[5, 1024]``),
  float32.  Every identity must have the same shapes.  ``RawMif`` of one identity saved as
  ``{"face": mif.face, "clip": mif.clip}`` is exactly this file.

**Training** (one process on the CPU for now; plain PyTorch, AdamW; the generators are CPU generators, so a GPU
version must draw on the CPU and move the draws, as :func:`~hyperlora.difflora.diffusion.training_loss` does):

1. ``lae_steps`` steps of the LAE (:class:`~hyperlora.difflora.lae.LoraAutoencoder`, module scales calibrated
   on all LoRAs first) on random batches of LoRAs (:meth:`~hyperlora.difflora.lae.LoraAutoencoder.loss`);
2. the LAE is frozen; the posterior-mean latents ``z`` of all LoRAs and ``latent_scale = std(z)`` are computed
   once; ``dit_steps`` steps of the :class:`~hyperlora.difflora.dit.LatentDiT` (with its MIF encoder) on
   ``z / latent_scale`` with the rectified-flow loss and condition dropout ``drop_prob``
   (:func:`~hyperlora.difflora.diffusion.training_loss`).

Every random draw of step ``k`` (batch indices, the KL sample, times, noise, dropout) comes from a CPU
generator seeded by ``(seed, k)``, so a run resumed from a checkpoint continues exactly as the uninterrupted
run would have (same final weights, bit for bit on the same machine).

**Run folder** ``out``: ``config.json``; ``loss.csv`` (``fit``'s columns ``step, stage, scenario, loss, lr``, stage and
scenario both the phase ``lae`` / ``dit``; one row per step, rows after the checkpoint a run resumes from are
dropped) and ``loss.png`` (drawn at every checkpoint); ``checkpoints/step-XXXXXX/`` with ``lae.safetensors``,
``dit.safetensors``, ``optimizer.safetensors`` (both optimizers' state tensors) and ``state.json`` (step,
optimizer scalars, latent scale; written last: a folder without it is ignored); every checkpoint folder is
written under a temporary name and renamed.  ``difflora-export`` writes the model folder from the last one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..difflora.condition import MifSpec, RawMif
from ..difflora.diffusion import training_loss
from ..difflora.dit import DitConfig, LatentDiT
from ..difflora.lae import LaeConfig, LoraAutoencoder
from ..difflora.lora_space import LoraLayout, stack_factors
from ..errors import HyperLoRAError, SettingError, check_folder_option, os_error_line
from . import plot
from .ctrl_c import StopFlag

log = logging.getLogger(__name__)

MIF_SUFFIX = ".mif.safetensors"
"""The per-identity MIF file: ``<identity>.mif.safetensors`` with ``face [A]`` and optional ``clip [Mc, E]``."""
MANIFEST = "manifest.json"
STATE_FILE = "state.json"
LAE_FILE = "lae.safetensors"
DIT_FILE = "dit.safetensors"
OPTIM_FILE = "optimizer.safetensors"
CSV_HEADER = ("step", "stage", "scenario", "loss", "lr")
"""The columns of ``fit``'s loss.csv (:mod:`hyperlora.train.plot` draws both); stage and scenario are the phase."""
STEP_SEED = 1_000_003
"""The generator of step k is seeded ``seed * STEP_SEED + k``."""
RESUME_FREE_KEYS = frozenset({"out", "checkpoint_every", "keep_checkpoints", "max_steps"})
"""Config keys a resumed run may change (where it writes and how often it saves; nothing it learns)."""
DIT_KEYS = ("width", "depth", "heads", "mlp_ratio")
"""The DitConfig fields a fit config sets (tokens/channels come from the LAE, cond_* from the MIF spec)."""
MIF_KEYS = ("arcface_tokens", "width")
"""The MifSpec fields a fit config sets (the input sizes come from the MIF files)."""


@dataclass
class DiffLoraFitConfig:
    """A difflora-fit run (JSON: :meth:`to_json` / :meth:`from_dict`; unknown keys are refused).

    ``data``: the dataset folder (module docstring); ``out``: the run folder.  ``lae`` / ``dit`` / ``mif``:
    fields of :class:`LaeConfig`, of :class:`DitConfig` (:data:`DIT_KEYS`) and of :class:`MifSpec`
    (:data:`MIF_KEYS`).  ``max_steps``: stop (with a checkpoint) after this many steps in all, 0 = run to the
    end (``lae_steps + dit_steps``).
    """

    data: str
    out: str
    name: str = "difflora"
    lae_steps: int = 2000
    dit_steps: int = 10000
    batch_size: int = 32
    lae_lr: float = 1e-3
    dit_lr: float = 3e-4
    weight_decay: float = 0.0
    drop_prob: float = 0.1
    seed: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    max_steps: int = 0
    lae: dict[str, Any] = field(default_factory=dict)
    dit: dict[str, Any] = field(default_factory=lambda: {"width": 256, "depth": 6, "heads": 4})
    mif: dict[str, Any] = field(default_factory=lambda: {"arcface_tokens": 4, "width": 256})

    def __post_init__(self) -> None:
        for key in ("lae_steps", "dit_steps", "batch_size", "seed", "checkpoint_every", "keep_checkpoints",
                    "max_steps"):
            v = getattr(self, key)
            low = 1 if key in ("batch_size", "keep_checkpoints") else 0
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise SettingError(f"difflora-fit: '{key}' is {v!r}; it must be a whole number >= {low}.")
        for key in ("lae_lr", "dit_lr", "weight_decay"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise SettingError(f"difflora-fit: '{key}' is {v!r}; it must be a finite number >= 0 (e.g. 1e-3).")
        if not (isinstance(self.drop_prob, (int, float)) and 0 <= self.drop_prob <= 1):
            raise SettingError(f"difflora-fit: 'drop_prob' is {self.drop_prob!r}; give a probability (e.g. 0.1).")
        if self.lae_steps + self.dit_steps < 1:
            raise SettingError("difflora-fit: 'lae_steps' + 'dit_steps' is 0; give some steps to train.")
        for key, allowed in (("dit", DIT_KEYS), ("mif", MIF_KEYS)):
            bad = sorted(set(getattr(self, key)) - set(allowed))
            if bad:
                raise SettingError(f"difflora-fit: '{key}' has unknown field(s) {bad}; allowed: {list(allowed)}.")
        LaeConfig.from_dict(self.lae, "difflora-fit: 'lae'")

    @property
    def total_steps(self) -> int:
        return self.lae_steps + self.dit_steps

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = "the config") -> DiffLoraFitConfig:
        if not isinstance(data, dict):
            raise SettingError(f"{where} must be a JSON object, got {type(data).__name__}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SettingError(f"{where} has unknown key(s) {unknown}; the known ones are {sorted(known)}.")
        missing = [k for k in ("data", "out") if k not in data]
        if missing:
            raise SettingError(f"{where} lacks {missing}; give the dataset folder ('data') and the run folder ('out').")
        return cls(**data)


# --------------------------------------------------------------------------------- dataset


@dataclass
class LoraDataset:
    """The loaded dataset: ``names`` (sorted), ``loras`` (float32 kohya dicts), ``face [N, A]``, ``clip
    [N, Mc, E]`` or None, and their common ``layout``."""

    names: list[str]
    loras: list[dict[str, Tensor]]
    face: Tensor
    clip: Tensor | None
    layout: LoraLayout

    def mif_spec(self, arcface_tokens: int = 4, width: int = 256) -> MifSpec:
        clip_tokens, clip_dim = (0, 1) if self.clip is None else (int(self.clip.shape[1]), int(self.clip.shape[2]))
        return MifSpec(arcface_dim=int(self.face.shape[1]), clip_dim=clip_dim, clip_tokens=clip_tokens,
                       arcface_tokens=arcface_tokens, width=width)


def save_mif_file(mif: RawMif, path: str | os.PathLike[str]) -> Path:
    """Write one identity's :class:`~hyperlora.difflora.condition.RawMif` (``face [A]``, ``clip [Mc, E]`` or None)
    as the ``<identity>.mif.safetensors`` file :func:`load_dataset` reads (float32, written atomically)."""
    from ..safetensors_io import save_file_atomic

    path = Path(path)
    if not path.name.endswith(MIF_SUFFIX):
        raise SettingError(f"a MIF file is named '<identity>{MIF_SUFFIX}' (beside '<identity>.safetensors'); "
                           f"'{path.name}' is not.")
    if mif.face.dim() != 1 or (mif.clip is not None and mif.clip.dim() != 2):
        raise SettingError(f"save_mif_file takes one identity's MIF (face [A], clip [Mc, E]), got face "
                           f"{list(mif.face.shape)}; save each identity on its own.")
    tensors = {"face": mif.face.detach().float().cpu().contiguous()}
    if mif.clip is not None:
        tensors["clip"] = mif.clip.detach().float().cpu().contiguous()
    return save_file_atomic(tensors, path)


def _identity_files(folder: Path) -> list[tuple[str, Path]]:
    manifest = folder / MANIFEST
    if manifest.is_file():
        try:
            data = json.loads(manifest.read_text(encoding="utf-8"))
            entries = data["identities"]
            out = [(name, folder / str(entry["file"])) for name, entry in sorted(entries.items())]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise SettingError(f"'{manifest}' is not a difflora-dataset manifest ({exc!r}); make the folder with "
                               "'python -m hyperlora.train difflora-dataset', or remove the manifest to use every "
                               "*.safetensors file in the folder.") from exc
        if not data.get("complete", True):
            log.warning("'%s' says the dataset is not complete (%d identities so far); training on those.",
                        manifest, len(out))
        return out
    return sorted((p.name[: -len(".safetensors")], p) for p in folder.glob("*.safetensors")
                  if not p.name.endswith(MIF_SUFFIX))


def load_dataset(folder: str | os.PathLike[str]) -> LoraDataset:
    """Read a dataset folder (module docstring); :class:`SettingError` / :class:`LoraError` naming the file
    and the fix for a missing MIF file, a LoRA of another layout or MIF files of different shapes."""
    from safetensors.torch import load_file

    from ..lora_file import load_lora_file

    folder = Path(folder)
    if not folder.is_dir():
        raise SettingError(f"difflora-fit: the dataset folder '{folder}' does not exist; give the folder "
                           "difflora-dataset wrote (<identity>.safetensors + <identity>.mif.safetensors).")
    files = _identity_files(folder)
    if len(files) < 2:
        raise SettingError(f"difflora-fit: '{folder}' holds {len(files)} identity LoRA(s); a DiffLoRA model needs "
                           "at least 2 (thousands for a useful one).")
    names, loras, faces, clips = [], [], [], []
    layout: LoraLayout | None = None
    for name, path in files:
        lora = {k: v.float() for k, v in load_lora_file(path).items()}
        if layout is None:
            layout = LoraLayout.of(lora, f"'{path}'")
        layout.check(lora, f"'{path}'")
        mif_path = folder / f"{name}{MIF_SUFFIX}"
        if not mif_path.is_file():
            raise SettingError(f"difflora-fit: '{mif_path}' is missing: every identity LoRA needs its MIF file "
                               "(face [A] and optional clip [Mc, E]); write it from the identity's photos or remove "
                               f"'{path.name}' from the folder.")
        mif = load_file(str(mif_path))
        extra = sorted(set(mif) - {"face", "clip"})
        if "face" not in mif or extra or mif["face"].dim() != 1 or ("clip" in mif and mif["clip"].dim() != 2):
            raise SettingError(f"difflora-fit: '{mif_path}' must hold 'face' [A] and optionally 'clip' [Mc, E], got "
                               f"{ {k: list(v.shape) for k, v in mif.items()} }; write RawMif.face / RawMif.clip.")
        if faces and (mif["face"].shape != faces[0].shape or ("clip" in mif) != (clips[0] is not None)
                      or ("clip" in mif and mif["clip"].shape != clips[0].shape)):
            raise SettingError(f"difflora-fit: '{mif_path}' has other shapes than '{files[0][0]}{MIF_SUFFIX}'; make "
                               "every MIF with the same MifSpec.")
        names.append(name)
        loras.append(lora)
        faces.append(mif["face"].float())
        clips.append(mif["clip"].float() if "clip" in mif else None)
    assert layout is not None
    face = torch.stack(faces)
    if not bool(torch.isfinite(face).all()):
        raise SettingError(f"difflora-fit: a MIF face in '{folder}' holds NaN or infinite values; rebuild the MIF files.")
    clip = torch.stack(clips) if clips[0] is not None else None   # type: ignore[arg-type]
    return LoraDataset(names, loras, face, clip, layout)


# --------------------------------------------------------------------------------- model parts


def build_models(cfg: DiffLoraFitConfig, data: LoraDataset) -> tuple[LoraAutoencoder, LatentDiT]:
    """The LAE and DiT of ``cfg`` for ``data``'s layout and MIF shapes, initialised from ``cfg.seed``."""
    spec = data.mif_spec(**cfg.mif)
    with torch.random.fork_rng(devices=[]):            # the caller's global RNG is left as it was
        torch.manual_seed(cfg.seed)
        lae = LoraAutoencoder(LaeConfig.from_dict(cfg.lae), data.layout)
        dit_cfg = DitConfig(tokens=lae.num_tokens, channels=lae.config.latent_channels, cond_dim=spec.width,
                            cond_tokens=spec.num_tokens, **cfg.dit)
        return lae, LatentDiT(dit_cfg, spec)


def _optim_state(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """An optimizer's state dict split into tensors (safetensors) and JSON (groups, scalars)."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"{prefix}.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _load_optim_state(opt: torch.optim.Optimizer, prefix: str, tensors: dict[str, Tensor], js: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        p, pid, k = key.split(".", 2)
        if p == prefix:
            state.setdefault(int(pid), {})[k] = v
    for key, v in js["scalars"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": js["param_groups"]})


def _make_optimizers(cfg: DiffLoraFitConfig, lae: LoraAutoencoder,
                     dit: LatentDiT) -> tuple[torch.optim.AdamW, torch.optim.AdamW]:
    return (torch.optim.AdamW(lae.parameters(), lr=cfg.lae_lr, weight_decay=cfg.weight_decay),
            torch.optim.AdamW(dit.parameters(), lr=cfg.dit_lr, weight_decay=cfg.weight_decay))


def latest_checkpoint(run: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint folder of a run (one with ``state.json``), or None."""
    found = sorted(p for p in (Path(run) / "checkpoints").glob("step-*") if (p / STATE_FILE).is_file())
    return found[-1] if found else None


def _save_checkpoint(run: Path, step: int, lae: LoraAutoencoder, dit: LatentDiT, opts: tuple[Any, Any],
                     latent_scale: float | None, keep: int) -> Path:
    from ..safetensors_io import save_file_atomic

    final = run / "checkpoints" / f"step-{step:06d}"
    tmp = run / "checkpoints" / f".step-{step:06d}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file_atomic({k: v.detach().cpu().contiguous() for k, v in lae.state_dict().items()}, tmp / LAE_FILE)
    save_file_atomic({k: v.detach().cpu().contiguous() for k, v in dit.state_dict().items()}, tmp / DIT_FILE)
    t_lae, j_lae = _optim_state(opts[0], "lae")
    t_dit, j_dit = _optim_state(opts[1], "dit")
    save_file_atomic({**t_lae, **t_dit}, tmp / OPTIM_FILE)
    state = {"step": step, "latent_scale": latent_scale, "lae_config": lae.config.to_dict(),
             "layout": lae.layout.to_dict(), "dit_config": dit.config.to_dict(), "mif_spec": dit.mif_spec.to_dict(),
             "optimizers": {"lae": j_lae, "dit": j_dit}}
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1), encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    plot.plot_losses(run / "loss.csv", run / "loss.png")
    old = sorted(p for p in (run / "checkpoints").glob("step-*") if p != final)
    for p in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def load_checkpoint(ckpt: Path) -> tuple[LoraAutoencoder, LatentDiT, dict[str, Any]]:
    """The LAE, DiT (strictly loaded) and ``state.json`` of a checkpoint folder."""
    from safetensors.torch import load_file

    from ..difflora.model import load_state_strict

    state = json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))
    lae = LoraAutoencoder(LaeConfig.from_dict(state["lae_config"]), LoraLayout.from_dict(state["layout"]))
    dit = LatentDiT(DitConfig.from_dict(state["dit_config"]), MifSpec.from_dict(state["mif_spec"]))
    fix = ("The checkpoint is damaged: delete its folder to resume from the one before, or start over with "
           "--no-resume.")
    for what, module, path in (("LAE", lae, ckpt / LAE_FILE), ("DiT", dit, ckpt / DIT_FILE)):
        load_state_strict(module, load_file(str(path)), path, what, described_in=str(ckpt / STATE_FILE), fix=fix)
    return lae, dit, state


# --------------------------------------------------------------------------------- fit


@dataclass
class DiffLoraFitResult:
    run: Path
    steps: int
    finished: bool
    latent_scale: float | None
    last_loss: float | None


def _check_resume(run: Path, cfg: DiffLoraFitConfig) -> None:
    path = run / "config.json"
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SettingError(f"'{path}' is unreadable ({exc}); give a new 'out' or --no-resume.") from exc
    now = cfg.to_json()
    changed = sorted(k for k in old.keys() | now.keys() if k not in RESUME_FREE_KEYS and old.get(k) != now.get(k))
    if changed:
        raise SettingError(f"the run folder '{run}' was trained with another config ({', '.join(changed)} differ); "
                           "give a new 'out', put the old values back to resume, or pass --no-resume.")


def _rows(path: Path, rows: list[tuple[Any, ...]], *, truncate_after: int | None = None) -> None:
    import csv

    if truncate_after is not None:
        if path.exists():
            with open(path, newline="", encoding="utf-8") as f:
                old = list(csv.reader(f))
            keep = [old[0]] + [r for r in old[1:] if r and int(r[0]) <= truncate_after]
            with open(path, "w", newline="", encoding="utf-8") as f:
                csv.writer(f).writerows(keep)
        return
    new = not path.exists()
    with open(path, "a", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        if new:
            w.writerow(CSV_HEADER)
        w.writerows(rows)


def fit(cfg: DiffLoraFitConfig, *, resume: bool = True, data: LoraDataset | None = None,
        on_step: Callable[[int], None] | None = None) -> DiffLoraFitResult:
    """Train (or resume) the run of ``cfg`` (module docstring).  ``data``: an already loaded dataset (else
    ``cfg.data`` is read).  Stops after ``cfg.max_steps`` steps in all when that is set, or after the step in
    which Ctrl-C came, with a checkpoint (run again to resume).  ``on_step(step)`` after every step."""
    run = check_folder_option(cfg.out, "'out'")
    if data is None:
        data = load_dataset(cfg.data)
    ckpt = latest_checkpoint(run) if resume else None
    if ckpt is not None:
        _check_resume(run, cfg)
    elif not resume and (run / "checkpoints").exists():
        shutil.rmtree(run / "checkpoints")
        (run / "loss.csv").unlink(missing_ok=True)
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps(cfg.to_json(), indent=1), encoding="utf-8")

    lae, dit = build_models(cfg, data)
    opts = _make_optimizers(cfg, lae, dit)
    step, latent_scale = 0, None
    if ckpt is not None:
        from safetensors.torch import load_file

        lae_c, dit_c, state = load_checkpoint(ckpt)
        if lae_c.layout != data.layout or dit_c.mif_spec != dit.mif_spec:
            raise SettingError(f"the checkpoint '{ckpt}' was trained on a dataset of another LoRA layout or MIF "
                               "shape; give a new 'out' or --no-resume.")
        lae.load_state_dict(lae_c.state_dict())
        dit.load_state_dict(dit_c.state_dict())
        opt_t = load_file(str(ckpt / OPTIM_FILE))
        _load_optim_state(opts[0], "lae", opt_t, state["optimizers"]["lae"])
        _load_optim_state(opts[1], "dit", opt_t, state["optimizers"]["dit"])
        step, latent_scale = int(state["step"]), state["latent_scale"]
        _rows(run / "loss.csv", [], truncate_after=step)
        log.info("difflora-fit: resumed from '%s' at step %d", ckpt, step)
    else:
        _rows(run / "loss.csv", [], truncate_after=0)
        lae.calibrate(data.loras)

    stop_at = cfg.total_steps if not cfg.max_steps else min(cfg.total_steps, cfg.max_steps)
    with StopFlag() as ctrl_c:
        step, latent_scale, last = _loop(cfg, run, data, lae, dit, opts, step, latent_scale, stop_at, ctrl_c, on_step)
    if ckpt is None or step != int(ckpt.name.split("-")[1]):
        _save_checkpoint(run, step, lae, dit, opts, latent_scale, cfg.keep_checkpoints)
    return DiffLoraFitResult(run, step, step >= cfg.total_steps, latent_scale, last)


def _loop(cfg: DiffLoraFitConfig, run: Path, data: LoraDataset, lae: LoraAutoencoder, dit: LatentDiT,
          opts: tuple[Any, Any], step: int, latent_scale: float | None, stop_at: int, ctrl_c: StopFlag,
          on_step: Callable[[int], None] | None) -> tuple[int, float | None, float | None]:
    """The training steps of :func:`fit` from ``step`` to ``stop_at`` (or Ctrl-C); returns ``(step, latent_scale,
    last loss)``."""
    n = len(data.loras)
    factors = stack_factors(data.loras, data.layout)              # per module (up [N, out, r], down [N, r, in])
    latents: Tensor | None = None
    last = None
    while step < stop_at:
        gen = torch.Generator().manual_seed(cfg.seed * STEP_SEED + step)
        idx = torch.randperm(n, generator=gen)[: min(cfg.batch_size, n)]
        if step < cfg.lae_steps:
            phase, opt, lr = "lae", opts[0], cfg.lae_lr
            lae.train()
            loss = lae.loss([(u[idx], d[idx]) for u, d in factors], generator=gen).total
        else:
            phase, opt, lr = "dit", opts[1], cfg.dit_lr
            if latents is None:
                lae.eval()
                with torch.no_grad():
                    z = lae.encode([(u, d) for u, d in factors])          # [N, T, C] posterior means
                if latent_scale is None:
                    latent_scale = float(z.float().std())
                    if not math.isfinite(latent_scale) or latent_scale <= 0:
                        raise SettingError(f"the LAE's latents have std {latent_scale}; train the LAE longer or "
                                           "check the dataset holds different LoRAs.")
                latents = (z / latent_scale).detach()
            dit.train()
            cond = dit.encode(data.face[idx], data.clip[idx] if data.clip is not None else None)
            loss = training_loss(dit, latents[idx], cond, cfg.drop_prob, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        last = float(loss.detach())
        if not math.isfinite(last):
            raise SettingError(f"difflora-fit: the {phase} loss became {last} at step {step}; lower "
                               f"'{phase}_lr' and resume from the last checkpoint.")
        _rows(run / "loss.csv", [(step, phase, phase, f"{last:.6g}", f"{lr:.6g}")])
        if step % 50 == 0 or step == stop_at:
            log.info("difflora-fit: step %d/%d %s loss %.5f", step, cfg.total_steps, phase, last)
        if on_step is not None:
            on_step(step)
        if ctrl_c.set:
            break
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < stop_at:
            _save_checkpoint(run, step, lae, dit, opts, latent_scale, cfg.keep_checkpoints)
    return step, latent_scale, last


# --------------------------------------------------------------------------------- export


def export(run: str | os.PathLike[str], folder: str | os.PathLike[str]) -> Path:
    """Write the model folder of a run's last checkpoint with :func:`hyperlora.difflora.format.save_difflora_folder`
    (the LAE, the DiT with its MIF encoder, their configs and the latent scale).  Refuses a run whose DiT phase
    has not started (no latent scale yet)."""
    from ..difflora.format import save_difflora_folder

    run = Path(run)
    ckpt = latest_checkpoint(run)
    if ckpt is None:
        raise SettingError(f"the run folder '{run}' has no checkpoint; train it first with "
                           "'python -m hyperlora.train difflora-fit'.")
    lae, dit, state = load_checkpoint(ckpt)
    if state["latent_scale"] is None:
        raise SettingError(f"the run '{run}' stopped at step {state['step']}, before its DiT was trained; run "
                           "difflora-fit again to finish it, then export.")
    return save_difflora_folder(folder, lae=lae, lae_config=lae.config, layout=lae.layout,
                                dit_state=dit.state_dict(), dit_config=dit.config.to_dict(),
                                condition=dit.mif_spec.to_dict(), latent_scale=float(state["latent_scale"]))


# --------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """``difflora-fit --config FILE [--data DIR] [--out DIR] [--max-steps N] [--no-resume]``."""
    parser = argparse.ArgumentParser(prog="python -m hyperlora.train difflora-fit",
                                     description="Train a DiffLoRA model (LAE, then DiT) on a LoRA dataset folder.")
    parser.add_argument("--config", type=Path, required=True, help="difflora-fit JSON (DiffLoraFitConfig fields)")
    parser.add_argument("--data", type=Path, help="dataset folder (overrides the config's 'data')")
    parser.add_argument("--out", type=Path, help="run folder (overrides the config's 'out')")
    parser.add_argument("--max-steps", type=int, help="stop after this many steps in all (resume later)")
    parser.add_argument("--no-resume", action="store_true", help="start over, deleting the run's checkpoints")
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        try:
            raw = json.loads(args.config.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SettingError(f"--config '{args.config}' is not valid JSON ({exc}); fix the file.") from exc
        if isinstance(raw, dict):
            for key, value in (("data", args.data), ("out", args.out), ("max_steps", args.max_steps)):
                if value is not None:
                    raw[key] = str(value) if isinstance(value, Path) else value
        cfg = DiffLoraFitConfig.from_dict(raw, f"--config '{args.config}'")
        result = fit(cfg, resume=not args.no_resume)
    except HyperLoRAError as exc:
        sys.stderr.write(f"difflora-fit: {exc}\n")
        return 2
    except OSError as exc:
        sys.stderr.write(f"difflora-fit: {os_error_line(exc)}\n")
        return 2
    if not result.finished:
        sys.stdout.write(f"difflora-fit: stopped at step {result.steps}; run the same command again to resume.\n")
    else:
        sys.stdout.write(f"difflora-fit: {result.steps} steps done in '{result.run}'; export it with "
                         f"'python -m hyperlora.train difflora-export --run {result.run} --out FOLDER'.\n")
    return 0


__all__ = [
    "CSV_HEADER",
    "MIF_SUFFIX",
    "DiffLoraFitConfig",
    "DiffLoraFitResult",
    "LoraDataset",
    "build_models",
    "export",
    "fit",
    "latest_checkpoint",
    "load_checkpoint",
    "load_dataset",
    "main",
    "save_mif_file",
]
