"""The pack inside a running ComfyUI, driven through its HTTP API (POST /prompt, /history, /view)."""

from __future__ import annotations

import io
import re
from typing import Any

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from tests.comfy import graphs as g
from hyperlora import errors
from tests.comfy.client import ComfyServer, PromptError, execution_error, raised
from tests.comfy.models import CLIP_FILE, FULL_MODEL, PACK_DIR_NAME

pytestmark = pytest.mark.comfy

EXPECTED = {  # node id -> (category, output types)
    "HyperLoRAStudioLoader": ("HyperLoRA Studio/loaders", ["HYPERLORA_STUDIO_MODEL", "STRING"]),
    "HyperLoRAStudioIdentityFromImages": ("HyperLoRA Studio/identity", ["HYPERLORA_STUDIO_IDENTITY", "IMAGE"]),
    "HyperLoRAStudioFaceMask": ("HyperLoRA Studio/identity", ["MASK"]),
    "HyperLoRAStudioBuildLoRA": ("HyperLoRA Studio/lora", ["LORA_MODEL"]),
    "HyperLoRAStudioApply": ("HyperLoRA Studio/lora", ["MODEL"]),
    "HyperLoRAStudioApplyFromImages": ("HyperLoRA Studio/lora", ["MODEL", "IMAGE"]),
    "HyperLoRAStudioConditioning": ("HyperLoRA Studio/lora", ["CONDITIONING", "CONDITIONING", "HOOKS"]),
    "HyperLoRAStudioSaveIdentity": ("HyperLoRA Studio/io", []),
    "HyperLoRAStudioLoadIdentity": ("HyperLoRA Studio/io", ["HYPERLORA_STUDIO_IDENTITY"]),
    "HyperLoRAStudioExportLoRA": ("HyperLoRA Studio/io", []),
    "HyperLoRAStudioMixIdentities": ("HyperLoRA Studio/mix", ["LORA_MODEL"]),
    "HyperLoRAStudioConceptSlider": ("HyperLoRA Studio/mix", ["LORA_MODEL"]),
    "HyperLoRAStudioFaceKeypoints": ("HyperLoRA Studio/faces", ["IMAGE"]),
    "HyperLoRAStudioFaceAnalysis": ("HyperLoRA Studio/faces", ["IMAGE", "STRING"]),
    "HyperLoRAStudioFaceMasks": ("HyperLoRA Studio/faces", ["MASK", "MASK", "MASK", "MASK", "MASK", "INT"]),
    "HyperLoRAStudioCropByMask": ("HyperLoRA Studio/faces", ["IMAGE", "MASK", "HYPERLORA_STUDIO_CROP"]),
    "HyperLoRAStudioPasteByMask": ("HyperLoRA Studio/faces", ["IMAGE"]),
}


def _images(entry: dict[str, Any], node: str) -> list[dict[str, str]]:
    return entry["outputs"][node]["images"]


def _files(entry: dict[str, Any], node: str) -> list[dict[str, str]]:
    return entry["outputs"][node]["hyper_lora_files"]


def _pixels(server: ComfyServer, image: dict[str, str]) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(server.view(image))).convert("RGB"))


def test_pack_loads_through_comfyuis_loader(comfy_server: ComfyServer):
    log = comfy_server.log_text()
    line = next((ln for ln in log.splitlines() if ln.rstrip().endswith(PACK_DIR_NAME) and "seconds" in ln), "")
    assert line and "IMPORT FAILED" not in line, log[-3000:]
    assert f"Cannot import {comfy_server.base / 'custom_nodes' / PACK_DIR_NAME}" not in log
    assert "Traceback" not in "\n".join(ln for ln in log.splitlines() if "HyperLoRA" in ln)
    info = comfy_server.get_json("/object_info")
    assert set(EXPECTED) <= set(info)


def test_object_info_documents_every_node(comfy_server: ComfyServer):
    info = comfy_server.get_json("/object_info")
    for node_id, (category, outputs) in EXPECTED.items():
        node = info[node_id]
        assert node["category"] == category, node_id
        assert node["output"] == outputs, node_id
        assert len(node["description"]) > 60 and node["display_name"].startswith("HyperLoRA "), node_id
        inputs = {**node["input"]["required"], **node["input"].get("optional", {})}
        assert inputs, node_id
        for name, spec in inputs.items():
            assert len(spec) == 2 and len(spec[1].get("tooltip", "")) > 10, f"{node_id}.{name} has no tooltip"
        if outputs:
            assert len(node["output_tooltips"]) == len(outputs), node_id
            assert all(len(t) > 10 for t in node["output_tooltips"]), node_id
        else:
            assert node["output_node"] is True, node_id
    loader = info["HyperLoRAStudioLoader"]["input"]["required"]
    assert loader["dtype"][0] == ["auto", "fp16", "bf16", "fp32"]
    assert loader["provider"][0] == ["auto", "CUDA", "ROCm", "CoreML", "CPU"]
    assert {"sdxl_small", "tiny", FULL_MODEL} <= set(loader["model"][0])
    assert {"clip_vit_large_14", CLIP_FILE} <= set(loader["clip_vision"][0])
    apply = info["HyperLoRAStudioApply"]["input"]["required"]
    assert apply["lora"][0] == "LORA_MODEL" and apply["model"][0] == "MODEL"


@pytest.mark.parametrize("value", ["sdxl_hyper_id_lora_v1_fidelity", None], ids=["stale", "empty_dropdown"])
def test_missing_model_is_refused_with_the_fix(comfy_server: ComfyServer, value):
    prompt = {"hl": g.loader(model=value), "img": g.load_image("astronaut.png"),
              "id": g.identity("hl", ["img", 0]),
              "save": {"class_type": "HyperLoRAStudioSaveIdentity", "inputs": {"identity": ["id", 0], "filename_prefix": "x"}}}
    with pytest.raises(PromptError) as info:
        comfy_server.post_prompt(prompt)
    errors = info.value.body["node_errors"]["hl"]["errors"]
    assert [e["extra_info"]["input_name"] for e in errors] == ["model"]   # only the input that is wrong
    text = " ".join(e["details"] for e in errors)
    assert str(value) in text and "hyper_lora_modules.json" in text
    assert str(comfy_server.base / "models" / "hyper_lora" / "hyper_lora") in text


@pytest.fixture(scope="module")
def sdxl_run(comfy_server: ComfyServer) -> dict[str, Any]:
    """One graph, several branches on the random SDXL checkpoint (64x64, one step each):

    ``_hl``: our Build LoRA -> HyperLoRA Apply; ``_core``: the same LoRA through the core
    "Load LoRA Model" node; ``_plain``: no LoRA; ``_noface``: Apply from Images on a faceless
    photo with no_face=skip (must leave the model unchanged).  Plus Save Identity and Export LoRA.
    """
    p: dict[str, Any] = {
        "ckpt": g.checkpoint(), "hl": g.loader(), "img": g.load_image("astronaut.png"),
        "noface": g.load_image("noface.png"),
        "id": g.identity("hl", ["img", 0]),
        "lora": {"class_type": "HyperLoRAStudioBuildLoRA", "inputs": {"hyper_lora": ["hl", 0], "identity": ["id", 0],
                                                                 "kind": "id"}},
        "apply": {"class_type": "HyperLoRAStudioApply", "inputs": {"model": ["ckpt", 0], "lora": ["lora", 0],
                                                             "strength": 0.85}},
        "core": {"class_type": "LoraModelLoader", "inputs": {"model": ["ckpt", 0], "lora": ["lora", 0],
                                                             "strength_model": 0.85}},
        "apply_noface": {"class_type": "HyperLoRAStudioApplyFromImages", "inputs": {
            "model": ["ckpt", 0], "hyper_lora": ["hl", 0], "images": ["noface", 0], "strength": 0.85, **g.FACE}},
        "save_id": {"class_type": "HyperLoRAStudioSaveIdentity", "inputs": {"identity": ["id", 0],
                                                                      "filename_prefix": "e2e/astronaut"}},
        "export": {"class_type": "HyperLoRAStudioExportLoRA", "inputs": {"lora": ["lora", 0], "filename_prefix": "e2e/astronaut",
                                                                   "dtype": "fp32"}},
        "crops": {"class_type": "SaveImage", "inputs": {"images": ["id", 1], "filename_prefix": "e2e/crops"}},
    }
    for tag, model in (("_hl", ["apply", 0]), ("_core", ["core", 0]), ("_plain", ["ckpt", 0]),
                       ("_noface", ["apply_noface", 0])):
        g.sampling(p, model=model, ckpt="ckpt", prefix=f"e2e/img{tag}", tag=tag, seed=7)
    entry = comfy_server.run(p, timeout=900)
    return {"entry": entry, "prompt": p}


def test_end_to_end_graph_saves_an_image(comfy_server: ComfyServer, sdxl_run):
    entry = sdxl_run["entry"]
    assert entry["status"]["status_str"] == "success"
    [image] = _images(entry, "save_hl")
    assert image["type"] == "output" and image["filename"].endswith(".png")
    assert (comfy_server.base / "output" / image["subfolder"] / image["filename"]).is_file()
    pixels = _pixels(comfy_server, image)
    assert pixels.shape == (64, 64, 3) and pixels.std() > 5          # a real (random-model) picture, not blank
    plain = _pixels(comfy_server, _images(entry, "save_plain")[0])
    assert not np.array_equal(pixels, plain)                          # the merged LoRA changed the result
    [crop] = _images(entry, "crops")
    assert _pixels(comfy_server, crop).shape[2] == 3


def test_core_lora_loader_and_our_apply_give_the_same_image(comfy_server: ComfyServer, sdxl_run):
    entry = sdxl_run["entry"]
    ours = _pixels(comfy_server, _images(entry, "save_hl")[0])
    core = _pixels(comfy_server, _images(entry, "save_core")[0])
    assert np.array_equal(ours, core)


def test_faceless_photo_with_skip_leaves_the_model_unchanged(comfy_server: ComfyServer, sdxl_run):
    entry = sdxl_run["entry"]
    plain = _pixels(comfy_server, _images(entry, "save_plain")[0])
    noface = _pixels(comfy_server, _images(entry, "save_noface")[0])
    assert np.array_equal(plain, noface)
    assert "No face found in the 1 photo(s) - model passed through unchanged" in comfy_server.log_text()
    ui = entry["outputs"]["apply_noface"]                  # said on the node too, not only in the console
    assert ui["text"][0].startswith("No face found in the 1 photo(s) - model passed through unchanged")
    [shown] = ui["images"]
    label = _pixels(comfy_server, shown)
    assert label.shape == (512, 512, 3) and label.std() > 5     # the labelled placeholder (text on gray)


def test_saved_identity_and_exported_lora_files(comfy_server: ComfyServer, sdxl_run):
    from hyperlora.identity import load_identity

    entry = sdxl_run["entry"]
    [ident] = _files(entry, "save_id")
    path = comfy_server.base / "output" / "hyper_lora_identities" / ident["subfolder"] / ident["filename"]
    assert re.fullmatch(r"astronaut_\d{5}_\.safetensors", ident["filename"]) and path.is_file()
    identity = load_identity(path)
    assert identity.model_name == "sdxl_small" and identity.num_images == 1
    assert tuple(identity.tokens.shape) == (1120, 4)
    [lora_file] = _files(entry, "export")
    lpath = comfy_server.base / "models" / "loras" / lora_file["subfolder"] / lora_file["filename"]
    lora = load_file(str(lpath))
    assert len(lora) == 560 * 3
    assert lora["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"].shape == (2, 2048)
    # LoraLoader lists the exported file
    names = comfy_server.get_json("/object_info/LoraLoader")["LoraLoader"]["input"]["required"]["lora_name"][0]
    assert lora_file["load_name"] in names
    # Load Identity lists the saved one and rebuilds the very same LoRA
    ids = comfy_server.get_json("/object_info/HyperLoRAStudioLoadIdentity")["HyperLoRAStudioLoadIdentity"]["input"]["required"]
    assert ident["load_name"] in ids["identity_file"][0]
    p = {"hl": g.loader(),
         "load": {"class_type": "HyperLoRAStudioLoadIdentity", "inputs": {"identity_file": ident["load_name"]}},
         "lora": {"class_type": "HyperLoRAStudioBuildLoRA", "inputs": {"hyper_lora": ["hl", 0], "identity": ["load", 0],
                                                                 "kind": "id"}},
         "export": {"class_type": "HyperLoRAStudioExportLoRA", "inputs": {"lora": ["lora", 0], "filename_prefix": "e2e/again",
                                                                    "dtype": "fp32"}}}
    again = comfy_server.run(p)
    [f2] = _files(again, "export")
    lora2 = load_file(str(comfy_server.base / "models" / "loras" / f2["subfolder"] / f2["filename"]))
    assert set(lora2) == set(lora) and all(np.array_equal(lora[k].numpy(), lora2[k].numpy()) for k in lora)


def _batch_prompt(no_face: str) -> dict[str, Any]:
    return {"hl": g.loader(), "a": g.load_image("astronaut.png"), "b": g.load_image("noface.png"),
            "batch": {"class_type": "ImageBatch", "inputs": {"image1": ["a", 0], "image2": ["b", 0]}},
            "id": g.identity("hl", ["batch", 0], no_face=no_face),
            "save": {"class_type": "HyperLoRAStudioSaveIdentity", "inputs": {"identity": ["id", 0],
                                                                       "filename_prefix": f"policy_{no_face}"}},
            "crops": {"class_type": "PreviewImage", "inputs": {"images": ["id", 1]}}}


def test_no_face_policy_skip_uses_the_other_photos(comfy_server: ComfyServer):
    from hyperlora.identity import load_identity

    entry = comfy_server.run(_batch_prompt("skip"))
    assert len(_images(entry, "crops")) == 1
    [f] = _files(entry, "save")
    identity = load_identity(comfy_server.base / "output" / "hyper_lora_identities" / f["filename"])
    assert identity.num_images == 1 and identity.settings.get("skipped_images") == "1"


def test_no_face_policy_error_names_the_photo(comfy_server: ComfyServer):
    entry = comfy_server.wait(comfy_server.post_prompt(_batch_prompt("error")))
    assert entry["status"]["status_str"] == "error"
    err = execution_error(entry)
    assert err is not None and err["node_type"] == "HyperLoRAStudioIdentityFromImages"
    assert raised(err, errors.FaceNotFoundError), err["exception_type"]
    assert "image(s) 2 of 2" in err["exception_message"] and "skip" in err["exception_message"]


def test_mix_and_slider_graph(comfy_server: ComfyServer):
    p = {"hl": g.loader(), "a": g.load_image("astronaut.png"),
         "id1": g.identity("hl", ["a", 0]), "id2": g.identity("hl", ["a", 0], grayscale=True),
         "mix": {"class_type": "HyperLoRAStudioMixIdentities", "inputs": {
             "hyper_lora": ["hl", 0], "identity_1": ["id1", 0], "weight_1": 0.5, "identity_2": ["id2", 0],
             "weight_2": 0.5, "mode": "coefficients"}},
         "delta": {"class_type": "HyperLoRAStudioMixIdentities", "inputs": {
             "hyper_lora": ["hl", 0], "identity_1": ["id1", 0], "weight_1": 0.5, "identity_2": ["id2", 0],
             "weight_2": 0.5, "mode": "weight_delta"}},
         "slider": {"class_type": "HyperLoRAStudioConceptSlider", "inputs": {
             "hyper_lora": ["hl", 0], "edited": ["id2", 0], "original": ["id1", 0], "strength": -1.5}},
         }
    for name in ("mix", "delta", "slider"):
        p[f"export_{name}"] = {"class_type": "HyperLoRAStudioExportLoRA", "inputs": {
            "lora": [name, 0], "filename_prefix": f"mix/{name}", "dtype": "fp32"}}
    entry = comfy_server.run(p)
    loras = {}
    for name in ("mix", "delta", "slider"):
        [f] = _files(entry, f"export_{name}")
        loras[name] = load_file(str(comfy_server.base / "models" / "loras" / f["subfolder"] / f["filename"]))
    key = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"
    assert loras["mix"][key].shape[0] == 2          # coefficient mix: one rank-2 LoRA
    assert loras["delta"][key].shape[0] == 4        # weight-delta mix: ranks concatenated
    assert loras["slider"][key].shape[0] == 4       # edited - original: ranks concatenated
    assert all(len(v) == 560 * 3 for v in loras.values())


@pytest.mark.slow
def test_released_size_model_graph(comfy_server: ComfyServer):
    """The full-size random model (released shapes: 140 modules, K=128, rank 8, ViT-L/14) end to end."""
    p: dict[str, Any] = {
        "ckpt": g.checkpoint(), "hl": g.loader(model=FULL_MODEL, clip_vision=CLIP_FILE, dtype="fp16"),
        "img": g.load_image("astronaut.png"),
        "apply": {"class_type": "HyperLoRAStudioApplyFromImages", "inputs": {
            "model": ["ckpt", 0], "hyper_lora": ["hl", 0], "images": ["img", 0], "strength": 0.85, **g.FACE}},
    }
    g.sampling(p, model=["apply", 0], ckpt="ckpt", prefix="e2e/full", seed=3)
    entry = comfy_server.run(p, timeout=900)
    [image] = _images(entry, "save")
    assert _pixels(comfy_server, image).shape == (64, 64, 3)
    assert "loaded HyperLoRA 'sdxl_random_full' (140 modules, K=128, rank 8" in comfy_server.log_text()
