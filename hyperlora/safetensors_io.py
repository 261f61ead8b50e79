"""Minimal, strict safetensors reading without memory maps or pickles.

* :func:`read_header` parses only the JSON header (8-byte little-endian length + JSON) and checks
  that every tensor's byte range fits its dtype/shape and the file (catches truncated downloads
  and files that are not safetensors at all, e.g. a pickle renamed or an HTML error page).
* :class:`TensorReader` reads one tensor at a time with ``readinto`` into a reusable staging
  buffer, so reading a 3 GB file costs one tensor of extra RAM and the page cache is never
  mapped into the process (it does not count against its RSS).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checks import atomic_temp_name
from .errors import HyperLoRAError, ModelFileError

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}
_ITEMSIZE = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors dtype code, e.g. "F16"
    shape: tuple[int, ...]
    begin: int  # byte offsets relative to the start of the data section
    end: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    tensors: dict[str, TensorInfo]  # file order of the header
    metadata: dict[str, str]
    data_start: int  # absolute byte offset of the data section


def _not_safetensors(path: Path, why: str) -> ModelFileError:
    return ModelFileError(
        f"'{path}' is not a valid safetensors file ({why}). The released model files are .safetensors; "
        f"an interrupted download or a saved error page causes this: download the file again.")


def read_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Parse and validate the header of a safetensors file (reads no tensor data)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _not_safetensors(path, f"only {len(head)} bytes long")
            n = int.from_bytes(head, "little")
            if n <= 1 or n > min(MAX_HEADER, size - 8):
                raise _not_safetensors(path, f"header length field {n} does not fit a {size}-byte file")
            raw = f.read(n)
    except OSError as exc:
        raise ModelFileError(f"cannot read '{path}' ({exc}); check that the file exists and is readable.") from exc
    if not raw.lstrip().startswith(b"{"):
        raise _not_safetensors(path, "no JSON header")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _not_safetensors(path, f"broken JSON header: {exc}") from exc
    if not isinstance(header, dict):
        raise _not_safetensors(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_size = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    for key, info in header.items():
        try:
            code = info["dtype"]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (TypeError, KeyError, ValueError) as exc:
            raise _not_safetensors(path, f"entry '{key}' is malformed") from exc
        if code not in DTYPES:
            raise ModelFileError(
                f"'{path}': tensor '{key}' has dtype {code}; HyperLoRA weights must be floating point "
                f"(F16, BF16 or F32). The file is not a HyperLoRA model file: download the model again.")
        if end - begin != math.prod(shape) * _ITEMSIZE[code] or begin < 0:
            raise _not_safetensors(path, f"tensor '{key}' byte range does not match its shape {list(shape)}")
        if end > data_size:
            raise ModelFileError(
                f"'{path}' is truncated: tensor '{key}' ends at byte {end} of the data but the file holds only "
                f"{data_size}. The download was interrupted: download the file again.")
        tensors[key] = TensorInfo(code, shape, begin, end)
    return SafetensorsHeader(path, tensors, dict(metadata), 8 + n)


class TensorReader:
    """Reads tensors of one file one at a time into a reused staging buffer.

    ``read(key)`` returns a tensor *view of the staging buffer* (valid until the next call);
    ``read(key, copy=True)`` returns a fresh tensor.  Each tensor is checked for NaN/inf on
    the way (one cheap integer pass over bytes that are read anyway).
    """

    def __init__(self, header: SafetensorsHeader) -> None:
        self.header = header
        self._file = open(header.path, "rb")
        biggest = max((t.end - t.begin for t in header.tensors.values()), default=0)
        self._staging = torch.empty(max(biggest, 8), dtype=torch.uint8)
        self._scratch = np.empty((biggest + 7) // 8 + 1, dtype=np.uint64)  # viewable as any uint width

    def __enter__(self) -> "TensorReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def read(self, key: str, *, copy: bool = False) -> torch.Tensor:
        info = self.header.tensors[key]
        nbytes = info.end - info.begin
        buf = torch.empty(nbytes, dtype=torch.uint8) if copy else self._staging[:nbytes]
        self._file.seek(self.header.data_start + info.begin)
        view = memoryview(buf.numpy())
        got = 0
        while got < nbytes:
            n = self._file.readinto(view[got:])
            if not n:
                raise ModelFileError(f"'{self.header.path}' ended while reading tensor '{key}'; download it again.")
            got += n
        check_finite(buf.numpy(), info.dtype, path=self.header.path, key=key, scratch=self._scratch)
        return buf.view(info.torch_dtype).view(info.shape)


_FINITE_BITS: dict[str, tuple[type, int, int]] = {  # dtype -> (uint type, abs mask, first non-finite |bits|)
    "F16": (np.uint16, 0x7FFF, 0x7C00),
    "BF16": (np.uint16, 0x7FFF, 0x7F80),
    "F32": (np.uint32, 0x7FFFFFFF, 0x7F800000),
    "F64": (np.uint64, 0x7FFFFFFFFFFFFFFF, 0x7FF0000000000000),
}


def check_finite(raw: np.ndarray, code: str, *, path: Path, key: str, scratch: np.ndarray | None = None) -> None:
    """Raise when the raw bytes ``raw`` (uint8) of a ``code`` tensor hold NaN or inf.

    Works on the bit patterns: an IEEE value is inf/NaN iff its exponent bits are all ones,
    i.e. ``bits & abs_mask >= first_non_finite``.  One vectorised integer pass in numpy
    (single-threaded: immune to OpenMP thread oversubscription on busy machines).
    """
    utype, mask, limit = _FINITE_BITS[code]
    bits = raw.view(utype)
    if bits.size == 0:
        return
    out = scratch.view(utype)[: bits.size] if scratch is not None else None
    masked = np.bitwise_and(bits, utype(mask), out=out)
    if masked.max() >= limit:
        bad = int(np.count_nonzero(masked >= limit))
        raise ModelFileError(
            f"'{path}': tensor '{key}' contains {bad} NaN/inf value(s); the file is damaged (or was saved from a "
            f"diverged training run). Download the model again.")


def looks_pickled(path: str | os.PathLike[str]) -> bool:
    """True for a torch zip archive or a raw pickle, judged by the first bytes (never unpickled).

    Meant for a file that safetensors refused, to tell the user what it is instead."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return False
    return head == b"PK\x03\x04" or head[:1] == b"\x80"


@contextlib.contextmanager
def open_safetensors(path: Path, *, error: type[HyperLoRAError], name: str, pickle_fix: str,
                     fix: str) -> Iterator[Any]:
    """``safetensors.safe_open`` (torch, CPU) whose failures, also while reading inside the
    ``with`` block, become ``error`` naming the file and the fix: a missing file, a pickled PyTorch
    file (never opened: unpickling can run code; ``pickle_fix`` says what to do instead) and
    anything else safetensors cannot read (``fix``).  ``name`` says what the file should be."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise error(f"The {name} '{path}' does not exist; check the file name and folder.")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            yield f
    except (SafetensorError, OSError) as exc:
        if looks_pickled(path):
            article = "an" if name[:1].lower() in "aeiou" else "a"
            raise error(f"'{path}' is a pickled PyTorch file, not {article} {name}; this pack never unpickles files "
                        f"(they can run code). {pickle_fix}") from exc
        raise error(f"'{path}' is not a readable .safetensors {name} ({exc}); {fix}") from exc


def current_umask() -> int:
    """The process's umask (e.g. ``0o022``): from ``/proc/self/status`` where there is one (no change to the
    process), else by setting and restoring it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_file_atomic(tensors: dict[str, torch.Tensor], path: str | os.PathLike[str], *,
                     metadata: dict[str, str] | None = None) -> Path:
    """Write ``tensors`` as a .safetensors file at ``path`` atomically.

    The file is written next to its destination under a temporary name and renamed into
    place, so an interrupted save never leaves a half-written file under the real name
    (the previous file, if any, survives).  Tensors must be contiguous, on the CPU, and
    must not share storage (``safetensors`` refuses that).  The file gets the mode a plain ``open()``
    gives a new file (``0o666`` less the umask, as ComfyUI's own outputs), not the ``0o600`` that
    ``safetensors.torch.save_file`` leaves.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(atomic_temp_name(path.name))
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
