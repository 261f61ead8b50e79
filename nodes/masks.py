"""Face mask for re-painting a face in a photo (inpainting with the identity)."""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..hyperlora.pipeline import face_masks, images_from_comfy
from .common import (CATEGORY, STUDIO_MODEL, check_interrupt, display_name, expect_handle, face_inputs, mappings,
                     no_face_input, progress, progress_callback, single)

TITLE = "Face Mask (for inpainting)"

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
                       "with no_face 'skip'). A list of photos gives a list of masks, each in its photo's size.",)
    FUNCTION = "run"
    # a list of images (e.g. photos of different sizes) is masked photo by photo in one call: the output
    # is a list with one MASK batch per input batch, each in the size of its photos
    INPUT_IS_LIST = True
    OUTPUT_IS_LIST = (True,)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        shared = face_inputs()
        return {"required": {
            "hyper_lora": (STUDIO_MODEL, {"tooltip": "HyperLoRA Studio Loader (its face analyser finds the faces)."}),
            "images": ("IMAGE", {"tooltip": "The photo(s) whose face is to be re-painted (a batch, or a list of "
                                            "photos of different sizes: one mask each)."}),
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

    def run(self, hyper_lora: Any, images: Any, face_choice: Any, face_index: Any, grow: Any, feather: Any,
            no_face: Any, det_size: Any) -> tuple[list[torch.Tensor]]:
        node = display_name(TITLE)
        o = {k: single(v, k, node) for k, v in dict(face_choice=face_choice, face_index=face_index, grow=grow,
                                                     feather=feather, no_face=no_face, det_size=det_size).items()}
        hyper_lora = expect_handle(single(hyper_lora, "hyper_lora", node))
        check_interrupt()
        batches = [images_from_comfy(b) for b in (images if isinstance(images, list) else [images])]
        bar = progress(sum(len(b) for b in batches))
        out, done = [], 0
        for arrays in batches:
            masks, chosen = face_masks(arrays, analyzer=hyper_lora.analyzer(), face_choice=o["face_choice"],
                                       face_index=int(o["face_index"]), det_size=int(o["det_size"]),
                                       grow=float(o["grow"]), feather=float(o["feather"]), no_face=o["no_face"],
                                       check_interrupt=check_interrupt, progress=progress_callback(bar, done))
            for i, face in enumerate(chosen):
                if face is not None:
                    log.info("%s: image %d: %s", node, done + i + 1, face.describe())
            done += len(arrays)
            out.append(torch.from_numpy(masks))
        return (out,)


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = mappings(("FaceMask", TITLE, HyperLoRAStudioFaceMask))
