"""Identity quality: Face Similarity (score images against the person), Best of N (keep the most alike),
Refine Identity (a short fine-tune of an identity on the person's photos, the SDXL model frozen)."""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch

import comfy.lora
import comfy.model_management as mm
import comfy.model_sampling
import comfy.sampler_helpers
import comfy.samplers

from ..hyperlora import similarity as sim
from ..hyperlora.checks import check_strength
from ..hyperlora.errors import LoraError, SettingError
from ..hyperlora.pipeline import images_from_comfy
from ..hyperlora.refine import (DEFAULT_LEARNING_RATE, DEFAULT_STEPS, MAX_STEPS, MODES, DenoiseTask, inference_tensors,
                                plain_copies, refine)
from ..hyperlora.spec import TRIGGER_PREFIX
from .common import (CATEGORY, LORA_MODEL, STUDIO_IDENTITY, STUDIO_MODEL, HyperLoRAHandle, check_interrupt,
                     display_name, expect_handle, expect_identity, face_inputs, face_options, images_to_comfy,
                     mappings, photos, progress, single)
from .lora import STRENGTH, model_kind, node_label

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


def _options(kwargs: dict[str, Any], node: str) -> dict[str, Any]:
    """The face options of an ``INPUT_IS_LIST`` node, one value each (see :func:`nodes.common.single`)."""
    return {k: single(v, k, node) for k, v in kwargs.items()}


def frames(images: Any) -> list[torch.Tensor]:
    """IMAGE batch or list of batches (a list node, images of different sizes) -> one ``[1, H, W, C]`` per image,
    in order: the images a scoring node ranks as one set."""
    return [b[i:i + 1] for b in (images if isinstance(images, list) else [images]) for i in range(b.shape[0])]


def score(hyper_lora: Any, images: Any, identity: Any, reference_images: Any, kwargs: dict[str, Any],
          node: str) -> tuple[list[np.ndarray], list[sim.ImageScore], str]:
    """``(images as uint8 arrays, one score each, where the reference came from)``, with progress.

    The inputs arrive as ComfyUI passes them to an ``INPUT_IS_LIST`` node: ``images`` and
    ``reference_images`` may be lists of batches of different sizes, each taken as one set (every
    image scored once, one reference from all photos); every other input must have one value."""
    hyper_lora = expect_handle(single(hyper_lora, "hyper_lora", node))
    identity = single(identity, "identity", node)
    if isinstance(reference_images, list) and not reference_images:
        reference_images = None                   # the optional input left open
    if reference_images is not None:
        reference_images = photos(reference_images, node)
    options = face_options(_options(kwargs, node))
    arrays = images_from_comfy(photos(images, node))
    bar = progress(len(arrays) + 1)
    check_interrupt()
    analyzer = hyper_lora.analyzer()
    if reference_images is not None:
        reference, notes = sim.reference_from_photos(images_from_comfy(reference_images), analyzer=analyzer,
                                                     options=options)
        source = f"reference: {len(notes)} photo(s)" + (" (the identity input is not used)" if identity is not None else "")
    elif identity is not None:
        reference = sim.reference_from_identity(expect_identity(identity), analyzer=analyzer)
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


SIMILARITY = "Face Similarity"
BEST_OF_N = "Best of N"


class HyperLoRAStudioFaceSimilarity:
    DESCRIPTION = (
        "Scores how much each image looks like the person: the ArcFace cosine similarity (1 = the same face as "
        "the reference, about 0.3-0.5 and below: someone else for real ArcFace) between the reference and the "
        "best-matching face of each image, with the same AntelopeV2 models and crops as the identity. Images "
        "without a face are marked 'no face'. A list of images (different sizes) is scored as one set, and a "
        "list of reference photos makes one reference.")
    CATEGORY = f"{CATEGORY}/quality"
    RETURN_TYPES = ("FLOAT", "STRING", "IMAGE")
    RETURN_NAMES = ("scores", "report", "annotated")
    OUTPUT_IS_LIST = (True, False, False)
    OUTPUT_TOOLTIPS = (
        "One score per image, in image order (a list); NaN (not a number) for an image without a face.",
        "One line per image: its score, which face (numbered largest first) or 'no face'.",
        "The images with the scored face boxed and the score (or 'no face') written on them (images of "
        "different sizes are scaled to 512x512 to make one batch).")
    FUNCTION = "run"
    # the images (and the reference photos) are one set even when they arrive as a list of different sizes:
    # called once with every input as a list, each image gets one score against one reference
    INPUT_IS_LIST = True

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return reference_inputs()

    def run(self, hyper_lora: Any, images: Any, identity: Any = None, reference_images: Any = None,
            **kwargs: Any) -> tuple[list[float], str, torch.Tensor]:
        arrays, scores, source = score(hyper_lora, images, identity, reference_images, kwargs,
                                       display_name(SIMILARITY))
        report = f"{source}\n{sim.describe(scores)}"
        log.info("HyperLoRA Studio Face Similarity:\n%s", report)
        annotated = images_to_comfy([sim.annotate(a, s) for a, s in zip(arrays, scores)])
        return (floats(scores), report, annotated)


class HyperLoRAStudioBestOfN:
    DESCRIPTION = (
        "Keeps the images that look most like the person: scores a batch as Face Similarity does and passes on "
        "the 'keep' best, most alike first, with their scores. Generate 8, keep 2. A list of images (different "
        "sizes) is ranked as one set.")
    CATEGORY = f"{CATEGORY}/quality"
    RETURN_TYPES = ("IMAGE", "FLOAT", "STRING")
    RETURN_NAMES = ("images", "scores", "report")
    OUTPUT_IS_LIST = (True, True, False)
    OUTPUT_TOOLTIPS = (
        "The kept images, most alike first (images without a face only if fewer faces than 'keep' were found): "
        "one batch when they have one size, else a list with one image each.",
        "The kept images' scores, in the same order (a list; NaN for a kept image without a face).",
        "Every image's score in rank order, and which were kept.")
    FUNCTION = "run"
    INPUT_IS_LIST = True     # a list of images is ranked as one set: 'keep' best of all of them, not of each

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        inputs = reference_inputs()
        required = dict(inputs["required"])
        keep = ("INT", {"default": 2, "min": 1, "max": 4096, "step": 1,
                        "tooltip": "How many images to keep (all of them, ranked, if the batch is smaller)."})
        inputs["required"] = {"hyper_lora": required.pop("hyper_lora"), "images": required.pop("images"),
                              "keep": keep, **required}
        return inputs

    def run(self, hyper_lora: Any, images: Any, keep: Any, identity: Any = None, reference_images: Any = None,
            **kwargs: Any) -> tuple[list[torch.Tensor], list[float], str]:
        node = display_name(BEST_OF_N)
        keep = int(single(keep, "keep", node))
        _arrays, scores, source = score(hyper_lora, images, identity, reference_images, kwargs, node)
        order = sim.rank(scores)
        kept = order[:keep]
        lines = [f"{source}; kept {len(kept)} of {len(scores)}"]
        lines += [f"{'kept' if r < len(kept) else '    '} #{r + 1}: image {i + 1}: {scores[i].label()}"
                  for r, i in enumerate(order)]
        report = "\n".join(lines)
        log.info("HyperLoRA Studio Best of N:\n%s", report)
        every = frames(images)
        chosen = [every[i] for i in kept]
        same_size = len({tuple(t.shape[1:]) for t in chosen}) == 1
        out = [torch.cat(chosen)] if same_size else chosen
        return (out, floats([scores[i] for i in kept]), report)


# --------------------------------------------------------------------------- refine


def _plain_weight(weight: torch.Tensor) -> torch.Tensor:
    """A weight / bias wrapper that changes nothing: its presence makes ComfyUI hand the layer a fresh copy
    of the tensor at each call (``cast_bias_weight`` copies when a function is set), which autograd can
    keep (tensors loaded in inference mode cannot be saved for backward)."""
    return weight


Slot = tuple[torch.nn.Module, str]
"""A parameter or buffer: ``(module, attribute name)``."""


def trainable_patcher(model: Any) -> tuple[Any, list[Slot], list[Slot]]:
    """``(patcher, wrapped slots, other slots)`` that let autograd run through ``model`` whatever the
    precision ComfyUI loaded it in: every weight and bias of ComfyUI's cast layers (Linear, Conv, GroupNorm,
    LayerNorm, ...) made in inference mode gets :func:`_plain_weight` on a clone of the patcher, so each
    call copies just that layer's tensor (no copy of the whole UNet); any other parameter or buffer made in
    inference mode is returned as a slot for :func:`hyperlora.refine.plain_copies`.  The input patcher is
    not changed (without inference tensors it is returned as it is)."""
    slots = inference_tensors(model.model)
    if not slots:
        return model, [], []
    patcher = model.clone()       # the input MODEL keeps its own patcher; only the clone has the wrappers
    wrapped: list[Slot] = []
    others: list[Slot] = []
    for name, module, attr in slots:
        if attr in ("weight", "bias") and hasattr(module, f"{attr}_function") and name:
            patcher.add_weight_wrapper(f"{name}.{attr}", _plain_weight)
            wrapped.append((module, attr))
        else:
            others.append((module, attr))
    return patcher, wrapped, others


def unwrapped(slots: list[Slot]) -> list[Slot]:
    """The slots whose layer did not get :func:`_plain_weight` when ComfyUI loaded the clone."""
    return [(m, a) for m, a in slots if not any(f is _plain_weight for f in getattr(m, f"{a}_function", []))]


def lora_targets(model: Any) -> dict[str, torch.nn.Module]:
    """``{kohya prefix: nn.Linear}`` of the diffusion model, from ComfyUI's own LoRA key map."""
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    targets: dict[str, torch.nn.Module] = {}
    for prefix, key in key_map.items():
        if isinstance(key, str) and key.endswith(".weight") and prefix.startswith("lora_unet_"):
            try:
                module = model.model.get_submodule(key[: -len(".weight")])
            except AttributeError:        # the map names layers of every model of the family, not all exist here
                continue
            if isinstance(module, torch.nn.Linear):
                targets[prefix] = module
    return targets


def model_inputs(model: Any, positive: list, latents: torch.Tensor, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """ComfyUI CONDITIONING -> the keyword tensors of ``apply_model`` (``c_crossattn``, ``y``, ...), one
    dict per conditioning entry, each for a batch of one, as the samplers make them."""
    conds = comfy.sampler_helpers.convert_cond(positive)
    conds = comfy.samplers.encode_model_conds(model.model.extra_conds, conds, latents[:1], device, "positive")
    out = []
    for c in conds:
        if c.get("area") is not None or c.get("mask") is not None or c.get("control") is not None:
            raise SettingError("Refine Identity takes a plain prompt: connect CLIP Text Encode directly (no area, "
                               "mask or ControlNet on the conditioning).")
        # plain copies: the conditioning was made in inference mode, and autograd saves what meets the LoRA
        out.append({k: v.process_cond(batch_size=1, device=device, area=None).cond.to(device).clone()
                    for k, v in c["model_conds"].items()})
    return out


def check_latent(model: Any, latent: dict) -> torch.Tensor:
    """The ``samples [N, C, H, W]`` of Refine Identity's latent input, or a :class:`SettingError` that says what
    is wrong with it and how to make a good one (the SDXL checkpoint's own VAE through VAE Encode)."""
    samples = latent["samples"]
    if samples.dim() != 4 or samples.shape[0] == 0:
        raise SettingError(f"Refine Identity: the latent input has shape {list(samples.shape)}; connect VAE Encode "
                           "of the photos (one size per batch).")
    channels = int(getattr(model.model.latent_format, "latent_channels", 4))
    if samples.shape[1] != channels:
        raise SettingError(
            f"Refine Identity: the latent input has {samples.shape[1]} channels but the connected SDXL model works on "
            f"{channels}-channel latents: the photos were encoded with another model's VAE (16 channels: SD3 or "
            "Flux). Connect the VAE output of the SDXL checkpoint (Load Checkpoint) to the VAE Encode of the photos.")
    bad = int((~torch.isfinite(samples)).sum())
    if bad:
        raise SettingError(
            f"Refine Identity: the latent input holds {bad} NaN or infinite values (of {samples.numel()}), so there "
            "is nothing to learn from. Encode the photos again: load them afresh and use the SDXL checkpoint's VAE "
            "in full precision (start ComfyUI with --fp32-vae: the SDXL VAE overflows in fp16).")
    return samples


class HyperLoRAStudioRefineIdentity:
    DESCRIPTION = (
        "Fine-tunes an identity on the person's own photos for a few steps (the authors suggest about 50), the "
        "SDXL model frozen: 'coefficients' tunes the identity itself (the result is still an identity file), "
        "'lora' tunes the built LoRA matrices (the result is a LoRA to apply or export). Connect the photos "
        "through VAE Encode and a prompt with the trigger words and a class word. The report gives the "
        "denoising loss before and after.")
    CATEGORY = f"{CATEGORY}/quality"
    RETURN_TYPES = (STUDIO_IDENTITY, LORA_MODEL, "STRING")
    RETURN_NAMES = ("identity", "lora", "report")
    OUTPUT_TOOLTIPS = (
        "coefficients: the refined identity (save it, build, mix it like any identity); lora: the input "
        "identity unchanged (the refinement is in the lora output).",
        "The refined LoRA for HyperLoRA Studio Apply or Export LoRA (coefficients: built from the refined identity).",
        "Mode, steps, learning rate and the denoising loss on the photos before and after.")
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        strength = (STRENGTH[0], {**STRENGTH[1], "tooltip": "The strength the LoRA acts with while tuning: use the "
                                  "one you apply it with (0.85 is typical)."})
        return {"required": {
            "model": ("MODEL", {"tooltip": "The SDXL model (e.g. from Load Checkpoint) without the identity applied; "
                                           "it is not changed."}),
            "hyper_lora": (STUDIO_MODEL, {"tooltip": "The HyperLoRA model that made the identity."}),
            "identity": (STUDIO_IDENTITY, {"tooltip": "The identity to refine (Identity from Images or Load Identity)."}),
            "latent": ("LATENT", {"tooltip": "The person's photos through the core VAE Encode (one size per batch; "
                                             "e.g. 1024x1024 crops around the person)."}),
            "positive": ("CONDITIONING", {"tooltip": "A prompt for the photos with the trigger words and a class word, "
                                                     f"e.g. '{TRIGGER_PREFIX}a photo of a woman' (one for all photos, "
                                                     "or one per photo)."}),
            "mode": (list(MODES), {"default": MODES[0], "tooltip": "'coefficients': tune the identity's 1,120 x 128 "
                                   "coefficients (result: an identity). 'lora': tune the LoRA matrices (result: a "
                                   "LoRA; more freedom, bigger, no longer an identity)."}),
            "steps": ("INT", {"default": DEFAULT_STEPS, "min": 1, "max": MAX_STEPS, "step": 1,
                              "tooltip": "Fine-tuning steps, one photo each; about 50 as the authors suggest. Each "
                                         "costs a forward and backward pass of the SDXL UNet."}),
            "learning_rate": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.00001, "round": False,
                                        "tooltip": "Adam step size; 0 = the mode's default (coefficients "
                                                   f"{DEFAULT_LEARNING_RATE['coefficients']:g}, lora "
                                                   f"{DEFAULT_LEARNING_RATE['lora']:g}). Lower it if the loss rises."}),
            "strength": strength,
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF,
                             "tooltip": "Seed of the noise, timesteps and photo order."}),
        }}

    def run(self, model: Any, hyper_lora: HyperLoRAHandle, identity: Any, latent: dict, positive: list, mode: str,
            steps: int, learning_rate: float, strength: float, seed: int) -> dict:
        strength = check_strength(strength, "strength", where=node_label("RefineIdentity", "Refine Identity"))
        hyper_lora = expect_handle(hyper_lora)
        identity = expect_identity(identity)
        sampling = model.model.model_sampling
        if not isinstance(sampling, comfy.model_sampling.EPS):
            raise LoraError(f"Refine Identity trains with the epsilon objective of SDXL; the connected model is "
                            f"{model_kind(model)} ({type(sampling).__name__}). Connect an SDXL checkpoint.")
        targets = lora_targets(model)
        samples = check_latent(model, latent)
        n = samples.shape[0]
        if len(positive) not in (1, n):
            raise SettingError(f"Got {len(positive)} prompts for {n} photos; connect one prompt for all photos or one "
                               "per photo.")
        check_interrupt()
        hyper_lora.load()
        # with or without manual cast: a tensor already in the compute dtype is not copied by ComfyUI's cast
        patcher, wrapped, others = trainable_patcher(model)
        dm = model.model.diffusion_model
        try:
            mm.load_models_gpu([patcher], force_full_load=True)
            others += unwrapped(wrapped)          # a layer ComfyUI did not wrap: a copy of its tensor instead
            device = patcher.load_device
            bar = progress(steps + 2)
            with torch.inference_mode(False), plain_copies(others) as copied:
                if copied:
                    log.debug("Refine Identity: %d bytes of other inference-mode tensors copied", copied)
                latents = patcher.model.process_latent_in(samples.to(device).float()).clone()
                conds = model_inputs(patcher, positive, latents, device)

                def denoise(x: torch.Tensor, sigma: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
                    if len(conds) == 1:          # one prompt for all photos: one batched call
                        c = {k: torch.cat([v] * x.shape[0]) for k, v in conds[0].items()}
                        return patcher.model.apply_model(x, sigma, **c)
                    return torch.cat([patcher.model.apply_model(x[j:j + 1], sigma[j:j + 1], **conds[int(images[j])])
                                      for j in range(x.shape[0])])

                # the layers inside each block: ComfyUI's UNet calls them one by one (forward_timestep_embed), never
                # the block's own forward, so checkpointing the blocks themselves would never engage
                blocks = [layer for block in (*getattr(dm, "input_blocks", []),
                                              *([dm.middle_block] if hasattr(dm, "middle_block") else []),
                                              *getattr(dm, "output_blocks", [])) for layer in block]
                task = DenoiseTask(denoise, latents, sampling.sigmas.detach().to(device).float().clone())
                bar.update(1)
                result = refine(hyper_lora.model, identity, targets, task, mode=mode, steps=int(steps),
                                learning_rate=float(learning_rate), strength=float(strength), seed=int(seed),
                                checkpoint_modules=blocks, check_interrupt=check_interrupt,
                                on_step=lambda _i, _loss: bar.update(1))
        finally:
            for module, attr in wrapped:             # what ComfyUI attached for the clone, taken off again
                functions = getattr(module, f"{attr}_function", [])
                if any(f is _plain_weight for f in functions):
                    setattr(module, f"{attr}_function", [f for f in functions if f is not _plain_weight])
        bar.update(1)
        report = result.report()
        log.info("HyperLoRA Studio Refine Identity: %s", report.replace("\n", "; "))
        out_identity = result.identity if result.identity is not None else identity
        return {"ui": {"text": [report]}, "result": (out_identity, result.lora, report)}


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = mappings(
    ("FaceSimilarity", SIMILARITY, HyperLoRAStudioFaceSimilarity),
    ("BestOfN", BEST_OF_N, HyperLoRAStudioBestOfN),
    ("RefineIdentity", "Refine Identity", HyperLoRAStudioRefineIdentity),
)
