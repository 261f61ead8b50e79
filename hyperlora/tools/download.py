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
"""

from __future__ import annotations

import argparse
import hashlib
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

from ..errors import DownloadError

logger = logging.getLogger(__name__)

HF = "https://huggingface.co"
GITHUB = "https://github.com"
HYPERLORA_REPO = "bytedance-research/HyperLoRA"
CLIP_REPO = "openai/clip-vit-large-patch14"
MODELS = {"fidelity": "sdxl_hyper_id_lora_v1_fidelity", "edit": "sdxl_hyper_id_lora_v1_edit"}
MODEL_FILES = ("hyper_lora_modules.json", "hyper_lora_modules.safetensors", "resampler.safetensors",
               "id_projector.safetensors")
ANTELOPEV2_FILES = ("scrfd_10g_bnkps.onnx", "2d106det.onnx", "1k3d68.onnx", "genderage.onnx", "glintr100.onnx")
ANTELOPEV2_ZIP = "deepinsight/insightface/releases/download/v0.7/antelopev2.zip"
ANTELOPEV2_DIR = "insightface/models/antelopev2"
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
                                    f"hyper_lora/hyper_lora/{folder}/{name}", kind))
    if clip:
        files += [
            RemoteFile(HF, f"{CLIP_REPO}/resolve/main/preprocessor_config.json",
                       "hyper_lora/clip_processor/clip_vit_large_14_processor/preprocessor_config.json", "json"),
            RemoteFile(HF, f"{CLIP_REPO}/resolve/main/config.json", "hyper_lora/clip_vit/clip_vit_large_14/config.json",
                       "json"),
            RemoteFile(HF, f"{CLIP_REPO}/resolve/main/model.safetensors",
                       "hyper_lora/clip_vit/clip_vit_large_14/model.safetensors", "safetensors"),
        ]
    if antelopev2:
        files.append(RemoteFile(GITHUB, ANTELOPEV2_ZIP, "insightface/models/antelopev2.zip", "zip"))
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


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


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


def fetch(file: RemoteFile, models_dir: Path, *, base_url: str | None = None, retries: int = 5,
          timeout: float = 60.0, backoff: float = 2.0) -> Path:
    """Download one file into place, resuming a ``.part``; verified before it gets its final name."""
    dest = models_dir / file.dest
    url = file.url(base_url)
    if dest.exists():
        try:
            check_content(dest, file.kind)
        except DownloadError as e:
            logger.warning("%s exists but fails its check (%s); downloading it again", dest, e)
            dest.replace(dest.with_name(dest.name + ".bad"))
        else:
            logger.info("%s: already there", file.dest)
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
    expected_sha = KNOWN_SHA256.get(file.dest) or linked_sha or sha
    problem = None
    if size != total:
        problem = f"has {size} bytes, the server announced {total}"
    elif linked_size is not None and size != linked_size:
        problem = f"has {size} bytes, the repository lists {linked_size}"
    elif expected_sha is not None and sha256_of(part) != expected_sha:
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


def download_all(models_dir: str | Path, *, model: str = "fidelity", clip: bool = True, antelopev2: bool = True,
                 base_url: str | None = None, retries: int = 5, timeout: float = 60.0,
                 backoff: float = 2.0) -> list[Path]:
    """Fetch everything ``plan`` lists into ``models_dir`` (ComfyUI's ``models`` folder). Returns final paths."""
    models_dir = Path(models_dir).expanduser()
    base_url = base_url or os.environ.get("HYPERLORA_DOWNLOAD_BASE") or None
    out: list[Path] = []
    for file in plan(model=model, clip=clip, antelopev2=antelopev2):
        if file.kind == "zip":
            target = fix_antelopev2(models_dir)
            if all((target / n).is_file() for n in ANTELOPEV2_FILES):
                logger.info("%s: already there", ANTELOPEV2_DIR)
            else:
                install_antelopev2(fetch(file, models_dir, base_url=base_url, retries=retries, timeout=timeout,
                                         backoff=backoff), models_dir)
            out += [target / n for n in ANTELOPEV2_FILES]
        else:
            out.append(fetch(file, models_dir, base_url=base_url, retries=retries, timeout=timeout, backoff=backoff))
    return out


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
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.list:
        for f in plan(model=args.model, clip=not args.skip_clip, antelopev2=not args.skip_antelopev2):
            sys.stdout.write(f"{f.url(args.base_url)} -> {Path(args.models_dir) / f.dest}\n")
        return 0
    try:
        paths = download_all(args.models_dir, model=args.model, clip=not args.skip_clip,
                             antelopev2=not args.skip_antelopev2, base_url=args.base_url, retries=args.retries)
    except DownloadError as e:
        sys.stderr.write(f"error: {e}\n")
        return 1
    sys.stdout.write(f"{len(paths)} files in place under {args.models_dir}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
