"""Identity from Images: face photos -> an identity (+ the crops the model saw)."""

from __future__ import annotations

from typing import Any

import torch

from .common import CATEGORY, STUDIO_MODEL, STUDIO_IDENTITY, HyperLoRAHandle, face_inputs, make_identity, mappings


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

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "hyper_lora": (STUDIO_MODEL, {"tooltip": "The model from HyperLoRA Studio Loader."}),
            "images": ("IMAGE", {"tooltip": "One or more photos of the same person (a batch)."}),
            **face_inputs(),
        }}

    def run(self, hyper_lora: HyperLoRAHandle, images: torch.Tensor, **kwargs: Any) -> tuple[Any, torch.Tensor]:
        identity, crops = make_identity(hyper_lora, images, kwargs)
        return (identity, crops)


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = mappings(
    ("IdentityFromImages", "Identity from Images", HyperLoRAStudioIdentityFromImages))
