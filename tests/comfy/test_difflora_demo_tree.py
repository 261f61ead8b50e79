"""The DiffLoRA demo (``python -m hyperlora.train difflora-demo --quick``) writes a ComfyUI ``models/`` tree
that the pack's DiffLoRA nodes use as it is.

A quick run: toy data, prepare, base pre-training, the HyperLoRA generator beside it, one LoRA per training
identity, the LAE and DiT fit, export, the evaluation of both generators.  Then, inside ComfyUI (the pack
loaded by its own custom-node loader), the tree's folders are registered as ``extra_model_paths.yaml`` entries
would be, and

* its last line is ``difflora: id-sim own X, other Y`` and agrees with ``difflora_eval.json``;
* the DiffLoRA Loader lists and loads the demo's model; the HyperLoRA Studio Loader loads the demo's
  HyperLoRA model, CLIP and AntelopeV2 (the faces and CLIP that LoRA from Images (DiffLoRA) needs);
* LoRA from Images (DiffLoRA) on an identity's held-out reference photos gives the LoRA the demo evaluated
  for that identity (the core path: reference features -> MIF -> sample, seed 0);
* Apply merges it into ComfyUI's SDXL class holding the demo's base UNet exactly as the trainer applies it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import re
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from tests.comfy.toy_sdxl import assert_apply_matches_the_trainer, tree_folders_registered

pytestmark = pytest.mark.comfy

NUMBER = r"(-?\d+\.\d{3}|nan)"
LAST_LINE = re.compile(rf"^difflora: id-sim own {NUMBER}, other {NUMBER}$")
LOADER, FROM_IMAGES = "HyperLoRAStudioDiffLoRALoader", "HyperLoRAStudioDiffLoRAFromImages"


@pytest.fixture(scope="module")
def demo_tree(tmp_path_factory) -> SimpleNamespace:
    pytest.importorskip("diffusers")
    from hyperlora.train import demo, difflora_demo

    out = tmp_path_factory.mktemp("difflora_demo_tree") / "models"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = difflora_demo.main(["--out", str(out), "--quick"])
    lines = buf.getvalue().strip().splitlines()
    assert code == 0, lines
    return SimpleNamespace(root=out, lines=lines, work=out / difflora_demo.WORK_NAME, demo=demo, dd=difflora_demo,
                           summary=json.loads((out / difflora_demo.SUMMARY_FILE).read_text(encoding="utf-8")))


@pytest.fixture(scope="module")
def registered(pack, demo_tree) -> Any:
    """The demo tree's folders in front of the test base's (as extra_model_paths.yaml entries would be)."""
    with tree_folders_registered(demo_tree.root, ("hyper_lora", "insightface", "difflora")):
        yield demo_tree


def test_last_line_and_the_summary_agree(demo_tree):
    match = LAST_LINE.match(demo_tree.lines[-1])
    assert match, demo_tree.lines[-3:]
    s = demo_tree.summary
    pics = s["id_sim"]
    assert match.groups() == (f"{pics['difflora training']['own']:.3f}", f"{pics['difflora training']['other']:.3f}")
    quick = demo_tree.dd.QUICK
    assert s["identities"] == quick.toy.identities
    # both generators, both groups, and the dataset LoRAs DiffLoRA learns from (training identities only)
    assert set(s["denoising_loss"]) == {"difflora training", "difflora unseen", "hyperlora training",
                                        "hyperlora unseen", "dataset training", "reconstructed training"}
    # the plain LoRAs (the ceiling) and the same through the LAE, in pictures too
    assert set(pics) == {"difflora training", "difflora unseen", "hyperlora training", "hyperlora unseen",
                         "dataset training", "reconstructed training"}
    for key, loss in s["denoising_loss"].items():
        group = quick.toy.identities if key.endswith("training") else quick.toy.unseen
        assert loss["identities"] == group and loss["photos"] == group * quick.toy.evaluate_per_identity, key
        assert all(math.isfinite(loss[k]) and loss[k] > 0 for k in ("own", "other", "none")), key
    assert math.isfinite(s["lae_relative_error"]) and s["lae_relative_error"] > 0
    assert set(s["seconds_per_lora"]) == {"difflora", "hyperlora"} and min(s["seconds_per_lora"].values()) > 0
    assert (demo_tree.root / "eval.png").is_file() and (demo_tree.root / "eval.json").is_file()
    table = "\n".join(demo_tree.lines)
    assert "difflora-demo, hyperlora unseen: loss own " in table and "one LoRA from reference features: " in table


def test_tree_holds_both_models_and_the_dataset_layout(demo_tree):
    from hyperlora.difflora.model import DiffLoraModel
    from hyperlora.spec import MODEL_FILES
    from hyperlora.train.difflora_fit import load_dataset

    dd, demo = demo_tree.dd, demo_tree.demo
    folder = demo_tree.root / "difflora" / dd.MODEL_NAME
    model = DiffLoraModel.from_folder(folder)
    data = load_dataset(demo_tree.work / "loras")
    assert model.lae.layout == data.layout and len(data.names) == dd.QUICK.toy.identities
    assert {m.rank for m in data.layout.modules} == {dd.QUICK.lora_rank}
    assert all(any(layer.replace(".", "_") in m.prefix for layer in dd.QUICK.lora_layers) for m in data.layout.modules)
    hyper = demo.Tree(demo_tree.root).model(demo.MODEL_NAME)
    assert sorted(p.name for p in hyper.iterdir()) == sorted(MODEL_FILES)


def test_nodes_sample_the_demo_lora_and_apply_it_as_the_trainer_does(pack, comfy, registered):
    from hyperlora.difflora.model import DiffLoraModel
    from hyperlora.faces.options import FaceOptions
    from hyperlora.train.evaluate import reference_features_from_photos

    dd, demo = registered.dd, registered.demo
    tree = demo.Tree(registered.root)
    assert dd.MODEL_NAME in pack.nodes[LOADER].INPUT_TYPES()["required"]["model"][0]
    difflora, info = pack.nodes[LOADER]().load(model=dd.MODEL_NAME, dtype="fp32")
    assert dd.MODEL_NAME in info
    faces, _ = pack.nodes["HyperLoRAStudioLoader"]().load(model=demo.MODEL_NAME, clip_vision=demo.CLIP_NAME,
                                                          insightface="antelopev2", dtype="fp32", provider="CPU")

    # an unseen identity's held-out reference photos, as the demo's evaluation reads them
    references = registered.work / "data" / "heldout" / "reference"
    person = sorted(references.iterdir())[-1]
    photos = [torch.from_numpy(np.array(Image.open(p).convert("RGB"))).float().div(255.0)[None]
              for p in sorted(person.glob("*.png"))]
    node = pack.nodes[FROM_IMAGES]
    face = {k: v for k, v in dataclasses.asdict(FaceOptions()).items() if k in node.INPUT_TYPES()["required"]}
    steps = dd.QUICK.sample_steps
    (lora,), _crops, text = node().run(difflora=[difflora], hyper_lora=[faces], images=photos, seed=[0],
                                       batch_count=[1], steps=[steps], guidance=[1.0], **{k: [v] for k, v in face.items()})
    assert f"from {len(photos)} photo(s)" in text

    features = reference_features_from_photos(references, [person.name], antelope=tree.antelope,
                                              clip_folder=tree.clip, clip_processor=tree.clip_processor)
    core, _ = dd.difflora_loras(DiffLoraModel.from_folder(registered.root / "difflora" / dd.MODEL_NAME), features,
                                [person.name], steps=steps)
    ref = core[person.name]
    assert set(lora) == set(ref)
    for key in ref:
        assert torch.allclose(lora[key], ref[key], rtol=1e-4, atol=1e-6), key

    modules = len([k for k in ref if k.endswith(".alpha")])
    assert_apply_matches_the_trainer(pack, tree.sdxl, dict(lora), 0.8, patches=modules, min_change=1e-7)
