"""Fetch the released HyperLoRA models, CLIP ViT-L/14 and AntelopeV2 into ComfyUI's models folder.

``python -m hyperlora.tools.download --models-dir ComfyUI/models [--model fidelity|edit|all]``
puts every file where the released layout expects it (see the README tree):

    hyper_lora/clip_processor/clip_vit_large_14_processor/preprocessor_config.json
    hyper_lora/clip_vit/clip_vit_large_14/{config.json, model.safetensors}
    hyper_lora/hyper_lora/sdxl_hyper_id_lora_v1_{fidelity,edit}/{4 files}
    insightface/models/antelopev2/{5 .onnx files}

Downloads resume (``.part`` files and HTTP ``Range``), retry a cut connection,
log a line about every 5 %, and are verified before they get their final
name: the byte count against the server's length (and the size Hugging Face
lists), the SHA-256 when the server announces one (Hugging Face's X-Linked-Etag
of an LFS file is its SHA-256) or the table below has one, and the content itself (safetensors header and data
extent, JSON parse, zip CRCs). ``--base-url`` / ``HYPERLORA_DOWNLOAD_BASE``
send every request to a mirror that keeps the same paths.

The SHA-256 of every verified file is kept beside it (``hyperlora_checksums.json`` in each folder,
see :mod:`hyperlora.integrity`), so the Loader can tell a file damaged later. A folder's marker
file (``hyper_lora_modules.json``, CLIP's ``config.json``), which makes it appear in ComfyUI's
dropdown, is put in place last, after the checksums: a download that stops half-way never looks
finished. A re-run checks the files already there against their recorded hashes (files without a
record, copied by hand: against the SHA-256 the server announces, when it announces one), fetches damaged
or missing ones again and deletes the ``.corrupt`` / ``.bad`` leftovers of earlier attempts once a
file is good. ``--checksums-only`` records the hashes of model files you already have, offline.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import re
import shutil
import struct
import sys
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import DownloadError, HyperLoRAError, ModelFileError, SettingError, check_folder_option, os_error_line
from ..integrity import (RELEASED_MODELS, FileRecord, VerifiedCache, default_cache, file_matches,
                         read_checksums, record_files, redownload_hint, sha256_file, verify_folder, write_checksums)
from ..spec import (ANTELOPE_DIR, ANTELOPE_FILES, BASIS_FILE, CHECKSUM_FILE, ID_PROJECTOR_FILE, MARKER_FILE, RESAMPLER_FILE, clip_dir, clip_processor_dir, model_dir)

logger = logging.getLogger(__name__)

HF = "https://huggingface.co"
GITHUB = "https://github.com"
HYPERLORA_REPO = "bytedance-research/HyperLoRA"
CLIP_REPO = "openai/clip-vit-large-patch14"
MODELS = RELEASED_MODELS
MODEL_FILES = (BASIS_FILE, RESAMPLER_FILE, ID_PROJECTOR_FILE, MARKER_FILE)
"""The released files of a model folder; the marker (it makes the folder a model) last."""
CLIP_MARKER = "config.json"
"""What makes a CLIP folder appear in the Loader's list (fetched last in its folder)."""
ANTELOPEV2_FILES = ANTELOPE_FILES
LEFTOVER_SUFFIXES = (".corrupt", ".bad")
ANTELOPEV2_ZIP = "deepinsight/insightface/releases/download/v0.7/antelopev2.zip"
ANTELOPEV2_DIR = ANTELOPE_DIR
# Known SHA-256 of released files, filled only from public material (none published so far;
# Hugging Face still proves LFS files through the ETag it sends, see _announced_sha256).
KNOWN_SHA256: dict[str, str] = {}
CHUNK = 1 << 20
HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class RemoteFile:
    """One file to fetch: ``host`` + ``path`` (the mirror keeps ``path``) saved as ``dest`` under the models dir."""

    host: str
    path: str
    dest: str
    kind: str  # "safetensors" | "json" | "zip"

    def url(self, base: str | None) -> str:
        return f"{(base or self.host).rstrip('/')}/{self.path}"


def plan(*, model: str = "fidelity", clip: bool = True, antelopev2: bool = True) -> list[RemoteFile]:
    """The files to fetch for a choice of model(s) (``fidelity``, ``edit`` or ``all``)."""
    if model not in (*MODELS, "all"):
        raise DownloadError(f"--model must be fidelity, edit or all, not '{model}'.")
    files: list[RemoteFile] = []
    for key in (MODELS if model == "all" else [model]):
        folder = MODELS[key]
        for name in MODEL_FILES:
            kind = "json" if name.endswith(".json") else "safetensors"
            files.append(RemoteFile(HF, f"{HYPERLORA_REPO}/resolve/main/{folder}/{name}",
                                    f"{model_dir(folder)}/{name}", kind))
    if clip:
        files += [
            RemoteFile(HF, f"{CLIP_REPO}/resolve/main/preprocessor_config.json",
                       f"{clip_processor_dir()}/preprocessor_config.json", "json"),
            RemoteFile(HF, f"{CLIP_REPO}/resolve/main/model.safetensors",
                       f"{clip_dir()}/model.safetensors", "safetensors"),
            RemoteFile(HF, f"{CLIP_REPO}/resolve/main/{CLIP_MARKER}",
                       f"{clip_dir()}/{CLIP_MARKER}", "json"),
        ]
    if antelopev2:
        files.append(RemoteFile(GITHUB, ANTELOPEV2_ZIP, f"{ANTELOPE_DIR}.zip", "zip"))
    return files


# --------------------------------------------------------------------------- verification

def check_safetensors(path: Path) -> None:
    """Header parses and the tensors fill the file exactly; DownloadError otherwise."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise DownloadError(f"{path} is not a safetensors file (only {size} bytes).")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 << 20):
            raise DownloadError(f"{path} is not a safetensors file (header length {n} does not fit its {size} bytes).")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DownloadError(f"{path} has a corrupt safetensors header ({e}).") from e
    if not isinstance(header, dict):
        raise DownloadError(f"{path} has a corrupt safetensors header (not a JSON object).")
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise DownloadError(f"{path}: tensor '{key}' has no valid data_offsets in the header.") from e
    if 8 + n + end != size:
        raise DownloadError(f"{path} is truncated or padded: its header needs {8 + n + end} bytes, the file has {size}.")


def check_content(path: Path, kind: str) -> None:
    """Kind-specific integrity check of a finished file."""
    if kind == "safetensors":
        check_safetensors(path)
    elif kind == "json":
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DownloadError(f"{path} is not valid JSON ({e}).") from e
    elif kind == "zip":
        try:
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
        except (zipfile.BadZipFile, OSError) as e:
            raise DownloadError(f"{path} is not a valid zip file ({e}).") from e
        if bad is not None:
            raise DownloadError(f"{path}: member '{bad}' fails its CRC check.")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def probe(url: str, *, timeout: float = 30.0) -> tuple[str | None, int | None]:
    """(sha256, size) the server announces for ``url`` without downloading it, else (None, None).

    Hugging Face answers a HEAD on ``resolve/`` with a redirect carrying ``X-Linked-Etag`` (the
    SHA-256 of an LFS file) and ``X-Linked-Size``; redirects are not followed to keep them.
    """
    opener = urllib.request.build_opener(_NoRedirect)
    req = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "ComfyUI-HyperLoRA-download"})
    try:
        with opener.open(req, timeout=timeout) as resp:
            headers = resp.headers
    except urllib.error.HTTPError as e:
        headers = e.headers
        if headers is None or e.code >= 400:
            return None, None
    except (urllib.error.URLError, OSError, http.client.HTTPException):
        return None, None
    size = headers.get("X-Linked-Size")
    return _announced_sha256(headers), int(size) if size and size.isdigit() else None


def _announced_sha256(headers: http.client.HTTPMessage) -> str | None:
    for key in ("X-Linked-Etag", "ETag"):
        value = (headers.get(key) or "").strip().removeprefix("W/").strip('"').lower()
        if HEX64.match(value):
            return value
    return None


# --------------------------------------------------------------------------- transfer

def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"


def _transfer(url: str, part: Path, *, timeout: float) -> tuple[int, str | None]:
    """Append the rest of ``url`` to ``part`` (Range from its size). Returns (total size, announced sha256)."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "ComfyUI-HyperLoRA-download"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    req = urllib.request.Request(url, headers=headers)
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:
            part.unlink()  # our .part is not a prefix of the file any more: start over
            return _transfer(url, part, timeout=timeout)
        raise DownloadError(f"{url} answered HTTP {e.code} {e.reason}; check the address "
                            f"(or --base-url / HYPERLORA_DOWNLOAD_BASE).") from e
    with resp:
        sha = _announced_sha256(resp.headers)
        if offset and resp.status == 206:
            m = re.match(r"bytes (\d+)-\d+/(\d+)", resp.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != offset:
                raise DownloadError(f"{url} sent a Content-Range that does not continue {part}.")
            total = int(m.group(2))
            mode = "ab"
            if offset:
                logger.info("%s: resuming at %s", part.name.removesuffix(".part"), _human(offset))
        else:
            offset, mode = 0, "wb"
            length = resp.headers.get("Content-Length")
            total = int(length) if length is not None else -1
        done, next_mark = offset, 0.0
        if total > 0:
            next_mark = (done * 20 // total + 1) / 20
        with part.open(mode) as f:
            while chunk := resp.read(CHUNK):
                f.write(chunk)
                done += len(chunk)
                if total > 0 and done / total >= next_mark:
                    logger.info("%s: %3d%% (%s of %s)", part.name.removesuffix(".part"), int(100 * done / total),
                                _human(done), _human(total))
                    next_mark = (done * 20 // total + 1) / 20
        if 0 < total != done:
            raise ConnectionError(f"connection closed after {done} of {total} bytes")
        return (total if total > 0 else done), sha


def _clean_leftovers(dest: Path) -> None:
    """Delete the ``.corrupt`` / ``.bad`` copies earlier attempts left beside ``dest`` (it is good now)."""
    for suffix in LEFTOVER_SUFFIXES:
        old = dest.with_name(dest.name + suffix)
        if old.exists():
            old.unlink()
            logger.info("%s: removed %s left by an earlier attempt", dest.name, old.name)


def _recorded(folder: Path) -> dict[str, FileRecord]:
    """The checksum record of ``folder`` for the downloader: {} when there is none or it is damaged (then
    the files there are checked by format only and recorded again)."""
    if not folder.is_dir():
        return {}
    try:
        return read_checksums(folder) or {}
    except ModelFileError as e:
        logger.warning("%s; it is ignored and written again", e)
        return {}


def existing_record(file: RemoteFile, dest: Path, recorded: FileRecord | None, cache: VerifiedCache, *,
                    url: str | None = None, timeout: float = 30.0) -> FileRecord | None:
    """The record of a file that is already at ``dest`` and good, else None (a bad one is moved to ``.bad``).

    Good: it passes its format check and, when a hash was recorded for it, has that SHA-256 (checked
    through the verified cache, so a re-run does not hash unchanged files again).  Without a record
    (a folder copied by hand) and with ``url``: it has the SHA-256 this pack's table or the server
    announces for ``url`` (recorded with source ``known`` / ``server``); nothing announced: ``local``.
    """
    if not dest.exists():
        return None
    announced = None
    try:
        check_content(dest, file.kind)
        if recorded is not None and not file_matches(dest, recorded, cache)[0]:
            raise DownloadError(f"it does not match the SHA-256 recorded in {CHECKSUM_FILE}")
        if recorded is None and url is not None:
            announced = KNOWN_SHA256.get(file.dest) or probe(url, timeout=timeout)[0]
            if announced is not None and sha256_file(dest) != announced:
                raise DownloadError(f"it does not have the SHA-256 the server announces ({announced[:16]}...)")
    except DownloadError as e:
        logger.warning("%s exists but fails its check (%s); downloading it again", dest, e)
        dest.replace(dest.with_name(dest.name + ".bad"))
        return None
    logger.info("%s: already there%s", file.dest, " (matches the SHA-256 the server announces)" if announced else "")
    _clean_leftovers(dest)
    if recorded is not None:
        return recorded
    if announced is not None:
        return FileRecord(announced, dest.stat().st_size, "known" if KNOWN_SHA256.get(file.dest) else "server")
    return record_files(dest.parent, [dest.name], source="local")[dest.name]


def fetch(file: RemoteFile, models_dir: Path, *, base_url: str | None = None, retries: int = 5,
          timeout: float = 60.0, backoff: float = 2.0, records: dict[str, FileRecord] | None = None,
          stage: bool = False) -> Path:
    """Download one file into place, resuming a ``.part``; verified before it gets its final name.

    ``records`` (optional) receives ``{file name: FileRecord}`` of what was verified.  ``stage``
    leaves a fresh download under its verified ``.part`` name and returns that path (the caller
    puts it in place last, see :func:`download_all`).
    """
    dest = models_dir / file.dest
    url = file.url(base_url)
    found = existing_record(file, dest, _recorded(dest.parent).get(dest.name), default_cache(), url=url,
                            timeout=timeout)
    if found is not None:
        if records is not None:
            records[dest.name] = found
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    linked_sha, linked_size = probe(url, timeout=timeout)
    attempt = 0
    while True:
        try:
            total, sha = _transfer(url, part, timeout=timeout)
            break
        except (ConnectionError, TimeoutError, http.client.HTTPException, urllib.error.URLError, OSError) as e:
            if isinstance(e, DownloadError):
                raise
            attempt += 1
            reason = getattr(e, "reason", e)
            if attempt > retries:
                kept = f" ({_human(part.stat().st_size)} kept in {part}; run again to resume)" if part.exists() else ""
                raise DownloadError(f"Cannot download {url}: {reason}{kept}. Check your internet connection "
                                    f"(or the mirror given by --base-url / HYPERLORA_DOWNLOAD_BASE).") from e
            logger.warning("%s: %s; retry %d of %d", file.dest, reason, attempt, retries)
            time.sleep(backoff * attempt)
    size = part.stat().st_size
    known = KNOWN_SHA256.get(file.dest)
    expected_sha = known or linked_sha or sha
    actual_sha = sha256_file(part)
    problem = None
    if size != total:
        problem = f"has {size} bytes, the server announced {total}"
    elif linked_size is not None and size != linked_size:
        problem = f"has {size} bytes, the repository lists {linked_size}"
    elif expected_sha is not None and actual_sha != expected_sha:
        problem = f"does not have the SHA-256 {expected_sha}"
    if problem is None:
        try:
            check_content(part, file.kind)
        except DownloadError as e:
            problem = str(e)
    if problem is not None:
        bad = dest.with_name(dest.name + ".corrupt")
        part.replace(bad)
        raise DownloadError(f"The download of {url} is corrupt: it {problem}. Kept as {bad} for inspection; "
                            f"delete it and run the command again.")
    if records is not None:
        records[dest.name] = FileRecord(actual_sha, size, "known" if known else "server" if expected_sha else "download")
    _clean_leftovers(dest)
    if stage:
        return part
    part.replace(dest)
    logger.info("%s: done (%s)", file.dest, _human(size))
    return dest


# --------------------------------------------------------------------------- antelopev2

def fix_antelopev2(models_dir: Path) -> Path:
    """Move .onnx files of a nested ``antelopev2/antelopev2/`` (or deeper) up into ``antelopev2/``."""
    target = models_dir / ANTELOPEV2_DIR
    if not target.is_dir():
        return target
    for onnx in sorted(target.rglob("*.onnx")):
        if onnx.parent != target and not (target / onnx.name).exists():
            logger.info("moving %s up into %s", onnx.relative_to(models_dir), target.relative_to(models_dir))
            shutil.move(str(onnx), target / onnx.name)
    for sub in sorted((p for p in target.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        if not any(sub.iterdir()):
            sub.rmdir()
    return target


def install_antelopev2(zip_path: Path, models_dir: Path) -> Path:
    """Unpack the .onnx files of the antelopev2 zip flat into ``insightface/models/antelopev2``."""
    target = models_dir / ANTELOPEV2_DIR
    target.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(zip_path) as z:
        for member in z.infolist():
            name = Path(member.filename).name
            if member.is_dir() or not name.endswith(".onnx"):
                continue
            with z.open(member) as src, (target / (name + ".part")).open("wb") as out:
                shutil.copyfileobj(src, out, CHUNK)
            (target / (name + ".part")).replace(target / name)
    fix_antelopev2(models_dir)
    missing = [n for n in ANTELOPEV2_FILES if not (target / n).is_file()]
    if missing:
        raise DownloadError(f"{zip_path} did not contain {', '.join(missing)}; it is not the antelopev2 pack. "
                            f"Delete it and run the command again.")
    zip_path.unlink()
    return target


def _by_folder(files: list[RemoteFile]) -> list[tuple[str, list[RemoteFile]]]:
    """Plan entries grouped by destination folder, in plan order (a folder's marker is last in it)."""
    groups: dict[str, list[RemoteFile]] = {}
    for f in files:
        groups.setdefault(str(Path(f.dest).parent), []).append(f)
    return list(groups.items())


def _is_marker(file: RemoteFile) -> bool:
    return Path(file.dest).name in (MARKER_FILE, CLIP_MARKER)


def _download_folder(files: list[RemoteFile], models_dir: Path, **kw: object) -> list[Path]:
    """Fetch one folder's files; its marker last, after the checksums, so a half-done folder never shows
    up in the Loader's dropdown.  Files already there are checked against their recorded hash."""
    folder = models_dir / Path(files[0].dest).parent
    recorded = _recorded(folder)
    cache = default_cache()
    records: dict[str, FileRecord] = {}
    pending: list[RemoteFile] = []
    for f in files:
        found = existing_record(f, models_dir / f.dest, recorded.get(Path(f.dest).name), cache,
                                url=f.url(kw.get("base_url")), timeout=kw.get("timeout", 60.0))  # type: ignore[arg-type]
        if found is None:
            pending.append(f)
        else:
            records[Path(f.dest).name] = found
    marker = next((f for f in files if _is_marker(f)), None)
    if marker is not None and any(f is not marker for f in pending) and (models_dir / marker.dest).exists():
        logger.info("%s: hidden from ComfyUI until its files are complete", folder)
        (models_dir / marker.dest).unlink()
        records.pop(Path(marker.dest).name, None)
        pending.append(marker)
    staged: Path | None = None
    for f in pending:
        path = fetch(f, models_dir, records=records, stage=f is marker, **kw)  # type: ignore[arg-type]
        if f is marker and path.name.endswith(".part"):
            staged = path
    write_checksums(folder, records)
    if staged is not None and marker is not None:
        staged.replace(models_dir / marker.dest)
        logger.info("%s: done; %s is in ComfyUI's list now", marker.dest, folder.name)
    return [models_dir / f.dest for f in files]


def _antelopev2(file: RemoteFile, models_dir: Path, **kw: object) -> list[Path]:
    """The AntelopeV2 .onnx files: kept when they are all there and match their record, else from the zip."""
    target = fix_antelopev2(models_dir)
    recorded = _recorded(target) or None
    cache = default_cache()
    present = all((target / n).is_file() for n in ANTELOPEV2_FILES)
    good = present and (recorded is None or all(
        n in recorded and file_matches(target / n, recorded[n], cache)[0] for n in ANTELOPEV2_FILES))
    if good:
        logger.info("%s: already there", ANTELOPEV2_DIR)
        if recorded is None:
            write_checksums(target, record_files(target, ANTELOPEV2_FILES, source="local"))
        return [target / n for n in ANTELOPEV2_FILES]
    if present:
        logger.warning("%s: a file does not match %s; unpacking the pack again", ANTELOPEV2_DIR, CHECKSUM_FILE)
    install_antelopev2(fetch(file, models_dir, **kw), models_dir)  # type: ignore[arg-type]
    write_checksums(target, record_files(target, ANTELOPEV2_FILES, source="zip"))
    return [target / n for n in ANTELOPEV2_FILES]


def download_all(models_dir: str | Path, *, model: str = "fidelity", clip: bool = True, antelopev2: bool = True,
                 base_url: str | None = None, retries: int = 5, timeout: float = 60.0,
                 backoff: float = 2.0) -> list[Path]:
    """Fetch everything ``plan`` lists into ``models_dir`` (ComfyUI's ``models`` folder). Returns final paths."""
    models_dir = Path(models_dir).expanduser()
    kw = dict(base_url=base_url or os.environ.get("HYPERLORA_DOWNLOAD_BASE") or None, retries=retries,
              timeout=timeout, backoff=backoff)
    out: list[Path] = []
    for _folder, files in _by_folder(plan(model=model, clip=clip, antelopev2=antelopev2)):
        if files[0].kind == "zip":
            out += _antelopev2(files[0], models_dir, **kw)
        else:
            out += _download_folder(files, models_dir, **kw)
    return out


def record_existing(models_dir: str | Path, *, model: str = "fidelity", clip: bool = True,
                    antelopev2: bool = True) -> list[Path]:
    """``--checksums-only``: write the checksum file of every complete folder of the plan from the files as
    they are now (source ``local``), offline.  A folder that has a record already is checked against it
    instead (a damaged file is refused, never recorded as good).  Returns the checksum files written."""
    models_dir = Path(models_dir).expanduser()
    written = []
    for folder_name, files in _by_folder(plan(model=model, clip=clip, antelopev2=antelopev2)):
        folder = models_dir / (ANTELOPEV2_DIR if files[0].kind == "zip" else folder_name)
        names = list(ANTELOPEV2_FILES) if files[0].kind == "zip" else [Path(f.dest).name for f in files]
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            logger.info("%s: skipped, %s missing", folder, ", ".join(missing))
            continue
        if read_checksums(folder) is not None:
            verify_folder(folder, uses=names, fix=redownload_hint(folder))
            logger.info("%s: matches its %s", folder, CHECKSUM_FILE)
            continue
        written.append(write_checksums(folder, record_files(folder, names, source="local")))
        logger.info("%s: recorded the SHA-256 of %d file(s) as they are now", folder, len(names))
    return written


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hyperlora.tools.download", description=__doc__.split("\n\n")[0])
    p.add_argument("--models-dir", required=True, help="ComfyUI's models folder, e.g. ComfyUI/models")
    p.add_argument("--model", default="fidelity", choices=("fidelity", "edit", "all"),
                   help="fidelity: better likeness (default); edit: better prompt editability")
    p.add_argument("--skip-clip", action="store_true", help="do not fetch CLIP ViT-L/14")
    p.add_argument("--skip-antelopev2", action="store_true", help="do not fetch the AntelopeV2 face models")
    p.add_argument("--base-url", help="mirror with the same paths (default: huggingface.co / github.com; "
                                      "env HYPERLORA_DOWNLOAD_BASE)")
    p.add_argument("--retries", type=int, default=5)
    p.add_argument("--list", action="store_true", help="only print what would be fetched")
    p.add_argument("--checksums-only", action="store_true",
                   help=f"download nothing: record the SHA-256 of the files already there ({CHECKSUM_FILE} in each "
                        "folder), so the Loader can tell if they get damaged later; folders with a record are "
                        "checked against it instead")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.list:
        for f in plan(model=args.model, clip=not args.skip_clip, antelopev2=not args.skip_antelopev2):
            sys.stdout.write(f"{f.url(args.base_url)} -> {Path(args.models_dir) / f.dest}\n")
        return 0
    try:
        check_folder_option(args.models_dir, "--models-dir")
        if args.checksums_only and not Path(args.models_dir).expanduser().is_dir():
            raise SettingError(f"--models-dir '{args.models_dir}' does not exist; give ComfyUI's models folder "
                               f"(e.g. ComfyUI/models), which holds the files to record.")
        if args.checksums_only:
            written = record_existing(args.models_dir, model=args.model, clip=not args.skip_clip,
                                      antelopev2=not args.skip_antelopev2)
            sys.stdout.write("".join(f"{p}\n" for p in written))
            return 0
        paths = download_all(args.models_dir, model=args.model, clip=not args.skip_clip,
                             antelopev2=not args.skip_antelopev2, base_url=args.base_url, retries=args.retries)
    except HyperLoRAError as e:
        sys.stderr.write(f"error: {e}\n")
        return 1
    except OSError as e:                         # permissions, a full disk: one line, the path and the fix
        sys.stderr.write(f"error: {os_error_line(e)}\n")
        return 1
    sys.stdout.write(f"{len(paths)} files in place under {args.models_dir}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
