"""The on-disk training format written by ``prepare`` and read by :class:`hyperlora.train.data.ShardDataset`.

``DIR/shard-XXXXX.safetensors`` holds the N kept samples of one slice of the input, tensors stacked on dim 0:

==============  ==================  =====================================================================
key             shape, dtype        content
==============  ==================  =====================================================================
arcface         [N, 512] f32        L2-normalised ArcFace embedding (as the pipeline gives it)
clip_id         [N, 257, E] f16     CLIP penultimate features of the gray-background face crop (ID)
clip_base       [N, 257, E] f16     CLIP penultimate features of the blurred-face crop (Base)
latents         [N, 4, h, w] f32    VAE latent mean of the training crop, already * scaling_factor
time_ids        [N, 6] f32          SDXL size/crop conditioning: orig h, w, crop top, left, target h, w
text            [N, 77, C] f16      penultimate states of both text encoders, TRIGGER_PREFIX + caption
pooled          [N, P] f16          pooled projection of text encoder 2, TRIGGER_PREFIX + caption
text_plain      [N, 77, C] f16      the same for the caption without the trigger words
pooled_plain    [N, P] f16
==============  ==================  =====================================================================

These are the dtypes of the default feature set (``prepare --feature-dtype mixed``); with ``--feature-dtype
float16`` every tensor but ``time_ids`` is float16 (:func:`stored_dtypes`).  Readers cast to their compute
dtype (``fit`` stacks a batch as float32), so both read alike.  :func:`folder_size` measures a folder's bytes
per sample (``prepare`` prints it on its last line).

Metadata: ``format``, ``version``, ``samples`` (JSON list of ``{"key", "identity", "caption"}`` in row
order), ``report`` (JSON :class:`~hyperlora.train.filters.FilterReport` of the shard's input slice),
``settings`` (JSON of what made it).  A shard whose slice kept nothing holds no tensors (N = 0).

``DIR/manifest.json``: ``{"format": "hyperlora.train.shards", "version": 1, "shards": [{"file", "count"}],
"planned": total shard count, "complete": bool, "encoders": {...}, "report": {...}, "sizes": {...},
"settings": {...}}`` - rebuilt from the finished shards, so it is always consistent with them.

Writes are atomic: a shard is written under a temporary name and renamed, so an interrupted run never
leaves a half-written shard; a finished shard is never redone.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import ModelFileError, SettingError
from ..memory import human_bytes
from .filters import FilterReport

logger = logging.getLogger(__name__)

FORMAT = "hyperlora.train.shards"
VERSION = 1
MANIFEST = "manifest.json"
SHARD_RE = re.compile(r"^shard-(\d{5,})\.safetensors$")
DTYPES: dict[str, torch.dtype] = {
    "arcface": torch.float32, "clip_id": torch.float16, "clip_base": torch.float16, "latents": torch.float32,
    "time_ids": torch.float32, "text": torch.float16, "pooled": torch.float16, "text_plain": torch.float16,
    "pooled_plain": torch.float16,
}
"""Every tensor of a sample and its stored dtype (the default feature set, ``feature_dtype`` "mixed")."""
TENSOR_KEYS: tuple[str, ...] = tuple(DTYPES)
FEATURE_DTYPES: tuple[str, ...] = ("mixed", "float16")
"""Stored-dtype sets of ``prepare --feature-dtype``: "mixed" = :data:`DTYPES` (the default); "float16" = every
tensor float16 but ``time_ids`` (pixel sizes and crop corners, kept float32 so sizes above 2048 stay exact)."""


def stored_dtypes(feature_dtype: str = "mixed") -> dict[str, torch.dtype]:
    """The stored dtype of every sample tensor for a :data:`FEATURE_DTYPES` name; :class:`SettingError` naming
    the choices for another name."""
    if feature_dtype == "mixed":
        return dict(DTYPES)
    if feature_dtype == "float16":
        return {k: (torch.float32 if k == "time_ids" else torch.float16) for k in DTYPES}
    raise SettingError(f"feature_dtype is {feature_dtype!r}; choose one of {', '.join(FEATURE_DTYPES)} "
                       f"(--feature-dtype of prepare).")


def shard_name(index: int) -> str:
    return f"shard-{int(index):05d}.safetensors"


def shard_index(name: str) -> int | None:
    m = SHARD_RE.match(name)
    return int(m.group(1)) if m else None


def _tmp_name(path: Path) -> Path:
    """A temporary name beside ``path``, unique per host and process (several machines may share the folder);
    it does not match :data:`SHARD_RE`, so it is never taken for a finished shard."""
    host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:40]
    return path.with_name(f".{path.name}.tmp-{host}-{os.getpid()}")


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = _tmp_name(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_shard(path: str | os.PathLike[str], samples: list[dict[str, Tensor]], meta: list[dict],
                *, report: FilterReport | None = None, settings: Mapping[str, Any] | None = None,
                dtypes: Mapping[str, torch.dtype] | None = None) -> None:
    """Stack ``samples`` (each a dict of :data:`TENSOR_KEYS` -> per-sample tensor) into one shard at ``path``,
    atomically (temporary name, then rename).  ``meta[i]`` = ``{"key", "identity", "caption"}`` of sample i.
    ``dtypes``: the stored dtype per key (:func:`stored_dtypes`; default :data:`DTYPES`)."""
    from safetensors.torch import save_file

    path = Path(path)
    if len(samples) != len(meta):
        raise ValueError(f"write_shard: {len(samples)} samples but {len(meta)} metadata entries")
    tensors: dict[str, Tensor] = {}
    if samples:
        for key, dtype in (dtypes or DTYPES).items():
            missing = [i for i, s in enumerate(samples) if key not in s]
            if missing:
                raise ValueError(f"write_shard: sample {missing[0]} has no {key!r} tensor")
            tensors[key] = torch.stack([s[key].detach().to("cpu", dtype) for s in samples]).contiguous()
    metadata = {"format": FORMAT, "version": str(VERSION),
                "samples": json.dumps([{k: str(m[k]) for k in ("key", "identity", "caption")} for m in meta]),
                "report": json.dumps((report or FilterReport()).as_dict()),
                "settings": json.dumps(dict(settings or {}), sort_keys=True, default=str)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@dataclass
class ShardInfo:
    """What one finished shard's header says (no tensor is read)."""

    file: str
    count: int
    samples: list[dict[str, str]]
    report: FilterReport
    settings: dict[str, Any]
    shapes: dict[str, tuple[int, ...]]


def read_shard_info(path: str | os.PathLike[str]) -> ShardInfo:
    """Header of a shard; ModelFileError naming the file (delete it to have prepare redo it) when unreadable."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise ModelFileError(f"Shard {path} is not readable ({exc}); delete it and run prepare again to redo it.") from exc
    if meta.get("format") != FORMAT:
        raise ModelFileError(f"{path} is not a HyperLoRA training shard (format {meta.get('format')!r}).")
    try:
        samples = json.loads(meta.get("samples", "[]"))
        report = FilterReport.from_dict(json.loads(meta.get("report", "{}")))
        settings = json.loads(meta.get("settings", "{}"))
    except ValueError as exc:
        raise ModelFileError(f"Shard {path} has damaged metadata ({exc}); delete it and run prepare again.") from exc
    counts = {s[0] for s in shapes.values()}
    if len(counts) > 1 or (counts and counts != {len(samples)}) or (not counts and samples):
        raise ModelFileError(f"Shard {path}: tensor rows {sorted(counts)} do not match its {len(samples)} samples; "
                             "delete it and run prepare again.")
    return ShardInfo(path.name, len(samples), samples, report, settings, shapes)


@dataclass
class Manifest:
    """``manifest.json`` of a shard folder."""

    folder: Path
    shards: list[dict[str, Any]]
    planned: int
    complete: bool
    encoders: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    sizes: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return sum(int(s["count"]) for s in self.shards)

    def as_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "shards": self.shards, "planned": self.planned,
                "complete": self.complete, "count": self.count, "encoders": self.encoders, "report": self.report,
                "sizes": self.sizes, "settings": self.settings}


def finished_shards(folder: str | os.PathLike[str]) -> dict[int, Path]:
    """Index -> path of every finished shard file in ``folder`` (temporary files are not shards)."""
    folder = Path(folder)
    out: dict[int, Path] = {}
    if folder.is_dir():
        for p in folder.iterdir():
            i = shard_index(p.name)
            if i is not None and p.is_file():
                out[i] = p
    return dict(sorted(out.items()))


def rebuild_manifest(folder: str | os.PathLike[str], *, planned: int, encoders: Mapping[str, Any],
                     sizes: Mapping[str, Any], settings: Mapping[str, Any]) -> Manifest:
    """Write ``manifest.json`` from the finished shards of ``folder`` (atomic) and return it."""
    folder = Path(folder)
    report = FilterReport()
    shards = []
    for i, path in finished_shards(folder).items():
        info = read_shard_info(path)
        report.add(info.report)
        shards.append({"file": info.file, "count": info.count})
    manifest = Manifest(folder, shards, int(planned), complete=len(shards) >= planned, encoders=dict(encoders),
                        report=report.as_dict(), sizes=dict(sizes), settings=dict(settings))
    _atomic_write_bytes(folder / MANIFEST, json.dumps(manifest.as_dict(), indent=2, default=str).encode("utf-8"))
    return manifest


def read_manifest(folder: str | os.PathLike[str]) -> Manifest:
    """The manifest of a shard folder; ModelFileError / SettingError naming the folder and the fix."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SettingError(f"Training data folder {folder} does not exist; run `python -m hyperlora.train prepare "
                           f"--out {folder}` first, or fix the data path.")
    path = folder / MANIFEST
    if not path.is_file():
        raise ModelFileError(f"{folder} has no {MANIFEST}: it is not a prepared shard folder (or prepare did not "
                             "finish a shard yet). Run `python -m hyperlora.train prepare` into it.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"{path} is not readable JSON ({exc}); run prepare again into {folder} to rebuild it.") from exc
    if data.get("format") != FORMAT or int(data.get("version", 0)) != VERSION:
        raise ModelFileError(f"{path} is not a version-{VERSION} {FORMAT} manifest (got {data.get('format')!r} "
                             f"v{data.get('version')}); prepare the data again with this version.")
    for s in data.get("shards", []):
        if not (folder / s["file"]).is_file():
            raise ModelFileError(f"{folder}: shard {s['file']} listed in {MANIFEST} is missing; run prepare again "
                                 "into the folder to redo it.")
    return Manifest(folder, list(data.get("shards", [])), int(data.get("planned", 0)), bool(data.get("complete")),
                    dict(data.get("encoders", {})), dict(data.get("report", {})), dict(data.get("sizes", {})),
                    dict(data.get("settings", {})))


@dataclass
class FolderSize:
    """What a shard folder's finished shards take on disk (headers included), and per sample."""

    samples: int
    file_bytes: int
    shards: int
    tensor_bytes: dict[str, int] = field(default_factory=dict)
    """Bytes per sample of each tensor key (from the headers: shape and dtype), for the breakdown."""

    @property
    def per_sample(self) -> float:
        """Bytes on disk per sample (0 when there is no sample)."""
        return self.file_bytes / self.samples if self.samples else 0.0

    def projected(self, samples: int) -> float:
        """Bytes that ``samples`` samples would take at this folder's size per sample."""
        return self.per_sample * samples


_HEADER_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                       "BOOL": 1}


def folder_size(folder: str | os.PathLike[str]) -> FolderSize:
    """The size of the finished shards of ``folder`` (file sizes, and per-key tensor bytes from the headers)."""
    from safetensors import safe_open

    total = count = 0
    per_key: dict[str, int] = {}
    shards = finished_shards(folder)
    for path in shards.values():
        total += path.stat().st_size
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                shape = sl.get_shape()
                if not shape or shape[0] == 0:
                    continue
                if key not in per_key:
                    row = 1
                    for d in shape[1:]:
                        row *= int(d)
                    per_key[key] = row * _HEADER_DTYPE_BYTES.get(sl.get_dtype(), 4)
        count += read_shard_info(path).count
    return FolderSize(samples=count, file_bytes=total, shards=len(shards), tensor_bytes=per_key)


def stack_check(samples: Sequence[dict[str, Tensor]]) -> None:
    """Raise ValueError when the samples' tensors cannot be stacked (differing shapes)."""
    for key in TENSOR_KEYS:
        shapes = {tuple(s[key].shape) for s in samples if key in s}
        if len(shapes) > 1:
            raise ValueError(f"samples have different {key} shapes {sorted(shapes)}")


__all__ = ["DTYPES", "FEATURE_DTYPES", "FORMAT", "FolderSize", "MANIFEST", "Manifest", "ShardInfo", "TENSOR_KEYS",
           "VERSION", "finished_shards", "folder_size", "human_bytes", "read_manifest", "read_shard_info",
           "rebuild_manifest", "shard_index", "shard_name", "stored_dtypes", "write_shard"]
