"""Face controls: InstantID keypoint images, the face-analysis preview, one mask per face."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from ..hyperlora.controls import KEYPOINT_MODES, Placement, analysis_preview, face_report, keypoint_image, per_face_masks
from ..hyperlora.faces.options import FACE_ORDERS
from ..hyperlora.pipeline import images_from_comfy
from .common import (CATEGORY, STUDIO_MODEL, HyperLoRAHandle, check_interrupt, expect_handle, face_inputs,
                     face_options, images_to_comfy, mappings, no_face_input, progress)

log = logging.getLogger(__name__)

MAX_FACE_OUTPUTS = 4
"""Faces with an output socket of their own on Face Masks (face_1 ... face_4)."""
HYPER_LORA_INPUT = (STUDIO_MODEL, {"tooltip": "HyperLoRA Studio Loader (its face analyser finds the faces)."})


def _face_node_inputs(images_tooltip: str, shared_names: tuple[str, ...], **extra: tuple) -> dict:
    """Required inputs of a face node: the loader, the images, the named shared face inputs, then ``extra``."""
    shared = face_inputs()
    return {"required": {"hyper_lora": HYPER_LORA_INPUT, "images": ("IMAGE", {"tooltip": images_tooltip}),
                         **{name: shared[name] for name in shared_names}, **extra}}


def _fraction(default: float, tooltip: str, low: float = 0.0, high: float = 1.0) -> tuple:
    return ("FLOAT", {"default": default, "min": low, "max": high, "step": 0.01, "tooltip": tooltip})


class HyperLoRAStudioFaceKeypoints:
    DESCRIPTION = (
        "Draws the chosen face's five keypoints the way InstantID's ControlNet was trained to see them (eyes, nose "
        "and mouth corners joined to the nose by coloured limbs, on black). Connect the image to the core Apply "
        "ControlNet node with InstantID's ControlNet (models/controlnet, loaded by the core Load ControlNet Model "
        "node): the face then lands where the keypoints are. 'image' draws them where the face is in the photo, at "
        "the photo's size; 'canvas' places the photo's face on a new canvas at the position and size given.")
    CATEGORY = f"{CATEGORY}/faces"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("keypoints",)
    OUTPUT_TOOLTIPS = ("One keypoint image per photo (black where no face was found and no_face is 'skip').",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return _face_node_inputs(
            "The photo(s) whose face gives the keypoints.", ("face_choice", "face_index", "det_size"),
            no_face=no_face_input("gives a black image (no keypoints)"),
            mode=(list(KEYPOINT_MODES), {
                "default": KEYPOINT_MODES[0],
                "tooltip": "'image': the keypoints where the face is, at the photo's size (use a photo of the "
                           "pose you want). 'canvas': the photo's face moved onto a width x height canvas, centred "
                           "at (center_x, center_y) with the face box face_width wide; its pose and proportions "
                           "are kept."}),
            width=("INT", {"default": 1024, "min": 64, "max": 8192, "step": 8,
                           "tooltip": "Canvas width in pixels ('canvas' mode): the size of the image you generate."}),
            height=("INT", {"default": 1024, "min": 64, "max": 8192, "step": 8,
                            "tooltip": "Canvas height in pixels ('canvas' mode)."}),
            center_x=_fraction(0.5, "Face centre across the canvas ('canvas' mode): 0 = left edge, 1 = right edge."),
            center_y=_fraction(0.4, "Face centre down the canvas ('canvas' mode): 0 = top edge, 1 = bottom edge."),
            face_width=_fraction(0.3, "Width of the face box as a fraction of the canvas width ('canvas' mode); "
                                      "0.3 suits a portrait, 0.15 an upper-body shot.", 0.02, 1.0))

    def run(self, hyper_lora: HyperLoRAHandle, images: torch.Tensor, face_choice: str, face_index: int,
            det_size: str, no_face: str, mode: str, width: int, height: int, center_x: float, center_y: float,
            face_width: float) -> tuple[torch.Tensor]:
        hyper_lora = expect_handle(hyper_lora)
        arrays = images_from_comfy(images)
        placement = None if mode == "image" else Placement(width=int(width), height=int(height),
                                                              center_x=float(center_x), center_y=float(center_y),
                                                              face_width=float(face_width))
        analyzer = hyper_lora.analyzer()
        bar = progress(len(arrays))
        drawn = []
        for i, image in enumerate(arrays):
            check_interrupt()
            kps_image, face = keypoint_image(image, analyzer=analyzer, face_choice=face_choice,
                                             face_index=int(face_index), det_size=int(det_size), no_face=no_face,
                                             placement=placement, label=f"image {i + 1} of {len(arrays)}")
            if face is not None:
                log.info("HyperLoRA Studio Face Keypoints: image %d: %s", i + 1, face.describe())
            drawn.append(kps_image)
            bar.update(1)
        return (images_to_comfy(drawn),)


class HyperLoRAStudioFaceAnalysis:
    DESCRIPTION = (
        "Shows what face analysis found, as the identity nodes with the same settings see it: every detected face "
        "with its box, detector score and number in the face-choice order (#0 is what face_index 0 takes), the "
        "chosen face's 106 landmarks, and the crops the model saw. Use it to find out why a photo failed or which "
        "face of a group photo was taken.")
    CATEGORY = f"{CATEGORY}/faces"
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("preview", "detections")
    OUTPUT_TOOLTIPS = (
        "The photo with the boxes, numbers, scores and landmarks, and a panel with the crops the model saw "
        "(one per photo; connect Preview Image).",
        "The detections as text: how many faces, how they were found, each face's box, size and score.")
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return _face_node_inputs("The photo(s) to look at.",
                                 ("face_choice", "face_index", "remove_background", "grayscale", "det_size"))

    def run(self, hyper_lora: HyperLoRAHandle, images: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, str]:
        hyper_lora = expect_handle(hyper_lora)
        arrays = images_from_comfy(images)
        options = face_options(kwargs)
        analyzer = hyper_lora.analyzer()
        bar = progress(len(arrays))
        previews, texts = [], []
        for i, image in enumerate(arrays):
            check_interrupt()
            report = face_report(image, analyzer=analyzer, options=options, heading=f"image {i + 1} of {len(arrays)}:")
            previews.append(analysis_preview(image, report))
            texts.append(report.text)
            bar.update(1)
        text = "\n\n".join(texts)
        log.info("HyperLoRA Studio Face Analysis:\n%s", text)
        return (images_to_comfy(previews), text)


class HyperLoRAStudioFaceMasks:
    DESCRIPTION = (
        "One soft mask per detected face, numbered left to right (or largest first), so each face of a group "
        "photo can get its own identity: face_1 with identity 1, face_2 with identity 2 ... (e.g. Crop by Mask -> "
        "re-render with that identity -> Paste by Mask, as in the group_photo workflow).")
    CATEGORY = f"{CATEGORY}/faces"
    RETURN_TYPES = ("MASK",) * (1 + MAX_FACE_OUTPUTS) + ("INT",)
    RETURN_NAMES = ("masks",) + tuple(f"face_{k + 1}" for k in range(MAX_FACE_OUTPUTS)) + ("count",)
    OUTPUT_TOOLTIPS = (
        "Every face's mask, photo by photo and in order within each photo (one empty mask when no face was found).",
        *(f"The mask of face {k + 1} in the order chosen, one per photo (empty where a photo has fewer faces)."
          for k in range(MAX_FACE_OUTPUTS)),
        "How many faces were found (the most in one photo of the batch).")
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return _face_node_inputs(
            "The picture(s) with the faces (one size per batch).", (),
            order=(list(FACE_ORDERS), {
                "default": FACE_ORDERS[0],
                "tooltip": "How the faces are numbered: 'left_to_right' by the face centre, 'largest' largest "
                           "first, 'highest_score' the detector's surest first."}),
            grow=("FLOAT", {"default": 1.3, "min": 0.5, "max": 4.0, "step": 0.05,
                            "tooltip": "Size of each mask around its face outline: 1.0 is the outline (jaw and "
                                       "brows), 1.3 also covers the forehead."}),
            feather=("INT", {"default": 8, "min": 0, "max": 256, "step": 1,
                             "tooltip": "Blur of the mask edges in pixels, so a re-painted face blends in."}),
            det_size=face_inputs()["det_size"])

    def run(self, hyper_lora: HyperLoRAHandle, images: torch.Tensor, order: str, grow: float, feather: int,
            det_size: str) -> tuple[Any, ...]:
        hyper_lora = expect_handle(hyper_lora)
        arrays = images_from_comfy(images)
        analyzer = hyper_lora.analyzer()
        h, w = arrays[0].shape[:2]     # an IMAGE batch has one size
        per_face = np.zeros((MAX_FACE_OUTPUTS, len(arrays), h, w), dtype=np.float32)
        every: list[np.ndarray] = []
        count = 0
        bar = progress(len(arrays))
        for i, image in enumerate(arrays):
            check_interrupt()
            masks, faces = per_face_masks(image, analyzer=analyzer, order=order, det_size=int(det_size),
                                          grow=float(grow), feather=float(feather))
            log.info("HyperLoRA Studio Face Masks: image %d: %d face(s)%s", i + 1, len(faces),
                     "".join(f"\n  face_{k + 1}: {f.describe()}" for k, f in enumerate(faces)))
            every.extend(masks)
            per_face[:min(len(masks), MAX_FACE_OUTPUTS), i] = masks[:MAX_FACE_OUTPUTS]
            count = max(count, len(faces))
            bar.update(1)
        all_masks = np.stack(every) if every else np.zeros((1, h, w), dtype=np.float32)
        return (torch.from_numpy(all_masks), *(torch.from_numpy(per_face[k]) for k in range(MAX_FACE_OUTPUTS)), count)


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = mappings(
    ("FaceKeypoints", "Face Keypoints (InstantID ControlNet)", HyperLoRAStudioFaceKeypoints),
    ("FaceAnalysis", "Face Analysis (preview)", HyperLoRAStudioFaceAnalysis),
    ("FaceMasks", "Face Masks (one per face)", HyperLoRAStudioFaceMasks),
)
