"""HyperLoRA Identity on Prompt: the identity as ComfyUI weight hooks on conditioning, in a real
ComfyUI (random SDXL, 64x64, two euler steps).

Pinned: hooks over all steps give exactly the image of the merged LoRA (HyperLoRA Apply); with two
steps the first one decides the picture, so a window over the first half gives the merged image
and a window over the second half the plain model's (to one grey level); two identities on
left/right masks run in one sampler and give a picture of their own; a window that ends before it
starts is refused with a message.  Which steps a window switches on, and the non-SDXL refusal,
are pinned in test_inprocess.py.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.comfy import graphs as g
from tests.comfy.client import ComfyServer, PromptError

pytestmark = pytest.mark.comfy

STEPS = 2
STRENGTH = 4.0   # the random-weight LoRA is weak; at 0.85 it moves pixels by about 5 of 255


def _pixels(server: ComfyServer, entry: dict[str, Any], node: str) -> np.ndarray:
    [image] = entry["outputs"][node]["images"]
    return np.asarray(Image.open(io.BytesIO(server.view(image))).convert("RGB")).astype(np.int16)


def _sample(p: dict[str, Any], tag: str, model: list, positive: list, negative: list) -> None:
    p[f"ks{tag}"] = {"class_type": "KSampler", "inputs": {
        "model": model, "seed": 3, "steps": STEPS, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal",
        "positive": positive, "negative": negative, "latent_image": ["latent", 0], "denoise": 1.0}}
    p[f"dec{tag}"] = {"class_type": "VAEDecode", "inputs": {"samples": [f"ks{tag}", 0], "vae": ["ckpt", 2]}}
    p[f"save{tag}"] = {"class_type": "SaveImage", "inputs": {"images": [f"dec{tag}", 0], "filename_prefix": f"hooks/{tag}"}}


def _on_prompt(lora: str, start: float = 0.0, end: float = 1.0, **extra: Any) -> dict[str, Any]:
    return {"class_type": "HyperLoRAStudioConditioning", "inputs": {
        "positive": ["pos", 0], "negative": ["neg", 0], "lora": [lora, 0], "strength": STRENGTH,
        "start_percent": start, "end_percent": end, **extra}}


def _half_mask(name: str, x: int) -> dict[str, Any]:
    return {f"{name}_bg": {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 64, "height": 64}},
            f"{name}_fg": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 32, "height": 64}},
            name: {"class_type": "MaskComposite", "inputs": {"destination": [f"{name}_bg", 0],
                                                              "source": [f"{name}_fg", 0], "x": x, "y": 0,
                                                              "operation": "add"}}}


@pytest.fixture(scope="module")
def hooks_run(comfy_server: ComfyServer) -> dict[str, Any]:
    p: dict[str, Any] = {
        "ckpt": g.checkpoint(), "hl": g.loader(), "img": g.load_image("astronaut.png"),
        "id_a": g.identity("hl", ["img", 0]), "id_b": g.identity("hl", ["img", 0], grayscale=True),
        "lora_a": {"class_type": "HyperLoRAStudioBuildLoRA", "inputs": {"hyper_lora": ["hl", 0], "identity": ["id_a", 0],
                                                                   "kind": "id"}},
        "lora_b": {"class_type": "HyperLoRAStudioBuildLoRA", "inputs": {"hyper_lora": ["hl", 0], "identity": ["id_b", 0],
                                                                   "kind": "id"}},
        "merged": {"class_type": "HyperLoRAStudioApply", "inputs": {"model": ["ckpt", 0], "lora": ["lora_a", 0],
                                                              "strength": STRENGTH}},
        "merged_blocks": {"class_type": "HyperLoRAStudioApply", "inputs": {   # block strengths given, all at 1
            "model": ["ckpt", 0], "lora": ["lora_a", 0], "strength": STRENGTH, "input_blocks": 1.0,
            "middle_block": 1.0, "output_blocks": 1.0, "self_attention": 1.0, "cross_attention": 1.0}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": g.PROMPT, "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["ckpt", 1]}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "all_steps": _on_prompt("lora_a"),
        "early": _on_prompt("lora_a", 0.0, 0.5),
        "late": _on_prompt("lora_a", 0.5, 1.0),
        **_half_mask("left", 0), **_half_mask("right", 32),
        "person_a": _on_prompt("lora_a", mask=["left", 0], mask_strength=1.0, set_cond_area="default"),
        "person_b": _on_prompt("lora_b", mask=["right", 0], mask_strength=1.0, set_cond_area="default"),
        "two_pos": {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["person_a", 0],
                                                                    "conditioning_2": ["person_b", 0]}},
        "two_neg": {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["person_a", 1],
                                                                    "conditioning_2": ["person_b", 1]}},
    }
    _sample(p, "plain", ["ckpt", 0], ["pos", 0], ["neg", 0])
    _sample(p, "merged", ["merged", 0], ["pos", 0], ["neg", 0])
    _sample(p, "merged_blocks", ["merged_blocks", 0], ["pos", 0], ["neg", 0])
    for name in ("all_steps", "early", "late"):
        _sample(p, name, ["ckpt", 0], [name, 0], [name, 1])
    _sample(p, "two", ["ckpt", 0], ["two_pos", 0], ["two_neg", 0])
    entry = comfy_server.run(p, timeout=1500)
    return {name: _pixels(comfy_server, entry, f"save{name}")
            for name in ("plain", "merged", "merged_blocks", "all_steps", "early", "late", "two")}


def test_hooks_over_all_steps_equal_the_merged_lora(hooks_run) -> None:
    merged, hooked, plain = hooks_run["merged"], hooks_run["all_steps"], hooks_run["plain"]
    assert np.abs(merged - plain).max() >= 10           # the identity visibly changes this random model's picture
    assert np.array_equal(hooked, merged)               # same weights, patched per step instead of once


def test_block_strengths_at_their_defaults_give_the_same_image(hooks_run) -> None:
    assert np.array_equal(hooks_run["merged_blocks"], hooks_run["merged"])   # bit for bit


def test_step_windows_follow_the_steps_they_cover(hooks_run) -> None:
    early, late = hooks_run["early"], hooks_run["late"]
    assert np.abs(early - hooks_run["merged"]).max() <= 1 and np.abs(early - hooks_run["plain"]).max() >= 10
    assert np.abs(late - hooks_run["plain"]).max() <= 1 and np.abs(late - hooks_run["merged"]).max() >= 10


def test_two_identities_on_two_masks_in_one_sampler(hooks_run) -> None:
    two = hooks_run["two"]
    assert two.shape == (64, 64, 3) and two.std() > 5
    assert np.abs(two - hooks_run["plain"]).max() >= 10        # identities applied
    assert np.abs(two - hooks_run["merged"]).max() >= 4        # not just person A everywhere


def test_a_window_that_ends_before_it_starts_is_refused(comfy_server: ComfyServer) -> None:
    p = {"ckpt": g.checkpoint(), "hl": g.loader(), "img": g.load_image("astronaut.png"),
         "id": g.identity("hl", ["img", 0]),
         "lora": {"class_type": "HyperLoRAStudioBuildLoRA", "inputs": {"hyper_lora": ["hl", 0], "identity": ["id", 0],
                                                                 "kind": "id"}},
         "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": g.PROMPT, "clip": ["ckpt", 1]}},
         "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["ckpt", 1]}},
         "bad": _on_prompt("lora", 0.6, 0.3),
         "show": {"class_type": "PreviewAny", "inputs": {"source": ["bad", 2]}}}
    with pytest.raises(PromptError, match=r"end_percent \(0.3\) must be larger than start_percent \(0.6\)"):
        comfy_server.run(p)
