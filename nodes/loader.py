"""Loader: model folder + CLIP vision + AntelopeV2 -> the pack's loaded model (HYPERLORA_STUDIO_MODEL)."""

from __future__ import annotations

import logging
from typing import Any

import torch

import comfy.model_management as mm

from pathlib import Path

from ..hyperlora.bundle import clip_width_needed
from ..hyperlora.checkpoint import load_hyper_lora
from ..hyperlora.encoders import ClipVisionEncoder
from ..hyperlora.errors import ModelFileError, check_choice
from ..hyperlora.faces.setup import PROVIDERS, find_antelopev2
from ..hyperlora.generate import HyperLoRAModel
from ..hyperlora.memory import MEMORY_CHOICES, SAMPLING_HEADROOM
from ..hyperlora.integrity import IntegrityReport, redownload_hint, verify_folder
from ..hyperlora.precision import PRECISIONS, TOLERANCE, auto_precision
from ..hyperlora.spec import ANTELOPE_REQUIRED_FILES, MODEL_FILES, VIT_L14_WIDTH
from . import paths
from .common import CATEGORY, STUDIO_MODEL, HyperLoRAHandle, check_interrupt, mappings, progress

CLIP_FOLDER_FILES = ("config.json", "model.safetensors")

log = logging.getLogger(__name__)

DTYPES = ("auto", "fp16", "bf16", "fp32")


def pick_dtype(name: str) -> torch.dtype:
    """``auto``: on the CPU the fastest precision within tolerance of fp32 for this CPU (decided once,
    hyperlora.precision); on a GPU fp16 or bf16 where ComfyUI would run them, else fp32."""
    if name != "auto":
        return PRECISIONS[name]
    device = mm.get_torch_device()
    prefers = [d for d, ok in ((torch.float16, mm.should_use_fp16(device)),
                               (torch.bfloat16, mm.should_use_bf16(device))) if ok]
    return auto_precision(device, device_prefers=prefers).dtype


class HyperLoRAStudioLoader:
    DESCRIPTION = (
        "Loads a HyperLoRA model (for example sdxl_hyper_id_lora_v1_fidelity or _edit), the CLIP ViT-L/14 "
        "image encoder and the AntelopeV2 face-analysis pack. The architecture is read from the weights; "
        "nothing to type. ComfyUI moves the models to the GPU when used and may offload them for SDXL.")
    CATEGORY = f"{CATEGORY}/loaders"
    RETURN_TYPES = (STUDIO_MODEL, "STRING")
    RETURN_NAMES = ("hyper_lora", "info")
    OUTPUT_TOOLTIPS = ("The loaded HyperLoRA generator: feed it to the identity and LoRA nodes.",
                       "What was loaded and whether its files match the SHA-256 recorded at download (verified, "
                       "or unverified for folders copied by hand); connect it to a Preview Any node to read it.")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model": (paths.list_models(), {
                "tooltip": "HyperLoRA model folder under models/hyper_lora/hyper_lora/ (holding "
                           "hyper_lora_modules.json). 'fidelity' keeps more likeness, 'edit' follows prompts more."}),
            "clip_vision": (paths.list_clip_vision(), {
                "tooltip": "The OpenAI CLIP ViT-L/14 vision encoder: a Hugging Face folder under "
                           "models/hyper_lora/clip_vit/ or a ViT-L/14 file from models/clip_vision/."}),
            "insightface": (paths.list_insightface(), {
                "tooltip": "The AntelopeV2 face-analysis folder under models/insightface/models/ (also found "
                           "when the zip unpacked one folder too deep)."}),
            "dtype": (list(DTYPES), {
                "default": "auto",
                "tooltip": "Precision of the HyperLoRA and CLIP weights: auto keeps the LoRA basis as stored "
                           f"(fp16) and runs the resampler and CLIP in the fastest precision within {TOLERANCE:.0%} of fp32 "
                           "on this device: fp16/bf16 as ComfyUI runs on a GPU; on the CPU bf16 where it has bf16 matrix "
                           "hardware (AMX, AVX512-BF16), else fp32. fp16/bf16/fp32 force one precision for "
                           "everything (fp32 is exact)."}),
            "provider": (list(PROVIDERS), {
                "default": "auto",
                "tooltip": "Where face analysis (onnxruntime) runs: auto picks CUDA, ROCm or CoreML when "
                           "available, else the CPU."}),
        }, "optional": {
            "memory": (list(MEMORY_CHOICES), {
                "default": "auto",
                "tooltip": "Whether the HyperLoRA weights (about 5 GB for the release) stay in RAM while SDXL samples. "
                           "'release while sampling' drops them once the LoRA is built and reads them back from disk "
                           "(a few seconds) when a photo or setting changes; 'keep' holds them for the fastest "
                           "changes; 'auto' releases only when the free RAM as sampling starts is less than their "
                           f"size plus {SAMPLING_HEADROOM // 2**30} GB. Applies to images sampled through Apply, "
                           "Apply from Images and Identity on Prompt."}),
        }}

    # ComfyUI attaches a VALIDATE_INPUTS message to every input the function takes, so only 'model' is
    # checked here (with where to put a model folder); clip_vision and insightface get ComfyUI's own
    # "Value not in list" check, which names the input and the choices, and the full help when they run.
    @classmethod
    def VALIDATE_INPUTS(cls, model: str) -> bool | str:
        if model not in paths.list_models():
            return f"HyperLoRA model '{model}' is not available. {paths.model_help()}"
        return True

    @classmethod
    def IS_CHANGED(cls, model: str, clip_vision: str, insightface: str, **_: str) -> str:
        """Load again when a file of the chosen folders changed (size or time), so its check runs again."""
        try:
            return files_state([paths.resolve_model(model), paths.resolve_clip(clip_vision)[1],
                                paths.resolve_insightface(insightface)])
        except (ModelFileError, OSError):
            return ""     # the load itself reports what is missing

    def load(self, model: str, clip_vision: str, insightface: str, dtype: str,
             provider: str, memory: str = "auto") -> tuple[HyperLoRAHandle, str]:
        folder = paths.resolve_model(model)
        clip_kind, clip_path, processor = paths.resolve_clip(clip_vision)
        antelope = find_antelopev2(paths.resolve_insightface(insightface))   # all files there? (no insightface import)
        check_choice(memory, MEMORY_CHOICES, "The Loader's memory setting")
        bar = progress(3)
        checks = {
            "model": verify_folder(folder, uses=MODEL_FILES, fix=redownload_hint(folder),
                                   check_interrupt=check_interrupt),
            "clip": verify_folder(clip_path, uses=CLIP_FOLDER_FILES, fix=redownload_hint(clip_path),
                                  check_interrupt=check_interrupt) if clip_kind == "folder" else None,
            "faces": verify_folder(antelope, uses=ANTELOPE_REQUIRED_FILES, fix=redownload_hint(antelope),
                                   check_interrupt=check_interrupt),
        }
        bar.update(1)
        check_interrupt()
        hl_model, clip = load_weights(folder, clip_kind, clip_path, processor, dtype=dtype, model=model,
                                      clip_vision=clip_vision, bar=bar)
        info = describe_load(hl_model, clip, model=model, clip_vision=clip_vision, insightface=insightface,
                             provider=provider, checks=checks)
        log.info("HyperLoRA: loaded %s (%s) with CLIP %s\n%s", model, hl_model.module_dtype, clip_vision, info)
        handle = HyperLoRAHandle(
            model=hl_model, clip=clip, antelope_dir=antelope, provider=provider, memory=memory,
            names={"model": model, "clip_vision": clip_vision, "insightface": insightface},
            reload=lambda: load_weights(folder, clip_kind, clip_path, processor, dtype=dtype, model=model,
                                        clip_vision=clip_vision))
        return (handle, info)


def load_weights(folder: Path, clip_kind: str, clip_path: Path, processor: Path | None, *, dtype: str, model: str,
                 clip_vision: str, bar: Any = None) -> tuple[HyperLoRAModel, ClipVisionEncoder]:
    """The HyperLoRA model and the CLIP encoder in the Loader's ``dtype`` on ComfyUI's offload device (the load
    itself; the Loader checks the files first, and a released handle reads them back through this)."""
    torch_dtype = pick_dtype(dtype)
    offload = mm.unet_offload_device()
    # The 3 GB basis is only summed (memory-bound): with 'auto' it keeps the file's precision
    # (fp16 for the release) instead of doubling to fp32 on the CPU; the resampler and CLIP
    # run in the chosen compute precision.
    basis_dtype = None if dtype == "auto" else torch_dtype
    hl_model = load_hyper_lora(folder, dtype=basis_dtype, resampler_dtype=torch_dtype, device=offload,
                               check_interrupt=check_interrupt)
    if bar is not None:
        bar.update(1)
    check_interrupt()
    width = clip_width_needed(hl_model)
    strict = width in (None, VIT_L14_WIDTH)   # released models: the encoder must be ViT-L/14 itself
    if clip_kind == "file":
        clip = ClipVisionEncoder.from_single_file(clip_path, dtype=torch_dtype, require_vit_l14=strict,
                                                  processor_folder=paths.default_processor_dir())
    else:
        clip = ClipVisionEncoder.from_pretrained(clip_path, processor, dtype=torch_dtype, require_vit_l14=strict)
    if width is not None and clip.shape.hidden_size != width:
        raise ModelFileError(
            f"The CLIP vision model '{clip_vision}' gives features {clip.shape.hidden_size} wide, but the HyperLoRA "
            f"model '{model}' reads {width}-wide CLIP features; pick the CLIP model it was trained with "
            f"(OpenAI CLIP ViT-L/14 for the released models).")
    clip = clip.to(offload)
    if bar is not None:
        bar.update(1)
    return hl_model, clip


def files_state(paths_: list[Path]) -> str:
    """(name, size, mtime, ctime, inode) of the files in these folders (or of this file): changes when a file does,
    even when its modification time was put back (see hyperlora.integrity.file_state)."""
    parts = []
    for p in paths_:
        files = sorted(q for q in p.iterdir() if q.is_file()) if p.is_dir() else [p]
        for f in files:
            st = f.stat()
            parts.append(f"{f}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}")
    return "|".join(parts)


def _dtype(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


def describe_load(hl_model: HyperLoRAModel, clip: ClipVisionEncoder, *, model: str, clip_vision: str,
                  insightface: str, provider: str, checks: dict[str, IntegrityReport | None]) -> str:
    """The Loader's ``info`` text: what was loaded, in which precision, and each folder's integrity state."""
    arch = hl_model.arch
    base = f", Base-LoRA rank {arch.base_rank}" if arch.base_rank else ""
    unverified_file = "unverified (a single file from models/clip_vision; only downloaded folders carry recorded hashes)"
    states = {k: (r.describe() if r is not None else unverified_file) for k, r in checks.items()}
    return "\n".join([
        f"HyperLoRA model '{model}': {len(arch.modules)} modules, K {arch.hyper_dim}, rank {arch.rank}{base}; basis "
        f"{_dtype(hl_model.basis_dtype)}, resampler {_dtype(hl_model.module_dtype)}. Files: {states['model']}",
        f"CLIP vision '{clip_vision}': {clip.shape.hidden_size} wide. Files: {states['clip']}",
        f"Face analysis '{insightface}' (provider {provider}). Files: {states['faces']}",
    ])


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = mappings(("Loader", "Loader", HyperLoRAStudioLoader))
