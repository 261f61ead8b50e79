"""Checks of values users type: numbers that must be finite and file-name prefixes.

Every node input and every command-line option goes through one of these, so a NaN strength
or a ``../`` prefix is refused with a message naming the setting and the allowed form instead of
giving a wrong result (a NaN strength merges NaN into every weight: the image comes out black)
or a generic error further down.
"""

from __future__ import annotations

import argparse
import math
import re
from typing import Any

from .errors import SettingError

MAX_NAME_BYTES = 255
"""Longest file or folder name most file systems take (ext4, APFS, NTFS: 255)."""
COUNTER_SUFFIX_BYTES = len("_00001_.safetensors")
"""What the saving nodes append to the prefix's last part (ComfyUI's counter and the extension)."""
_DRIVE = re.compile(r"^[A-Za-z]:")
_SEPARATORS = re.compile(r"[/\\]")
PREFIX_FORM = ("a relative name such as 'identity' or 'people/anna': parts separated by '/', no '..' part, "
               "not starting with '/', '\\' or a drive letter, no control characters, each part at most "
               f"{MAX_NAME_BYTES} bytes (the last one at most {MAX_NAME_BYTES - COUNTER_SUFFIX_BYTES}, "
               "as a counter and the file ending are added)")


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


def check_filename_prefix(prefix: Any, setting: str = "filename_prefix", *, where: str = "") -> str:
    """``prefix`` if it is a relative file-name start the saving nodes can use, else :class:`SettingError`.

    Refused: not a string, empty or blank, control characters, absolute paths (``/x``, ``\\x``,
    ``C:x``), a ``..`` part, a trailing separator (no file name), a part longer than the file
    system allows (the last part leaves room for ComfyUI's ``_00001_`` counter and ``.safetensors``).
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
    else:
        sizes = [len(p.encode("utf-8")) for p in parts]
        if sizes[-1] > MAX_NAME_BYTES - COUNTER_SUFFIX_BYTES or max(sizes) > MAX_NAME_BYTES:
            problem = (f"has a part of {max(sizes)} bytes, longer than the file system allows with the counter and "
                       f"file ending added")
    if problem is not None:
        raise SettingError(f"{start}{setting} {_shown(prefix)} {problem}. Use {PREFIX_FORM}.")
    return prefix


__all__ = ["COUNTER_SUFFIX_BYTES", "MAX_NAME_BYTES", "PREFIX_FORM", "check_filename_prefix", "check_finite",
           "finite_float", "is_finite_number"]
