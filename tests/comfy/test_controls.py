"""The control nodes inside ComfyUI (pack loaded by ComfyUI's own loader, this process):

* block strengths on ComfyUI's real SDXL class: patched weights read back from the ModelPatcher
  equal ``W + strength x m x 0.5 x up @ down`` (float64 reference), the defaults give the very
  patches of today, a multiplier touches exactly its block's weights, 0 leaves them unpatched;
  the same multipliers reach Identity on Prompt's hook;
* Face Keypoints, Face Analysis, Face Masks, Crop by Mask and Paste by Mask on synthetic faces
  painted at known places (the fixture detector finds them, tests/fixtures/antelope.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from tests.comfy.models import ANTELOPE, CLIP_FOLDER, SMALL_MODEL
from tests.core.test_drawing import assert_same_drawing, reference_keypoints
from tests.fixtures import antelope as A
from tests.fixtures.hyperlora_models import sdxl_lora_module_specs
from tests.fixtures.loras import random_lora
from tests.fixtures.sdxl import meta_model

pytestmark = pytest.mark.comfy

STRENGTH = 0.8
BLOCK_NAMES = ("input_blocks", "middle_block", "output_blocks", "self_attention", "cross_attention")
LEFT, RIGHT = (230.0, 300.0, 160.0), (640.0, 290.0, 220.0)     # painted faces (cx, cy, height)


def _group(prefix: str) -> set[str]:
    """The block inputs that act on a module (diffusers name), written out independently."""
    block = {"down": "input_blocks", "mid": "middle_block", "up": "output_blocks"}[prefix.split("_")[2]]
    return {block, "self_attention" if "_attn1_" in prefix else "cross_attention"}


@pytest.fixture(scope="module")
def lora() -> dict[str, torch.Tensor]:
    """A random rank-2 LoRA on SDXL's 140 attention modules at their real sizes, alpha = rank / 2."""
    return random_lora(sdxl_lora_module_specs(), rank=2, seed=5, dtype=torch.float16)


def _patcher(comfy: Any) -> Any:
    import comfy.model_patcher

    return comfy.model_patcher.ModelPatcher(meta_model(comfy, "SDXL"), load_device=torch.device("cpu"),
                                            offload_device=torch.device("cpu"))


def _sample_keys(lora: dict[str, torch.Tensor]) -> list[str]:
    """Two modules of every (block, attention kind) pair: 12 patched weights to read back."""
    seen: dict[tuple[str, ...], int] = {}
    picked = []
    for key in lora:
        if key.endswith(".lora_down.weight"):
            prefix = key[: -len(".lora_down.weight")]
            group = tuple(sorted(_group(prefix)))
            if seen.get(group, 0) < 2:
                seen[group] = seen.get(group, 0) + 1
                picked.append(prefix)
    assert len(picked) == 12
    return picked


def _read_back(comfy: Any, patched: Any, key: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Put a real W at ``key``, let ComfyUI patch it, return (W, patched weight) and free it again."""
    import comfy.utils

    shape = tuple(patched.model.state_dict()[key].shape)
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    comfy.utils.set_attr_param(patched.model, key, w.clone())
    patched.patch_weight_to_device(key, device_to=torch.device("cpu"))
    got = comfy.utils.get_attr(patched.model, key).detach().clone()
    patched.backup.pop(key, None)
    comfy.utils.set_attr_param(patched.model, key, torch.empty(shape, device="meta"))
    return w, got


def test_default_block_strengths_give_todays_patches(pack, comfy, lora):
    base = _patcher(comfy)
    (today,) = pack.nodes["HyperLoRAStudioApply"]().run(base, lora, STRENGTH)
    (explicit,) = pack.nodes["HyperLoRAStudioApply"]().run(base, lora, STRENGTH, **{n: 1.0 for n in BLOCK_NAMES})
    assert set(today.patches) == set(explicit.patches) and len(today.patches) == 560
    for key, [patch] in today.patches.items():
        [other] = explicit.patches[key]
        assert patch[0] == other[0] == STRENGTH                    # strength
        for a, b in zip(patch[1].weights, other[1].weights):       # the very same tensors / values
            assert a is b or a == b


@pytest.mark.parametrize("name, value", [("input_blocks", 0.5), ("middle_block", 2.0), ("output_blocks", 0.3),
                                         ("self_attention", 1.5), ("cross_attention", -1.0)])
def test_a_block_multiplier_scales_exactly_its_weights(pack, comfy, lora, name, value):
    import comfy.lora

    base = _patcher(comfy)
    (patched,) = pack.nodes["HyperLoRAStudioApply"]().run(base, lora, STRENGTH, **{name: value})
    key_map = comfy.lora.model_lora_keys_unet(patched.model, {})
    assert len(patched.patches) == 560
    for n, prefix in enumerate(_sample_keys(lora)):
        key = key_map[prefix]
        up = lora[f"{prefix}.lora_up.weight"].double()
        down = lora[f"{prefix}.lora_down.weight"].double()
        m = value if name in _group(prefix) else 1.0
        w, got = _read_back(comfy, patched, key, n)
        expected = w.double() + STRENGTH * m * 0.5 * up @ down
        assert torch.allclose(got.double(), expected, atol=1e-5, rtol=1e-5), (prefix, m)
        assert float((got.double() - w.double()).abs().max()) > 1e-4   # the LoRA did change it


def test_zero_leaves_a_block_untouched(pack, comfy, lora):
    import comfy.lora

    base = _patcher(comfy)
    (patched,) = pack.nodes["HyperLoRAStudioApply"]().run(base, lora, STRENGTH, middle_block=0.0)
    key_map = comfy.lora.model_lora_keys_unet(patched.model, {})
    middle = {key_map[p[: -len(".lora_down.weight")]] for p in lora
              if p.endswith(".lora_down.weight") and "_mid_block_" in p}
    assert len(middle) == 80 and len(patched.patches) == 560 - 80
    assert not middle & set(patched.patches)
    for n, prefix in enumerate(_sample_keys(lora)):
        w, got = _read_back(comfy, patched, key_map[prefix], 100 + n)
        if "_mid_block_" in prefix:
            assert torch.equal(got, w)                    # not patched at all: bit for bit W
        else:
            assert not torch.equal(got, w)
    (all_off,) = pack.nodes["HyperLoRAStudioApply"]().run(base, lora, STRENGTH, self_attention=0.0,
                                                          cross_attention=0.0)
    assert all_off is base                                # nothing left to patch: the model as it came


def test_identity_on_prompt_takes_the_block_multipliers(pack, lora):
    node = pack.nodes["HyperLoRAStudioConditioning"]()
    (_, _, hooks) = node.run([], [], lora, 0.85, 0.0, 1.0)
    assert hooks.hooks[0].weights is lora                              # defaults: the LoRA as it is
    (_, _, hooks) = node.run([], [], lora, 0.85, 0.0, 1.0, output_blocks=0.5, cross_attention=0.0)
    [hook] = hooks.hooks
    prefixes = {k[: -len(".lora_down.weight")] for k in hook.weights if k.endswith(".lora_down.weight")}
    assert prefixes and all("_attn1_" in p for p in prefixes) and len(prefixes) == 70 * 4
    for p in prefixes:
        alpha = float(hook.weights[p + ".alpha"])
        assert alpha == (0.5 if "_up_blocks_" in p else 1.0)           # rank 2: alpha 1 x multiplier
    (pos, _, none) = node.run([[torch.zeros(1, 77, 2048), {}]], [], lora, 0.85, 0.0, 1.0, self_attention=0.0,
                              cross_attention=0.0)
    assert len(none) == 0 and "hooks" not in pos[0][1]


# --------------------------------------------------------------------------- face nodes


@pytest.fixture(scope="module")
def small(pack) -> Any:
    handle, _info = pack.nodes["HyperLoRAStudioLoader"]().load(model=SMALL_MODEL, clip_vision=CLIP_FOLDER,
                                                           insightface=ANTELOPE, dtype="fp32", provider="CPU")
    return handle


def _comfy_image(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array).float().div(255.0)[None]


@pytest.fixture(scope="module")
def two_faces() -> torch.Tensor:
    return _comfy_image(A.face_image((560, 900), [LEFT, RIGHT], seeds=[1, 2]))


def test_face_keypoints_node(pack, small):
    image = _comfy_image(A.face_image((400, 500), [(260.0, 190.0, 180.0)], seeds=[4]))
    node = pack.nodes["HyperLoRAStudioFaceKeypoints"]()
    (kps,) = node.run(small, image, "largest", 0, "640", "skip", "image", 1024, 1024, 0.5, 0.4, 0.3)
    assert kps.shape == (1, 400, 500, 3) and kps.dtype == torch.float32
    drawn = (kps[0].numpy() * 255).round().astype(np.uint8)
    half = np.array([0.4 * 180.0, 0.5 * 180.0])
    expected = np.array([260.0, 190.0]) + np.array(A.KPS_TEMPLATE) * half
    assert_same_drawing(drawn, reference_keypoints(expected, 500, 400), within=5)
    (canvas,) = node.run(small, image, "largest", 0, "640", "skip", "canvas", 640, 512, 0.25, 0.5, 0.2)
    assert canvas.shape == (1, 512, 640, 3)
    ys, xs = np.nonzero(canvas[0].numpy().any(axis=-1))
    assert abs(xs.mean() - 160) < 12 and abs(ys.mean() - 256) < 20     # the face moved to (0.25, 0.5)
    blank = torch.full((1, 96, 128, 3), 0.3)
    (black,) = node.run(small, blank, "largest", 0, "640", "skip", "image", 1024, 1024, 0.5, 0.4, 0.3)
    assert black.shape == (1, 96, 128, 3) and not bool(black.any())
    with pytest.raises(pack.errors.FaceNotFoundError, match="image 1 of 1"):
        node.run(small, blank, "largest", 0, "640", "error", "image", 1024, 1024, 0.5, 0.4, 0.3)


def test_face_analysis_node_marks_the_face_face_choice_takes(pack, small, two_faces):
    node = pack.nodes["HyperLoRAStudioFaceAnalysis"]()
    for choice, index, taken in (("left_to_right", 1, RIGHT), ("left_to_right", 0, LEFT), ("largest", 0, RIGHT)):
        preview, text = node.run(small, two_faces, face_choice=choice, face_index=index, remove_background=True,
                                 grayscale=False, det_size="640")
        assert preview.shape[0] == 1 and preview.shape[1] == 560 and preview.shape[2] > 900
        pixels = (preview[0].numpy() * 255).round().astype(np.uint8)[:, :900]
        green = np.all(pixels == np.array([40, 230, 90]), axis=-1)
        cx, cy, h = taken
        left_edge = round(cx - 0.4 * h)
        assert green[int(cy):int(cy + 0.4 * h), left_edge - 6:left_edge + 6].any(axis=1).mean() > 0.9
        other = RIGHT if taken is LEFT else LEFT
        assert not green[int(other[1]):int(other[1] + 0.45 * other[2]),
                         int(other[0] - 0.45 * other[2]):int(other[0] + 0.45 * other[2])].any()
        assert text.startswith("image 1 of 1:") and "2 face(s)" in text and "<- chosen" in text
        chosen_line = next(line for line in text.splitlines() if "<- chosen" in line)
        x1 = int(chosen_line.split("box (")[1].split(",")[0])
        assert abs(x1 - left_edge) < 10


def test_face_masks_node_two_faces_left_to_right(pack, small, two_faces):
    node = pack.nodes["HyperLoRAStudioFaceMasks"]()
    masks, f1, f2, f3, f4, count = node.run(small, two_faces, "left_to_right", 1.3, 8, "640")
    assert count == 2 and masks.shape == (2, 560, 900)
    yy, xx = np.mgrid[0:560, 0:900]

    def inside(face: tuple[float, float, float], scale: float = 1.0) -> np.ndarray:
        cx, cy, h = face
        return ((xx - cx) / (0.4 * h * scale)) ** 2 + ((yy - cy) / (0.5 * h * scale)) ** 2 <= 1.0

    for mask, own, other in ((f1, LEFT, RIGHT), (f2, RIGHT, LEFT)):
        m = mask[0].numpy()
        assert mask.shape == (1, 560, 900)
        assert m[inside(own, 0.6)].min() > 0.9 and m[inside(other)].max() < 1e-3
    assert torch.equal(masks[0], f1[0]) and torch.equal(masks[1], f2[0])
    assert not bool(f3.any()) and not bool(f4.any()) and f3.shape == (1, 560, 900)
    _, g1, g2, *_ = node.run(small, two_faces, "largest", 1.3, 8, "640")
    assert torch.equal(g1, f2) and torch.equal(g2, f1)


def test_crop_and_paste_nodes_repaint_only_the_face(pack, small, two_faces):
    (_, f1, *_rest) = pack.nodes["HyperLoRAStudioFaceMasks"]().run(small, two_faces, "left_to_right", 1.3, 8, "640")
    crop_image, crop_mask, crop = pack.nodes["HyperLoRAStudioCropByMask"]().run(two_faces, f1, 0.5, 512)
    assert crop_image.shape[1:] == (512, 512, 3) and crop_mask.shape == (1, 512, 512)
    assert 0.05 < float(crop_mask.mean()) < 0.6                # the face, with context around it
    painted = torch.zeros_like(crop_image)                      # a "re-render": black
    (out,) = pack.nodes["HyperLoRAStudioPasteByMask"]().run(two_faces, painted, crop)
    changed = (out != two_faces).any(dim=-1)[0].numpy()
    outside = f1[0].numpy() == 0
    assert not changed[outside].any()                           # outside face 1's mask: every pixel kept
    cx, cy, _ = LEFT
    assert float(out[0, int(cy), int(cx)].max()) < 0.02        # its centre re-painted
    assert torch.equal(out[0, int(RIGHT[1]), int(RIGHT[0])], two_faces[0, int(RIGHT[1]), int(RIGHT[0])])


def test_a_wrong_wire_into_crop_names_crop_by_mask(pack):
    check = pack.nodes["HyperLoRAStudioPasteByMask"].VALIDATE_INPUTS
    assert check(input_types={"destination": "IMAGE", "image": "IMAGE", "crop": "HYPERLORA_STUDIO_CROP"}) is True
    msg = check(input_types={"crop": "MASK"})
    assert isinstance(msg, str) and "'crop'" in msg and "Crop by Mask" in msg, msg
