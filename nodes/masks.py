"""Face mask for re-painting a face in a photo (inpainting with the identity)."""

from __future__ import annotations

import logging

import torch

from ..hyperlora.pipeline import face_masks, images_from_comfy
from .common import (CATEGORY, STUDIO_MODEL, HyperLoRAHandle, check_interrupt, expect_handle, face_inputs, mappings,
                     no_face_input)

log = logging.getLogger(__name__)


class HyperLoRAStudioFaceMask:
    DESCRIPTION = (
        "Finds the face in each photo (as the identity nodes do) and returns a soft mask over it, for "
        "re-painting just the face with an identity: connect it to InpaintModelConditioning (or Set Latent "
        "Noise Mask) and to ImageCompositeMasked, so everything outside the face keeps its original pixels.")
    CATEGORY = f"{CATEGORY}/identity"
    RETURN_TYPES = ("MASK",)
    RETURN_NAMES = ("mask",)
    OUTPUT_TOOLTIPS = ("1 over the face, 0 elsewhere, soft edges; one mask per photo (empty for a faceless photo "
                       "with no_face 'skip').",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        shared = face_inputs()
        return {"required": {
            "hyper_lora": (STUDIO_MODEL, {"tooltip": "HyperLoRA Studio Loader (its face analyser finds the faces)."}),
            "images": ("IMAGE", {"tooltip": "The photo(s) whose face is to be re-painted (one size per batch)."}),
            "face_choice": shared["face_choice"],          # faces are found and chosen as for identities
            "face_index": shared["face_index"],
            "grow": ("FLOAT", {"default": 1.3, "min": 0.5, "max": 4.0, "step": 0.05,
                               "tooltip": "Size of the mask around the face outline (jaw and brows): 1.0 is the "
                                          "outline itself, 1.3 also covers the forehead, more takes hair and "
                                          "neck too."}),
            "feather": ("INT", {"default": 8, "min": 0, "max": 256, "step": 1,
                                "tooltip": "Blur of the mask edge in pixels, so the new face blends in."}),
            "no_face": no_face_input("gives it an empty mask (nothing is re-painted)"),
            "det_size": shared["det_size"],
        }}

    def run(self, hyper_lora: HyperLoRAHandle, images: torch.Tensor, face_choice: str, face_index: int,
            grow: float, feather: int, no_face: str, det_size: str) -> tuple[torch.Tensor]:
        hyper_lora = expect_handle(hyper_lora)
        check_interrupt()
        arrays = images_from_comfy(images)
        masks, chosen = face_masks(arrays, analyzer=hyper_lora.analyzer(), face_choice=face_choice,
                                   face_index=int(face_index), det_size=int(det_size), grow=float(grow),
                                   feather=float(feather), no_face=no_face)
        for i, face in enumerate(chosen):
            if face is not None:
                log.info("HyperLoRA Studio Face Mask: image %d: %s", i + 1, face.describe())
        return (torch.from_numpy(masks),)


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = mappings(("FaceMask", "Face Mask (for inpainting)", HyperLoRAStudioFaceMask))
