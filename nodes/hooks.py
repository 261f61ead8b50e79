"""Identity on a prompt instead of the whole model: ComfyUI weight hooks with a step window and
an optional mask, so two identities on two masked prompts put two people into one image."""

from __future__ import annotations

import logging
from typing import Any

import torch

import comfy.hooks
import comfy.utils

from ..hyperlora.blocks import apply_block_strengths
from ..hyperlora.lora import hook_cache_fits, step_window
from .common import CATEGORY, LORA_MODEL, mappings, release_for_sampling
from ..hyperlora.checks import check_strength
from .lora import BLOCK_INPUTS, STRENGTH, block_strengths, check_lora_lands, node_label


log = logging.getLogger(__name__)

TITLE = "Identity on Prompt (regions, steps)"


HOOK_STATE = "hyperlora_studio_hook_cache"
"""Key of this sampling's hook-cache count in ComfyUI's ``model_options`` (a fresh clone per sampling)."""


def keep_hook_cache_in_ram(model: Any, model_options: dict, landed: dict[str, str]) -> None:
    """Switch this sampling to ComfyUI's "min vram" hook mode when its "max speed" cache would not fit in RAM.

    With two identities or more on prompts, ComfyUI (hook mode "max speed", its default) keeps a patched fp32
    copy of every hooked weight per identity, plus a backup: on a CPU with ComfyUI's default fp32 SDXL that is
    11 GB for two identities, beside the 13 GB model, and the process was killed on a 24 GB machine.  Called
    for each identity hook as ComfyUI registers it; when the cache of the identities so far does not fit in the
    free RAM (less a margin), the patched weights are recomputed at each switch instead (slower steps, no extra
    memory).  Only when the model runs on the CPU (on a GPU, ComfyUI's own counter places the cache in VRAM).
    ComfyUI restores the hook mode after the sampling."""
    import comfy.model_management as mm

    if model.hook_mode != comfy.hooks.EnumHookMode.MaxSpeed or torch.device(model.load_device).type != "cpu":
        return
    state = model_options.setdefault(HOOK_STATE, {"keys": set(), "groups": 0})
    state["groups"] += 1
    state["keys"].update(landed.values())
    weights = [comfy.utils.get_attr(model.model, k) for k in state["keys"]]     # check_lora_lands found each one
    numel = sum(w.numel() for w in weights)
    free = int(mm.get_free_memory(torch.device("cpu")))
    fits, need = hook_cache_fits(numel, max(w.element_size() for w in weights), state["groups"], free)
    if not fits:
        model.hook_mode = comfy.hooks.EnumHookMode.MinVram
        log.warning("HyperLoRA Studio: %d identities on prompts would make ComfyUI keep %.1f GB of patched weight "
                    "copies, with %.1f GB of RAM free; it recomputes them at each switch instead (slower steps, no "
                    "extra memory).", state["groups"], need / 2**30, free / 2**30)


class CheckedLoraHook(comfy.hooks.WeightHook):
    """ComfyUI's LoRA weight hook, plus our landing check on the model it is registered on (an SD1.5
    or Flux model gets the same clear error as HyperLoRA Studio Apply, instead of a silent no-op), and the
    RAM check of :func:`keep_hook_cache_in_ram`."""

    def add_hook_patches(self, model: Any, model_options: dict, target_dict: dict, registered: Any) -> bool:
        if target_dict.get("target") != comfy.hooks.EnumWeightTarget.Clip and self.need_weight_init:
            landed = check_lora_lands(model, self.weights)
            release_for_sampling()          # the LoRAs are built: the Loader's memory setting decides
            keep_hook_cache_in_ram(model, model_options, landed)
        return super().add_hook_patches(model, model_options, target_dict, registered)


def identity_hooks(lora: dict[str, torch.Tensor], strength: float, start_percent: float,
                   end_percent: float) -> comfy.hooks.HookGroup:
    """A HOOKS group holding one checked LoRA hook (UNet only) active in the given step window."""
    keys = step_window(start_percent, end_percent)
    hook = CheckedLoraHook(strength_model=strength, strength_clip=0.0)
    hook.weights = lora
    group = comfy.hooks.HookGroup()
    group.add(hook)
    if keys:
        frames = comfy.hooks.HookKeyframeGroup()
        for mult, start in keys:
            frames.add(comfy.hooks.HookKeyframe(strength=mult, start_percent=start))
        group.set_keyframes_on_hooks(hook_kf=frames)
    return group


class HyperLoRAStudioConditioning:
    DESCRIPTION = (
        "Puts the identity on a prompt instead of merging it into the model: only for the sampling steps "
        "between start_percent and end_percent, and with a mask only in that region of the image. Two of these "
        "on two masked prompts, joined with Conditioning (Combine), give two different people in one image. "
        "Connect the plain SDXL model to the KSampler (not one that already has the LoRA merged).")
    CATEGORY = f"{CATEGORY}/lora"
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "HOOKS")
    RETURN_NAMES = ("positive", "negative", "hooks")
    OUTPUT_TOOLTIPS = (
        "The positive prompt carrying the identity (and the mask, if given).",
        "The negative prompt carrying the same identity and mask, so guidance compares like with like.",
        "The identity as ComfyUI hooks, for the core hook nodes (Cond Set Props, Combine Hooks, ...).")
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "positive": ("CONDITIONING", {"tooltip": "The prompt for this person (with the trigger words)."}),
                "negative": ("CONDITIONING", {"tooltip": "The negative prompt."}),
                "lora": (LORA_MODEL, {"tooltip": "The LoRA from Build LoRA, Mix Identities or Concept Slider."}),
                "strength": STRENGTH,
                "start_percent": ("FLOAT", {
                    "default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001,
                    "tooltip": "First part of sampling where the identity applies (0 = from the first step). "
                               "Starting later (e.g. 0.2) leaves the composition to the prompt."}),
                "end_percent": ("FLOAT", {
                    "default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001,
                    "tooltip": "Where the identity stops (1 = until the last step)."}),
            },
            "optional": {
                "mask": ("MASK", {"tooltip": "Where in the image this person is (white = here). Without a mask "
                                             "the identity applies to the whole image."}),
                "mask_strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01,
                                            "tooltip": "Weight of this masked prompt against the others."}),
                "set_cond_area": (["default", "mask bounds"], {
                    "default": "default",
                    "tooltip": "'mask bounds' samples this prompt only inside the mask's bounding box "
                               "(sharper regions, a little slower)."}),
                **BLOCK_INPUTS,
            },
        }

    def run(self, positive: list, negative: list, lora: dict[str, torch.Tensor], strength: float,
            start_percent: float, end_percent: float, mask: torch.Tensor | None = None, mask_strength: float = 1.0,
            set_cond_area: str = "default", **blocks: float) -> tuple[list, list, comfy.hooks.HookGroup]:
        strength = check_strength(strength, "strength", where=node_label("Conditioning", TITLE))
        lora = apply_block_strengths(lora, block_strengths(**blocks))
        hooks = identity_hooks(lora, strength, start_percent, end_percent)
        # strength 0 (or every block at 0): no hook at all (nothing to patch per step); the mask still applies
        attach = hooks if strength != 0 and lora else None
        pos, neg = comfy.hooks.set_conds_props(conds=[positive, negative], strength=mask_strength,
                                               set_cond_area=set_cond_area, mask=mask, hooks=attach)
        return (pos, neg, hooks if attach is not None else comfy.hooks.HookGroup())


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = mappings(
    ("Conditioning", TITLE, HyperLoRAStudioConditioning))
