"""Model folders of the pack, registered with ComfyUI's ``folder_paths``.

Keys (each one extendable from ``extra_model_paths.yaml``; the user's entries are kept
and listed first):

* ``hyper_lora``            ``models/hyper_lora`` - the released layout below it:
  ``hyper_lora/<model>/`` (marker ``hyper_lora_modules.json``), ``clip_vit/<name>/``
  (Hugging Face CLIP vision folder) and ``clip_processor/<name>/``.
* ``insightface``           ``models/insightface`` - ``models/antelopev2/*.onnx`` below it.
* ``difflora``              ``models/difflora`` - DiffLoRA model folders ``<name>/`` (marker ``difflora.json``,
  hyperlora/difflora/format.py).
* ``hyper_lora_identities`` identity files: ``models/hyper_lora/identities`` and
  ``output/hyper_lora_identities`` (where the Save node writes).

CLIP vision files of ComfyUI's own ``models/clip_vision`` are listed too, as
``clip_vision/<file>``.  Nothing here imports torch when imported (the DiffLoRA marker's module is imported
when a list is asked for).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import folder_paths

from ..hyperlora.errors import ModelFileError
from ..hyperlora.faces.setup import is_antelopev2_entry
from ..hyperlora.spec import (ANTELOPE_DIR, ANTELOPE_FILES, ANTELOPE_SUBDIR, CLIP_PROCESSOR_SUBDIR, CLIP_VIT_SUBDIR,
                              DIFFLORA_DIR, HYPER_LORA_DIR, IDENTITIES_SUBDIR, INSIGHTFACE_DIR, MARKER_FILE, MODELS_SUBDIR,
                              RELEASED_CLIP_NAME, clip_processor_name)

log = logging.getLogger(__name__)

HYPER_LORA_KEY = HYPER_LORA_DIR
INSIGHTFACE_KEY = INSIGHTFACE_DIR
DIFFLORA_KEY = DIFFLORA_DIR
IDENTITY_KEY = "hyper_lora_identities"
IDENTITY_SUBFOLDER = "hyper_lora_identities"
CLIP_VISION_PREFIX = "clip_vision/"


def register_folders() -> None:
    """Add the pack's default folders after whatever ``extra_model_paths.yaml`` already set."""
    models_dir = folder_paths.models_dir
    folder_paths.add_model_folder_path(HYPER_LORA_KEY, os.path.join(models_dir, HYPER_LORA_DIR))
    folder_paths.add_model_folder_path(INSIGHTFACE_KEY, os.path.join(models_dir, INSIGHTFACE_DIR))
    folder_paths.add_model_folder_path(DIFFLORA_KEY, os.path.join(models_dir, DIFFLORA_DIR))
    folder_paths.add_model_folder_path(IDENTITY_KEY, os.path.join(models_dir, HYPER_LORA_DIR, IDENTITIES_SUBDIR))
    folder_paths.add_model_folder_path(IDENTITY_KEY, identity_output_dir())
    folder_paths.folder_names_and_paths[IDENTITY_KEY][1].add(".safetensors")


def identity_output_dir() -> str:
    """Where the Save Identity node writes: ``output/hyper_lora_identities``."""
    return os.path.join(folder_paths.get_output_directory(), IDENTITY_SUBFOLDER)


def _roots(key: str) -> list[Path]:
    try:
        return [Path(p) for p in folder_paths.get_folder_paths(key)]
    except KeyError:
        return []


def _subdirs(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if p.is_dir()), key=lambda p: p.name.lower())


# --------------------------------------------------------------------------- HyperLoRA models


def _model_dirs() -> dict[str, Path]:
    """Model folders by their dropdown name; the first root wins on a name clash."""
    found: dict[str, Path] = {}
    for root in _roots(HYPER_LORA_KEY):
        for parent in (root / MODELS_SUBDIR, root):
            for d in _subdirs(parent):
                if (d / MARKER_FILE).is_file() and d.name not in found:
                    found[d.name] = d
    return found


def list_models() -> list[str]:
    """Names of the HyperLoRA model folders (those holding ``hyper_lora_modules.json``)."""
    return list(_model_dirs())


def model_help() -> str:
    where = " or ".join(str(r / MODELS_SUBDIR) for r in _roots(HYPER_LORA_KEY)) or f"models/{HYPER_LORA_DIR}/{MODELS_SUBDIR}"
    return (f"Put a HyperLoRA model folder (for example sdxl_hyper_id_lora_v1_fidelity, holding "
            f"{MARKER_FILE} and the .safetensors files) into {where}, then press R in ComfyUI to refresh "
            f"(python -m hyperlora.tools.download can fetch the released models).")


def resolve_model(name: str) -> Path:
    """Folder of model ``name``; :class:`ModelFileError` with where to put it when absent."""
    found = _model_dirs()
    if name in found:
        return found[name]
    if not found:
        raise ModelFileError(f"No HyperLoRA model folder was found. {model_help()}")
    raise ModelFileError(f"HyperLoRA model folder '{name}' was not found (found: {', '.join(found)}). {model_help()}")


# --------------------------------------------------------------------------- DiffLoRA models


def _difflora_marker() -> str:
    """``difflora.json``, the file that makes a folder a DiffLoRA model (imported when asked: it needs torch)."""
    from ..hyperlora.difflora.format import CONFIG_FILE

    return CONFIG_FILE


def _difflora_dirs() -> dict[str, Path]:
    """DiffLoRA model folders (holding ``difflora.json``) by their dropdown name; the first root wins a clash."""
    found: dict[str, Path] = {}
    marker = _difflora_marker()
    for root in _roots(DIFFLORA_KEY):
        for d in _subdirs(root):
            if (d / marker).is_file() and d.name not in found:
                found[d.name] = d
    return found


def list_difflora() -> list[str]:
    """Names of the DiffLoRA model folders."""
    return list(_difflora_dirs())


def difflora_help() -> str:
    where = " or ".join(str(r) for r in _roots(DIFFLORA_KEY)) or f"models/{DIFFLORA_DIR}"
    return (f"Put a DiffLoRA model folder (holding {_difflora_marker()}, lae.safetensors and dit.safetensors, as "
            f"python -m hyperlora.train difflora-export writes it) into {where}, or add a '{DIFFLORA_KEY}' entry to "
            "extra_model_paths.yaml, then press R in ComfyUI to refresh.")


def resolve_difflora(name: str) -> Path:
    """Folder of DiffLoRA model ``name``; :class:`ModelFileError` with where to put it when absent."""
    found = _difflora_dirs()
    if name in found:
        return found[name]
    if not found:
        raise ModelFileError(f"No DiffLoRA model folder was found. {difflora_help()}")
    raise ModelFileError(f"DiffLoRA model folder '{name}' was not found (found: {', '.join(found)}). {difflora_help()}")


# --------------------------------------------------------------------------- CLIP vision


def _clip_dirs() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for root in _roots(HYPER_LORA_KEY):
        for d in _subdirs(root / CLIP_VIT_SUBDIR):
            if (d / "config.json").is_file() and d.name not in found:
                found[d.name] = d
    return found


def list_clip_vision() -> list[str]:
    """Hugging Face CLIP folders (``hyper_lora/clip_vit/<name>``) then ``clip_vision/<file>`` entries."""
    names = list(_clip_dirs())
    try:
        names += [CLIP_VISION_PREFIX + f for f in folder_paths.get_filename_list("clip_vision")]
    except KeyError:
        pass
    return names


def clip_help() -> str:
    hf = " or ".join(str(r / CLIP_VIT_SUBDIR) for r in _roots(HYPER_LORA_KEY)) or f"models/{HYPER_LORA_DIR}/{CLIP_VIT_SUBDIR}"
    cv = " or ".join(str(r) for r in _roots("clip_vision")) or "models/clip_vision"
    return (f"Put the OpenAI CLIP ViT-L/14 vision model either as a Hugging Face folder "
            f"(config.json + model.safetensors, e.g. {RELEASED_CLIP_NAME}) into {hf}, or as a single "
            f"ViT-L/14 .safetensors file into {cv}, then press R to refresh.")


def resolve_clip(name: str) -> tuple[str, Path, Path | None]:
    """``("folder", dir, processor_dir or None)`` or ``("file", path, None)`` for a dropdown entry."""
    if name.startswith(CLIP_VISION_PREFIX):
        rel = name[len(CLIP_VISION_PREFIX):]
        path = folder_paths.get_full_path("clip_vision", rel)
        if path is None:
            raise ModelFileError(f"CLIP vision file '{rel}' was not found. {clip_help()}")
        return "file", Path(path), None
    found = _clip_dirs()
    if name not in found:
        listed = f" (found: {', '.join(found)})" if found else ""
        raise ModelFileError(f"CLIP vision model '{name}' was not found{listed}. {clip_help()}")
    return "folder", found[name], _processor_dir(name)


def _processor_dir(clip_name: str) -> Path | None:
    """The ``clip_processor`` folder matching ``clip_name`` (``<name>_processor`` or ``<name>``), else the only one."""
    candidates: list[Path] = []
    for root in _roots(HYPER_LORA_KEY):
        candidates += [d for d in _subdirs(root / CLIP_PROCESSOR_SUBDIR) if (d / "preprocessor_config.json").is_file()]
    for d in candidates:
        if d.name in (clip_processor_name(clip_name), clip_name):
            return d
    return candidates[0] if len(candidates) == 1 else None


def default_processor_dir() -> Path | None:
    """The released ``clip_processor/clip_vit_large_14_processor`` (or the only processor folder), if any."""
    return _processor_dir(RELEASED_CLIP_NAME)


# --------------------------------------------------------------------------- AntelopeV2


def _antelope_dirs() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for root in _roots(INSIGHTFACE_KEY):
        for parent in (root / Path(ANTELOPE_SUBDIR).parent, root):
            for d in _subdirs(parent):
                if d.name not in found and is_antelopev2_entry(d):
                    found[d.name] = d
    return found


def list_insightface() -> list[str]:
    """Face-analysis packs (folders holding the AntelopeV2 .onnx files, also one level too deep)."""
    return list(_antelope_dirs())


def insightface_help() -> str:
    where = " or ".join(str(r / ANTELOPE_SUBDIR) for r in _roots(INSIGHTFACE_KEY)) or f"models/{ANTELOPE_DIR}"
    return (f"Unzip the insightface antelopev2 pack ({', '.join(ANTELOPE_FILES)}) so that the .onnx files are in "
            f"{where}, then press R to refresh.")


def resolve_insightface(name: str) -> Path:
    found = _antelope_dirs()
    if name not in found:
        listed = f" (found: {', '.join(found)})" if found else ""
        raise ModelFileError(f"Face-analysis folder '{name}' was not found{listed}. {insightface_help()}")
    return found[name]


# --------------------------------------------------------------------------- identities and LoRAs


def list_identities() -> list[str]:
    return folder_paths.get_filename_list(IDENTITY_KEY)


def identity_help() -> str:
    where = " or ".join(str(r) for r in _roots(IDENTITY_KEY))
    return f"Save an identity with the HyperLoRA Studio Save Identity node, or put identity .safetensors files into {where}."


def resolve_identity(name: str) -> Path:
    path = folder_paths.get_full_path(IDENTITY_KEY, name)
    if path is None:
        raise ModelFileError(f"Identity file '{name}' was not found. {identity_help()}")
    return Path(path)


def lora_output_dir() -> Path:
    """The first ``loras`` folder, where LoraLoader lists files."""
    roots = folder_paths.get_folder_paths("loras")
    if not roots:
        raise ModelFileError("ComfyUI has no 'loras' model folder configured; add one in extra_model_paths.yaml.")
    return Path(roots[0])
