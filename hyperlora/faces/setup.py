"""Setting up insightface's AntelopeV2 pack: where the files are, which execution provider, import.

Everything here is cheap and never imports insightface or onnxruntime at module level: a broken
or missing install must not stop the pack from loading (the most common failure of identity packs).  :func:`import_backend`
imports them on first use and turns any failure into a :class:`DependencyError` that says which
pip command fixes it.

Format §1: the pack is ``models/insightface/models/antelopev2/`` with five ``.onnx`` files; the
official zip often unpacks one level too deep (``antelopev2/antelopev2/``).  Only three files are
used (detector, 106-point landmarks, recognition).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..errors import DependencyError, ModelFileError, SettingError
from ..spec import ANTELOPE_DIR, ANTELOPE_FILES, ANTELOPE_NAME, ANTELOPE_REQUIRED_FILES, ANTELOPE_SUBDIR

logger = logging.getLogger(__name__)

PACK_LOCATION = f"ComfyUI/models/{ANTELOPE_DIR}/"
NESTED = f"{ANTELOPE_NAME}/{ANTELOPE_NAME}/"
"""The too-deep unzip that is found too."""

PROVIDERS = ("auto", "CUDA", "ROCm", "CoreML", "CPU")
PROVIDER_CHOICES: dict[str, tuple[str, ...]] = {
    "CUDA": ("CUDAExecutionProvider",),
    "ROCm": ("ROCMExecutionProvider", "MIGraphXExecutionProvider"),
    "CoreML": ("CoreMLExecutionProvider",),
    "CPU": ("CPUExecutionProvider",),
}
"""User choice -> onnxruntime provider names, in order of preference."""
AUTO_ORDER = (
    "CUDAExecutionProvider",
    "ROCMExecutionProvider",
    "MIGraphXExecutionProvider",
    "CoreMLExecutionProvider",
    "DmlExecutionProvider",
    "CPUExecutionProvider",
)
"""What ``auto`` picks: the first of these that onnxruntime reports as available."""
_INSTALL_HINT = {
    "CUDA": "install onnxruntime-gpu (after `pip uninstall onnxruntime`)",
    "ROCm": "install the ROCm build of onnxruntime (onnxruntime-rocm or onnxruntime-migraphx)",
    "CoreML": "use the standard onnxruntime wheel on macOS",
    "CPU": "reinstall onnxruntime",
}


def _pip(package: str) -> str:
    return f"`{sys.executable} -m pip install {package}`"


@dataclass(frozen=True)
class Backend:
    """The imported modules and functions of insightface / onnxruntime that the analyzer uses."""

    onnxruntime: Any
    insightface_version: str
    get_model: Any  # insightface.model_zoo.get_model
    Face: Any  # insightface.app.common.Face


def import_backend() -> Backend:
    """Import onnxruntime and insightface (0.7.3 or 2.x) now; DependencyError when that fails."""
    try:
        import onnxruntime
    except Exception as exc:  # a broken wheel raises ImportError, OSError, AttributeError, ...
        raise DependencyError(
            f"onnxruntime could not be imported ({type(exc).__name__}: {exc}). HyperLoRA's face analysis "
            f"needs it: install it with {_pip('onnxruntime')} (or onnxruntime-gpu for CUDA, not both) "
            "in the Python environment that runs ComfyUI, then restart ComfyUI."
        ) from exc
    # insightface 0.7.3 imports albumentations, which contacts pypi.org on import (an update
    # check): offline users would wait and get a warning.  The user's own setting still wins.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    try:
        import insightface
        from insightface.app.common import Face
        from insightface.model_zoo import get_model
    except Exception as exc:
        if "numpy" in str(exc) or "binary incompatibility" in str(exc):
            raise DependencyError(
                f"insightface could not be imported ({type(exc).__name__}: {exc}): its compiled part was built "
                f"for another numpy version. Fix: {_pip('-U insightface')} (2.x wheels need no compiler) or "
                f"rebuild 0.7.3 with {_pip('--force-reinstall --no-cache-dir --no-deps --no-binary insightface insightface==0.7.3')}"
                ", then restart ComfyUI."
            ) from exc
        raise DependencyError(
            f"insightface could not be imported ({type(exc).__name__}: {exc}). HyperLoRA's face analysis "
            f"needs it (versions 0.7.3 and 2.x work): install it with {_pip('insightface')} in the Python "
            "environment that runs ComfyUI, then restart ComfyUI. (insightface 0.7.3 also needs "
            "albumentations; 2.x wheels need no compiler.)"
        ) from exc
    version = str(getattr(insightface, "__version__", "unknown"))
    return Backend(onnxruntime=onnxruntime, insightface_version=version, get_model=get_model, Face=Face)


def insightface_major(version: str) -> int:
    """``"0.7.3"`` -> 0, ``"2.1"`` -> 2; unknown -> 0."""
    try:
        return int(version.split(".", 1)[0])
    except ValueError:
        return 0


def resolve_providers(provider: str = "auto", available: Sequence[str] | None = None) -> list[str]:
    """onnxruntime provider list for a user choice, CPU appended as fallback.

    ``available`` defaults to ``onnxruntime.get_available_providers()``.  ``auto`` takes the
    first of :data:`AUTO_ORDER` that is available.  A named provider that is not available raises
    DependencyError listing the available ones.
    """
    names = {p.lower(): p for p in PROVIDERS}
    choice = names.get(str(provider).strip().lower())
    if choice is None:
        raise SettingError(
            f"Unknown face analysis provider {provider!r}: choose one of {', '.join(PROVIDERS)}."
        )
    if available is None:
        available = list(import_backend().onnxruntime.get_available_providers())
    available = list(available)
    if choice == "auto":
        picked = next((p for p in AUTO_ORDER if p in available), None)
        if picked is None:
            if not available:
                raise DependencyError("onnxruntime reports no execution provider at all: reinstall onnxruntime.")
            picked = available[0]
    else:
        picked = next((p for p in PROVIDER_CHOICES[choice] if p in available), None)
        if picked is None:
            raise DependencyError(
                f"The face analysis provider {choice!r} ({' or '.join(PROVIDER_CHOICES[choice])}) is not "
                f"available in this onnxruntime; available: {', '.join(available) or 'none'}. "
                f"Choose 'auto' or one of those, or {_INSTALL_HINT[choice]}."
            )
    providers = [picked]
    if picked != "CPUExecutionProvider" and "CPUExecutionProvider" in available:
        providers.append("CPUExecutionProvider")
    return providers


FINGERPRINT_CHUNK = 8 << 20
"""Bytes read per step while hashing a face-model file."""
_FINGERPRINTS: dict[tuple[str, int, int], str] = {}
_FINGERPRINT_LOCK = threading.Lock()


def _file_sha256(path: Path) -> str:
    """SHA-256 of one file, remembered per (resolved path, size, mtime_ns) for the life of the process."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _FINGERPRINT_LOCK:
        known = _FINGERPRINTS.get(key)
    if known is not None:
        return known
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(FINGERPRINT_CHUNK):
            h.update(chunk)
    with _FINGERPRINT_LOCK:
        _FINGERPRINTS[key] = h.hexdigest()
    return _FINGERPRINTS[key]


def face_models_fingerprint(folder: str | Path) -> str:
    """16 hex digits naming the face models in ``folder`` (an AntelopeV2 folder, see :func:`find_antelopev2`):
    a hash of the SHA-256 of the three files this pack loads (detector, landmarks, recognition).

    Two folders with the same files give the same fingerprint wherever they are; any changed byte
    gives another.  Each file is hashed once per process (about a second for the 280 MB of the
    released pack) and remembered by path, size and modification time.
    """
    base = find_antelopev2(folder)
    h = hashlib.sha256(b"hyperlora-face-models-v1")
    for name in ANTELOPE_REQUIRED_FILES:
        h.update(f"{name}:{_file_sha256(base / name)}\n".encode())
    return h.hexdigest()[:16]


def _has_required(folder: Path) -> bool:
    return all((folder / name).is_file() for name in ANTELOPE_REQUIRED_FILES)


def _candidates(base: Path) -> list[Path]:
    return [base, base / ANTELOPE_NAME, base / base.name, base / ANTELOPE_SUBDIR, base / ANTELOPE_SUBDIR / ANTELOPE_NAME]


def antelopev2_dir(folder: str | Path) -> Path | None:
    """The folder below ``folder`` that holds the three AntelopeV2 files this pack loads, or None.

    Looks at ``folder`` itself, one level too deep (``antelopev2/antelopev2``, or ``name/name``)
    and, for the insightface root, ``models/antelopev2`` (also one level too deep).  The Loader's
    dropdown lists exactly the folders for which this is not None.
    """
    base = Path(folder).expanduser()
    return next((c for c in _candidates(base) if c.is_dir() and _has_required(c)), None)


def is_antelopev2_entry(folder: str | Path) -> bool:
    """True for a folder the Loader's dropdown lists: it holds the AntelopeV2 files itself or one level
    too deep (``name/name``), so :func:`find_antelopev2` on it finds them there."""
    base = Path(folder).expanduser()
    return antelopev2_dir(base) in (base, base / base.name)


def find_antelopev2(folder: str | Path) -> Path:
    """The folder that holds the AntelopeV2 files (see :func:`antelopev2_dir`).

    Raises ModelFileError naming the folder, the missing or empty files and where they belong.
    """
    base = Path(folder).expanduser()
    cand = antelopev2_dir(base)
    if cand is not None:
        for name in ANTELOPE_REQUIRED_FILES:
            if (cand / name).stat().st_size == 0:
                raise ModelFileError(
                    f"{cand / name} is empty (an interrupted download?): download the AntelopeV2 pack "
                    f"again and put its five files ({', '.join(ANTELOPE_FILES)}) in {PACK_LOCATION}."
                )
        if cand != base:
            logger.info("AntelopeV2 files found in %s (below %s)", cand, base)
        return cand
    candidates = _candidates(base)
    # explain what is there and what is missing
    present = next((c for c in candidates if c.is_dir() and any(c.glob("*.onnx"))), None)
    if present is not None:
        missing = [n for n in ANTELOPE_REQUIRED_FILES if not (present / n).is_file()]
        raise ModelFileError(
            f"The insightface AntelopeV2 folder {present} lacks {', '.join(missing)}. The pack has five files "
            f"({', '.join(ANTELOPE_FILES)}); HyperLoRA needs {', '.join(ANTELOPE_REQUIRED_FILES)}. Put them in "
            f"{PACK_LOCATION} (a folder {NESTED} from the zip works too)."
        )
    where = "does not exist" if not base.exists() else "holds no AntelopeV2 .onnx files"
    raise ModelFileError(
        f"The insightface AntelopeV2 folder {base} {where}. Download the antelopev2 pack and put its five "
        f"files ({', '.join(ANTELOPE_FILES)}) in {PACK_LOCATION} (a folder {NESTED} from the zip works too). "
        "HyperLoRA never downloads them by itself."
    )
