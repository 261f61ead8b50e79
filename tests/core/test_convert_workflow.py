"""hyperlora.tools.convert_workflow: the authors' workflows rewritten into this pack's nodes (no ComfyUI).

The five example workflows of the authors' plugin are the inputs (tests/fixtures/authors.py); the
widget order and socket types of our nodes come from the saved specs, which tests/comfy/test_coexist.py
compares with a live server's /object_info.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from hyperlora.errors import HyperLoRAError, WorkflowError
from hyperlora.spec import NODE_PREFIX
from hyperlora.tools import convert_workflow as cw
from hyperlora.tools.graph_format import expected_widget_count, input_specs, is_widget, load_node_specs
from tests.fixtures.authors import EXAMPLES, example

SPECS = load_node_specs()
OURS = (cw.LOADER, cw.IDENTITY, cw.BUILD, cw.APPLY, cw.APPLY_IMAGES, cw.EXPORT)
# core node types of the authors' examples (what is left with --core-nodes when no other pack is needed)
CORE_TYPES = {"CheckpointLoaderSimple", "CLIPSetLastLayer", "EmptyLatentImage", "KSampler", "VAEDecode",
              "PreviewImage", "LoadImage", "ControlNetLoader", "ControlNetApplyAdvanced", "Note"}
REPO = Path(__file__).resolve().parents[2]


def load(name: str) -> dict[str, Any]:
    return json.loads(example(name).read_text(encoding="utf-8"))


def convert(name: str, **kw: Any) -> cw.Conversion:
    return cw.convert(load(name), source=f"{name}.json", **kw)


def by_id(ui: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {n["id"]: n for n in ui["nodes"]}


def of_type(ui: dict[str, Any], type_: str) -> list[dict[str, Any]]:
    return [n for n in ui["nodes"] if n["type"] == type_]


def widgets(node: dict[str, Any]) -> dict[str, Any]:
    """Our node's widget values by name (no widget of ours has front-end extras)."""
    names = [n for n, t, o, _ in input_specs(SPECS[node["type"]]) if is_widget(t, o)]
    return dict(zip(names, node["widgets_values"], strict=True))


def upstream(ui: dict[str, Any], node_id: int, name: str) -> tuple[dict[str, Any], int]:
    """(source node, output index) linked into input ``name`` of node ``node_id``."""
    node = by_id(ui)[node_id]
    (inp,) = [i for i in node["inputs"] if i["name"] == name]
    (link,) = [lk for lk in ui["links"] if lk[0] == inp["link"]]
    return by_id(ui)[link[1]], link[2]


def check_links(ui: dict[str, Any]) -> None:
    """Every link joins an existing output and input of one type, and both ends name it; ids are 1..n."""
    nodes = by_id(ui)
    assert len(nodes) == len(ui["nodes"])
    ids = [lk[0] for lk in ui["links"]]
    assert ids == list(range(1, len(ids) + 1))
    assert ui["last_link_id"] == len(ids) and ui["last_node_id"] == max(nodes)
    for link_id, origin, o_slot, target, t_slot, type_ in ui["links"]:
        out = nodes[origin]["outputs"][o_slot]
        inp = nodes[target]["inputs"][t_slot]
        assert out["type"] == type_ and inp["type"] in (type_, "*"), (link_id, out, inp)   # '*': a Reroute
        assert link_id in out["links"] and inp["link"] == link_id
    for node in ui["nodes"]:
        for inp in node["inputs"]:
            assert inp["link"] is None or inp["link"] in ids
        for out in node["outputs"]:
            assert set(out["links"] or []) <= set(ids)


def check_ours(node: dict[str, Any]) -> None:
    """A node of ours agrees with its saved spec: widget count, sockets, outputs; required sockets linked."""
    info = SPECS[node["type"]]
    assert len(node["widgets_values"]) == expected_widget_count(info), node
    sockets = [(n, t) for n, t, o, _ in input_specs(info) if not is_widget(t, o)]
    assert [(i["name"], i["type"]) for i in node["inputs"]] == sockets
    required = {n for n, t, o, opt in input_specs(info) if not is_widget(t, o) and not opt}
    assert required <= {i["name"] for i in node["inputs"] if i["link"] is not None}, node
    assert [o["type"] for o in node["outputs"]] == info["output"]


# --------------------------------------------------------------------------- the saved specs

def test_specs_hold_what_the_converter_writes():
    for type_ in OURS + (cw.TEXT_ENCODE, cw.IMAGE_BATCH):
        assert type_ in SPECS, type_
    for type_ in (cw.IDENTITY, cw.APPLY_IMAGES):
        face_choice = dict((n, t) for n, t, o, _ in input_specs(SPECS[type_]))["face_choice"]
        assert cw.AUTHORS_FACE_CHOICE in face_choice
    kinds = dict((n, t) for n, t, o, _ in input_specs(SPECS[cw.BUILD]))["kind"]
    assert {"id", "base"} <= set(kinds)
    dtypes = dict((n, t) for n, t, o, _ in input_specs(SPECS[cw.LOADER]))["dtype"]
    assert {"auto", "bf16", "fp32"} <= set(dtypes)


# --------------------------------------------------------------------------- the authors' five examples

@pytest.mark.parametrize("name", EXAMPLES)
def test_authors_example_converts(name):
    original = load(name)
    before = copy.deepcopy(original)
    conv = cw.convert(original, source=f"{name}.json")
    assert original == before                                   # the input is not touched
    ui = conv.workflow
    assert conv.fmt == "ui"
    assert not [n for n in ui["nodes"] if n["type"] in cw.AUTHORS_NODES]
    check_links(ui)
    ours = [n for n in ui["nodes"] if n["type"] in SPECS]
    assert {n["type"] for n in ours} & {cw.LOADER} and {n["type"] for n in ours} & {cw.APPLY, cw.APPLY_IMAGES}
    for node in ours:
        check_ours(node)
    # every other node is kept as it was (type, place, size, settings)
    old = by_id(original)
    for node in ui["nodes"]:
        if node["type"] not in SPECS and node["type"] != "Note":
            src = old[node["id"]]
            assert (node["type"], node["pos"], node["size"], node.get("widgets_values"), node["mode"]) == \
                (src["type"], src["pos"], src["size"], src.get("widgets_values"), src["mode"])
    (note,) = of_type(ui, "Note")
    text = note["widgets_values"][0]
    assert text == conv.note
    for node in original["nodes"]:                               # every replaced node is accounted for
        if node["type"] in cw.AUTHORS_NODES:
            assert f"#{node['id']} {cw.AUTHORS_NODES[node['type']].title}" in text
    # the note sits above everything else
    assert note["pos"][1] + note["size"][1] <= min(n["pos"][1] for n in ui["nodes"] if n is not note)
    # the sampler still gets the checkpoint's model through our LoRA node
    (sampler,) = of_type(ui, "KSampler")
    node, _ = upstream(ui, sampler["id"], "model")
    while node["type"] in (cw.APPLY, cw.APPLY_IMAGES):
        node, _ = upstream(ui, node["id"], "model")
    assert node["type"] == "CheckpointLoaderSimple"


def test_t2i_carries_settings_and_places():
    original = load("HyperLoRA-T2I")
    ui = convert("HyperLoRA-T2I", core_nodes=False).workflow
    nodes, old = by_id(ui), by_id(original)
    (loader,) = of_type(ui, cw.LOADER)
    (ident,) = of_type(ui, cw.IDENTITY)
    (build,) = of_type(ui, cw.BUILD)
    (apply,) = of_type(ui, cw.APPLY)
    # ids and places of the nodes they replace: Loader (#3), ID Cond (#7), Generate (#8), Apply LoRA (#9)
    assert [loader["id"], ident["id"], build["id"], apply["id"]] == [3, 7, 8, 9]
    for node in (loader, ident, build, apply):
        assert node["pos"] == old[node["id"]]["pos"]
    assert 2 not in nodes and 4 not in nodes                     # Config and Face Attr are folded in
    assert widgets(loader) == {"model": "sdxl_hyper_id_lora_v1_fidelity", "clip_vision": "clip_vit_large_14",
                               "insightface": "antelopev2", "dtype": "auto", "provider": "auto", "memory": "auto"}
    face = widgets(ident)
    assert (face["grayscale"], face["remove_background"]) == tuple(old[7]["widgets_values"]) == (False, True)
    assert face["face_choice"] == "highest_score"
    assert widgets(build)["kind"] == "id"
    assert widgets(apply)["strength"] == old[9]["widgets_values"][0] == 0.9
    assert upstream(ui, build["id"], "identity") == (ident, 0)
    assert upstream(ui, build["id"], "hyper_lora") == (loader, 0)
    assert upstream(ui, apply["id"], "lora") == (build, 0)
    batch, _ = upstream(ui, ident["id"], "images")
    assert batch["type"] == "ImpactMakeImageBatch" and upstream(ui, batch["id"], "image1")[0]["type"] == "LoadImage"
    note = of_type(ui, "Note")[0]["widgets_values"][0]
    for dropped in ("resampler.dim 1024", "resampler.heads 12", "lora_rank 8", "has_base_lora False",
                    "encoder_types 'clip + arcface'", "image_processor 'clip_vit_large_14_processor'"):
        assert dropped in note
    assert "dtype fp16 -> auto" in note
    assert "BNK_CLIPTextEncodeAdvanced (ComfyUI_ADV_CLIP_emb)" in note and "#12, #13" in note
    assert "ImpactMakeImageBatch (ComfyUI-Impact-Pack)" in note


def test_concept_slider_becomes_three_apply_from_images():
    original = load("HyperLoRA-T2I-ConceptSlider")
    ui = convert("HyperLoRA-T2I-ConceptSlider", core_nodes=False).workflow
    old = by_id(original)
    applies = {n["id"]: n for n in of_type(ui, cw.APPLY_IMAGES)}
    assert sorted(applies) == [9, 24, 25]                          # at the Apply LoRA nodes
    assert not {21, 22, 23} & set(by_id(ui))                       # the Uni Generate nodes are inside them
    assert [widgets(applies[i])["strength"] for i in (9, 24, 25)] == \
        [old[i]["widgets_values"][0] for i in (9, 24, 25)] == pytest.approx([0.85, -0.7, 0.7])
    (loader,) = of_type(ui, cw.LOADER)
    assert loader["id"] == 20
    photos = {i: upstream(ui, i, "images")[0] for i in (9, 24, 25)}
    assert photos[9]["type"] == "ImpactMakeImageBatch"
    assert (photos[24]["widgets_values"][0], photos[25]["widgets_values"][0]) == ("slider0.png", "slider1.png")
    assert upstream(ui, 9, "model")[0]["type"] == "CheckpointLoaderSimple"
    assert upstream(ui, 24, "model")[0]["id"] == 9 and upstream(ui, 25, "model")[0]["id"] == 24
    assert upstream(ui, 11, "model")[0]["id"] == 25                    # KSampler
    assert upstream(ui, 18, "model")[0]["id"] == 25                    # FaceDetailer
    for i in (9, 24, 25):
        assert upstream(ui, i, "hyper_lora") == (loader, 0)


@pytest.mark.parametrize("name", ["HyperLoRA-T2I", "HyperLoRA-T2I-ControlNet"])
def test_default_leaves_no_other_pack(name):
    original = load(name)
    conv = convert(name)
    ui = conv.workflow
    assert ui == convert(name, core_nodes=True).workflow           # the old option's result is the default now
    check_links(ui)
    assert {n["type"] for n in ui["nodes"]} <= set(SPECS) | CORE_TYPES
    assert conv.needs_packs == []
    texts = {n["id"]: n["widgets_values"][0] for n in original["nodes"] if n["type"] == "BNK_CLIPTextEncodeAdvanced"}
    encoders = {n["id"]: n for n in of_type(ui, cw.TEXT_ENCODE)}
    assert sorted(encoders) == sorted(texts)
    for nid, node in encoders.items():
        check_ours(node)
        assert node["widgets_values"] == [texts[nid]]
    (ident,) = of_type(ui, cw.IDENTITY)
    assert upstream(ui, ident["id"], "images")[0]["type"] == "LoadImage"      # a batch of one photo is its photo
    note = of_type(ui, "Note")[0]["widgets_values"][0]
    assert "token_normalization" in note and "Nodes of other packs" not in note


# what no core node replaces, per example: (node id, type, pack)
UNREPLACEABLE = {
    "HyperLoRA-T2I": [], "HyperLoRA-T2I-ControlNet": [],
    "HyperLoRA-T2I-FaceDetailer": [(18, "FaceDetailer", "ComfyUI-Impact-Pack"),
                                   (19, "UltralyticsDetectorProvider", "ComfyUI-Impact-Subpack")],
    "HyperLoRA-T2I-ConceptSlider": [(18, "FaceDetailer", "ComfyUI-Impact-Pack"),
                                    (19, "UltralyticsDetectorProvider", "ComfyUI-Impact-Subpack")],
    "HyperLoRA-T2I-InstantID": [(18, "ApplyInstantIDAdvanced", "ComfyUI_InstantID"),
                                (19, "InstantIDModelLoader", "ComfyUI_InstantID"),
                                (20, "InstantIDFaceAnalysis", "ComfyUI_InstantID")],
}


@pytest.mark.parametrize("name", EXAMPLES)
def test_default_conversion_has_only_core_and_our_nodes_and_names_each_unreplaceable_one(name):
    """Core ComfyUI 0.3.64 + this pack, except the nodes no core node replaces: each named in one line
    (tests/comfy/test_coexist.py checks the same against a running ComfyUI's node list)."""
    from hyperlora.tools.core_nodes import CORE_NODE_TYPES
    from hyperlora.tools.graph_format import VIRTUAL_NODES

    conv = convert(name)
    ui = conv.workflow
    check_links(ui)
    foreign = sorted((n["id"], n["type"]) for n in ui["nodes"]
                     if n["type"] not in CORE_NODE_TYPES | set(VIRTUAL_NODES) and not n["type"].startswith(NODE_PREFIX))
    expected = UNREPLACEABLE[name]
    assert foreign == [(i, t) for i, t, _ in expected]
    assert [(i, t) for i, t, _ in expected] == sorted((n["id"], n["type"]) for n in ui["nodes"]
                                                     if n["type"] in cw.OTHER_PACK_NODES)
    assert len(conv.needs_packs) == len(expected)
    for line, (nid, type_, pack) in zip(conv.needs_packs, expected):
        assert line.startswith(f"#{nid} {type_} needs {pack}, which no core node replaces: install that pack, or "
                               f"instead use ")
        assert "\n" not in line


def test_keep_other_packs_names_each_kept_node():
    conv = convert("HyperLoRA-T2I", core_nodes=False)
    assert conv.needs_packs == [
        "#5 ImpactMakeImageBatch needs ComfyUI-Impact-Pack (kept by --keep-other-packs): without that option core "
        "Batch Images replaces it",
        "#12 BNK_CLIPTextEncodeAdvanced needs ComfyUI_ADV_CLIP_emb (kept by --keep-other-packs): without that "
        "option core CLIP Text Encode (Prompt) replaces it",
        "#13 BNK_CLIPTextEncodeAdvanced needs ComfyUI_ADV_CLIP_emb (kept by --keep-other-packs): without that "
        "option core CLIP Text Encode (Prompt) replaces it"]
    wf = load("HyperLoRA-T2I")
    by_id(wf)[11]["type"] = "SomePackSampler"                 # a node of a pack the converter does not know
    (line,) = cw.convert(wf, source="x.json").needs_packs
    assert line.startswith("#11 SomePackSampler needs a custom-node pack (it is not a node of ComfyUI 0.3.64 nor "
                           "of this pack)")


def test_core_nodes_option_keeps_what_core_cannot_do():
    ui = convert("HyperLoRA-T2I-FaceDetailer", core_nodes=True).workflow
    assert of_type(ui, "FaceDetailer") and of_type(ui, "UltralyticsDetectorProvider")
    note = of_type(ui, "Note")[0]["widgets_values"][0]
    assert "#18 FaceDetailer (ComfyUI-Impact-Pack): instead, workflow face_detailer" in note


def test_make_image_batch_of_three_becomes_a_chain_of_core_batches():
    wf = load("HyperLoRA-T2I")
    batch = by_id(wf)[5]
    next_link = max(lk[0] for lk in wf["links"]) + 1
    for k, nid in ((2, 101), (3, 102)):
        wf["nodes"].append({"id": nid, "type": "LoadImage", "pos": [0, 1000 + nid], "size": [315, 314], "flags": {},
                            "order": 0, "mode": 0, "inputs": [], "widgets_values": [f"id-{nid}.png", "image"],
                            "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [next_link]},
                                        {"name": "MASK", "type": "MASK", "links": None}]})
        slot = next((i for i, inp in enumerate(batch["inputs"]) if inp["name"] == f"image{k}"), None)
        if slot is None:
            batch["inputs"].append({"name": f"image{k}", "type": "IMAGE", "link": None})
            slot = len(batch["inputs"]) - 1
        batch["inputs"][slot]["link"] = next_link
        wf["links"].append([next_link, nid, 0, 5, slot, "IMAGE"])
        next_link += 1
    ui = cw.convert(wf, source="three.json", core_nodes=True).workflow
    check_links(ui)
    (ident,) = of_type(ui, cw.IDENTITY)
    last, _ = upstream(ui, ident["id"], "images")
    first, _ = upstream(ui, last["id"], "image1")
    assert (last["type"], first["type"], first["id"]) == (cw.IMAGE_BATCH, cw.IMAGE_BATCH, 5)
    assert [upstream(ui, first["id"], "image1")[0]["id"], upstream(ui, first["id"], "image2")[0]["id"],
            upstream(ui, last["id"], "image2")[0]["id"]] == [6, 101, 102]


def test_mode_and_widget_links_and_reroutes():
    wf = load("HyperLoRA-T2I")
    nodes = by_id(wf)
    nodes[9]["mode"] = 4                                     # Apply LoRA bypassed
    # a Reroute between the Loader (#3) and ID Cond (#7): the link 7 -> through reroute 50
    (link7,) = [lk for lk in wf["links"] if lk[0] == 7]
    wf["nodes"].append({"id": 50, "type": "Reroute", "pos": [900, 420], "size": [75, 26], "flags": {}, "order": 0,
                        "mode": 0, "inputs": [{"name": "", "type": "*", "link": 7}],
                        "outputs": [{"name": "", "type": "HYPER_LORA", "links": [99]}], "properties": {}})
    link7[3], link7[4] = 50, 0
    nodes[3]["outputs"][0]["links"] = [2, 7, 9]
    nodes[7]["inputs"][0]["link"] = 99
    wf["links"].append([99, 50, 0, 7, 0, "HYPER_LORA"])
    # Apply LoRA's weight fed by a primitive (the value is also in widgets_values)
    wf["nodes"].append({"id": 51, "type": "PrimitiveNode", "pos": [1000, 900], "size": [210, 80], "flags": {},
                        "order": 0, "mode": 0, "inputs": [],
                        "outputs": [{"name": "FLOAT", "type": "FLOAT", "links": [98], "widget": {"name": "weight"}}],
                        "widgets_values": [0.9, "fixed"], "properties": {}})
    nodes[9]["inputs"].append({"name": "weight", "type": "FLOAT", "link": 98, "widget": {"name": "weight"}})
    wf["links"].append([98, 51, 0, 9, 2, "FLOAT"])
    conv = cw.convert(wf, source="edited.json")
    ui = conv.workflow
    check_links(ui)
    apply = by_id(ui)[9]
    assert apply["mode"] == 4 and widgets(apply)["strength"] == 0.9
    reroute, _ = upstream(ui, 7, "hyper_lora")
    assert reroute["id"] == 50 and reroute["outputs"][0]["type"] == SPECS[cw.LOADER]["output"][0]
    assert upstream(ui, 50, "")[0]["type"] == cw.LOADER
    assert "the link into its widget 'weight' was replaced by the value saved with the workflow" in conv.note


# --------------------------------------------------------------------------- API format

def authors_api() -> dict[str, Any]:
    """An API-format graph of the authors' nodes as 'Export (API)' writes it (their input names)."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "RealVisXL.safetensors"}},
        "2": {"class_type": "HyperLoRAConfig", "inputs": {
            "image_processor": "clip_vit_large_14_processor", "image_encoder": "clip_vit_large_14",
            "resampler.dim": 1024, "resampler.dim_head": 64, "resampler.heads": 12, "resampler.depth": 4,
            "resampler.ff_mult": 4, "encoder_types": "clip + arcface", "face_analyzer": "antelopev2",
            "id_embed_dim": 512, "num_id_tokens": 16, "hyper_dim": 128, "lora_rank": 8, "has_base_lora": True},
            "_meta": {"title": "HyperLoRA Config"}},
        "3": {"class_type": "HyperLoRALoader", "inputs": {"config": ["2", 0], "model": "my_model", "dtype": "bf16"},
              "_meta": {"title": "HyperLoRA Loader"}},
        "4": {"class_type": "LoadImage", "inputs": {"image": "me.png"}},
        "5": {"class_type": "HyperLoRAFaceAttr", "inputs": {"hyper_lora": ["3", 0], "images": ["4", 0]}},
        "6": {"class_type": "HyperLoRAIDCond", "inputs": {
            "hyper_lora": ["3", 0], "images": ["4", 0], "face_attr": ["5", 0], "grayscale": True,
            "remove_background": False}, "_meta": {"title": "my identity"}},
        "7": {"class_type": "HyperLoRAGenerateIDLoRA", "inputs": {"hyper_lora": ["3", 0], "id_cond": ["6", 0]}},
        "8": {"class_type": "HyperLoRABaseCond", "inputs": {
            "hyper_lora": ["3", 0], "images": ["4", 0], "face_attr": ["5", 0], "crop": True,
            "crop_scale_LRTB": "1,1,1,1.5", "safe_crop": True}},
        "9": {"class_type": "HyperLoRAGenerateBaseLoRA", "inputs": {"hyper_lora": ["3", 0], "base_cond": ["8", 0]}},
        "10": {"class_type": "HyperLoRAApplyLoRA", "inputs": {"model": ["1", 0], "lora": ["7", 0], "weight": 0.8}},
        "11": {"class_type": "HyperLoRAApplyLoRA", "inputs": {"model": ["10", 0], "lora": ["9", 0], "weight": 0.25}},
        "12": {"class_type": "HyperLoRASaveLoRA", "inputs": {"filename_prefix": "lora/anna", "lora": ["7", 0]}},
        "13": {"class_type": "PreviewImage", "inputs": {"images": ["6", 1]}},
        "14": {"class_type": "KSampler", "inputs": {"model": ["11", 0], "seed": 1, "steps": 20, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "normal",
                                                   "positive": ["15", 0], "negative": ["15", 0],
                                                   "latent_image": ["16", 0], "denoise": 1.0}},
        "15": {"class_type": "CLIPTextEncode", "inputs": {"text": "fcsks fxhks fhyks, a photo", "clip": ["1", 1]}},
        "16": {"class_type": "EmptyLatentImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1}},
    }


def test_api_workflow_converts():
    conv = cw.convert(authors_api(), source="theirs_api.json")
    api = conv.workflow
    assert conv.fmt == "api"
    assert {k: v["class_type"] for k, v in api.items()} == {
        "1": "CheckpointLoaderSimple", "3": cw.LOADER, "4": "LoadImage", "6": cw.IDENTITY, "7": cw.BUILD,
        "8": cw.IDENTITY, "9": cw.BUILD, "10": cw.APPLY, "11": cw.APPLY, "12": cw.EXPORT, "13": "PreviewImage",
        "14": "KSampler", "15": "CLIPTextEncode", "16": "EmptyLatentImage"}
    for node in api.values():                      # all inputs present, in the spec's order
        if node["class_type"] in OURS:
            assert list(node["inputs"]) == [n for n, *_ in input_specs(SPECS[node["class_type"]])]
    assert api["3"]["inputs"] == {"model": "my_model", "clip_vision": "clip_vit_large_14", "insightface": "antelopev2",
                                  "dtype": "bf16", "provider": "auto", "memory": "auto"}
    assert api["6"]["inputs"] == {"hyper_lora": ["3", 0], "images": ["4", 0], "face_choice": "highest_score",
                                  "face_index": 0, "remove_background": False, "grayscale": True, "no_face": "skip",
                                  "det_size": "640"}
    assert api["6"]["_meta"]["title"] == "my identity"                    # the user's title stays
    assert api["3"]["_meta"]["title"] == SPECS[cw.LOADER]["display_name"]
    assert api["7"]["inputs"] == {"hyper_lora": ["3", 0], "identity": ["6", 0], "kind": "id"}
    assert api["9"]["inputs"] == {"hyper_lora": ["3", 0], "identity": ["8", 0], "kind": "base"}
    blocks = {"input_blocks": 1.0, "middle_block": 1.0, "output_blocks": 1.0, "self_attention": 1.0,
              "cross_attention": 1.0}                     # Apply's optional block strengths at their defaults
    assert api["10"]["inputs"] == {"model": ["1", 0], "lora": ["7", 0], "strength": 0.8, **blocks}
    assert api["11"]["inputs"] == {"model": ["10", 0], "lora": ["9", 0], "strength": 0.25, **blocks}
    assert api["12"]["inputs"] == {"lora": ["7", 0], "filename_prefix": "lora/anna", "dtype": "fp16"}
    assert api["13"]["inputs"] == {"images": ["6", 1]}                   # ID Cond's crops -> our crops
    assert api["14"]["inputs"]["model"] == ["11", 0]
    assert "#8 HyperLoRA Base Cond: crop_scale_LRTB '1,1,1,1.5'" in conv.note
    assert "has_base_lora True" in conv.note and "dtype" in conv.note.split("Carried over:")[1].split("\n")[0]


def test_uni_generate_feeding_two_nodes_is_split():
    graph = {
        "1": {"class_type": "HyperLoRAUniLoader", "inputs": {
            "image_processor": "clip_vit_large_14_processor", "image_encoder": "clip_vit_large_14",
            "encoder_types": "clip + arcface", "face_analyzer": "antelopev2",
            "model": "sdxl_hyper_id_lora_v1_edit", "dtype": "fp16"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "me.png"}},
        "3": {"class_type": "HyperLoRAUniGenerateIDLoRA", "inputs": {
            "hyper_lora": ["1", 0], "images": ["2", 0], "grayscale": False, "remove_background": True}},
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "x.safetensors"}},
        "5": {"class_type": "HyperLoRAApplyLoRA", "inputs": {"model": ["4", 0], "lora": ["3", 0], "weight": 0.85}},
        "6": {"class_type": "HyperLoRASaveLoRA", "inputs": {"filename_prefix": "lora/id_lora", "lora": ["3", 0]}},
    }
    api = cw.convert(graph, source="uni.json").workflow
    assert api["3"]["class_type"] == cw.IDENTITY
    (build_id,) = [k for k, v in api.items() if v["class_type"] == cw.BUILD]
    assert build_id == "7"                                               # a new id after the last one
    assert api[build_id]["inputs"] == {"hyper_lora": ["1", 0], "identity": ["3", 0], "kind": "id"}
    assert api["5"]["inputs"]["lora"] == api["6"]["inputs"]["lora"] == [build_id, 0]
    assert api["1"]["inputs"]["model"] == "sdxl_hyper_id_lora_v1_edit" and api["1"]["inputs"]["dtype"] == "auto"


def test_one_config_feeding_two_loaders():
    graph = authors_api()
    graph["20"] = {"class_type": "HyperLoRALoader", "inputs": {"config": ["2", 0], "model": "other", "dtype": "fp16"}}
    conv = cw.convert(graph, source="two.json")
    api = conv.workflow
    assert "2" not in api
    for nid, model, dtype in (("3", "my_model", "bf16"), ("20", "other", "auto")):
        assert api[nid]["class_type"] == cw.LOADER
        assert (api[nid]["inputs"]["model"], api[nid]["inputs"]["clip_vision"], api[nid]["inputs"]["dtype"]) == \
            (model, "clip_vit_large_14", dtype)
    assert conv.note.count("#2 HyperLoRA Config: resampler.dim 1024") == 1


# --------------------------------------------------------------------------- this pack's pre-rename ids

def _downgrade(wf: dict[str, Any]) -> dict[str, Any]:
    """A shipped workflow (UI or API) as this pack saved it before the rename: old node ids and socket types."""
    old_types = {SPECS[cw.LOADER]["output"][0]: "HYPER_LORA", SPECS[cw.IDENTITY]["output"][0]: "HYPER_LORA_ID"}

    def old_id(type_: str) -> str:
        return cw.OLD_PREFIX + type_[len(NODE_PREFIX):] if type_.startswith(NODE_PREFIX) else type_

    wf = copy.deepcopy(wf)
    if "nodes" not in wf:
        for node in wf.values():
            node["class_type"] = old_id(node["class_type"])
        return wf
    for node in wf["nodes"]:
        node["type"] = old_id(node["type"])
        if "Node name for S&R" in node.get("properties", {}):
            node["properties"]["Node name for S&R"] = node["type"]
        for item in node["inputs"] + node["outputs"]:
            item["type"] = old_types.get(item["type"], item["type"])
    for link in wf["links"]:
        link[5] = old_types.get(link[5], link[5])
    return wf


@pytest.mark.parametrize("name", ["t2i_several_photos", "two_people", "interpolate_two_people"])
def test_workflows_with_this_packs_old_ids_are_renamed(name):
    shipped = json.loads((REPO / "example_workflows" / f"{name}.json").read_text(encoding="utf-8"))
    assert any(n["type"].startswith(NODE_PREFIX) for n in shipped["nodes"])
    old = _downgrade(shipped)
    assert not any(n["type"].startswith(NODE_PREFIX) for n in old["nodes"])
    conv = cw.convert(old, source=f"{name}.json")
    ui = conv.workflow
    check_links(ui)
    strip = ("order",)
    got = [{k: v for k, v in n.items() if k not in strip} for n in ui["nodes"] if "Converted" not in n.get("title", "")]
    want = [{k: v for k, v in n.items() if k not in strip} for n in shipped["nodes"]]
    assert got == want
    assert ui["links"] == shipped["links"]
    assert "(this pack, before the rename)" in conv.note

    api = json.loads((REPO / "example_workflows" / "api" / f"{name}.json").read_text(encoding="utf-8"))
    converted = cw.convert(_downgrade(api), source=f"api/{name}.json").workflow
    assert converted == api
    assert [list(n["inputs"]) for n in converted.values()] == [list(n["inputs"]) for n in api.values()]


# --------------------------------------------------------------------------- errors and the CLI

def _write(tmp_path: Path, name: str, content: Any) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return path


def _with_idcond_widgets(values: list[Any]) -> dict[str, Any]:
    wf = load("HyperLoRA-T2I")
    by_id(wf)[7]["widgets_values"] = values
    return wf


BAD = {
    "not_json": ("{ nodes: [", ["not JSON", "line 1"]),
    "image": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", ["not a text file"]),
    "a_list": ([1, 2, 3], ["not a ComfyUI workflow", "Export (API)"]),
    "no_nodes": ({"hello": "world"}, ["not a ComfyUI workflow"]),
    "core_only": ({"1": {"class_type": "KSampler", "inputs": {}}}, ["nothing to convert"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_files_raise_a_workflow_error_naming_the_file(tmp_path, case):
    content, needles = BAD[case]
    src = _write(tmp_path, f"{case}.json", content)
    with pytest.raises(WorkflowError) as ei:
        cw.convert_file(src, tmp_path / "out.json")
    assert src.name in str(ei.value)
    for needle in needles:
        assert needle in str(ei.value)
    assert not (tmp_path / "out.json").exists()


def test_another_version_of_their_nodes_is_refused():
    with pytest.raises(WorkflowError) as ei:
        cw.convert(_with_idcond_widgets([False, True, "largest"]), source="newer.json")
    msg = str(ei.value)
    for needle in ("newer.json", "#7", "HyperLoRAIDCond", cw.AUTHORS_VERSION, "['grayscale', 'remove_background']",
                   "'Opening the authors' workflows'"):
        assert needle in msg
    wf = load("HyperLoRA-T2I")
    by_id(wf)[8]["type"] = "HyperLoRAGenerateFancyLoRA"
    with pytest.raises(WorkflowError, match="#8 has the type HyperLoRAGenerateFancyLoRA"):
        cw.convert(wf, source="newer.json")
    api = authors_api()
    api["6"]["inputs"]["face_index"] = 1
    with pytest.raises(WorkflowError, match="#6 HyperLoRAIDCond"):
        cw.convert(api, source="newer_api.json")


def test_authors_nodes_inside_a_subgraph_are_refused():
    wf = load("HyperLoRA-T2I")
    wf["definitions"] = {"subgraphs": [{"id": "abc", "name": "My HyperLoRA", "nodes": [{"type": "HyperLoRAIDCond"}]}]}
    with pytest.raises(WorkflowError, match="Unpack Subgraph"):
        cw.convert(wf, source="sub.json")


def test_output_must_not_overwrite_the_input(tmp_path):
    src = _write(tmp_path, "theirs.json", load("HyperLoRA-T2I"))
    with pytest.raises(WorkflowError, match="is the input file"):
        cw.convert_file(src, tmp_path / "." / "theirs.json")
    assert json.loads(src.read_text()) == load("HyperLoRA-T2I")


def test_cli(tmp_path, capsys):
    src = _write(tmp_path, "theirs.json", load("HyperLoRA-T2I-InstantID"))
    out = tmp_path / "sub" / "ours.json"
    assert cw.main([str(src), str(out)]) == 0
    written = json.loads(out.read_text())
    assert written == cw.convert(load("HyperLoRA-T2I-InstantID"), source="theirs.json").workflow
    stdout = capsys.readouterr().out
    lines = stdout.splitlines()
    assert lines[0] == f"wrote {out} (UI format)"
    assert [line.split(" needs ")[0] for line in lines[1:4]] == [
        "needs a pack: #18 ApplyInstantIDAdvanced", "needs a pack: #19 InstantIDModelLoader",
        "needs a pack: #20 InstantIDFaceAnalysis"]
    assert "ApplyInstantIDAdvanced (ComfyUI_InstantID)" in stdout
    assert not [n for n in written["nodes"] if n["type"] in cw.CORE_REPLACED]       # core nodes by default

    kept = tmp_path / "kept.json"
    assert cw.main([str(src), str(kept), "--keep-other-packs"]) == 0
    assert "needs a pack: #12 BNK_CLIPTextEncodeAdvanced needs ComfyUI_ADV_CLIP_emb" in capsys.readouterr().out
    assert sorted(n["id"] for n in json.loads(kept.read_text())["nodes"]
                  if n["type"] == "BNK_CLIPTextEncodeAdvanced") == [12, 13]
    assert cw.main([str(src), str(tmp_path / "same.json"), "--core-nodes"]) == 0            # old scripts still work
    assert json.loads((tmp_path / "same.json").read_text()) == written

    bad = _write(tmp_path, "bad.json", "[]")
    capsys.readouterr()
    assert cw.main([str(bad), str(tmp_path / "never.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "bad.json" in err and not (tmp_path / "never.json").exists()
    assert cw.main([str(tmp_path / "missing.json"), str(tmp_path / "never.json")]) == 2
    assert "Cannot read the workflow" in capsys.readouterr().err
    assert issubclass(WorkflowError, HyperLoRAError)


@pytest.mark.parametrize("where", ["top", "inside_a_node"])
def test_deeply_nested_json_is_one_line_not_a_recursion_error(tmp_path, capsys, where):
    if where == "top":
        text = "[" * 100_000 + "]" * 100_000
    else:                                   # parses, but nested deeper than converting can go
        wf = load("HyperLoRA-T2I")
        (sampler,) = of_type(wf, "KSampler")                  # a node kept as it was
        sampler["widgets_values"][0] = "DEEP"
        text = json.dumps(wf).replace('"DEEP"', "[" * 900 + "]" * 900)
    src = _write(tmp_path, "deep.json", text)
    with pytest.raises(WorkflowError, match="deep.json is JSON nested too deeply"):
        cw.convert_file(src, tmp_path / "out.json")
    assert cw.main([str(src), str(tmp_path / "out.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "deep.json is JSON nested too deeply" in err and err.count("\n") == 1
    assert not (tmp_path / "out.json").exists()
