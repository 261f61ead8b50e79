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

pytestmark = pytest.mark.comfy

FACE = dict(face_choice="largest", face_index=0, remove_background=True, grayscale=False, no_face="error",
            det_size="640")
LAST_LINE = re.compile(r"^demo: loss own (\d+\.\d+), other (\d+\.\d+), none (\d+\.\d+); "
                       r"id-sim own (-?\d+\.\d+|nan), other (-?\d+\.\d+|nan), none (-?\d+\.\d+|nan)$")


def comfy_unet_config(diffusers_config: dict[str, Any]) -> dict[str, Any]:
    """ComfyUI's ``unet_config`` of the toy SDXL-shaped UNet (SDXL's keys, the toy's sizes)."""
    levels = len(diffusers_config["block_out_channels"])
    base = diffusers_config["block_out_channels"][0]
    attn = [t.startswith("CrossAttn") for t in diffusers_config["down_block_types"]]
    per = diffusers_config["layers_per_block"]
    return dict(
        use_checkpoint=False, image_size=diffusers_config["sample_size"], out_channels=4, use_spatial_transformer=True,
        legacy=False, num_classes="sequential", adm_in_channels=diffusers_config["projection_class_embeddings_input_dim"],
        in_channels=4, model_channels=base, num_res_blocks=[per] * levels,
        transformer_depth=[1 if a else 0 for a in attn for _ in range(per)],
        channel_mult=[c // base for c in diffusers_config["block_out_channels"]], transformer_depth_middle=1,
        use_linear_in_transformer=True, context_dim=diffusers_config["cross_attention_dim"], num_head_channels=64,
        transformer_depth_output=[1 if a else 0 for a in attn for _ in range(per + 1)],
        use_temporal_attention=False, use_temporal_resblock=False)


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
    import folder_paths

    added = [("hyper_lora", str(demo_tree.root / "hyper_lora")), ("insightface", str(demo_tree.root / "insightface"))]
    for key, path in added:
        folder_paths.add_model_folder_path(key, path, is_default=True)
    yield demo_tree
    for key, path in added:
        paths = folder_paths.folder_names_and_paths[key][0]
        if path in paths:
            paths.remove(path)


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
    import comfy.model_detection
    import comfy.model_patcher
    import comfy.supported_models
    import comfy.utils
    from diffusers import UNet2DConditionModel

    from hyperlora.lora_functional import LoraTerm, applied, diffusers_lora_targets, factors_from_lora

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
    unet = UNet2DConditionModel.from_pretrained(tree.sdxl, subfolder="unet").eval()
    cfg = comfy.model_detection.convert_config(comfy_unet_config(dict(unet.config)))
    model = comfy.supported_models.SDXL(cfg).get_model({})
    key_map = comfy.utils.unet_to_diffusers(cfg)
    theirs = unet.state_dict()
    model.diffusion_model.load_state_dict({c: theirs[d] for d, c in key_map.items() if d in theirs}, strict=True)
    base = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))

    strength = 0.8
    (patched,) = pack.nodes["HyperLoRAStudioApply"]().run(base, lora, strength)
    assert len(patched.patches) == 14 * 4 and not base.patches

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([300, 700])
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    text_embeds = torch.randn(2, 32, generator=g)
    time_ids = torch.tensor([[128.0, 128.0, 0.0, 0.0, 128.0, 128.0]] * 2)
    with torch.no_grad():
        y = torch.cat([text_embeds, unet.add_time_proj(time_ids.flatten()).reshape(2, -1)], dim=-1)
        plain = model.diffusion_model(x, timesteps=t, context=ctx, y=y)
        ref_plain = unet(x, t, ctx, added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}).sample
        assert torch.allclose(plain, ref_plain, atol=1e-4), "ComfyUI's SDXL class and the toy UNet differ"
        patched.patch_model(device_to=torch.device("cpu"))
        try:
            got = patched.model.diffusion_model(x, timesteps=t, context=ctx, y=y)
        finally:
            patched.unpatch_model(device_to=torch.device("cpu"))
        with applied(diffusers_lora_targets(unet), [LoraTerm(factors_from_lora(lora), strength)]):
            ref = unet(x, t, ctx, added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}).sample
    assert float((ref - ref_plain).abs().max()) > 1e-5          # the identity changes the UNet's output
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4), float((got - ref).abs().max())
