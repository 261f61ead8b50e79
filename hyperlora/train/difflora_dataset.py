"""``python -m hyperlora.train difflora-dataset``: the identity-oriented LoRA dataset DiffLoRA trains on.

For every identity of prepared shards (:mod:`hyperlora.train.shards`, made by ``prepare``), ONE plain LoRA
is fitted on the frozen base model (the folder or single file ``fit`` uses) with the trainer's denoising
loss (SDXL epsilon MSE, caption with the trigger words, uniform timesteps, the noise schedule of the base
model) on that identity's training samples.  The LoRA is applied through
:func:`hyperlora.lora_functional.applied` (forward hooks, no per-identity copy of the UNet).

Per identity (``docs/training.md``, section "DiffLoRA dataset", says why these defaults):

* the LoRA: ``down [rank, in]``, ``up [out, rank]`` on every attention projection named by ``layers``
  (default: ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` of self- and cross-attention, HyperLoRA's layout),
  ``alpha = rank / 2`` (HyperLoRA's convention, so a generated LoRA starts the fit unchanged);
* the start: ``down`` random (normal, std ``1 / in``), ``up`` zero, from a generator seeded by
  :func:`identity_seed` (the config's seed and the identity's name only); or, with ``init_from`` (a
  HyperLoRA model folder as ``export`` writes it), the ID-LoRA that model generates from the identity's
  training photos' features (ArcFace + CLIP, mean tokens as the Identity node makes them), extra ranks
  beyond the model's padded with random ``down`` rows and zero ``up`` columns;
* training: AdamW (no weight decay: the large weights are the identity), gradient norm clipped at 1,
  ``steps`` steps of ``batch_size`` samples drawn epoch by epoch from a seeded permutation; on the CPU
  on one thread per process (:func:`one_thread`);
* reported losses (fixed noise per (sample, timestep) at timesteps 200/400/600/800,
  :func:`hyperlora.train.evaluate.denoising_losses`, on the identity's training samples): ``loss`` after
  the fit, ``loss_start`` with the starting LoRA, ``loss_none`` without a LoRA.

Output folder: ``<identity>.safetensors`` (kohya keys, float32, the pack's Apply / Export read it; written
under a temporary name and renamed; header keys sorted so equal contents give equal bytes) with metadata
(``difflora_identity``, ``difflora_steps``, ``difflora_loss``, ``difflora_rank``, ``difflora_seed``,
``difflora_init``, ``difflora_config``), and ``manifest.json``::

    {"format": "hyperlora.difflora.dataset", "version": 1, "config": {...},
     "layout": {"rank": r, "alpha": a, "modules": [{"prefix", "in", "out"}, ...]},
     "identities_total": N, "complete": bool,
     "identities": {"<name>": {"file", "sha256", "loss", "loss_start", "loss_none", "seed"}, ...}}

**Several processes** (``torchrun`` / ``accelerate launch``, or by hand with ``RANK`` / ``WORLD_SIZE``):
the sorted identity list is split by index (``identities[rank::world]``), so the split does not depend
on what is already done.  No collective is used.  The manifest is updated under an exclusive file lock
(``.manifest.lock``, ``fcntl.flock``) by whichever process finished an identity, read-modify-write with an
atomic rename, so concurrent processes never lose each other's entries; the last process to finish leaves
the complete manifest.  (On a folder shared by several machines, where ``flock`` may not hold, run the
same command once more on one process at the end: every identity is then skipped and the manifest rebuilt.)
Each identity's result depends only on the config and the identity, so any split gives the same files.

Resuming: an identity whose file exists, whose manifest entry has the file's SHA-256 and whose metadata
holds the same config is skipped.  A config that differs from the manifest's in a key outside
:data:`RESUME_FREE_KEYS` is refused naming the keys.  Ctrl-C stops after the identity being fitted
(a second Ctrl-C stops at once); finished identities are kept and a rerun resumes.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import struct
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import atomic_temp_name
from ..errors import HyperLoRAError, SettingError, check_folder_option, run_command
from ..lora import ALPHA_SUFFIX, DOWN_SUFFIX, UP_SUFFIX, LoraDict
from ..lora_functional import LoraTerm, applied, diffusers_lora_targets
from .difflora_fit import MIF_SUFFIX, save_mif_file
from .ctrl_c import StopFlag
from .data import collate

log = logging.getLogger(__name__)

FORMAT = "hyperlora.difflora.dataset"
VERSION = 1
MANIFEST = "manifest.json"
LOCK = ".manifest.lock"
LAYERS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out_0",
          "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out_0")
"""Every attention projection a LoRA may target (default: all of them, HyperLoRA's layout)."""
DEFAULT_RANK = 8
"""The released HyperLoRA rank: a generated ID-LoRA starts a fit as it is."""
DEFAULT_STEPS = 300
DEFAULT_LR = 1e-4
DEFAULT_BATCH = 4
MAX_GRAD_NORM = 1.0
RESUME_FREE_KEYS = frozenset({"identities"})
"""Config keys a rerun may change (which identities to do now); every other key shapes the files."""
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


@dataclass
class DatasetConfig:
    """Everything that decides the files (the manifest's ``config``)."""

    base_model: str
    shards: list[str]
    rank: int = DEFAULT_RANK
    layers: list[str] = field(default_factory=lambda: list(LAYERS))
    steps: int = DEFAULT_STEPS
    lr: float = DEFAULT_LR
    batch_size: int = DEFAULT_BATCH
    seed: int = 0
    init_from: str | None = None
    identities: list[str] | None = None

    @property
    def alpha(self) -> float:
        return self.rank / 2

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class IdentityResult:
    """One fitted identity: its LoRA (kohya keys) and losses (see the module docstring)."""

    identity: str
    lora: LoraDict
    loss: float
    loss_start: float
    loss_none: float
    seed: int


@dataclass
class DatasetResult:
    fitted: list[str]
    skipped: list[str]
    interrupted: bool
    out: Path
    rank: int = 0
    world: int = 1


# --------------------------------------------------------------------------------- small pieces


def identity_seed(seed: int, identity: str) -> int:
    """A 31-bit seed from the config's seed and the identity's name alone (not from its position)."""
    digest = hashlib.sha256(f"{int(seed)}\0{identity}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def process_split() -> tuple[int, int]:
    """``(rank, world)`` from ``RANK`` / ``WORLD_SIZE`` (set by torchrun and accelerate launch); ``(0, 1)``
    without them.  :class:`SettingError` for values that do not fit."""
    try:
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise SettingError(f"RANK={os.environ.get('RANK')!r} / WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} are not "
                           f"whole numbers; unset them or set RANK in 0..WORLD_SIZE-1.") from None
    if world < 1 or not 0 <= rank < world:
        raise SettingError(f"RANK={rank} with WORLD_SIZE={world}; RANK must be in 0..WORLD_SIZE-1.")
    return rank, world


def check_layers(layers: Sequence[str]) -> list[str]:
    """``layers`` (names from :data:`LAYERS`) without repeats, in the given order; :class:`SettingError` naming
    ``--layers`` for an unknown name or an empty list."""
    out = []
    for name in layers:
        if name not in LAYERS:
            raise SettingError(f"--layers: unknown layer {name!r}; choose from {', '.join(LAYERS)}.")
        if name not in out:
            out.append(name)
    if not out:
        raise SettingError(f"--layers is empty; name at least one of {', '.join(LAYERS)}.")
    return out


def lora_targets(unet: nn.Module, layers: Sequence[str]) -> dict[str, nn.Linear]:
    """``{kohya prefix: Linear}`` of the UNet's attention projections named by ``layers`` (``attn2.to_k``...),
    in the UNet's module order."""
    suffixes = tuple("_" + layer.replace(".", "_") for layer in layers)
    found = {p: m for p, m in diffusers_lora_targets(unet).items() if p.endswith(suffixes)}
    if not found:
        raise SettingError(f"the base model has no attention layer among {list(layers)}; use an SDXL-shaped UNet.")
    return found


def check_identity_name(name: str) -> str:
    """``name`` when it can be a file name (``<name>.safetensors``); :class:`SettingError` otherwise."""
    if not name or name.startswith(".") or any(c in name for c in "/\\:\0"):
        raise SettingError(f"identity name {name!r} cannot be a file name; rename its photo folder and prepare again.")
    return name


# --------------------------------------------------------------------------------- deterministic files


def safetensors_bytes(tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> bytes:
    """A ``.safetensors`` file as bytes with its header keys sorted (the library's writer orders metadata by
    a per-process hash, so equal contents would give different bytes in different processes)."""
    header: dict[str, Any] = {"__metadata__": {str(k): str(v) for k, v in sorted(metadata.items())}}
    blobs = []
    offset = 0
    for key in sorted(tensors):
        t = tensors[key].detach().to("cpu").contiguous()
        if t.dtype not in _ST_DTYPES:
            raise ValueError(f"safetensors_bytes: {key} has dtype {t.dtype}")
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[key] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + b"".join(blobs)


def write_atomic(path: Path, data: bytes) -> None:
    """``data`` to ``path`` under the pack's temporary name, then renamed (mode as a plain ``open``)."""
    from ..safetensors_io import current_umask

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(atomic_temp_name(path.name))
    try:
        tmp.write_bytes(data)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of the file at ``path`` (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------- manifest


@contextlib.contextmanager
def manifest_lock(out: Path) -> Iterator[None]:
    """An exclusive lock on ``out/.manifest.lock`` (``fcntl.flock``; without fcntl, e.g. on Windows, no lock:
    run one process there)."""
    try:
        import fcntl
    except ImportError:                                   # pragma: no cover - Windows
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def read_manifest(out: Path) -> dict[str, Any] | None:
    """``out/manifest.json`` as a dict (None when there is none); :class:`SettingError` when it is damaged or
    not a DiffLoRA dataset manifest."""
    path = out / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SettingError(f"'{path}' is unreadable ({exc}); delete it (the identity files stay and are checked "
                           f"again) or give another --out.") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise SettingError(f"'{path}' is not a DiffLoRA dataset manifest; give another --out (an empty or new folder).")
    return data


def _write_manifest(out: Path, data: dict[str, Any]) -> None:
    data["identities"] = dict(sorted(data["identities"].items()))
    data["complete"] = len(data["identities"]) >= int(data["identities_total"])
    write_atomic(out / MANIFEST, (json.dumps(data, indent=1, sort_keys=False) + "\n").encode("utf-8"))


def changed_keys(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Sorted config keys whose values differ between ``old`` and ``new`` (:data:`RESUME_FREE_KEYS` left out)."""
    return sorted(k for k in old.keys() | new.keys() if k not in RESUME_FREE_KEYS and old.get(k) != new.get(k))


def check_config(out: Path, cfg: DatasetConfig) -> None:
    """Refuse to add to ``out`` when its manifest was made with another config (naming the keys)."""
    old = read_manifest(out)
    if old is None:
        return
    changed = changed_keys(old.get("config", {}), cfg.to_json())
    if changed:
        what = "; ".join(f"{k}: {json.dumps(old['config'].get(k))} in the folder, {json.dumps(cfg.to_json().get(k))} "
                         f"now" for k in changed)
        raise SettingError(f"the dataset folder '{out}' was made with another config ({what}). Its LoRAs would mix "
                           f"two recipes; give a new --out, or put the old values back to resume.")


def start_manifest(out: Path, cfg: DatasetConfig, layout: dict[str, Any], total: int) -> None:
    """Under the lock: check the folder's config, then write the manifest if there is none yet."""
    with manifest_lock(out):
        check_config(out, cfg)
        data = read_manifest(out)
        if data is None:
            data = {"format": FORMAT, "version": VERSION, "config": cfg.to_json(), "layout": layout,
                    "identities_total": total, "complete": False, "identities": {}}
        else:
            if data.get("layout") != layout:
                raise SettingError(f"'{out / MANIFEST}' has another LoRA layout (modules or shapes) than this base "
                                   f"model gives; give a new --out for this base model.")
            data["config"]["identities"] = cfg.identities
            data["identities_total"] = total
        _write_manifest(out, data)


def record_identity(out: Path, name: str, entry: dict[str, Any]) -> None:
    """Add one identity to the manifest (read-modify-write under the lock)."""
    with manifest_lock(out):
        data = read_manifest(out)
        if data is None:
            raise SettingError(f"'{out / MANIFEST}' vanished while the dataset was being made; run again to rebuild.")
        data["identities"][name] = entry
        _write_manifest(out, data)


def is_done(out: Path, name: str, cfg: DatasetConfig, manifest: Mapping[str, Any] | None) -> bool:
    """The identity's file exists, its SHA-256 is the manifest's and its metadata holds this config."""
    from ..lora_file import read_lora_metadata

    path = out / f"{name}.safetensors"
    entry = (manifest or {}).get("identities", {}).get(name)
    if entry is None or not path.is_file():
        return False
    if sha256_file(path) != entry.get("sha256"):
        log.warning("'%s' does not match the manifest's SHA-256; fitting it again", path)
        return False
    try:
        meta = read_lora_metadata(path)
        old = json.loads(meta.get("difflora_config", "{}"))
    except (HyperLoRAError, ValueError):
        return False
    return not changed_keys(old, cfg.to_json())


# --------------------------------------------------------------------------------- the fit of one identity


def _collate(samples: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
    """Shard items -> float32 stacks: latents ``[N, 4, h, w]``, time_ids ``[N, 6]``, text ``[N, 77, C]``, pooled
    ``[N, P]``, arcface ``[N, 512]``, clip_id ``[N, L, E]``."""
    return collate(samples, torch.device("cpu"), keys=("latents", "time_ids", "text", "pooled", "arcface", "clip_id"))


def random_start(targets: Mapping[str, nn.Linear], rank: int, seed: int) -> dict[str, tuple[Tensor, Tensor]]:
    """``{prefix: (down [rank, in] ~ N(0, 1/in), up [out, rank] = 0)}`` from ``seed`` (in prefix order)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for prefix, lin in targets.items():
        down = torch.randn((rank, lin.in_features), generator=g) * lin.in_features ** -0.5
        out[prefix] = (down, torch.zeros(lin.out_features, rank))
    return out


def generated_start(model: Any, batch: Mapping[str, Tensor], targets: Mapping[str, nn.Linear], rank: int,
                    seed: int, init_from: str) -> dict[str, tuple[Tensor, Tensor]]:
    """The ID-LoRA ``model`` (a :class:`hyperlora.generate.HyperLoRAModel`) generates from the identity's
    ArcFace ``[N, 512]`` and CLIP ``[N, L, E]`` features, as factors of rank ``rank`` at scale ``rank / 2 / rank``
    (its alpha/rank is also 1/2); ranks beyond the model's: random ``down`` rows, zero ``up`` columns."""
    tokens = model.id_tokens(id_embeds=batch["arcface"], clip_features=batch["clip_id"], use_cache=False)
    lora = model.build_lora(tokens, dtype=torch.float32)
    pad = random_start(targets, rank, seed)
    out = {}
    for prefix in targets:
        down = lora.get(prefix + DOWN_SUFFIX)
        if down is None:
            raise SettingError(f"--init-from '{init_from}' has no LoRA for '{prefix}': it was made for another base "
                               f"model, or --layers names layers it does not generate; use a model of this base model.")
        up = lora[prefix + UP_SUFFIX]
        r = down.shape[0]
        alpha = float(lora[prefix + ALPHA_SUFFIX]) if prefix + ALPHA_SUFFIX in lora else float(r)
        if r > rank:
            raise SettingError(f"--rank {rank} is below the rank {r} of the --init-from model '{init_from}'; give "
                               f"--rank {r} or more.")
        up = up * ((alpha / r) / 0.5)                  # our scale is 1/2: keep the generated dW exactly
        d, u = pad[prefix]
        d = torch.cat([down.float(), d[r:]], 0)
        u = torch.cat([up.float(), u[:, r:]], 1)
        out[prefix] = (d, u)
    return out


def _loss(unet: nn.Module, factors: Mapping[str, tuple[Tensor, Tensor]] | None, targets: Mapping[str, nn.Linear],
          scale: float, alphas: Tensor, samples: Sequence[Mapping[str, Any]], seed: int) -> float:
    """Mean epsilon MSE of ``samples`` with the LoRA ``factors`` (``{prefix: (down [r, in], up [out, r])}``) at
    ``scale`` (None: no LoRA), fixed noise per (sample, timestep) from ``seed``."""
    from .evaluate import denoising_losses

    fac = None if factors is None else {p: (d[None], (u * scale)[None]) for p, (d, u) in factors.items()}
    return float(denoising_losses(unet, alphas, samples, fac, seed=seed, targets=targets).mean())


def fit_identity(name: str, samples: Sequence[Mapping[str, Any]], unet: nn.Module, targets: Mapping[str, nn.Linear],
                 alphas_cumprod: Tensor, cfg: DatasetConfig, *, generator_model: Any = None) -> IdentityResult:
    """Fit one identity's LoRA on its ``samples`` (shard items); see the module docstring."""
    seed = identity_seed(cfg.seed, name)
    batch = _collate(samples)
    if generator_model is not None:
        start = generated_start(generator_model, batch, targets, cfg.rank, seed, str(cfg.init_from))
    else:
        start = random_start(targets, cfg.rank, seed)
    params = {p: (nn.Parameter(d.clone()), nn.Parameter(u.clone())) for p, (d, u) in start.items()}
    flat = [t for pair in params.values() for t in pair]
    opt = torch.optim.AdamW(flat, lr=cfg.lr, weight_decay=0.0)
    alphas = alphas_cumprod.float()
    scale = cfg.alpha / cfg.rank
    loss_none = _loss(unet, None, targets, scale, alphas, samples, seed)
    loss_start = _loss(unet, start, targets, scale, alphas, samples, seed)
    g = torch.Generator().manual_seed(seed)
    n = batch["latents"].shape[0]
    queue: list[int] = []
    dtype = next(unet.parameters()).dtype
    for _ in range(cfg.steps):
        idx = []
        while len(idx) < cfg.batch_size:
            if not queue:
                queue = torch.randperm(n, generator=g).tolist()
            idx.append(queue.pop())
        sel = torch.tensor(idx)
        x0 = batch["latents"][sel]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, alphas.shape[0], (len(idx),), generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        factors = {p: (d[None], u[None]) for p, (d, u) in params.items()}
        with applied(targets, [LoraTerm(factors, scale)]):
            pred = unet(noisy.to(dtype), t, encoder_hidden_states=batch["text"][sel].to(dtype),
                        added_cond_kwargs={"text_embeds": batch["pooled"][sel].to(dtype),
                                           "time_ids": batch["time_ids"][sel].to(dtype)}).sample.float()
            loss = F.mse_loss(pred, noise)
            loss.backward()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise SettingError(f"identity '{name}': the loss became {value}; lower --lr.")
        torch.nn.utils.clip_grad_norm_(flat, MAX_GRAD_NORM)
        opt.step()
        opt.zero_grad(set_to_none=True)
    final = {p: (d.detach(), u.detach()) for p, (d, u) in params.items()}
    loss = _loss(unet, final, targets, scale, alphas, samples, seed)
    lora: LoraDict = {}
    for p, (d, u) in final.items():
        lora[p + DOWN_SUFFIX] = d.clone().contiguous()
        lora[p + UP_SUFFIX] = u.clone().contiguous()
        lora[p + ALPHA_SUFFIX] = torch.tensor(cfg.alpha, dtype=torch.float32)
    return IdentityResult(name, lora, loss, loss_start, loss_none, seed)


def file_config(cfg: DatasetConfig) -> dict[str, Any]:
    """The config as an identity's file records it: without :data:`RESUME_FREE_KEYS` (which identities a run
    does must not change another identity's bytes)."""
    return {k: v for k, v in cfg.to_json().items() if k not in RESUME_FREE_KEYS}


@contextlib.contextmanager
def one_thread(device: torch.device) -> Iterator[None]:
    """On the CPU, torch's intra-op threads set to 1 inside the block (restored after): float sums split
    over another number of threads round differently, and a file must not depend on how many threads its
    process had.  Parallelism on a CPU comes from processes (``torchrun --nproc_per_node CORES``)."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def identity_file_bytes(res: IdentityResult, cfg: DatasetConfig) -> bytes:
    """The identity's ``.safetensors`` bytes: kohya keys, float32, the pack's LoRA metadata plus ``difflora_*``."""
    from ..lora import split_lora
    from ..lora_file import lora_metadata, standard_metadata

    meta = dict(standard_metadata(split_lora(res.lora)))
    meta.update(lora_metadata(title=res.identity, description=(
        f"SDXL identity LoRA of '{res.identity}' fitted for the DiffLoRA dataset ({cfg.steps} steps, rank "
        f"{cfg.rank}, {'from ' + Path(cfg.init_from).name if cfg.init_from else 'random start'}).")))
    meta.update({"difflora_identity": res.identity, "difflora_steps": str(cfg.steps),
                 "difflora_loss": repr(res.loss), "difflora_loss_start": repr(res.loss_start),
                 "difflora_loss_none": repr(res.loss_none), "difflora_rank": str(cfg.rank),
                 "difflora_seed": str(res.seed), "difflora_init": cfg.init_from or "random",
                 "difflora_config": json.dumps(file_config(cfg), sort_keys=True)})
    return safetensors_bytes(res.lora, meta)


# --------------------------------------------------------------------------------- the whole dataset


def _group_by_identity(datasets: Sequence[Any]) -> dict[str, list[tuple[int, int]]]:
    from .data import sample_identities

    groups: dict[str, list[tuple[int, int]]] = {}
    for d, ds in enumerate(datasets):
        for i, name in enumerate(sample_identities(ds)):
            groups.setdefault(name, []).append((d, i))
    return dict(sorted(groups.items()))


def write_identity_mif(out: Path, name: str, samples: Sequence[Mapping[str, Any]]) -> Path:
    """Write ``<name>.mif.safetensors`` beside the identity's LoRA: its DiffLoRA condition (MIF), made from the
    ArcFace embeddings ``[N, 512]`` and CLIP hidden states ``[N, L, E]`` of its N training samples as
    :func:`hyperlora.difflora.condition.mixed_image_features` makes it from photos (default grid, this CLIP's
    width), so ``difflora-fit`` trains on this folder as it is.  Deterministic: every process writes the same bytes."""
    from ..difflora.condition import MifSpec, mixed_image_features

    batch = _collate(samples)
    spec = MifSpec(arcface_dim=int(batch["arcface"].shape[-1]), clip_dim=int(batch["clip_id"].shape[-1]))
    return save_mif_file(mixed_image_features(batch["arcface"], batch["clip_id"], spec), out / f"{name}{MIF_SUFFIX}")


def build_dataset(cfg: DatasetConfig, out: str | os.PathLike[str], *, unet: nn.Module | None = None,
                  noise_scheduler: Any = None, split: tuple[int, int] | None = None,
                  stop: Callable[[], bool] | None = None) -> DatasetResult:
    """Fit and write this process's share of the identities into ``out`` (see the module docstring).

    ``unet`` / ``noise_scheduler`` override loading them from ``cfg.base_model`` (tests); ``split`` =
    ``(rank, world)`` overrides the environment; ``stop()`` is asked after each identity (True: stop as
    Ctrl-C would).  Returns the fitted and skipped identities of this process.
    """
    from .data import ShardDataset

    out = Path(out)
    rank, world = split if split is not None else process_split()
    datasets = [ShardDataset(Path(s)) for s in cfg.shards]
    groups = _group_by_identity(datasets)
    if not groups:
        raise SettingError(f"the shards {cfg.shards} hold no samples; run 'python -m hyperlora.train prepare' first.")
    names = list(groups)
    for name in names:
        check_identity_name(name)
    if cfg.identities is not None:
        unknown = sorted(set(cfg.identities) - set(names))
        if unknown:
            raise SettingError(f"--identities: {unknown[:5]} not in the shards (they hold {names[:5]}...); fix the list.")
        names = [n for n in names if n in set(cfg.identities)]
    check_config(out, cfg)                          # before loading anything: a changed config fails at once
    if unet is None:
        from .frozen import load_unet

        unet = load_unet(Path(cfg.base_model))
    if noise_scheduler is None:
        from .frozen import load_noise_scheduler

        noise_scheduler = load_noise_scheduler(Path(cfg.base_model))
    unet.requires_grad_(False).eval()
    targets = lora_targets(unet, cfg.layers)
    layout = {"rank": cfg.rank, "alpha": cfg.alpha,
              "modules": [{"prefix": p, "in": m.in_features, "out": m.out_features} for p, m in targets.items()]}
    generator_model = None
    if cfg.init_from is not None:
        from ..checkpoint import load_hyper_lora

        generator_model = load_hyper_lora(Path(cfg.init_from), dtype=torch.float32)
    start_manifest(out, cfg, layout, len(groups))
    manifest = read_manifest(out)
    mine = names[rank::world]
    fitted: list[str] = []
    skipped: list[str] = []
    interrupted = False
    ctrl_c = StopFlag("stopping after this identity (Ctrl-C again to stop at once); a rerun resumes.")
    with ctrl_c as flag, one_thread(next(unet.parameters()).device):
        for k, name in enumerate(mine):
            if is_done(out, name, cfg, manifest):
                if not (out / f"{name}{MIF_SUFFIX}").is_file():     # a folder written before MIF files existed
                    write_identity_mif(out, name, [datasets[d][i] for d, i in groups[name]])
                skipped.append(name)
                log.info("identity %d/%d '%s': done before, skipped", k + 1, len(mine), name)
                continue
            samples = [datasets[d][i] for d, i in groups[name]]
            res = fit_identity(name, samples, unet, targets, noise_scheduler.alphas_cumprod, cfg,
                               generator_model=generator_model)
            path = out / f"{name}.safetensors"
            write_identity_mif(out, name, samples)
            write_atomic(path, identity_file_bytes(res, cfg))
            record_identity(out, name, {"file": path.name, "sha256": sha256_file(path), "loss": res.loss,
                                        "loss_start": res.loss_start, "loss_none": res.loss_none, "seed": res.seed,
                                        "samples": len(samples)})
            fitted.append(name)
            log.info("identity %d/%d '%s': loss %.5f (start %.5f, no LoRA %.5f), %d photos, %d steps",
                     k + 1, len(mine), name, res.loss, res.loss_start, res.loss_none, len(samples), cfg.steps)
            if flag.set or (stop is not None and stop()):
                interrupted = k + 1 < len(mine)
                break
    return DatasetResult(fitted, skipped, interrupted, out, rank, world)


# --------------------------------------------------------------------------------- CLI


def _layers_arg(text: str) -> list[str]:
    return check_layers([s.strip() for s in text.split(",") if s.strip()])


def config_from_args(args: argparse.Namespace) -> DatasetConfig:
    """The parsed options as a :class:`DatasetConfig` (absolute paths); :class:`SettingError` naming the option."""
    if args.rank < 1:
        raise SettingError(f"--rank is {args.rank}; give a positive rank (default {DEFAULT_RANK}).")
    if args.steps < 0:
        raise SettingError(f"--steps is {args.steps}; give 0 or more optimizer steps per identity.")
    if args.batch_size < 1:
        raise SettingError(f"--batch-size is {args.batch_size}; give 1 or more samples per step.")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise SettingError(f"--lr is {args.lr}; give a positive learning rate (default {DEFAULT_LR}).")
    if args.seed < 0:
        raise SettingError(f"--seed is {args.seed}; give 0 or a positive whole number.")
    base = Path(args.base_model)
    if not base.exists():
        raise SettingError(f"--base-model '{base}' does not exist; give the SDXL base model fit uses (a diffusers "
                           f"folder or a single .safetensors file).")
    for s in args.shards:
        if not Path(s).is_dir():
            raise SettingError(f"--shards '{s}' is not a folder; give a folder written by "
                               f"'python -m hyperlora.train prepare'.")
    init = None
    if args.init_from is not None:
        if not Path(args.init_from).is_dir():
            raise SettingError(f"--init-from '{args.init_from}' is not a folder; give a HyperLoRA model folder (the "
                               f"one holding hyper_lora_modules.json, as export writes it).")
        init = str(Path(args.init_from).resolve())
    ids = None if args.identities is None else [s.strip() for s in args.identities.split(",") if s.strip()]
    return DatasetConfig(base_model=str(base.resolve()), shards=[str(Path(s).resolve()) for s in args.shards],
                         rank=args.rank, layers=_layers_arg(args.layers), steps=args.steps, lr=args.lr,
                         batch_size=args.batch_size, seed=args.seed, init_from=init, identities=ids)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hyperlora.train difflora-dataset",
                                description="Fit one plain LoRA per identity of prepared shards (the DiffLoRA "
                                            "dataset); resumable, split over processes by RANK / WORLD_SIZE.")
    p.add_argument("--base-model", required=True, help="the frozen SDXL base model (diffusers folder or single file)")
    p.add_argument("--shards", required=True, nargs="+", help="shard folder(s) written by prepare")
    p.add_argument("--out", required=True, type=Path, help="dataset folder (created; a rerun resumes)")
    p.add_argument("--init-from", help="HyperLoRA model folder: start each fit from its generated ID-LoRA")
    p.add_argument("--rank", type=int, default=DEFAULT_RANK, help=f"LoRA rank (default {DEFAULT_RANK})")
    p.add_argument("--layers", default=",".join(LAYERS), help="attention projections to adapt, comma-separated "
                   "(default: all eight)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"optimizer steps per identity ({DEFAULT_STEPS})")
    p.add_argument("--lr", type=float, default=DEFAULT_LR, help=f"AdamW learning rate ({DEFAULT_LR})")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help=f"samples per step ({DEFAULT_BATCH})")
    p.add_argument("--seed", type=int, default=0, help="seed (each identity's own is derived from it and its name)")
    p.add_argument("--identities", help="only these identities now (comma-separated); others stay for a later run")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> DatasetResult:
        check_folder_option(args.out, "--out")
        return build_dataset(config_from_args(args), args.out)

    # a second Ctrl-C: the identity being fitted is dropped, no file half-written
    code, result = run_command("difflora-dataset", body, interrupted="stopped; finished identities are kept, run "
                                                                    "the same command again to resume.")
    if result is None:
        return code
    where = f" (process {result.rank + 1} of {result.world})" if result.world > 1 else ""
    if result.interrupted:
        sys.stdout.write(f"difflora-dataset: interrupted after {len(result.fitted)} identities{where}; run the same "
                         f"command again to resume.\n")
        return 130
    sys.stdout.write(f"difflora-dataset: {len(result.fitted)} fitted, {len(result.skipped)} already done{where}; "
                     f"{result.out / MANIFEST}\n")
    return 0


__all__ = [
    "FORMAT",
    "LAYERS",
    "MANIFEST",
    "DatasetConfig",
    "DatasetResult",
    "IdentityResult",
    "build_dataset",
    "build_parser",
    "check_config",
    "fit_identity",
    "identity_seed",
    "main",
    "process_split",
    "read_manifest",
    "safetensors_bytes",
]
