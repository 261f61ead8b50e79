"""Loader: model folder + CLIP vision + AntelopeV2 -> the pack's loaded model (HYPERLORA_STUDIO_MODEL)."""

from __future__ import annotations

import logging

import torch

import comfy.model_management as mm

from ..hyperlora.bundle import clip_width_needed
from ..hyperlora.checkpoint import load_hyper_lora
from ..hyperlora.encoders import ClipVisionEncoder
from ..hyperlora.errors import ModelFileError
from ..hyperlora.faces.setup import PROVIDERS, find_antelopev2
from ..hyperlora.spec import VIT_L14_WIDTH
from . import paths
from .common import CATEGORY, STUDIO_MODEL, HyperLoRAHandle, check_interrupt, mappings, progress

log = logging.getLogger(__name__)

DTYPES = ("auto", "fp16", "bf16", "fp32")


def pick_dtype(name: str) -> torch.dtype:
    """``auto``: fp16 where ComfyUI would run fp16 on its device, else bf16, else fp32 (CPU)."""
    if name != "auto":
        return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]
    device = mm.get_torch_device()
    if mm.should_use_fp16(device):
        return torch.float16
    if mm.should_use_bf16(device):
        return torch.bfloat16
    return torch.float32


class HyperLoRAStudioLoader:
    DESCRIPTION = (
        "Loads a HyperLoRA model (for example sdxl_hyper_id_lora_v1_fidelity or _edit), the CLIP ViT-L/14 "
        "image encoder and the AntelopeV2 face-analysis pack. The architecture is read from the weights; "
        "nothing to type. ComfyUI moves the models to the GPU when used and may offload them for SDXL.")
    CATEGORY = f"{CATEGORY}/loaders"
    RETURN_TYPES = (STUDIO_MODEL,)
    RETURN_NAMES = ("hyper_lora",)
    OUTPUT_TOOLTIPS = ("The loaded HyperLoRA generator: feed it to the identity and LoRA nodes.",)
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
                           "(fp16) and runs the resampler and CLIP in fp16 on GPUs that handle it well, fp32 on the "
                           "CPU; fp16/bf16/fp32 force one precision for everything."}),
            "provider": (list(PROVIDERS), {
                "default": "auto",
                "tooltip": "Where face analysis (onnxruntime) runs: auto picks CUDA, ROCm or CoreML when "
                           "available, else the CPU."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, model: str, clip_vision: str, insightface: str) -> bool | str:
        if model not in paths.list_models():
            return f"HyperLoRA model '{model}' is not available. {paths.model_help()}"
        if clip_vision not in paths.list_clip_vision():
            return f"CLIP vision model '{clip_vision}' is not available. {paths.clip_help()}"
        if insightface not in paths.list_insightface():
            return f"Face-analysis folder '{insightface}' is not available. {paths.insightface_help()}"
        return True

    def load(self, model: str, clip_vision: str, insightface: str, dtype: str, provider: str) -> tuple[HyperLoRAHandle]:
        folder = paths.resolve_model(model)
        clip_kind, clip_path, processor = paths.resolve_clip(clip_vision)
        antelope = find_antelopev2(paths.resolve_insightface(insightface))   # all files there? (no insightface import)
        torch_dtype = pick_dtype(dtype)
        offload = mm.unet_offload_device()
        bar = progress(2)
        # The 3 GB basis is only summed (memory-bound): with 'auto' it keeps the file's precision
        # (fp16 for the release) instead of doubling to fp32 on the CPU; the resampler and CLIP
        # run in the chosen compute precision.
        basis_dtype = None if dtype == "auto" else torch_dtype
        hl_model = load_hyper_lora(folder, dtype=basis_dtype, resampler_dtype=torch_dtype, device=offload)
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
        bar.update(1)
        log.info("HyperLoRA: loaded %s (%s) with CLIP %s", model, torch_dtype, clip_vision)
        handle = HyperLoRAHandle(model=hl_model, clip=clip, antelope_dir=antelope, provider=provider,
                                 names={"model": model, "clip_vision": clip_vision, "insightface": insightface})
        return (handle,)


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = mappings(("Loader", "Loader", HyperLoRAStudioLoader))
