"""Checks of values users type: numbers that must be finite, strengths, and file-name prefixes.

Every node input and every command-line option goes through one of these, so a NaN strength
or a ``../`` prefix is refused with a message naming the setting and the allowed form instead of
giving a wrong result (a NaN strength merges NaN into every weight: the image comes out black)
or a generic error further down.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from pathlib import Path
from typing import Any

from .errors import SettingError

MAX_STRENGTH = 4.0
MAX_SLIDER_STRENGTH = 10.0
"""The Concept Slider's bound: its LoRA is a difference of two identities' LoRAs, so it is used at larger strengths."""
"""Largest magnitude of every LoRA strength and block multiplier (Apply, Apply from Images, Identity on
Prompt, Refine Identity, the block inputs): 4 x a released LoRA already changes weights far past anything
useful; a number fed through a link (ComfyUI checks only typed-in values) is refused past it."""
MAX_NAME_BYTES = 255
"""Longest file or folder name most file systems take (ext4, APFS, NTFS: 255); the saving nodes ask the
output folder's own limit (:func:`name_max`), this is the fallback where it cannot be asked."""
COUNTER_SUFFIX_BYTES = len("_00001_.safetensors")
"""What the saving nodes append to the prefix's last part (ComfyUI's counter and the extension)."""
PID_DIGITS = 7
"""Digits of the largest process id (Linux allows up to 4,194,304)."""
TEMP_NAME_EXTRA_BYTES = len(".") + len(".") + PID_DIGITS + len(".tmp")
"""What :func:`atomic_temp_name` adds to a file name at most (``.<name>.<pid>.tmp``)."""
_DRIVE = re.compile(r"^[A-Za-z]:")
_SEPARATORS = re.compile(r"[/\\]")


def atomic_temp_name(name: str) -> str:
    """The name a file is written under before it is renamed to ``name`` (a hidden ``.<name>.<pid>.tmp``
    beside it), so an interrupted save never leaves a half-written file under the real name."""
    return f".{name}.{os.getpid()}.tmp"


def name_max(folder: str | os.PathLike[str] | None) -> int:
    """The longest file name (bytes) the file system of ``folder`` takes: ``os.pathconf(.., 'PC_NAME_MAX')`` of
    ``folder`` or its nearest existing parent (the folder may not exist yet); :data:`MAX_NAME_BYTES` where
    that cannot be asked (Windows, no folder)."""
    if folder is None:
        return MAX_NAME_BYTES
    path = Path(folder).absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    try:
        return int(os.pathconf(path, "PC_NAME_MAX"))
    except (AttributeError, OSError, ValueError):
        return MAX_NAME_BYTES


def longest_prefix_name(limit: int = MAX_NAME_BYTES) -> int:
    """Bytes the last part of a file-name prefix may have when file names may have ``limit`` bytes: room is
    left for ComfyUI's counter, ``.safetensors`` and the temporary name the file is first written under."""
    return limit - COUNTER_SUFFIX_BYTES - TEMP_NAME_EXTRA_BYTES


PREFIX_FORM = ("a relative name such as 'identity' or 'people/anna': parts separated by '/', no '..' part, "
               "not starting with '/', '\\' or a drive letter, no control characters, a file name that does not "
               f"start with '.' (a hidden file), each part at most {MAX_NAME_BYTES} bytes (the last one at most "
               f"{longest_prefix_name()}, as a counter, the file ending and a temporary name are added)")


def _number_range(low: float | None, high: float | None, default: float | None) -> str:
    span = f" from {low:g} to {high:g}" if low is not None and high is not None else ""
    return span + (f" (default {default:g})" if default is not None else "")


def is_finite_number(value: Any) -> bool:
    """True for an int or float that is neither NaN nor infinite (bools count as numbers)."""
    try:
        return math.isfinite(value)
    except TypeError:
        return False


def check_finite(value: Any, setting: str, *, where: str = "", low: float | None = None,
                 high: float | None = None, default: float | None = None) -> float:
    """``value`` as a float if it is a finite number, else :class:`SettingError` naming ``setting``.

    ``where`` (a node's name) starts the message and adds a hint about linked inputs;
    ``low``/``high``/``default`` say what to use instead.
    """
    if is_finite_number(value):
        return float(value)
    shown = repr(value) if not isinstance(value, float) else str(value)
    prefix = f"{where}: " if where else ""
    link = f" If a link feeds {setting}, check the node it comes from." if where else ""
    raise SettingError(
        f"{prefix}{setting} is {shown}, not a finite number. Set it to a number{_number_range(low, high, default)}; "
        f"NaN and infinity are refused because they would silently spoil the result (a NaN strength turns every "
        f"weight into NaN and the image comes out black).{link}")


def check_strength(value: Any, setting: str = "strength", *, where: str = "", limit: float = MAX_STRENGTH) -> float:
    """``value`` as a float if it is a finite number from ``-MAX_STRENGTH`` to ``MAX_STRENGTH``, else
    :class:`SettingError` naming ``setting`` (and ``where``, a node's name).  The one rule for every strength
    and block multiplier: a strength of 1e9 from a link would otherwise multiply each weight change by 1e9.
    ``limit`` is :data:`MAX_STRENGTH` except for the Concept Slider (:data:`MAX_SLIDER_STRENGTH`)."""
    number = check_finite(value, setting, where=where, low=-limit, high=limit)
    if abs(number) > limit:
        prefix = f"{where}: " if where else ""
        link = f" If a link feeds {setting}, check the node it comes from." if where else ""
        raise SettingError(f"{prefix}{setting} is {number:g}; use a number from {-limit:g} to {limit:g} "
                           f"(1 = as released, 0 = off; 0.75-0.85 is typical for a strength).{link}")
    return number


def finite_float(text: str) -> float:
    """``argparse`` type for float options: refuses NaN and infinity (argparse names the option)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number (NaN and infinity are refused)")
    return value


def _shown(prefix: str) -> str:
    return repr(prefix) if len(prefix) <= 60 else f"{prefix[:40]!r}... ({len(prefix)} characters)"


def check_filename_prefix(prefix: Any, setting: str = "filename_prefix", *, where: str = "",
                          folder: str | os.PathLike[str] | None = None) -> str:
    """``prefix`` if it is a relative file-name start the saving nodes can use, else :class:`SettingError`.

    Refused: not a string, empty or blank, control characters, absolute paths (``/x``, ``\\x``,
    ``C:x``), a ``..`` part, a trailing separator (no file name), a file name starting with ``.`` (``.``
    itself would write the hidden ``._00001_.safetensors``), a part longer than the file system of ``folder``
    (the output folder; 255 bytes without one) allows: the last part leaves room for ComfyUI's ``_00001_``
    counter, ``.safetensors`` and the temporary name (:func:`longest_prefix_name`).
    """
    start = f"{where}: " if where else ""
    problem = None
    if not isinstance(prefix, str):
        raise SettingError(f"{start}{setting} is a {type(prefix).__name__}, not text; use {PREFIX_FORM}.")
    parts = _SEPARATORS.split(prefix)
    control = next((c for c in prefix if ord(c) < 32 or ord(c) == 127), None)
    if not prefix.strip():
        problem = "is empty"
    elif control is not None:
        problem = f"contains the control character {control!r} (position {prefix.index(control) + 1})"
    elif prefix[0] in "/\\" or _DRIVE.match(prefix):
        problem = "is an absolute path; files are written inside ComfyUI's folder for them"
    elif ".." in (p.strip() for p in parts):
        problem = "has a '..' part, which would leave ComfyUI's folder for these files"
    elif not parts[-1].strip():
        problem = "ends with a folder separator, so it names no file"
    elif parts[-1].startswith("."):
        problem = (f"has a file name starting with '.', which would write a hidden file "
                   f"('{parts[-1]}_00001_.safetensors' that file browsers and ComfyUI's lists do not show)")
    else:
        limit = name_max(folder)
        sizes = [len(p.encode("utf-8")) for p in parts]
        room = longest_prefix_name(limit)
        if sizes[-1] > room or max(sizes) > limit:
            in_folder = f" in '{folder}'" if folder is not None else ""
            problem = (f"has a part of {max(sizes)} bytes, longer than the file system allows (file names of at most "
                       f"{limit} bytes{in_folder}: {room} for the last part, as the counter, the file ending and a "
                       f"temporary name are added)")
    if problem is not None:
        raise SettingError(f"{start}{setting} {_shown(prefix)} {problem}. Use {PREFIX_FORM}.")
    return prefix


__all__ = ["COUNTER_SUFFIX_BYTES", "MAX_NAME_BYTES", "MAX_STRENGTH", "PREFIX_FORM", "TEMP_NAME_EXTRA_BYTES",
           "atomic_temp_name", "check_filename_prefix", "check_finite", "check_strength", "finite_float",
           "is_finite_number", "longest_prefix_name", "name_max"]
