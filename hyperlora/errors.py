"""User-facing errors of the HyperLoRA core.

Every error raised for bad input is a :class:`HyperLoRAError` whose message is
a complete sentence a ComfyUI user can act on: it names the file, image or
setting at fault and says what to do.  ComfyUI shows the message as is.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

_T = TypeVar("_T")


class HyperLoRAError(Exception):
    """Base class of every error this package raises on purpose."""


class ModelFileError(HyperLoRAError):
    """A model file or folder is missing, unreadable or not in the released format."""


class DependencyError(HyperLoRAError):
    """An optional dependency (insightface, onnxruntime, transformers) is missing or broken."""


class FaceNotFoundError(HyperLoRAError):
    """No usable face was found in the images given."""


class ImageInputError(HyperLoRAError):
    """An input image cannot be used (wrong shape, empty batch, ...)."""


class IdentityFileError(HyperLoRAError):
    """An identity file is unreadable or was made for another model."""


class SettingError(HyperLoRAError):
    """A setting (a node input or an option) has a value that cannot be used."""


def check_choice(value: str, allowed: Sequence[str], setting: str) -> str:
    """``value`` if it is one of ``allowed``, else :class:`SettingError` naming the setting and the choices."""
    if value not in allowed:
        raise SettingError(f"{setting} is {value!r}; choose one of {', '.join(map(repr, allowed))}.")
    return value


class LoraError(HyperLoRAError):
    """A LoRA does not fit what it is combined with or applied to."""


class QueueError(HyperLoRAError):
    """Queuing a workflow on a ComfyUI server failed (server down, node missing, prompt rejected, run failed)."""


class DownloadError(HyperLoRAError):
    """Downloading or verifying a released model file failed."""


class WorkflowError(HyperLoRAError):
    """A workflow file cannot be read or converted (tools/convert_workflow.py)."""


# --------------------------------------------------------------------------- command lines

_OS_FIXES = {
    errno.ENOTDIR: "a file stands where a folder is needed; give a folder path (or move that file away)",
    errno.EEXIST: "a file stands where a folder is needed; give a folder path (or move that file away)",
    errno.EISDIR: "it is a folder where a file is needed; give a file path",
    errno.ENOENT: "it does not exist; check the path",
    errno.EACCES: "you may not read or write there; choose another place or fix its permissions",
    errno.EPERM: "you may not read or write there; choose another place or fix its permissions",
    errno.EROFS: "the disk is read-only; choose another place",
    errno.ENOSPC: "the disk is full; free some space or choose another disk",
}


def os_error_line(exc: OSError) -> str:
    """One line for a command line tool about a file-system error on a path the user gave: the path, the
    system's reason and the fix (no traceback)."""
    where = f"'{exc.filename}'" if exc.filename else "a path"
    reason = exc.strerror or str(exc)
    fix = _OS_FIXES.get(exc.errno or 0, "check the path and its permissions")
    return f"cannot use {where} ({reason}): {fix}."


def run_command(prog: str, body: Callable[[], _T], *, interrupted: str | None = None) -> tuple[int, _T | None]:
    """Run a command line tool's ``body`` (INFO logging set up unless the caller already did): ``(0, result)``;
    a :class:`HyperLoRAError` or an :class:`OSError` becomes one line ``prog: ...`` on stderr and ``(2, None)``;
    with ``interrupted``, Ctrl-C becomes the line ``prog: <interrupted>`` and ``(130, None)`` (else it propagates)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return 0, body()
    except HyperLoRAError as exc:
        sys.stderr.write(f"{prog}: {exc}\n")
    except OSError as exc:
        sys.stderr.write(f"{prog}: {os_error_line(exc)}\n")
    except KeyboardInterrupt:
        if interrupted is None:
            raise
        sys.stderr.write(f"{prog}: {interrupted}\n")
        return 130, None
    return 2, None


def check_folder_option(path: str | os.PathLike[str], option: str) -> Path:
    """``path`` (an output folder a command creates or reuses) as a Path; :class:`SettingError` naming ``option``
    when it, or a folder above it, is an existing file."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            what = "is a file" if p == path else f"is inside '{p}', which is a file"
            raise SettingError(f"{option} '{path}' {what}; give a folder path (it is created when missing).")
        if p.exists():
            break
    return path
