"""Mix identities and the concept slider: several identities -> one LoRA_MODEL."""

from __future__ import annotations

from typing import Any

import torch

from ..hyperlora.bundle import concept_slider, mix_identities
from ..hyperlora.checks import MAX_SLIDER_STRENGTH, check_strength
from .common import (CATEGORY, STUDIO_MODEL, STUDIO_IDENTITY, LORA_MODEL, HyperLoRAHandle, check_interrupt, expect_handle,
                     display_name, expect_identity, mappings, node_id)

MAX_IDENTITIES = 4
WEIGHT_TOOLTIP = "Share of this identity. Weights need not sum to 1; negative values push away from it."


class HyperLoRAStudioMixIdentities:
    DESCRIPTION = (
        "Blends two to four identities into one LoRA: 'coefficients' interpolates the HyperLoRA coefficients and "
        "builds one LoRA (the authors' ID interpolation, a believable in-between face); 'weight_delta' adds the "
        "LoRAs' weight changes exactly (a larger LoRA).")
    CATEGORY = f"{CATEGORY}/mix"
    RETURN_TYPES = (LORA_MODEL,)
    RETURN_NAMES = ("lora",)
    OUTPUT_TOOLTIPS = ("The mixed LoRA, for HyperLoRA Studio Apply.",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        def weight(default: float) -> tuple:
            return ("FLOAT", {"default": default, "min": -2.0, "max": 2.0, "step": 0.01, "tooltip": WEIGHT_TOOLTIP})

        required: dict[str, tuple] = {
            "hyper_lora": (STUDIO_MODEL, {"tooltip": "The model from HyperLoRA Studio Loader that made the identities."}),
            "identity_1": (STUDIO_IDENTITY, {"tooltip": "First identity."}),
            "weight_1": weight(0.5),
            "identity_2": (STUDIO_IDENTITY, {"tooltip": "Second identity."}),
            "weight_2": weight(0.5),
            "mode": (["coefficients", "weight_delta"], {
                "default": "coefficients",
                "tooltip": "'coefficients': mix the identities before building one LoRA (smooth interpolation). "
                           "'weight_delta': weighted sum of the built LoRAs' weight changes."}),
        }
        optional: dict[str, tuple] = {}
        for i in range(3, MAX_IDENTITIES + 1):
            optional[f"identity_{i}"] = (STUDIO_IDENTITY, {"tooltip": f"Optional identity {i}."})
            optional[f"weight_{i}"] = weight(0.0)
        return {"required": required, "optional": optional}

    def run(self, hyper_lora: HyperLoRAHandle, mode: str, **kwargs: Any) -> tuple[dict[str, torch.Tensor]]:
        hyper_lora = expect_handle(hyper_lora)
        identities, weights = [], []
        for i in range(1, MAX_IDENTITIES + 1):
            ident = kwargs.get(f"identity_{i}")
            if ident is not None:
                identities.append(expect_identity(ident, f"identity_{i}"))
                weights.append(float(kwargs.get(f"weight_{i}", 0.0)))
        check_interrupt()
        hyper_lora.load()
        return (mix_identities(hyper_lora.model, identities, weights, mode=mode),)


class HyperLoRAStudioConceptSlider:
    DESCRIPTION = (
        "A slider LoRA from two identities of one person: the photo with a change (older, smiling, glasses...) "
        "minus the original. Apply it with a signed strength to add or remove that change.")
    CATEGORY = f"{CATEGORY}/mix"
    RETURN_TYPES = (LORA_MODEL,)
    RETURN_NAMES = ("lora",)
    OUTPUT_TOOLTIPS = ("strength x (LoRA of edited - LoRA of original), for HyperLoRA Studio Apply.",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "hyper_lora": (STUDIO_MODEL, {"tooltip": "The model from HyperLoRA Studio Loader that made both identities."}),
            "edited": (STUDIO_IDENTITY, {"tooltip": "Identity of the edited photo (with the concept)."}),
            "original": (STUDIO_IDENTITY, {"tooltip": "Identity of the original photo (without it)."}),
            "strength": ("FLOAT", {"default": 1.0, "min": -MAX_SLIDER_STRENGTH, "max": MAX_SLIDER_STRENGTH, "step": 0.05,
                                   "tooltip": "Signed strength: positive adds the concept, negative removes it."}),
        }}

    def run(self, hyper_lora: HyperLoRAHandle, edited: Any, original: Any, strength: float) -> tuple[dict[str, torch.Tensor]]:
        strength = check_strength(strength, where=f"{display_name('Concept Slider')} ({node_id('ConceptSlider')})",
                                  limit=MAX_SLIDER_STRENGTH)
        hyper_lora = expect_handle(hyper_lora)
        edited, original = expect_identity(edited, "edited"), expect_identity(original, "original")
        check_interrupt()
        hyper_lora.load()
        return (concept_slider(hyper_lora.model, edited, original, strength=strength),)


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = mappings(
    ("MixIdentities", "Mix Identities", HyperLoRAStudioMixIdentities),
    ("ConceptSlider", "Concept Slider", HyperLoRAStudioConceptSlider),
)
