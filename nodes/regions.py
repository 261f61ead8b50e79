"""Crop by Mask / Paste by Mask: the crop-upscale-re-render-paste pass of a face detailer.

ComfyUI's core can crop at fixed coordinates (ImageCrop) and composite at fixed coordinates
(ImageCompositeMasked), but nothing measures a mask's bounds, scales the crop to a size the
sampler likes and scales it back; these two nodes do that, nothing more.
"""

from __future__ import annotations

from typing import Any

import torch

from ..hyperlora.regions import MAX_PADDING, MAX_SIZE, MIN_SIZE, SIZE_MULTIPLE, MaskCrop, crop_region, paste_region
from ..hyperlora.spec import CROP_TYPE
from .common import CATEGORY, mappings

CROP = CROP_TYPE


class HyperLoRAStudioCropByMask:
    DESCRIPTION = (
        "Cuts the square around a mask (a face mask, with some context) out of an image and scales it so its "
        "longer side is 'size' pixels, for re-rendering a small face at full resolution. Re-render the crop (VAE "
        "Encode -> Set Latent Noise Mask with the mask output -> KSampler with the identity, denoise about 0.5), "
        "then put it back with Paste by Mask. An empty mask crops the whole image.")
    CATEGORY = f"{CATEGORY}/faces"
    RETURN_TYPES = ("IMAGE", "MASK", CROP)
    RETURN_NAMES = ("image", "mask", "crop")
    OUTPUT_TOOLTIPS = (
        "The cropped image scaled to 'size' (sides rounded to multiples of 8).",
        "The mask cut and scaled the same way (for Set Latent Noise Mask / InpaintModelConditioning).",
        "Where the crop came from and the mask to paste it back through; connect it to Paste by Mask.")
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The picture to take the region from."}),
            "mask": ("MASK", {"tooltip": "The region, e.g. a face mask from Face Mask or Face Masks (same size as "
                                         "the image; with a batch, the box holds every mask)."}),
            "padding": ("FLOAT", {"default": 0.5, "min": 0.0, "max": MAX_PADDING, "step": 0.05,
                                  "tooltip": "Context around the mask's bounds, as a fraction of their size on "
                                             "each side (0.5: the crop is twice as wide as the face). The sampler "
                                             "needs some context to fit the face in."}),
            "size": ("INT", {"default": 1024, "min": MIN_SIZE, "max": MAX_SIZE, "step": SIZE_MULTIPLE,
                             "tooltip": "Longer side of the scaled crop in pixels; 1024 is SDXL's native size."}),
        }}

    def run(self, image: torch.Tensor, mask: torch.Tensor, padding: float, size: int) -> tuple[Any, ...]:
        crop_image, crop_mask, crop = crop_region(image, mask, padding=float(padding), size=int(size))
        return (crop_image, crop_mask, crop)


class HyperLoRAStudioPasteByMask:
    DESCRIPTION = (
        "Puts a re-rendered crop from Crop by Mask back into the picture: scaled back to the crop's box and "
        "blended through the (feathered) mask, so every pixel outside the mask keeps its value.")
    CATEGORY = f"{CATEGORY}/faces"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The picture with the region replaced inside the mask.",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "destination": ("IMAGE", {"tooltip": "The picture the crop was cut from (or the result of an earlier "
                                                 "paste into it, for several faces)."}),
            "image": ("IMAGE", {"tooltip": "The re-rendered crop (any size; it is scaled back to the box)."}),
            "crop": (CROP, {"tooltip": "The crop output of Crop by Mask."}),
        }}

    def run(self, destination: torch.Tensor, image: torch.Tensor, crop: MaskCrop) -> tuple[torch.Tensor]:
        return (paste_region(destination, image, crop),)


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = mappings(
    ("CropByMask", "Crop by Mask", HyperLoRAStudioCropByMask),
    ("PasteByMask", "Paste by Mask", HyperLoRAStudioPasteByMask),
)
