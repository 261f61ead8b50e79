"""Files: save / load identities, export a LoRA as a standard .safetensors LoRA."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

import folder_paths

from . import paths
from .common import CATEGORY, HYPER_LORA_ID, LORA_MODEL

log = logging.getLogger(__name__)


def _next_path(prefix: str, out_dir: Path) -> tuple[Path, str]:
    """``<out_dir>/<prefix>_00001_.safetensors`` with the next free counter; also the subfolder."""
    out_dir.mkdir(parents=True, exist_ok=True)
    folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(prefix, str(out_dir))
    os.makedirs(folder, exist_ok=True)
    return Path(folder) / f"{filename}_{counter:05}_.safetensors", subfolder


class HyperLoRASaveIdentity:
    DESCRIPTION = (
        "Saves an identity (the HyperLoRA coefficients, a few hundred KB) to output/hyper_lora_identities, "
        "where Load Identity finds it. It only works with the HyperLoRA model that made it.")
    CATEGORY = f"{CATEGORY}/io"
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "identity": (HYPER_LORA_ID, {"tooltip": "The identity to save."}),
            "filename_prefix": ("STRING", {"default": "identity",
                                           "tooltip": "File name start; a counter and .safetensors are added. "
                                                      "May hold a subfolder, e.g. people/anna."}),
        }}

    def run(self, identity: Any, filename_prefix: str) -> dict:
        from ..hyperlora.identity import save_identity

        path, subfolder = _next_path(filename_prefix, Path(paths.identity_output_dir()))
        save_identity(identity, path)
        log.info("HyperLoRA: saved identity to %s", path)
        rel = str(Path(subfolder) / path.name) if subfolder else path.name
        return {"ui": {"hyper_lora_files": [{"filename": path.name, "subfolder": subfolder,
                                             "type": "output", "folder": paths.IDENTITY_SUBFOLDER,
                                             "load_name": rel}]}}


class HyperLoRALoadIdentity:
    DESCRIPTION = (
        "Loads an identity saved by Save Identity (from output/hyper_lora_identities, models/hyper_lora/identities "
        "or a 'hyper_lora_identities' entry of extra_model_paths.yaml).")
    CATEGORY = f"{CATEGORY}/io"
    RETURN_TYPES = (HYPER_LORA_ID,)
    RETURN_NAMES = ("identity",)
    OUTPUT_TOOLTIPS = ("The saved identity, for Build LoRA, Mix Identities or Concept Slider.",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "identity_file": (paths.list_identities(), {"tooltip": "An identity .safetensors file."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, identity_file: str) -> bool | str:
        if identity_file not in paths.list_identities():
            return f"Identity file '{identity_file}' is not available. {paths.identity_help()}"
        return True

    @classmethod
    def IS_CHANGED(cls, identity_file: str) -> str:
        path = folder_paths.get_full_path(paths.IDENTITY_KEY, identity_file)
        return f"{path}:{os.path.getmtime(path)}" if path and os.path.exists(path) else identity_file

    def run(self, identity_file: str) -> tuple[Any]:
        from ..hyperlora.identity import load_identity

        return (load_identity(paths.resolve_identity(identity_file)),)


class HyperLoRAExportLoRA:
    DESCRIPTION = (
        "Writes the LoRA as a standard kohya .safetensors file into the first 'loras' folder, so the core "
        "Load LoRA node lists it (press R to refresh) and other SDXL tools can use it.")
    CATEGORY = f"{CATEGORY}/io"
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "lora": (LORA_MODEL, {"tooltip": "The LoRA from Build LoRA, Mix Identities or Concept Slider."}),
            "filename_prefix": ("STRING", {"default": "hyperlora/identity",
                                           "tooltip": "File name start inside models/loras; a counter and "
                                                      ".safetensors are added."}),
            "dtype": (["fp16", "fp32"], {"default": "fp16",
                                         "tooltip": "Precision of the saved matrices; fp16 halves the file."}),
        }}

    def run(self, lora: dict[str, torch.Tensor], filename_prefix: str, dtype: str) -> dict:
        from ..hyperlora.lora_file import lora_metadata, save_lora_file

        out_dir = paths.lora_output_dir()
        path, subfolder = _next_path(filename_prefix, out_dir)
        meta = lora_metadata(title=path.stem)
        save_lora_file(lora, path, metadata=meta, dtype=torch.float16 if dtype == "fp16" else torch.float32)
        log.info("HyperLoRA: exported LoRA to %s", path)
        rel = str(Path(subfolder) / path.name) if subfolder else path.name
        return {"ui": {"hyper_lora_files": [{"filename": path.name, "subfolder": subfolder, "type": "loras",
                                             "load_name": rel}]}}


NODE_CLASS_MAPPINGS = {
    "HyperLoRASaveIdentity": HyperLoRASaveIdentity,
    "HyperLoRALoadIdentity": HyperLoRALoadIdentity,
    "HyperLoRAExportLoRA": HyperLoRAExportLoRA,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "HyperLoRASaveIdentity": "HyperLoRA Save Identity",
    "HyperLoRALoadIdentity": "HyperLoRA Load Identity",
    "HyperLoRAExportLoRA": "HyperLoRA Export LoRA",
}
