"""DiffLoRA nodes: a DiffLoRA model folder -> LoRAs sampled for a person's photos, or for nobody in particular.

Thin glue over :mod:`hyperlora.difflora.model`.  The photos' condition (MIF: ArcFace + CLIP features) is made
with the face pipeline the HyperLoRA Studio Loader already loaded (its AntelopeV2 analyser and CLIP encoder),
so the DiffLoRA Loader loads the DiffLoRA model only and no second CLIP / face model is ever held.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import comfy.model_management as mm
import torch

from ..hyperlora.difflora.condition import mif_from_conditions
from ..hyperlora.difflora.diffusion import MAX_GUIDANCE, MAX_STEPS
from ..hyperlora.difflora.model import MAX_SEEDS, DiffLoraModel
from ..hyperlora.errors import LoraError, ModelFileError, SettingError
from ..hyperlora.identity import check_photo_count
from ..hyperlora.lora import GeneratedLora, provenance_of
from ..hyperlora.pipeline import extract_conditions, images_from_comfy
from . import paths
from .common import (
    CATEGORY,
    LORA_MODEL,
    STUDIO_DIFFLORA,
    STUDIO_MODEL,
    HyperLoRAHandle,
    check_interrupt,
    count_images,
    display_name,
    expect_handle,
    face_inputs,
    face_options,
    images_to_comfy,
    managed,
    mappings,
    node_id,
    photos,
    progress,
    progress_callback,
    single,
)
from .loader import DTYPES, files_state, pick_dtype

log = logging.getLogger(__name__)

LOADER = "DiffLoRA Loader"
FROM_IMAGES = "LoRA from Images (DiffLoRA)"
NEW_PERSON = "New Person (DiffLoRA)"

SEED_MAX = 2 ** 63 - MAX_SEEDS
"""Highest first seed: the candidates use ``seed, seed + 1, ...`` and every one must stay below 2**63."""
SEED = ("INT", {"default": 0, "min": 0, "max": SEED_MAX, "control_after_generate": True,
                "tooltip": "Seed of the first LoRA; candidate i uses seed + i. The same seed, photos and model give "
                           "the same LoRA."})
BATCH_COUNT = ("INT", {"default": 1, "min": 1, "max": MAX_SEEDS, "step": 1,
                       "tooltip": "How many LoRAs to sample (one per seed, seed to seed + batch_count - 1). More than "
                                  "one comes out as a list: Apply then runs once per LoRA, and the images can be "
                                  "ranked together by Best of N or Face Similarity."})
STEPS = ("INT", {"default": 30, "min": 1, "max": MAX_STEPS, "step": 1,
                 "tooltip": "Sampling steps of the diffusion model (Euler); 20 to 50 is plenty."})
GUIDANCE = ("FLOAT", {"default": 1.0, "min": 0.0, "max": MAX_GUIDANCE, "step": 0.1,
                      "tooltip": "Classifier-free guidance on the photos' condition: 1 = the conditional pass only; "
                                 "about 2 to 5 sticks closer to the photos (two passes per step)."})


class DiffLoraHandle:
    """A loaded DiffLoRA model (the ``STUDIO_DIFFLORA`` type): its LAE and DiT in one ``ModelPatcher``, so
    ComfyUI moves them to the GPU for sampling (:meth:`load`) and may offload them for SDXL."""

    def __init__(self, model: DiffLoraModel, *, name: str, folder: Path) -> None:
        holder = torch.nn.ModuleDict({"lae": model.lae, "dit": model.dit})
        self.patcher = managed(holder, mm.get_torch_device(), mm.unet_offload_device())
        self.model = model
        self.name = name
        self.folder = folder

    def load(self) -> None:
        mm.load_models_gpu([self.patcher], force_full_load=True)

    def __repr__(self) -> str:
        return f"DiffLoraHandle({self.name!r})"


def expect_difflora(value: Any) -> DiffLoraHandle:
    """``value`` if it is a loaded DiffLoRA model of this pack; else LoraError naming what to connect."""
    if isinstance(value, DiffLoraHandle):
        return value
    raise LoraError(f"The input 'difflora' got a {type(value).__module__}.{type(value).__name__}, not a DiffLoRA "
                    f"model. Connect the '{display_name(LOADER)}' node ({node_id('DiffLoRALoader')}) to it.")


def describe(handle: DiffLoraHandle, dtype: torch.dtype) -> str:
    """The Loader's ``info`` text: the model, its LoRA layout, latent, DiT and condition."""
    m = handle.model
    layout = m.lae.layout
    ranks = sorted({mod.rank for mod in layout.modules})
    spec = m.dit.mif_spec
    cfg = m.dit.config
    clip = (f"CLIP {spec.clip_tokens} token(s) {spec.clip_dim} wide" if spec.clip_tokens else "no CLIP")
    return "\n".join([
        f"DiffLoRA model '{handle.name}' (fingerprint {m.fingerprint}), {str(dtype).removeprefix('torch.')}.",
        (f"LoRAs: {len(layout)} modules (e.g. {layout.prefixes[0]}), rank {'/'.join(map(str, ranks))}, "
         f"{layout.num_params:,} values."),
        f"Latent [{cfg.tokens}, {cfg.channels}]; DiT width {cfg.width}, depth {cfg.depth}.",
        (f"Condition: ArcFace {spec.arcface_dim} wide, {clip} (the photos' features come from the HyperLoRA "
         "Studio Loader's face analysis and CLIP)."),
    ])


class HyperLoRAStudioDiffLoRALoader:
    DESCRIPTION = (
        "Loads a DiffLoRA model folder (difflora.json + lae.safetensors + dit.safetensors) from models/difflora. "
        "A DiffLoRA model samples LoRAs: 'LoRA from Images (DiffLoRA)' for the person in photos, 'New Person "
        "(DiffLoRA)' for someone who does not exist. The face analysis and CLIP features of the photos come from "
        "the HyperLoRA Studio Loader connected to 'LoRA from Images' (one CLIP and face model for both), so this "
        "node loads the DiffLoRA model only.")
    CATEGORY = f"{CATEGORY}/loaders"
    RETURN_TYPES = (STUDIO_DIFFLORA, "STRING")
    RETURN_NAMES = ("difflora", "info")
    OUTPUT_TOOLTIPS = ("The loaded DiffLoRA model: feed it to LoRA from Images (DiffLoRA) or New Person (DiffLoRA).",
                       "What was loaded: the LoRA layout, the latent and the condition it reads.")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model": (paths.list_difflora(), {
                "tooltip": "DiffLoRA model folder under models/difflora/ (or a 'difflora' entry of "
                           "extra_model_paths.yaml), holding difflora.json."}),
            "dtype": (list(DTYPES), {
                "default": "auto",
                "tooltip": "Precision of the DiffLoRA weights: auto picks the fastest within tolerance of fp32 on "
                           "this device; fp32 is exact. Sampling keeps the latents in fp32 either way."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, model: str) -> bool | str:
        if model not in paths.list_difflora():
            return f"DiffLoRA model '{model}' is not available. {paths.difflora_help()}"
        return True

    @classmethod
    def IS_CHANGED(cls, model: str, **_: str) -> str:
        """Load again when a file of the folder changed."""
        try:
            return files_state([paths.resolve_difflora(model)])
        except (ModelFileError, OSError):
            return ""

    def load(self, model: str, dtype: str) -> tuple[DiffLoraHandle, str]:
        folder = paths.resolve_difflora(model)
        torch_dtype = pick_dtype(dtype)
        check_interrupt()
        loaded = DiffLoraModel.from_folder(folder, dtype=torch_dtype, device=mm.unet_offload_device(), name=model)
        handle = DiffLoraHandle(loaded, name=model, folder=folder)
        info = describe(handle, torch_dtype)
        log.info("HyperLoRA Studio: loaded DiffLoRA %s\n%s", model, info)
        return (handle, info)


def candidate_seeds(seed: int, batch_count: int, node: str) -> list[int]:
    """``seed .. seed + batch_count - 1``, or SettingError naming the node's inputs (an API prompt skips the
    widgets' limits)."""
    for name, value, low, high in (("seed", seed, 0, SEED_MAX), ("batch_count", batch_count, 1, MAX_SEEDS)):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise SettingError(f"{node}: the input '{name}' is {value!r}; give a whole number from {low} to {high}.")
    return [seed + i for i in range(batch_count)]


def with_photos(loras: list[GeneratedLora], num_images: int) -> list[GeneratedLora]:
    """The LoRAs with the number of photos in their provenance (Export LoRA writes it into the file)."""
    return [GeneratedLora(lora, {**provenance_of(lora), "num_images": str(num_images)}) for lora in loras]


def seeds_line(loras: list[GeneratedLora]) -> str:
    return ", ".join(f"#{i + 1}: seed {provenance_of(lora).get('seed', '?')}" for i, lora in enumerate(loras))


class HyperLoRAStudioDiffLoRAFromImages:
    DESCRIPTION = (
        "Samples LoRAs of the person in the photos with a DiffLoRA model: the faces are found and encoded by the "
        "connected HyperLoRA Studio Loader (its AntelopeV2 face analysis and CLIP; the HyperLoRA model itself is "
        "not used), then the DiffLoRA model samples one LoRA per seed. batch_count > 1 gives a list of candidate "
        "LoRAs: Apply runs once per LoRA, and Best of N ranks the images they make. Each LoRA is a standard "
        "kohya LORA_MODEL for Apply, Export LoRA or the core LoRA nodes.")
    CATEGORY = f"{CATEGORY}/difflora"
    RETURN_TYPES = (LORA_MODEL, "IMAGE", "STRING")
    RETURN_NAMES = ("lora", "crops", "info")
    OUTPUT_IS_LIST = (True, False, False)
    OUTPUT_TOOLTIPS = (
        "The sampled LoRAs, one per seed (a list when batch_count > 1).",
        "The face crops that were encoded (one per photo used), to check detection.",
        "Which seed each LoRA has, and how many photos were used.")
    FUNCTION = "run"
    INPUT_IS_LIST = True     # a list of photos (different sizes) is one set of photos of one person

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "difflora": (STUDIO_DIFFLORA, {"tooltip": "The model from DiffLoRA Loader."}),
            "hyper_lora": (STUDIO_MODEL, {"tooltip": "HyperLoRA Studio Loader: its face analysis and CLIP make the "
                                                     "photos' condition (load the CLIP the DiffLoRA model was "
                                                     "trained with, OpenAI CLIP ViT-L/14)."}),
            "images": ("IMAGE", {"tooltip": "One or more photos of the same person (a batch, or a list of photos "
                                            "of different sizes: all are used together)."}),
            "seed": SEED,
            "batch_count": BATCH_COUNT,
            "steps": STEPS,
            "guidance": GUIDANCE,
            **face_inputs(),
        }}

    def run(self, difflora: Any, hyper_lora: Any, images: Any, seed: Any, batch_count: Any, steps: Any,
            guidance: Any, **kwargs: Any) -> tuple[list[GeneratedLora], torch.Tensor, str]:
        node = display_name(FROM_IMAGES)
        handle = expect_difflora(single(difflora, "difflora", node))
        faces = expect_handle(single(hyper_lora, "hyper_lora", node))
        seeds = candidate_seeds(single(seed, "seed", node), single(batch_count, "batch_count", node), node)
        steps, guidance = single(steps, "steps", node), single(guidance, "guidance", node)
        options = face_options({k: single(v, k, node) for k, v in kwargs.items()})
        spec = handle.model.dit.mif_spec
        check_clip_width(handle, faces)
        images = photos(images, node)
        check_photo_count(count_images(images), node)
        check_interrupt()
        analyzer = faces.analyzer()
        arrays = images_from_comfy(images)
        bar = progress(len(arrays) + steps)
        if spec.clip_tokens:
            mm.load_models_gpu([faces.clip_patcher], force_full_load=True)
        cond = extract_conditions(arrays, analyzer=analyzer, clip=faces.clip if spec.clip_tokens else None,
                                  need_id=True, need_clip=bool(spec.clip_tokens), need_base=False, options=options,
                                  check_interrupt=check_interrupt, progress=progress_callback(bar))
        mif = mif_from_conditions(cond, spec)
        check_interrupt()
        handle.load()
        loras = handle.model.loras_from_mif(mif, seeds=seeds, steps=steps, guidance=guidance,
                                            callback=progress_callback(bar, len(arrays)),
                                            check_interrupt=check_interrupt)
        loras = with_photos(loras, len(cond.used))
        skipped = f", {len(cond.skipped)} skipped (no face)" if cond.skipped else ""
        info = (f"DiffLoRA '{handle.name}': {len(loras)} LoRA(s) from {len(cond.used)} photo(s){skipped}, "
                f"{steps} steps, guidance {guidance:g}. {seeds_line(loras)}")
        log.info("%s: %s", node, info)
        return (loras, images_to_comfy(list(cond.crops)), info)


def check_clip_width(handle: DiffLoraHandle, faces: HyperLoRAHandle) -> None:
    """The CLIP of the HyperLoRA Studio Loader must give the features the DiffLoRA model was trained on."""
    spec = handle.model.dit.mif_spec
    width = faces.clip.shape.hidden_size
    if spec.clip_tokens and width != spec.clip_dim:
        raise ModelFileError(
            f"The CLIP vision model '{faces.names.get('clip_vision', '?')}' of the HyperLoRA Studio Loader gives "
            f"features {width} wide, but the DiffLoRA model '{handle.name}' reads {spec.clip_dim}-wide CLIP "
            "features; choose the CLIP model it was trained with (OpenAI CLIP ViT-L/14) in that Loader.")


class HyperLoRAStudioDiffLoRANewPerson:
    DESCRIPTION = (
        "Samples the LoRA of a person who does not exist: the DiffLoRA model without any photo (its learned "
        "'no condition'). The same seed gives the same person again; save one you like with Export LoRA (the "
        "core Load LoRA node reads it back). batch_count > 1 gives a list of people.")
    CATEGORY = f"{CATEGORY}/difflora"
    RETURN_TYPES = (LORA_MODEL, "STRING")
    RETURN_NAMES = ("lora", "info")
    OUTPUT_IS_LIST = (True, False)
    OUTPUT_TOOLTIPS = ("The sampled LoRAs, one per seed (a list when batch_count > 1).",
                       "Which seed each LoRA has.")
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "difflora": (STUDIO_DIFFLORA, {"tooltip": "The model from DiffLoRA Loader."}),
            "seed": SEED,
            "batch_count": BATCH_COUNT,
            "steps": STEPS,
        }}

    def run(self, difflora: Any, seed: int, batch_count: int, steps: int) -> tuple[list[GeneratedLora], str]:
        node = display_name(NEW_PERSON)
        handle = expect_difflora(difflora)
        seeds = candidate_seeds(seed, batch_count, node)
        bar = progress(steps)
        check_interrupt()
        handle.load()
        loras = handle.model.new_person(seeds, steps, callback=progress_callback(bar),
                                        check_interrupt=check_interrupt)
        info = f"DiffLoRA '{handle.name}': {len(loras)} new person(s), {steps} steps. {seeds_line(loras)}"
        log.info("%s: %s", node, info)
        return (loras, info)


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = mappings(
    ("DiffLoRALoader", LOADER, HyperLoRAStudioDiffLoRALoader),
    ("DiffLoRAFromImages", FROM_IMAGES, HyperLoRAStudioDiffLoRAFromImages),
    ("DiffLoRANewPerson", NEW_PERSON, HyperLoRAStudioDiffLoRANewPerson),
)
