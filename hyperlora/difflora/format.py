"""The DiffLoRA model folder: ``difflora.json`` + ``lae.safetensors`` + ``dit.safetensors`` (``docs/difflora-format.md``).

* :func:`save_difflora_folder` writes a folder: every file under a temporary name renamed into place, the
  JSON last (and the old JSON removed first), so a folder whose save was interrupted has no ``difflora.json``
  and is refused instead of mixing old and new weights.
* :func:`read_difflora_folder` reads one strictly into a :class:`DiffloraFiles`: the JSON's fields are checked
  one by one, the LAE's tensors must be exactly the keys and shapes its config and layout give, every tensor
  must be finite, and files are only ever read as safetensors (a pickled file is named as such, never opened).

Building the diffusion transformer from ``dit_config`` and loading ``dit_state`` into it is the caller's job:
this module does not know the DiT's architecture (its state is checked for readability and NaN/inf only).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import HyperLoRAError, ModelFileError, SettingError
from ..integrity import write_text_atomic
from ..safetensors_io import TensorReader, looks_pickled, read_header, save_file_atomic
from .lae import LaeConfig, LoraAutoencoder
from .lora_space import LoraLayout

log = logging.getLogger(__name__)

FORMAT_NAME = "hyperlora-difflora"
"""The ``format`` field of ``difflora.json`` and of the safetensors files' metadata."""
FORMAT_VERSION = 1
"""The folder format's version; a reader refuses any other."""
CONFIG_FILE = "difflora.json"
LAE_FILE = "lae.safetensors"
DIT_FILE = "dit.safetensors"
CONFIG_FIELDS = ("format", "version", "lae", "dit", "layout", "condition", "latent_scale")
"""The fields of ``difflora.json``, all required, no others."""
PART_META = "part"
"""Metadata key of each safetensors file naming which part it holds (``"lae"`` or ``"dit"``)."""

_RESAVE = "save the model again with save_difflora_folder"


@dataclass
class DiffloraFiles:
    """What a DiffLoRA folder holds, as read by :func:`read_difflora_folder` (tensors on the CPU, as stored)."""

    folder: Path
    lae_config: LaeConfig
    layout: LoraLayout
    dit_config: dict[str, Any]
    condition: dict[str, Any]
    latent_scale: float
    lae_state: dict[str, Tensor] = field(repr=False)
    dit_state: dict[str, Tensor] = field(repr=False)
    version: int = FORMAT_VERSION

    def build_lae(self) -> LoraAutoencoder:
        """The LAE with its weights loaded (eval mode, float32 or the stored dtype)."""
        lae = LoraAutoencoder(self.lae_config, self.layout)
        lae.load_state_dict(self.lae_state, strict=True)
        return lae.eval()


# --------------------------------------------------------------------------- writing


def _json_object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise SettingError(f"{what} must be a dict with string keys, got {type(value).__name__}.")
    try:
        text = json.dumps(dict(value), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise SettingError(f"{what} cannot be written as JSON ({exc}); use only strings, numbers, booleans, "
                           "lists and dicts (finite numbers).") from exc
    return json.loads(text)


def _cpu_state(state: Mapping[str, Tensor], what: str) -> dict[str, Tensor]:
    """A state dict as contiguous CPU tensors that share no storage; SettingError for non-float or NaN/inf."""
    if not isinstance(state, Mapping) or not state:
        raise SettingError(f"{what} must be a non-empty dict of tensors (a module's state_dict()).")
    out: dict[str, Tensor] = {}
    for key, t in state.items():
        if not isinstance(key, str) or not isinstance(t, Tensor):
            raise SettingError(f"{what}: entry {key!r} is not a named tensor.")
        if not t.is_floating_point() or t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise SettingError(f"{what}: tensor '{key}' is {t.dtype}; the DiffLoRA format stores floating-point "
                               "tensors only (F16, BF16, F32, F64). Make that buffer non-persistent or float.")
        if not bool(torch.isfinite(t).all()):
            raise SettingError(f"{what}: tensor '{key}' holds NaN/inf (training diverged); save an earlier "
                               "checkpoint instead.")
        out[key] = t.detach().to("cpu").clone().contiguous()
    return out


def save_difflora_folder(folder: str | os.PathLike[str], *, lae: LoraAutoencoder | Mapping[str, Tensor],
                         lae_config: LaeConfig, layout: LoraLayout, dit_state: Mapping[str, Tensor],
                         dit_config: Mapping[str, Any], condition: Mapping[str, Any], latent_scale: float) -> Path:
    """Write a DiffLoRA model folder at ``folder`` (created when missing); returns its path.

    ``lae``: the autoencoder or its state dict (its keys and shapes must be those ``lae_config`` and ``layout``
    give); ``dit_state``: the diffusion transformer's state dict; ``dit_config`` and ``condition``: JSON-able
    dicts stored as given (the DiT's architecture, the condition's spec); ``latent_scale``: the LAE latents'
    std (:meth:`LoraAutoencoder.latent_scale`), finite and > 0.  Refuses a folder that holds other files but
    no ``difflora.json`` (it is not a DiffLoRA folder; a folder left by an interrupted save, with DiffLoRA files
    only, is saved into again).
    """
    folder = Path(folder)
    if not isinstance(lae_config, LaeConfig) or not isinstance(layout, LoraLayout):
        raise SettingError("save_difflora_folder needs lae_config as a LaeConfig and layout as a LoraLayout.")
    if isinstance(lae, nn.Module):
        if getattr(lae, "config", None) != lae_config or getattr(lae, "layout", None) != layout:
            raise SettingError("The LAE given to save_difflora_folder was built with another config or layout than "
                               "the lae_config and layout given; pass lae.config and lae.layout.")
        lae_state: Mapping[str, Tensor] = lae.state_dict()
    else:
        lae_state = lae
    if isinstance(latent_scale, bool) or not isinstance(latent_scale, (int, float)) \
            or not math.isfinite(latent_scale) or latent_scale <= 0:
        raise SettingError(f"latent_scale is {latent_scale!r}; it must be a finite number > 0 (the std of the "
                           "LAE's latents, LoraAutoencoder.latent_scale).")
    lae_tensors = _cpu_state(lae_state, "The LAE state")
    _check_lae_state(lae_tensors, lae_config, layout, where="The LAE state given to save_difflora_folder",
                     fix="pass the state_dict of a LoraAutoencoder(lae_config, layout)", error=SettingError)
    dit_tensors = _cpu_state(dit_state, "The DiT state")
    body = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "lae": lae_config.to_dict(),
            "dit": _json_object(dit_config, "dit_config"), "layout": layout.to_dict(),
            "condition": _json_object(condition, "condition"), "latent_scale": float(latent_scale)}

    if folder.exists() and not folder.is_dir():
        raise SettingError(f"The DiffLoRA folder '{folder}' is a file; give a folder path.")
    if folder.is_dir() and not (folder / CONFIG_FILE).is_file():
        # a folder of an interrupted save (only DiffLoRA files, maybe temporary ones) may be saved into again
        foreign = sorted(p.name for p in folder.iterdir() if p.name not in (LAE_FILE, DIT_FILE)
                         and not (p.name.startswith(".") and p.name.endswith(".tmp")))
        if foreign:
            raise SettingError(f"The folder '{folder}' holds other files (e.g. '{foreign[0]}') and no {CONFIG_FILE}, "
                               "so it is not a DiffLoRA folder; choose an empty or new folder.")
    folder.mkdir(parents=True, exist_ok=True)
    # until the new JSON is in place the folder is no model: an interrupted save is refused, never half-read
    (folder / CONFIG_FILE).unlink(missing_ok=True)
    meta = {"format": FORMAT_NAME, "version": str(FORMAT_VERSION)}
    save_file_atomic(lae_tensors, folder / LAE_FILE, metadata={**meta, PART_META: "lae"})
    save_file_atomic(dit_tensors, folder / DIT_FILE, metadata={**meta, PART_META: "dit"})
    write_text_atomic(folder / CONFIG_FILE, json.dumps(body, indent=1, allow_nan=False) + "\n")
    log.info("saved DiffLoRA model to '%s' (%d modules, %d LAE and %d DiT tensors)", folder, len(layout),
             len(lae_tensors), len(dit_tensors))
    return folder


# --------------------------------------------------------------------------- reading


def expected_lae_shapes(config: LaeConfig, layout: LoraLayout) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of the state dict of ``LoraAutoencoder(config, layout)`` (built on the meta device)."""
    with torch.device("meta"):
        model = LoraAutoencoder(config, layout)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _check_lae_state(state: Mapping[str, Tensor], config: LaeConfig, layout: LoraLayout, *, where: str,
                     fix: str, error: type[HyperLoRAError] = ModelFileError) -> None:
    want = expected_lae_shapes(config, layout)
    missing = [k for k in want if k not in state]
    if missing:
        raise error(f"{where} lacks the tensor '{missing[0]}' ({len(missing)} missing in all); {fix}.")
    extra = [k for k in state if k not in want]
    if extra:
        raise error(f"{where} has the unknown tensor '{extra[0]}' ({len(extra)} unknown in all); {fix}.")
    for key, shape in want.items():
        got = tuple(state[key].shape)
        if got != shape:
            raise error(f"{where} has '{key}' of shape {list(got)}, but the config and layout need {list(shape)}; "
                        f"{fix}.")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ModelFileError(
            f"'{path.parent}' is not a DiffLoRA model folder: it has no {CONFIG_FILE} (or a save into it was "
            f"interrupted); choose the folder that holds {CONFIG_FILE}, or {_RESAVE}.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"'{path}' cannot be read as JSON ({exc}); {_RESAVE}.") from exc
    if not isinstance(data, dict):
        raise ModelFileError(f"'{path}' must hold a JSON object; {_RESAVE}.")
    unknown = [k for k in data if k not in CONFIG_FIELDS]
    missing = [k for k in CONFIG_FIELDS if k not in data]
    if data.get("format") != FORMAT_NAME:
        raise ModelFileError(f"'{path}' has format {data.get('format')!r}, not {FORMAT_NAME!r}: it is not a DiffLoRA "
                             "model description; choose a DiffLoRA model folder.")
    version = data.get("version")
    if version != FORMAT_VERSION:
        raise ModelFileError(f"'{path}' is DiffLoRA format version {version!r}; this pack reads version "
                             f"{FORMAT_VERSION}. Update the pack (a newer version) or {_RESAVE}.")
    if unknown:
        raise ModelFileError(f"'{path}' has the unknown field '{unknown[0]}' (known: {', '.join(CONFIG_FIELDS)}); "
                             f"remove it or {_RESAVE}.")
    if missing:
        raise ModelFileError(f"'{path}' lacks the field '{missing[0]}'; {_RESAVE}.")
    for name in ("dit", "condition"):
        if not isinstance(data[name], dict):
            raise ModelFileError(f"'{path}': '{name}' must be a JSON object, got {type(data[name]).__name__}; "
                                 f"{_RESAVE}.")
    scale = data["latent_scale"]
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ModelFileError(f"'{path}': latent_scale is {scale!r}; it must be a finite number > 0. {_RESAVE}.")
    return data


def _read_tensors(path: Path, part: str) -> dict[str, Tensor]:
    """Every tensor of the safetensors file ``path`` (strict header, NaN/inf refused, never unpickled)."""
    if not path.is_file():
        raise ModelFileError(f"The DiffLoRA folder '{path.parent}' has no {path.name}; copy the whole folder, or "
                             f"{_RESAVE}.")
    try:
        header = read_header(path)
    except ModelFileError as exc:
        # asked only after the header failed: a safetensors header length such as 0x1280 also starts with 0x80
        if looks_pickled(path):
            raise ModelFileError(f"'{path}' is a pickled PyTorch file, not safetensors; this pack never unpickles "
                                 f"files (they can run code). {_RESAVE[0].upper() + _RESAVE[1:]}.") from exc
        raise
    got_part = header.metadata.get(PART_META)
    if header.metadata.get("format") != FORMAT_NAME or got_part != part:
        raise ModelFileError(f"'{path}' is not the DiffLoRA {part} file (its metadata says format "
                             f"{header.metadata.get('format')!r}, part {got_part!r}); files of different models or "
                             f"parts were mixed: copy the whole folder again, or {_RESAVE}.")
    if not header.tensors:
        raise ModelFileError(f"'{path}' holds no tensors; {_RESAVE}.")
    with TensorReader(header) as reader:
        return {key: reader.read(key, copy=True) for key in header.tensors}


def read_difflora_folder(folder: str | os.PathLike[str]) -> DiffloraFiles:
    """Read and check a DiffLoRA model folder (see the module docstring); :class:`ModelFileError` naming the file
    and the fix for anything that is not exactly as :func:`save_difflora_folder` writes it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFileError(f"The DiffLoRA model folder '{folder}' does not exist or is not a folder; check the path.")
    path = folder / CONFIG_FILE
    data = _read_json(path)
    try:
        lae_config = LaeConfig.from_dict(data["lae"], f"'{path}': 'lae'")
        layout = LoraLayout.from_dict(data["layout"], f"'{path}': 'layout'")
    except HyperLoRAError as exc:
        raise ModelFileError(f"{exc} ({path.name} is damaged or from another pack version; {_RESAVE}.)") from exc
    lae_state = _read_tensors(folder / LAE_FILE, "lae")
    _check_lae_state(lae_state, lae_config, layout, where=f"'{folder / LAE_FILE}'",
                     fix=f"it does not match the LAE that {CONFIG_FILE} describes; {_RESAVE}")
    dit_state = _read_tensors(folder / DIT_FILE, "dit")
    return DiffloraFiles(folder, lae_config, layout, dict(data["dit"]), dict(data["condition"]),
                         float(data["latent_scale"]), lae_state, dit_state, int(data["version"]))


__all__ = [
    "CONFIG_FIELDS",
    "CONFIG_FILE",
    "DIT_FILE",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "LAE_FILE",
    "DiffloraFiles",
    "expected_lae_shapes",
    "read_difflora_folder",
    "save_difflora_folder",
]
