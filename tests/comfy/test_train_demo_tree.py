"""The training demo's output is a ComfyUI ``models/`` tree that the pack uses as it is.

A quick demo run (``python -m hyperlora.train demo --quick``: toy data, prepare, base pre-training, all
three fit stages, export, evaluation) writes the tree; then, inside ComfyUI (the pack loaded by ComfyUI's
own custom-node loader), the tree's folders are registered with ``folder_paths`` as a user's
``extra_model_paths.yaml`` would, and

* the Loader node loads the trained model, the tiny CLIP folder and the AntelopeV2 folder from it;
* Identity from Images makes an identity from a held-out toy photo, Build LoRA turns it into a LoRA;
* Apply merges it into ComfyUI's own SDXL model class built with the toy UNet's sizes and loaded with
  the demo's base UNet weights, and the patched ComfyUI UNet computes what the diffusers UNet computes
  with the same LoRA applied functionally (the training path), to fp32 precision.
"""

from __future__ import annotations

import contextlib
import io
import re
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from tests.comfy.toy_sdxl import assert_apply_matches_the_trainer, tree_folders_registered

pytestmark = pytest.mark.comfy

FACE = dict(face_choice="largest", face_index=0, remove_background=True, grayscale=False, no_face="error",
            det_size="640")
LAST_LINE = re.compile(r"^demo: loss own (\d+\.\d+), other (\d+\.\d+), none (\d+\.\d+); "
                       r"id-sim own (-?\d+\.\d+|nan), other (-?\d+\.\d+|nan), none (-?\d+\.\d+|nan)$")


@pytest.fixture(scope="module")
def demo_tree(tmp_path_factory) -> SimpleNamespace:
    from hyperlora.train import demo

    out = tmp_path_factory.mktemp("demo_tree") / "models"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = demo.main(["--out", str(out), "--quick", "--seed", "1"])
    lines = buf.getvalue().strip().splitlines()
    assert code == 0, lines
    return SimpleNamespace(root=out, tree=demo.Tree(out), lines=lines, work=out / demo.WORK_NAME, demo=demo)


@pytest.fixture(scope="module")
def registered(pack, demo_tree) -> Any:
    """The demo tree's folders in front of the test base's (as extra_model_paths.yaml entries would be)."""
    with tree_folders_registered(demo_tree.root, ("hyper_lora", "insightface")):
        yield demo_tree


def test_demo_prints_the_loss_lines_last(demo_tree):
    assert LAST_LINE.match(demo_tree.lines[-1]), demo_tree.lines[-3:]
    assert demo_tree.lines[-2].startswith("demo (unseen identities): loss own ")
    own, other, none = (float(v) for v in LAST_LINE.match(demo_tree.lines[-1]).groups()[:3])
    assert all(np.isfinite([own, other, none])) and min(own, other, none) > 0
    assert (demo_tree.root / "eval.png").is_file() and (demo_tree.root / "eval.json").is_file()


def test_tree_layout(demo_tree):
    from hyperlora.spec import ANTELOPE_REQUIRED_FILES, BASE_RESAMPLER_FILE, MARKER_FILE, MODEL_FILES

    tree, demo = demo_tree.tree, demo_tree.demo
    model = tree.model(demo.MODEL_NAME)
    assert sorted(p.name for p in model.iterdir()) == sorted(MODEL_FILES)   # base_resampler too: trained with Base
    assert (model / MARKER_FILE).is_file() and (model / BASE_RESAMPLER_FILE).is_file()
    assert tree.clip == demo_tree.root / "hyper_lora" / "clip_vit" / demo.CLIP_NAME
    assert {p.name for p in tree.clip.iterdir()} >= {"config.json", "model.safetensors"}
    assert (tree.clip_processor / "preprocessor_config.json").is_file()
    assert tree.antelope == demo_tree.root / "insightface" / "models" / "antelopev2"
    assert all((tree.antelope / f).is_file() for f in ANTELOPE_REQUIRED_FILES)


def test_loader_reads_the_tree_and_an_identity_applies_to_an_sdxl_shaped_unet(pack, comfy, registered):
    demo, tree = registered.demo, registered.tree
    loader = pack.nodes["HyperLoRAStudioLoader"]
    assert demo.MODEL_NAME in loader.INPUT_TYPES()["required"]["model"][0]
    handle, info = loader().load(model=demo.MODEL_NAME, clip_vision=demo.CLIP_NAME, insightface="antelopev2",
                                 dtype="fp32", provider="CPU")
    assert demo.MODEL_NAME in info and handle.model.arch.base_rank is not None
    assert len(handle.model.arch.modules) == 14

    # a held-out reference photo of an unseen identity
    person = sorted((registered.work / "data" / "heldout" / "reference").iterdir())[-1]
    photo = np.array(Image.open(sorted(person.glob("*.png"))[0]).convert("RGB"))
    images = torch.from_numpy(photo).float().div(255.0)[None]
    identity, _crops = pack.nodes["HyperLoRAStudioIdentityFromImages"]().run(handle, images, **FACE)
    (lora,) = pack.nodes["HyperLoRAStudioBuildLoRA"]().run(handle, identity, "id")
    assert len(lora) == 14 * 4 * 3
    assert any(float(v.abs().max()) > 0 for k, v in lora.items() if k.endswith("lora_up.weight"))  # trained: not zero

    # ComfyUI's SDXL model class with the toy sizes, holding the demo's base UNet
    assert_apply_matches_the_trainer(pack, tree.sdxl, lora, 0.8, patches=14 * 4)
