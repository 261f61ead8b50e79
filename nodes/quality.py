"""Identity quality: Face Similarity (score images against the person), Best of N (keep the most alike)."""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch

from ..hyperlora import similarity as sim
from ..hyperlora.errors import SettingError
from ..hyperlora.pipeline import images_from_comfy
from .common import (CATEGORY, STUDIO_IDENTITY, STUDIO_MODEL, HyperLoRAHandle, check_interrupt, expect_handle,
                     expect_identity, face_inputs, face_options, images_to_comfy, mappings, progress)

log = logging.getLogger(__name__)

NO_SCORE = math.nan
"""The FLOAT given for an image without a face: not a number, so it can never pass for a score."""


def reference_inputs() -> dict[str, dict[str, tuple]]:
    """Inputs shared by the scoring nodes: the images, how reference photos' faces are chosen, the references."""
    shared = face_inputs()
    return {
        "required": {
            "hyper_lora": (STUDIO_MODEL, {"tooltip": "HyperLoRA Studio Loader (its AntelopeV2 face models score)."}),
            "images": ("IMAGE", {"tooltip": "The images to score, e.g. a KSampler batch after VAE Decode."}),
            "face_choice": shared["face_choice"],
            "face_index": shared["face_index"],
            "det_size": shared["det_size"],
        },
        "optional": {
            "identity": (STUDIO_IDENTITY, {"tooltip": "The person as an identity (Identity from Images, Load "
                                                      "Identity, Refine Identity). Connect this or reference_images."}),
            "reference_images": ("IMAGE", {"tooltip": "Photos of the person (used instead of the identity when both "
                                                      "are connected). face_choice / face_index pick their face."}),
        },
    }


def score(hyper_lora: HyperLoRAHandle, images: torch.Tensor, identity: Any, reference_images: torch.Tensor | None,
          kwargs: dict[str, Any]) -> tuple[list[np.ndarray], list[sim.ImageScore], str]:
    """``(images as uint8 arrays, one score each, where the reference came from)``, with progress."""
    hyper_lora = expect_handle(hyper_lora)
    options = face_options(kwargs)
    arrays = images_from_comfy(images)
    bar = progress(len(arrays) + 1)
    check_interrupt()
    analyzer = hyper_lora.analyzer()
    if reference_images is not None:
        reference, notes = sim.reference_from_photos(images_from_comfy(reference_images), analyzer=analyzer,
                                                     options=options)
        source = f"reference: {len(notes)} photo(s)" + (" (the identity input is not used)" if identity is not None else "")
    elif identity is not None:
        reference = sim.reference_from_identity(expect_identity(identity))
        source = f"reference: the identity ({identity.num_images} photo(s))"
    else:
        raise SettingError("Connect the person to compare with: an identity (identity input) or photos of them "
                           "(reference_images input).")
    bar.update(1)
    scores = sim.score_images(arrays, reference, analyzer=analyzer, det_size=options.det_size,
                              check_interrupt=check_interrupt, on_image=lambda _i: bar.update(1))
    return arrays, scores, source


def floats(scores: list[sim.ImageScore]) -> list[float]:
    return [NO_SCORE if s.score is None else float(s.score) for s in scores]


class HyperLoRAStudioFaceSimilarity:
    DESCRIPTION = (
        "Scores how much each image looks like the person: the ArcFace cosine similarity (1 = the same face as "
        "the reference, about 0.3-0.5 and below: someone else for real ArcFace) between the reference and the "
        "best-matching face of each image, with the same AntelopeV2 models and crops as the identity. Images "
        "without a face are marked 'no face'.")
    CATEGORY = f"{CATEGORY}/quality"
    RETURN_TYPES = ("FLOAT", "STRING", "IMAGE")
    RETURN_NAMES = ("scores", "report", "annotated")
    OUTPUT_IS_LIST = (True, False, False)
    OUTPUT_TOOLTIPS = (
        "One score per image, in image order (a list); NaN (not a number) for an image without a face.",
        "One line per image: its score, which face (numbered largest first) or 'no face'.",
        "The images with the scored face boxed and the score (or 'no face') written on them.")
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return reference_inputs()

    def run(self, hyper_lora: HyperLoRAHandle, images: torch.Tensor, identity: Any = None,
            reference_images: torch.Tensor | None = None, **kwargs: Any) -> tuple[list[float], str, torch.Tensor]:
        arrays, scores, source = score(hyper_lora, images, identity, reference_images, kwargs)
        report = f"{source}\n{sim.describe(scores)}"
        log.info("HyperLoRA Studio Face Similarity:\n%s", report)
        annotated = images_to_comfy([sim.annotate(a, s) for a, s in zip(arrays, scores)])
        return (floats(scores), report, annotated)


class HyperLoRAStudioBestOfN:
    DESCRIPTION = (
        "Keeps the images that look most like the person: scores a batch as Face Similarity does and passes on "
        "the 'keep' best, most alike first, with their scores. Generate 8, keep 2.")
    CATEGORY = f"{CATEGORY}/quality"
    RETURN_TYPES = ("IMAGE", "FLOAT", "STRING")
    RETURN_NAMES = ("images", "scores", "report")
    OUTPUT_IS_LIST = (False, True, False)
    OUTPUT_TOOLTIPS = (
        "The kept images, most alike first (images without a face only if fewer faces than 'keep' were found).",
        "The kept images' scores, in the same order (a list; NaN for a kept image without a face).",
        "Every image's score in rank order, and which were kept.")
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        inputs = reference_inputs()
        required = dict(inputs["required"])
        keep = ("INT", {"default": 2, "min": 1, "max": 4096, "step": 1,
                        "tooltip": "How many images to keep (all of them, ranked, if the batch is smaller)."})
        inputs["required"] = {"hyper_lora": required.pop("hyper_lora"), "images": required.pop("images"),
                              "keep": keep, **required}
        return inputs

    def run(self, hyper_lora: HyperLoRAHandle, images: torch.Tensor, keep: int, identity: Any = None,
            reference_images: torch.Tensor | None = None, **kwargs: Any) -> tuple[torch.Tensor, list[float], str]:
        _arrays, scores, source = score(hyper_lora, images, identity, reference_images, kwargs)
        order = sim.rank(scores)
        kept = order[:int(keep)]
        lines = [f"{source}; kept {len(kept)} of {len(scores)}"]
        lines += [f"{'kept' if r < len(kept) else '    '} #{r + 1}: image {i + 1}: {scores[i].label()}"
                  for r, i in enumerate(order)]
        report = "\n".join(lines)
        log.info("HyperLoRA Studio Best of N:\n%s", report)
        index = torch.tensor(kept, dtype=torch.long, device=images.device)
        return (images.index_select(0, index), floats([scores[i] for i in kept]), report)


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = mappings(
    ("FaceSimilarity", "Face Similarity", HyperLoRAStudioFaceSimilarity),
    ("BestOfN", "Best of N", HyperLoRAStudioBestOfN),
)
