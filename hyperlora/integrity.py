"""Integrity of model folders: the SHA-256 recorded at download time, checked when a model is loaded.

A damaged file whose values stay finite (a region overwritten by zeros, a bad copy) passes every
format check and silently gives a wrong LoRA.  The downloader (``hyperlora.tools.download``) writes
the hashes it verified beside the files, in ``spec.CHECKSUM_FILE``::

    {"format": "hyperlora-checksums", "version": 1,
     "files": {"resampler.safetensors": {"sha256": "<64 hex>", "size": 123, "source": "server"}, ...}}

``source`` says what the hash was checked against when it was recorded: ``server`` (the SHA-256 the
server announced), ``known`` (this pack's table), ``download`` (no hash announced: computed from the
bytes that passed the size and format checks), ``zip`` (extracted from a CRC-checked zip) or ``local``
(a file that was already there, recorded as found).

:func:`verify_folder` compares the files with their record.  Hashing 3 GB takes seconds, so a file
that matched is remembered in a user cache (``$HYPERLORA_CACHE/integrity.json``, else
``~/.cache/hyperlora/integrity.json``) keyed by the file's identity and change times as ``stat`` gives
them: (path, device, inode, size, modification time, status-change time, all times in ns), see
:func:`file_state`.  A normal load only ``stat``s the files (``bench/bench_integrity.py`` measures it).

Why the status-change time (``st_ctime`` on Linux and macOS): anyone can put a file's modification time
back (``touch -d``, ``os.utime``) after editing it, but the kernel sets the ctime to "now" on every write,
``utime``, rename or permission change, and only root can set it back (by changing the system clock or
editing the file system offline).  A file replaced by another one (a copy renamed over it) has another
inode.  So an edit made with ordinary rights is always hashed again; false alarms (a ``chmod``, a move)
only cost one more hash.  Limit: on Windows ``st_ctime`` is the creation time before Python 3.12, so
there the key protects against a replaced file (new creation time) but not against an in-place edit
whose modification time was restored; damage below the file system (a failing disk) changes no time
anywhere - the downloader's re-run (:func:`verify_folder` on a fresh cache) hashes everything again.

A folder without a record (copied by hand) loads as before, reported as unverified with a logged
warning that names the command recording its hashes (:func:`verify_command`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ModelFileError
from .spec import (ANTELOPE_SUBDIR, CHECKSUM_FILE, CLIP_VIT_SUBDIR, HYPER_LORA_DIR, INSIGHTFACE_DIR, MODELS_SUBDIR,
                   PACK_FOLDER)

log = logging.getLogger(__name__)

CHECKSUM_FORMAT = "hyperlora-checksums"
CHECKSUM_VERSION = 1
SOURCES = ("server", "known", "download", "zip", "local")
CACHE_ENV = "HYPERLORA_CACHE"
CACHE_FILE = "integrity.json"
CACHE_VERSION = 2                 # 1: keyed by (path, size, mtime) only; its entries are dropped
CACHE_LIMIT = 512                 # entries kept in the verified cache (oldest dropped)
CHUNK = 8 << 20                   # bytes hashed between interrupt checks (~5 ms)
RELEASED_MODELS = {"fidelity": "sdxl_hyper_id_lora_v1_fidelity", "edit": "sdxl_hyper_id_lora_v1_edit"}
"""``--model`` of the downloader -> the released model's folder name."""
GENERIC_FIX = ("download the model again (python -m hyperlora.tools.download --models-dir <ComfyUI models folder> "
               "replaces damaged files), or delete the folder and copy it again from a good source")

_unverified_logged: set[str] = set()
_log_lock = threading.Lock()


@dataclass(frozen=True)
class FileRecord:
    """What the downloader verified about one file."""

    sha256: str
    size: int
    source: str = "download"


@dataclass(frozen=True)
class IntegrityReport:
    """Result of :func:`verify_folder` for one folder."""

    folder: Path
    recorded: bool                                  # the folder has a CHECKSUM_FILE
    hashed: tuple[str, ...] = ()                    # files hashed now (first check, or changed since)
    cached: tuple[str, ...] = ()                    # files that matched before and are unchanged (stat only)
    unlisted: tuple[str, ...] = ()                  # files the caller uses that the record does not cover
    sources: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def state(self) -> str:
        """``verified`` (every used file matches its record), ``partly verified`` or ``unverified``."""
        if not self.recorded or not (self.hashed or self.cached):
            return "unverified"
        return "partly verified" if self.unlisted else "verified"

    def describe(self) -> str:
        """One line for the Loader's info output (for an unverified folder: how to verify it)."""
        if not self.recorded:
            return (f"UNVERIFIED (no {CHECKSUM_FILE}: copied by hand or downloaded by another tool, so a damaged "
                    f"file would not be noticed). To verify it, {verify_hint(self.folder)}")
        n = len(self.hashed) + len(self.cached)
        how = (f"SHA-256 checked now in {self.seconds:.1f} s" if self.hashed else
               "unchanged since an earlier check: same file, size, modification and change times")
        text = f"{self.state}: {n} file(s) match {CHECKSUM_FILE} ({how})"
        if self.unlisted:
            text += f"; not recorded: {', '.join(self.unlisted)}"
        return text


# --------------------------------------------------------------------------- advice


def _download_command(folder: Path) -> str | None:
    """The downloader's command line for ``folder`` when it sits in the released layout
    (``<models>/hyper_lora/hyper_lora/<model>``, ``<models>/hyper_lora/clip_vit/<name>``,
    ``<models>/insightface/models/<name>``), else None."""
    parents = folder.parents
    released = ((HYPER_LORA_DIR, MODELS_SUBDIR), (HYPER_LORA_DIR, CLIP_VIT_SUBDIR),
                (INSIGHTFACE_DIR, ANTELOPE_SUBDIR.split("/")[0]))
    layout = len(parents) >= 3 and (parents[1].name, parents[0].name) in released
    if not layout:
        return None
    key = next((k for k, v in RELEASED_MODELS.items() if v == folder.name), None)
    which = f" --model {key}" if key else ""
    return f"python -m hyperlora.tools.download --models-dir \"{parents[2]}\"{which}"


def redownload_hint(folder: str | os.PathLike[str]) -> str:
    """How to repair a damaged file of ``folder``: the download command for its models folder when the folder
    sits in the released layout, else :data:`GENERIC_FIX`."""
    command = _download_command(Path(folder))
    if command is None:
        return GENERIC_FIX
    return (f"run {command} from the {PACK_FOLDER} folder (it keeps the good files and downloads damaged or "
            f"missing ones again)")


def verify_hint(folder: str | os.PathLike[str]) -> str:
    """How to verify a folder that has no CHECKSUM_FILE: the download command (it compares the files with the
    SHA-256 the server announces, fetches differing ones again and records the hashes) in the released layout,
    else comparing with a good copy and recording the hashes."""
    folder = Path(folder)
    command = _download_command(folder)
    if command is None:
        return ("put it in ComfyUI's models folder in the README's layout (models/hyper_lora/hyper_lora/<model>) and "
                "run python -m hyperlora.tools.download --models-dir <ComfyUI models folder> from the "
                f"{PACK_FOLDER} folder, or compare its files with a good copy (sha256sum).")
    return (f"run {command} from the {PACK_FOLDER} folder: it compares the files with the SHA-256 Hugging Face "
            f"announces, downloads differing ones again and records their hashes in {CHECKSUM_FILE}.")


# --------------------------------------------------------------------------- files


def sha256_file(path: str | os.PathLike[str], *, check_interrupt: Callable[[], None] | None = None) -> str:
    """Hex SHA-256 of a file, read in 8 MB pieces; ``check_interrupt`` between pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            if check_interrupt is not None:
                check_interrupt()
    return h.hexdigest()


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` under a temporary name, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_checksums(folder: str | os.PathLike[str], records: dict[str, FileRecord]) -> Path:
    """Write (atomically) the record of ``folder``'s files: ``{file name: FileRecord}``."""
    folder = Path(folder)
    body = {"format": CHECKSUM_FORMAT, "version": CHECKSUM_VERSION,
            "files": {name: {"sha256": r.sha256, "size": r.size, "source": r.source}
                      for name, r in sorted(records.items())}}
    path = folder / CHECKSUM_FILE
    write_text_atomic(path, json.dumps(body, indent=1) + "\n")
    return path


def record_files(folder: str | os.PathLike[str], names: Sequence[str], *, source: str = "local",
                 check_interrupt: Callable[[], None] | None = None) -> dict[str, FileRecord]:
    """Hash the files ``names`` of ``folder`` as they are now (no comparison with anything)."""
    folder = Path(folder)
    return {name: FileRecord(sha256_file(folder / name, check_interrupt=check_interrupt),
                             (folder / name).stat().st_size, source) for name in names}


def read_checksums(folder: str | os.PathLike[str], *, fix: str = GENERIC_FIX) -> dict[str, FileRecord] | None:
    """The record of ``folder`` (None when it has none); :class:`ModelFileError` ending in ``fix`` when it is
    unreadable."""
    path = Path(folder) / CHECKSUM_FILE

    def _damaged_record(path: Path, why: str) -> ModelFileError:
        return ModelFileError(
            f"The checksum file '{path}' is damaged ({why}), so the model files beside it cannot be checked; the "
            f"disk may be failing. Delete it, then {fix}.")

    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _damaged_record(path, f"not readable JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != CHECKSUM_FORMAT or not isinstance(data.get("files"), dict):
        raise _damaged_record(path, f"not a {CHECKSUM_FORMAT} file")
    if not isinstance(data.get("version"), int) or data["version"] > CHECKSUM_VERSION:
        raise ModelFileError(f"'{path}' was written by a newer HyperLoRA Studio (version {data.get('version')!r}); "
                             f"update HyperLoRA Studio to check these files.")
    out: dict[str, FileRecord] = {}
    for name, item in data["files"].items():
        sha = item.get("sha256") if isinstance(item, dict) else None
        size = item.get("size") if isinstance(item, dict) else None
        if (not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha)
                or not isinstance(size, int) or size < 0 or "/" in name or "\\" in name or name in ("", ".", "..")):
            raise _damaged_record(path, f"the entry for '{name}' is not a file name with a SHA-256 and a size")
        out[name] = FileRecord(sha, size, str(item.get("source", "download")))
    return out


# --------------------------------------------------------------------------- verified cache


def cache_path() -> Path:
    """``$HYPERLORA_CACHE/integrity.json``, else ``$XDG_CACHE_HOME/hyperlora/integrity.json`` (``~/.cache``)."""
    root = os.environ.get(CACHE_ENV)
    if not root:
        root = str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hyperlora")
    return Path(root) / CACHE_FILE


def file_state(st: os.stat_result) -> dict[str, int]:
    """What the verified cache compares: ``{"size", "mtime_ns", "ctime_ns", "ino", "dev"}`` of a ``stat``.

    Equal states mean the same file (device, inode) not written since (size, mtime and the status-change
    time, which the kernel sets on every write or ``utime`` and only root can put back; see the module
    docstring for the Windows limit)."""
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino,
            "dev": st.st_dev}


class VerifiedCache:
    """Files whose SHA-256 matched their record: resolved path -> :func:`file_state` and SHA-256.

    Read lazily, tolerant of a missing or corrupt file (it is simply rebuilt), written atomically
    (merged with what another process may have written meanwhile).  Thread-safe.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else cache_path()
        self._entries: dict[str, dict[str, Any]] | None = None
        self._lock = threading.Lock()

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if isinstance(data, dict) and data.get("version") == 1:
                return {}                                   # the old (path, size, mtime) key: hash again once
            entries = data["entries"] if isinstance(data, dict) and data.get("version") == CACHE_VERSION else None
            if isinstance(entries, dict):
                return {k: v for k, v in entries.items() if isinstance(v, dict)}
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
            log.info("HyperLoRA: the integrity cache %s is unreadable (%s); it is rebuilt", self.path, exc)
            return {}
        log.info("HyperLoRA: the integrity cache %s has an unknown layout; it is rebuilt", self.path)
        return {}

    def _loaded(self) -> dict[str, dict[str, Any]]:
        if self._entries is None:
            self._entries = self._read()
        return self._entries

    @staticmethod
    def key(path: Path) -> str:
        return str(path.resolve())

    def get(self, path: Path, state: dict[str, int]) -> str | None:
        """The SHA-256 this file had when it last matched, if its :func:`file_state` is still ``state``."""
        with self._lock:
            entry = self._loaded().get(self.key(path))
        if entry and all(entry.get(k) == v for k, v in state.items()):
            sha = entry.get("sha256")
            return sha if isinstance(sha, str) else None
        return None

    def put(self, path: Path, state: dict[str, int], sha256: str) -> None:
        """Remember that ``path`` with :func:`file_state` ``state`` has ``sha256``."""
        with self._lock:
            self._loaded()[self.key(path)] = {**state, "sha256": sha256, "checked": time.time()}

    def save(self) -> None:
        """Merge into the file on disk and write it atomically; a read-only cache folder only logs."""
        with self._lock:
            merged = self._read()
            merged.update(self._loaded())
            if len(merged) > CACHE_LIMIT:
                keep = sorted(merged.items(), key=lambda kv: kv[1].get("checked", 0))[-CACHE_LIMIT:]
                merged = dict(keep)
            self._entries = merged
            try:
                write_text_atomic(self.path, json.dumps({"version": CACHE_VERSION, "entries": merged}, indent=1) + "\n")
            except OSError as exc:
                log.warning("HyperLoRA: cannot write the integrity cache %s (%s); files will be hashed again "
                            "next time", self.path, exc)


_DEFAULT_CACHE: VerifiedCache | None = None


def default_cache() -> VerifiedCache:
    """The process-wide cache at :func:`cache_path` (made on first use; follows a changed environment)."""
    global _DEFAULT_CACHE
    if _DEFAULT_CACHE is None or _DEFAULT_CACHE.path != cache_path():
        _DEFAULT_CACHE = VerifiedCache()
    return _DEFAULT_CACHE


# --------------------------------------------------------------------------- checking


def file_matches(path: Path, record: FileRecord, cache: VerifiedCache, *,
                 check_interrupt: Callable[[], None] | None = None) -> tuple[bool, bool]:
    """``(matches, from_cache)``: is ``path`` the file ``record`` describes?  Size first (free), then
    the cache, then the SHA-256 (remembered in ``cache`` when it matches)."""
    st = path.stat()
    if st.st_size != record.size:
        return False, False
    state = file_state(st)
    if cache.get(path, state) == record.sha256:
        return True, True
    if sha256_file(path, check_interrupt=check_interrupt) != record.sha256:
        return False, False
    cache.put(path, state, record.sha256)
    return True, False


def verify_folder(folder: str | os.PathLike[str], *, uses: Sequence[str] = (), cache: VerifiedCache | None = None,
                  fix: str = GENERIC_FIX, check_interrupt: Callable[[], None] | None = None) -> IntegrityReport:
    """Check the files of ``folder`` against its CHECKSUM_FILE.

    ``uses``: the names of the files the caller may read (whether they exist or not); only recorded
    files among them are checked, and existing ones the record lacks are reported as not recorded.
    Empty: every recorded file is checked.  Raises :class:`ModelFileError` naming the file and ``fix``
    for a checked file that is missing, has another size or another SHA-256.  Without a record: an
    unverified report (logged once per folder).
    """
    folder = Path(folder)
    start = time.perf_counter()
    records = read_checksums(folder, fix=fix)
    if records is None:
        key = str(folder.resolve())
        with _log_lock:
            first = key not in _unverified_logged
            _unverified_logged.add(key)
        if first:
            log.warning("HyperLoRA: %s has no %s (copied by hand?): its files are loaded UNVERIFIED, a damaged file "
                        "would give wrong LoRAs without any other sign. To verify it, %s", folder, CHECKSUM_FILE,
                        verify_hint(folder))
        return IntegrityReport(folder, recorded=False, unlisted=tuple(n for n in uses if (folder / n).is_file()))
    cache = cache or default_cache()
    hashed, cached = [], []
    for name, record in records.items():
        if uses and name not in uses:
            continue
        path = folder / name
        if not path.is_file():
            raise ModelFileError(
                f"'{path}' is missing, but '{folder / CHECKSUM_FILE}' records it as part of this model: the folder "
                f"is incomplete, and loading it without that file would silently give a different model. To repair "
                f"it, {fix}.")
        ok, from_cache = file_matches(path, record, cache, check_interrupt=check_interrupt)
        if not ok:
            size = path.stat().st_size
            what = (f"has {size} bytes where {record.size} were recorded" if size != record.size else
                    f"does not have the SHA-256 recorded for it ({record.sha256[:16]}...)")
            raise ModelFileError(
                f"'{path}' {what} in '{folder / CHECKSUM_FILE}' when it was downloaded: the file was damaged since "
                f"(a disk or copy error, or it was edited), and a model loaded from it would give wrong LoRAs "
                f"without any other sign. To repair it, {fix}.")
        (cached if from_cache else hashed).append(name)
    if hashed:
        cache.save()
    return IntegrityReport(folder, recorded=True, hashed=tuple(hashed), cached=tuple(cached),
                           unlisted=tuple(n for n in uses if n not in records and (folder / n).is_file()),
                           sources={n: r.source for n, r in records.items()},
                           seconds=time.perf_counter() - start)


__all__ = ["CHECKSUM_FORMAT", "FileRecord", "IntegrityReport", "RELEASED_MODELS", "VerifiedCache", "cache_path",
           "default_cache", "file_matches", "file_state", "read_checksums", "record_files", "redownload_hint",
           "sha256_file", "verify_folder", "verify_hint", "write_checksums", "write_text_atomic"]
