"""Training samples from a prepared shard folder (:mod:`hyperlora.train.shards`), memory-mapped.

Each item is a dict of the per-sample tensors of :data:`hyperlora.train.shards.TENSOR_KEYS` (stored
dtypes) plus ``"identity"``, ``"key"`` and ``"caption"`` strings; ``torch.utils.data.default_collate``
batches them.  Tensors are read row by row through ``safetensors.safe_open`` (memory-mapped), so a
dataset of any size costs only its index in memory; open files are per process (DataLoader workers
reopen them).

``fit``'s batches: :class:`BatchPlan` maps micro-batch ``m`` of a process to dataset indices (a permutation
per epoch seeded by ``(seed, epoch)``), :class:`PlanSampler` feeds that plan to a ``DataLoader`` from any
micro-batch (resume), and :func:`collate` stacks a batch's tensors: ``{key: [B, ...]}`` float32.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import SettingError
from .shards import TENSOR_KEYS, Manifest, read_manifest, read_shard_info


class ShardDataset(torch.utils.data.Dataset):
    """Samples of the shards listed in ``folder``'s manifest, optionally only of some ``identities``."""

    def __init__(self, folder: str | os.PathLike[str], *, identities: Collection[str] | None = None) -> None:
        self.folder = Path(folder)
        self.manifest: Manifest = read_manifest(self.folder)
        self._files: list[Path] = []
        self._index: list[tuple[int, int]] = []     # (file number, row)
        self._meta: list[dict[str, str]] = []
        wanted = None if identities is None else {str(i) for i in identities}
        for entry in self.manifest.shards:
            path = self.folder / entry["file"]
            info = read_shard_info(path)
            f = len(self._files)
            self._files.append(path)
            for row, sample in enumerate(info.samples):
                if wanted is None or sample["identity"] in wanted:
                    self._index.append((f, row))
                    self._meta.append(sample)
        if wanted is not None and not self._index:
            known = sorted(self.identities_in_manifest())
            raise SettingError(
                f"None of the identities {sorted(wanted)[:5]} is in {self.folder} (it has {len(known)}: "
                f"{known[:5]}{'...' if len(known) > 5 else ''}); fix the identity list.")
        self._handles: dict[int, Any] = {}

    def identities_in_manifest(self) -> set[str]:
        """Every identity of the folder (whatever the filter)."""
        out: set[str] = set()
        for path in self._files:
            out.update(s["identity"] for s in read_shard_info(path).samples)
        return out

    @property
    def identities(self) -> list[str]:
        """Identities of this dataset's samples, sorted."""
        return sorted({m["identity"] for m in self._meta})

    def meta(self, i: int) -> dict[str, str]:
        """``{"key", "identity", "caption"}`` of sample ``i``."""
        return dict(self._meta[i])

    def __len__(self) -> int:
        return len(self._index)

    def _open(self, f: int) -> Any:
        from safetensors import safe_open

        handle = self._handles.get(f)
        if handle is None:
            handle = safe_open(str(self._files[f]), framework="pt")
            self._handles[f] = handle
        return handle

    def __getitem__(self, i: int) -> dict[str, Tensor | str]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} of {len(self)}")
        f, row = self._index[i]
        handle = self._open(f)
        item: dict[str, Tensor | str] = {k: handle.get_slice(k)[row:row + 1][0] for k in TENSOR_KEYS}
        item.update(self._meta[i])
        return item

    def __getstate__(self) -> dict[str, Any]:   # DataLoader workers / spawn: file handles are not picklable
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state


def sample_identities(dataset: torch.utils.data.Dataset) -> list[str]:
    """The identity of every sample of ``dataset``: a :class:`ShardDataset` (from its index, no tensor read),
    a ``ConcatDataset`` of datasets, or any dataset whose items carry ``"identity"``."""
    if isinstance(dataset, ShardDataset):
        return [m["identity"] for m in dataset._meta]
    if isinstance(dataset, torch.utils.data.ConcatDataset):
        return [i for part in dataset.datasets for i in sample_identities(part)]
    return [str(dataset[i]["identity"]) for i in range(len(dataset))]   # type: ignore[arg-type]


class OtherPhotos:
    """For ``"id_photo": "other"``: each sample's ID features (:data:`ID_KEYS`) replaced by those of another
    photo of the same identity.  With ``across=True`` (``"id_photo": "shuffled"``, a control that must fail):
    by those of a photo of *another* identity, so the ID features say nothing of who is in the picture.

    ``pick`` draws, for sample index ``i``, a different index of the same identity with ``gen`` (uniform
    over the others); an identity with a single photo keeps its own.  ``across``: an index of another
    identity, uniform over all of their photos.  Deterministic in ``gen``.
    """

    ID_KEYS = ("arcface", "clip_id")

    def __init__(self, dataset: torch.utils.data.Dataset, *, across: bool = False) -> None:
        self.dataset = dataset
        self.across = across
        self.identity = sample_identities(dataset)
        self.groups: dict[str, list[int]] = {}
        for i, name in enumerate(self.identity):
            self.groups.setdefault(name, []).append(i)
        if across and len(self.groups) < 2:
            raise SettingError(f"'id_photo': \"shuffled\" needs photos of two identities or more; the training set "
                               f"holds {len(self.groups)}.")

    @property
    def singletons(self) -> int:
        """Number of samples whose identity has no other photo."""
        return sum(len(g) for g in self.groups.values() if len(g) == 1)

    def pick(self, i: int, gen: torch.Generator) -> int:
        if self.across:         # uniform over the photos of the other identities
            group = self.groups[self.identity[i]]
            k = int(torch.randint(0, len(self.identity) - len(group), (1,), generator=gen))
            for name, members in self.groups.items():
                if name == self.identity[i]:
                    continue
                if k < len(members):
                    return members[k]
                k -= len(members)
            raise RuntimeError(f"no photo of another identity for sample {i}")   # k < their photos: not reached
        group = self.groups[self.identity[i]]
        if len(group) == 1:
            return i
        k = int(torch.randint(0, len(group) - 1, (1,), generator=gen))
        j = group[k]
        return group[-1] if j == i else j      # uniform over the other len - 1 photos

    def apply(self, samples: list[dict[str, Any]], indices: list[int], gen: torch.Generator) -> list[dict[str, Any]]:
        """``samples`` (the items of ``indices``) with the ID features of other photos (new dicts)."""
        if len(samples) != len(indices):
            raise ValueError(f"{len(samples)} samples but {len(indices)} indices")
        out = []
        for item, i in zip(samples, indices):
            j = self.pick(i, gen)
            new = dict(item)
            if j != i:
                other = self.dataset[j]
                new.update({k: other[k] for k in self.ID_KEYS})
                new["id_source"] = j
            out.append(new)
        return out


SAMPLE_KEYS = ("arcface", "clip_id", "clip_base", "latents", "time_ids", "text", "pooled", "text_plain",
               "pooled_plain")
"""The per-sample tensors fit reads from a shard (:data:`hyperlora.train.shards.TENSOR_KEYS` lists what is stored)."""


def collate(samples: Sequence[Mapping[str, Any]], device: torch.device,
            keys: Sequence[str] = SAMPLE_KEYS) -> dict[str, Tensor]:
    """Stack the per-sample tensors ``keys`` (float32, on ``device``): ``{key: [N, ...]}``; strings are dropped."""
    out: dict[str, Tensor] = {}
    for key in keys:
        if key not in samples[0]:
            raise SettingError(f"training samples lack '{key}'; the shards were not written by "
                               f"'python -m hyperlora.train prepare' (format in docs/training.md).")
        out[key] = torch.stack([torch.as_tensor(s[key]) for s in samples]).to(device=device, dtype=torch.float32)
    return out


class BatchPlan:
    """Deterministic batches: micro-batch ``m`` of process ``rank`` -> dataset indices.

    Each epoch is a permutation seeded by ``(seed, epoch)``; the global batch of ``batch x world``
    indices is cut into one slice per process; incomplete global batches at the end of an epoch are
    dropped.  A function of ``m`` alone, so resuming needs nothing but the micro-batch counter.
    """

    def __init__(self, n: int, batch: int, *, seed: int, rank: int = 0, world: int = 1) -> None:
        self.per_epoch = n // (batch * world)
        if self.per_epoch < 1:
            raise SettingError(f"the shards hold {n} samples, fewer than one global batch ({batch} x {world} "
                               f"processes); lower 'batch_size' or prepare more data.")
        self.n, self.batch, self.seed, self.rank, self.world = n, batch, seed, rank, world
        self._cache: tuple[int, list[int]] | None = None

    def indices(self, m: int) -> list[int]:
        epoch, j = divmod(m, self.per_epoch)
        if self._cache is None or self._cache[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cache = (epoch, torch.randperm(self.n, generator=g).tolist())
        start = (j * self.world + self.rank) * self.batch
        return self._cache[1][start:start + self.batch]


class PlanSampler:
    """An endless batch sampler over :class:`BatchPlan` from micro-batch ``start`` (for ``DataLoader``)."""

    def __init__(self, plan: BatchPlan, start: int) -> None:
        self.plan, self.start = plan, start

    def __iter__(self) -> Iterator[list[int]]:
        m = self.start
        while True:
            yield self.plan.indices(m)
            m += 1


def sample_list(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The DataLoader's ``collate_fn`` of ``fit``: the samples as they are (a list; :func:`collate` stacks them
    later, after ``id_photo`` "other" has swapped features)."""
    return list(items)


def open_dataset(shards: Sequence[str], identities: Collection[str] | None = None) -> torch.utils.data.Dataset:
    """The samples of the shard folders ``shards`` (of ``identities`` only, when given), one dataset over all."""
    parts = [ShardDataset(Path(s), identities=identities) for s in shards]
    return parts[0] if len(parts) == 1 else torch.utils.data.ConcatDataset(parts)


__all__ = ["BatchPlan", "OtherPhotos", "PlanSampler", "SAMPLE_KEYS", "ShardDataset", "collate", "open_dataset",
           "sample_identities", "sample_list"]
