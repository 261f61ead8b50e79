"""LoRA nodes: Build LoRA, Apply (with a landing check), one-node Apply from images."""

from __future__ import annotations

import logging
from typing import Any

import torch

import comfy.lora
import comfy.patcher_extension

from ..hyperlora.blocks import DEFAULT_STRENGTHS, BlockStrengths, apply_block_strengths
from ..hyperlora.checks import MAX_STRENGTH, check_strength
from ..hyperlora.bundle import architecture_target_shapes, lora_from_identity, lora_target_shapes
from ..hyperlora.errors import FaceNotFoundError, LoraError
from ..hyperlora.lora import DOWN_SUFFIX
from ..hyperlora.spec import TRIGGER_PREFIX
from .common import (CATEGORY, STUDIO_MODEL, STUDIO_IDENTITY, LORA_MODEL, HyperLoRAHandle, check_interrupt,
                     display_name, expect_handle, expect_identity, face_inputs, label_image, make_identity, mappings,
                     node_id, photos, preview_ui, release_before_sampling, single)

log = logging.getLogger(__name__)

RELEASE_WRAPPER = "hyperlora_studio_release"
"""Key of the OUTER_SAMPLE wrapper on the models Apply returns (nodes.common.release_before_sampling)."""

STRENGTH = ("FLOAT", {
    "default": 0.85, "min": -MAX_STRENGTH, "max": MAX_STRENGTH, "step": 0.01,
    "tooltip": "How strongly the identity LoRA changes the model. 0.75-0.85 is typical; lower keeps the prompt "
               f"editable, higher gives more likeness. Prompts need the trigger words '{TRIGGER_PREFIX}'."})

_BLOCK_TOOLTIPS = {
    "input_blocks": "Multiplier of the identity's change to the UNet's input (down) blocks. InstantStyle found that "
                    "in SDXL an input-block attention (down_blocks.2.attentions.1) carries the spatial layout "
                    "(composition); IP-Adapter plus's 'composition' weight type builds on that.",
    "middle_block": "Multiplier for the middle block, the coarsest level (1/32 of the image size).",
    "output_blocks": "Multiplier for the output (up) blocks. InstantStyle found that in SDXL an output-block "
                     "attention (up_blocks.0.attentions.1) carries style: colour, material, atmosphere; IP-Adapter "
                     "plus's 'style transfer' weight type builds on that. Lower it if the photo's look leaks into "
                     "the image.",
    "self_attention": "Multiplier for the self-attention layers (attn1: the image's features attend to each other).",
    "cross_attention": "Multiplier for the cross-attention layers (attn2: where the prompt, trigger words included, "
                       "is read). Custom Diffusion showed that cross-attention's key/value weights alone can learn a "
                       "new subject.",
}
BLOCK_INPUTS: dict[str, tuple] = {
    name: ("FLOAT", {"default": 1.0, "min": -MAX_STRENGTH, "max": MAX_STRENGTH, "step": 0.05,
                     "tooltip": tooltip + " 1 = as released (bit for bit), 0 = off. Each patched weight is W + strength "
                                          "x multiplier x 0.5 x up @ down, a module's multiplier being its block's "
                                          "times its attention kind's. What a block carries is a tendency the "
                                          "peers observed, not a guarantee."})
    for name, tooltip in _BLOCK_TOOLTIPS.items()
}
"""Optional inputs of Apply and Identity on Prompt, after their existing inputs (older workflows keep working)."""


def block_strengths(input_blocks: float = 1.0, middle_block: float = 1.0, output_blocks: float = 1.0,
                    self_attention: float = 1.0, cross_attention: float = 1.0) -> BlockStrengths:
    """The optional block inputs as the core's BlockStrengths."""
    return BlockStrengths(input=float(input_blocks), middle=float(middle_block), output=float(output_blocks),
                          self_attention=float(self_attention), cross_attention=float(cross_attention))


def model_kind(model: Any) -> str:
    """A readable name of the diffusion model type behind a ComfyUI MODEL (e.g. ``SDXL``, ``SD15``, ``Flux``)."""
    inner = model.model
    config = getattr(inner, "model_config", None)
    config_name = type(config).__name__ if config is not None else "unknown"
    return f"{config_name} ({type(inner).__name__})"


def check_lora_lands(model: Any, lora: dict[str, torch.Tensor]) -> dict[str, str]:
    """Map every LoRA module onto a model weight of matching shape, or raise :class:`LoraError`.

    Returns ComfyUI's key map ``{lora prefix: model weight key}`` restricted to the LoRA's modules.
    """
    if not lora:
        raise LoraError("The LoRA is empty; connect the output of HyperLoRA Studio Build LoRA (or Mix / Slider).")
    return check_shapes_land(model, lora_target_shapes(lora), "This HyperLoRA LoRA does not fit")


def check_model_fits(model: Any, hyper_lora: HyperLoRAHandle) -> None:
    """The landing check of :func:`check_lora_lands` for the LoRAs ``hyper_lora`` makes, without a LoRA
    (e.g. when no face was found): an SD1.5 or Flux model is refused even then."""
    check_shapes_land(model, architecture_target_shapes(hyper_lora.model.arch),
                      f"The LoRAs of the HyperLoRA model '{hyper_lora.model.name}' do not fit")


def check_shapes_land(model: Any, shapes: dict[str, tuple[int, int]], subject: str) -> dict[str, str]:
    """``{prefix: weight key}`` for LoRA modules of ``shapes`` (``{prefix: (out, in)}``), else LoraError
    starting with ``subject`` ("This HyperLoRA LoRA does not fit")."""
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    state = model.model.state_dict()
    missing = [p for p in shapes if p not in key_map or key_map[p] not in state]
    wrong = [(p, shapes[p], tuple(state[key_map[p]].shape)) for p in shapes
             if p not in missing and tuple(state[key_map[p]].shape[:2]) != shapes[p]]
    if missing or wrong:
        kind = model_kind(model)
        bad = len(missing) + len(wrong)
        examples = missing[:2] + [f"{p} (LoRA {list(s)} vs model {list(m)})" for p, s, m in wrong[:2]]
        if "SDXL" in kind and not missing:
            hint = ("The LoRA was made by a HyperLoRA model whose module sizes differ from this SDXL UNet; "
                    "use a HyperLoRA model made for SDXL.")
        else:
            hint = ("HyperLoRA LoRAs are made for SDXL (SDXL 1.0 and its fine-tunes such as RealVisXL); "
                    "load an SDXL checkpoint instead.")
        raise LoraError(
            f"{subject} the connected model, which is {kind}: {bad} of {len(shapes)} "
            f"LoRA modules do not land on a weight of matching shape (e.g. {'; '.join(examples)}). {hint}")
    return {p: key_map[p] for p in shapes}


def node_label(short: str, title: str) -> str:
    """``HyperLoRA Studio <title> (HyperLoRAStudio<short>)``: how errors name a node of this pack."""
    return f"{display_name(title)} ({node_id(short)})"


def apply_lora(model: Any, lora: dict[str, torch.Tensor], strength: float,
               blocks: BlockStrengths = DEFAULT_STRENGTHS, *, where: str = "") -> Any:
    """Check, then patch a clone of ``model``: ``W + strength * m * (alpha/rank) * up @ down`` per module,
    ``m`` its block multiplier (1 by default: the LoRA passes as it is; 0: the module is not patched).
    ``strength`` obeys :func:`hyperlora.checks.check_strength` (SettingError naming ``where``, a node's label;
    default: Apply's)."""
    strength = check_strength(strength, "strength", where=where or node_label("Apply", "Apply"))
    targets = check_lora_lands(model, lora)
    lora = apply_block_strengths(lora, blocks)
    targets = {p: key for p, key in targets.items() if p + DOWN_SUFFIX in lora}
    if strength == 0 or not targets:
        return model
    patches = comfy.lora.load_lora(lora, targets, log_missing=False)
    if len(patches) != len(targets):
        raise LoraError(f"Only {len(patches)} of {len(targets)} LoRA modules could be read; the LoRA is not in "
                        f"kohya format (lora_up / lora_down / alpha).")
    patched = model.clone()
    added = patched.add_patches(patches, strength)
    if len(added) != len(patches):
        raise LoraError(f"Only {len(added)} of {len(patches)} LoRA modules were applied to {model_kind(model)}.")
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, RELEASE_WRAPPER,
                                 release_before_sampling)
    return patched


class HyperLoRAStudioBuildLoRA:
    DESCRIPTION = (
        "Turns an identity into a LoRA (the core LORA_MODEL type): connect it to HyperLoRA Studio Apply, the core "
        "'Load LoRA Model' node, 'Save LoRA Weights' or HyperLoRA Studio Export LoRA.")
    CATEGORY = f"{CATEGORY}/lora"
    RETURN_TYPES = (LORA_MODEL,)
    RETURN_NAMES = ("lora",)
    OUTPUT_TOOLTIPS = ("The generated LoRA: kohya-keyed tensors for the SDXL UNet attention layers.",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "hyper_lora": (STUDIO_MODEL, {"tooltip": "The model from HyperLoRA Studio Loader that made the identity."}),
            "identity": (STUDIO_IDENTITY, {"tooltip": "The identity from Identity from Images or Load Identity."}),
            "kind": (["id", "base", "id+base"], {
                "default": "id",
                "tooltip": "'id' is the released use. 'base' / 'id+base' need a model trained with a Base-LoRA "
                           "(base_resampler.safetensors); the released models already hold it inside the ID-LoRA, "
                           "and an extra Base-LoRA copies clothes and background."}),
        }}

    def run(self, hyper_lora: HyperLoRAHandle, identity: Any, kind: str) -> tuple[dict[str, torch.Tensor]]:
        hyper_lora = expect_handle(hyper_lora)
        identity = expect_identity(identity)
        check_interrupt()
        hyper_lora.load()
        return (lora_from_identity(hyper_lora.model, identity, kind=kind),)


class HyperLoRAStudioApply:
    DESCRIPTION = (
        "Merges a HyperLoRA LoRA into an SDXL model. It first checks that every LoRA module lands on a weight "
        "of the model and stops with a clear message for SD1.5, SD3, Flux and other models. Merged LoRAs cost "
        "nothing extra while sampling.")
    CATEGORY = f"{CATEGORY}/lora"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The SDXL model with the identity merged in.",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model": ("MODEL", {"tooltip": "An SDXL model (e.g. from Load Checkpoint)."}),
            "lora": (LORA_MODEL, {"tooltip": "The LoRA from Build LoRA, Mix Identities or Concept Slider."}),
            "strength": STRENGTH,
        }, "optional": dict(BLOCK_INPUTS)}

    def run(self, model: Any, lora: dict[str, torch.Tensor], strength: float, **blocks: float) -> tuple[Any]:
        return (apply_lora(model, lora, strength, block_strengths(**blocks)),)


APPLY_FROM_IMAGES = "Apply from Images"


class HyperLoRAStudioApplyFromImages:
    DESCRIPTION = (
        "One node for the common case: face photos -> identity -> LoRA -> merged into the SDXL model. With "
        "no_face 'skip' and no face in any photo, the model passes through unchanged, and the node shows a "
        "labelled image saying so.")
    CATEGORY = f"{CATEGORY}/lora"
    RETURN_TYPES = ("MODEL", "IMAGE")
    RETURN_NAMES = ("model", "crops")
    OUTPUT_TOOLTIPS = ("The SDXL model with the identity merged in (unchanged when no photo had a face).",
                       "The face crops the model saw (a labelled placeholder when no photo had a face).")
    FUNCTION = "run"
    INPUT_IS_LIST = True     # a list of photos (different sizes) is one set of photos of one person

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model": ("MODEL", {"tooltip": "An SDXL model (e.g. from Load Checkpoint)."}),
            "hyper_lora": (STUDIO_MODEL, {"tooltip": "The model from HyperLoRA Studio Loader."}),
            "images": ("IMAGE", {"tooltip": "One or more photos of the same person (a batch, or a list of photos "
                                            "of different sizes: all are used together)."}),
            "strength": STRENGTH,
            **face_inputs(),
        }}

    def run(self, model: Any, hyper_lora: Any, images: Any, strength: Any, **kwargs: Any) -> Any:
        node = display_name(APPLY_FROM_IMAGES)
        model, hyper_lora = single(model, "model", node), expect_handle(single(hyper_lora, "hyper_lora", node))
        strength = check_strength(single(strength, "strength", node), "strength",
                                  where=node_label("ApplyFromImages", APPLY_FROM_IMAGES))   # before the photos
        options = {k: single(v, k, node) for k, v in kwargs.items()}
        try:
            identity, crops = make_identity(hyper_lora, photos(images, node), options)
        except FaceNotFoundError as e:
            if options.get("no_face", "skip") != "skip":
                raise
            return pass_through(model, hyper_lora, images, node, e)
        hyper_lora.load()
        lora = lora_from_identity(hyper_lora.model, identity, kind="id")
        return (apply_lora(model, lora, strength, where=node_label("ApplyFromImages", APPLY_FROM_IMAGES)), crops)


def pass_through(model: Any, hyper_lora: HyperLoRAHandle, images: Any, node: str, reason: Exception) -> dict:
    """No face in any photo with no_face 'skip': the model unchanged (after the SDXL check), said on the node
    itself (a labelled image and text in the UI), not only in the console."""
    check_model_fits(model, hyper_lora)
    count = sum(int(b.shape[0]) if getattr(b, "ndim", 0) == 4 else 1
                for b in (images if isinstance(images, list) else [images]))
    headline = f"No face found in the {count} photo(s) - model passed through unchanged"
    log.warning("%s: %s. %s (no_face = skip)", node, headline, reason)
    placeholder = label_image([headline, "(no_face = skip; set it to 'error' to stop instead)"])
    return {"ui": {"images": preview_ui(placeholder, "HyperLoRA_no_face"),
                   "text": [f"{headline}. {reason}"]},
            "result": (model, placeholder)}


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = mappings(
    ("BuildLoRA", "Build LoRA", HyperLoRAStudioBuildLoRA),
    ("Apply", "Apply", HyperLoRAStudioApply),
    ("ApplyFromImages", APPLY_FROM_IMAGES, HyperLoRAStudioApplyFromImages),
)
