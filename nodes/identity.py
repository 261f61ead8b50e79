"""Identity from Images: face photos -> an identity (+ the crops the model saw)."""

from __future__ import annotations

from typing import Any

import torch

from .common import (CATEGORY, STUDIO_MODEL, STUDIO_IDENTITY, display_name, face_inputs,
                     make_identity, mappings, photos, single)

TITLE = "Identity from Images"


class HyperLoRAStudioIdentityFromImages:
    DESCRIPTION = (
        "Finds the face in each photo and turns them into one identity (the HyperLoRA coefficients, the mean "
        "over all photos). Several photos of one person give a steadier likeness. Connect it to Build LoRA, "
        "Save Identity or Mix Identities.")
    CATEGORY = f"{CATEGORY}/identity"
    RETURN_TYPES = (STUDIO_IDENTITY, "IMAGE")
    RETURN_NAMES = ("identity", "crops")
    OUTPUT_TOOLTIPS = (
        "The identity: HyperLoRA coefficients of this person for the loaded model.",
        "The face crops the model saw (one per photo used), to check detection and background removal.",
    )
    FUNCTION = "run"
    # a list of images (a list node, photos of different sizes) is one set of photos of one person,
    # not one identity per photo: the node is called once with every input as a list
    INPUT_IS_LIST = True

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "hyper_lora": (STUDIO_MODEL, {"tooltip": "The model from HyperLoRA Studio Loader."}),
            "images": ("IMAGE", {"tooltip": "One or more photos of the same person (a batch, or a list of photos "
                                            "of different sizes: all are used together)."}),
            **face_inputs(),
        }}

    def run(self, hyper_lora: Any, images: Any, **kwargs: Any) -> tuple[Any, torch.Tensor]:
        node = display_name(TITLE)
        options = {k: single(v, k, node) for k, v in kwargs.items()}
        identity, crops = make_identity(single(hyper_lora, "hyper_lora", node), photos(images, node), options)
        return (identity, crops)


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = mappings(
    ("IdentityFromImages", TITLE, HyperLoRAStudioIdentityFromImages))
