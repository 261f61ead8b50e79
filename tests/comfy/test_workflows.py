"""The shipped workflows against a real ComfyUI.

* every UI workflow: node types, widget counts, socket names/types and links agree with the
  /object_info of the session server (tests/comfy/conftest.py);
* the committed JSON is exactly what example_workflows/build_workflows.py generates from that /object_info;
* every API workflow, with the fixture models substituted, passes ComfyUI's own prompt validation
  (``execution.validate_prompt``, in this process with the pack loaded by ComfyUI's loader);
* slow: several RUN to the end on the server (64x64 px, 1 step): the ControlNet one with a
  random-weight SDXL T2I-Adapter (taken by the core ControlNetLoader / ControlNetApplyAdvanced like a
  ControlNet), instantid_controlnet with a random-weight SDXL ControlNet in the diffusers file format
  of InstantID's (tests/fixtures/controlnet.py), the face passes (face_detailer, group_photo), the
  concept slider, and the chains save -> load identity and export -> core LoraLoader with the files
  the first run wrote; the concept slider, ControlNet, two people and face inpainting runs are also
  run without their identity nodes and at strength 0: the identity must change the picture and
  strength 0 must give the plain model's picture exactly;
* Templates: every UI workflow has a same-name thumbnail, and the server's /workflow_templates lists
  them all for this pack's folder and serves them (and the thumbnails) under /api/workflow_templates/.
"""

from __future__ import annotations

import copy
import importlib.util
import io
import json
import os
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw

from hyperlora.tools import queue as q
from tests.comfy.client import PromptError
from tests.comfy.models import ANTELOPE, CHECKPOINT, CLIP_FOLDER, DIFFLORA_MODEL, PACK_DIR_NAME, SMALL_MODEL
from tests.fixtures.controlnet import sdxl_controlnet

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = REPO / "example_workflows"
UI_NAMES = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
API_NAMES = sorted(p.stem for p in (WORKFLOWS / "api").glob("*.json"))
T2I_ADAPTER_VERSION = "t2i-adapter-sdxl-random-v1"
FACE = "astronaut.png"
POSE = "pose_64.png"
REFINE_STEPS = 3


def _load_builder() -> ModuleType:
    spec = importlib.util.spec_from_file_location("hyperlora_build_workflows", WORKFLOWS / "build_workflows.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bw = _load_builder()


@pytest.fixture(scope="module")
def object_info(comfy_server) -> dict[str, Any]:
    return comfy_server.get_json("/object_info", timeout=120)


def t2i_adapter_file(cache_dir: Path, comfy_root: Path) -> Path:
    """A random-weight SDXL T2I-Adapter (ComfyUI's own Adapter class, 79 M parameters, fp16), cached."""
    path = cache_dir / f"{T2I_ADAPTER_VERSION}.safetensors"
    if path.is_file():
        return path
    import torch
    from safetensors.torch import save_file

    if str(comfy_root) not in sys.path:
        sys.path.insert(0, str(comfy_root))
    from comfy.t2i_adapter.adapter import Adapter

    torch.manual_seed(0)
    adapter = Adapter(cin=768, channels=[320, 640, 1280, 1280], nums_rb=2, ksize=1, sk=True, use_conv=False, xl=True)
    sd = {k: (v * 0.1).half().contiguous() for k, v in adapter.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    save_file(sd, str(tmp))
    tmp.replace(path)
    return path


@pytest.fixture(scope="module")
def fixture_files(comfy_base, cache_dir, comfy_root, comfy) -> dict[str, str]:
    """Puts the ControlNet stand-ins and a pose image where the server finds them: the T2I-Adapter
    for controlnet_pose, the random SDXL ControlNet under the very name instantid_controlnet ships."""
    cn_dir = comfy_base.models / "controlnet"
    cn_dir.mkdir(parents=True, exist_ok=True)
    link = cn_dir / "t2i_adapter_random.safetensors"
    if not link.exists():
        os.symlink(t2i_adapter_file(cache_dir, comfy_root), link)
    instantid = cn_dir / bw.INSTANTID_CONTROLNET
    if not instantid.exists():
        instantid.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(sdxl_controlnet(cache_dir, comfy), instantid)
    pose = Image.new("RGB", (64, 64), "black")
    d = ImageDraw.Draw(pose)
    for a, b in (((32, 8), (32, 40)), ((16, 20), (48, 20)), ((32, 40), (20, 60)), ((32, 40), (44, 60))):
        d.line([a, b], fill=(255, 128, 0), width=3)
    pose.save(comfy_base.input / POSE)
    return {"controlnet": link.name, "pose": POSE}


def for_fixtures(graph: dict[str, Any], files: dict[str, str]) -> dict[str, Any]:
    """A shipped API workflow with the fixture models and images, at 64x64 px and 1 step."""
    n_photos = len(q.photo_slots(graph))
    overrides = [f"{nid}.clip_vision={CLIP_FOLDER}" for nid in q.find_nodes(graph, "HyperLoRAStudioLoader")]
    overrides += [f"{nid}.insightface={ANTELOPE}" for nid in q.find_nodes(graph, "HyperLoRAStudioLoader")]
    overrides += [f"{nid}.model={DIFFLORA_MODEL}" for nid in q.find_nodes(graph, "HyperLoRAStudioDiffLoRALoader")]
    overrides += [f"{nid}.steps=3" for t in ("HyperLoRAStudioDiffLoRAFromImages", "HyperLoRAStudioDiffLoRANewPerson")
                  for nid in q.find_nodes(graph, t)]
    overrides += [f"{nid}.control_net_name={files['controlnet']}" for nid in q.find_nodes(graph, "ControlNetLoader")
                  if graph[nid]["inputs"]["control_net_name"] != bw.INSTANTID_CONTROLNET]
    overrides += [f"{nid}.megapixels=0.04" for nid in q.find_nodes(graph, "ImageScaleToTotalPixels")]   # 200x200
    overrides += [f"{nid}.size=64" for nid in q.find_nodes(graph, "HyperLoRAStudioCropByMask")]
    overrides += [f"{nid}.{side}=64" for nid in q.find_nodes(graph, "HyperLoRAStudioFaceKeypoints")
                  for side in ("width", "height")]
    overrides += [f"{nid}.{side}=64" for nid in q.find_nodes(graph, "ImageScale") for side in ("width", "height")]
    overrides += [f"{nid}.steps={REFINE_STEPS}" for nid in q.find_nodes(graph, "HyperLoRAStudioRefineIdentity")]
    pose = files["pose"] if q.find_nodes(graph, "LoadImage", "pose") else None
    return q.fill_workflow(graph, images=[FACE] * n_photos, pose_image=pose, model=SMALL_MODEL,
                           checkpoint=CHECKPOINT, steps=1, width=64, height=64, seed=3, overrides=overrides)


def node_ids(graph: dict[str, Any], class_type: str) -> list[str]:
    return q.find_nodes(graph, class_type)


def _saved_images(comfy_server, entry: dict[str, Any], graph: dict[str, Any]) -> list[Image.Image]:
    images = []
    for nid in node_ids(graph, "SaveImage"):
        for img in entry["outputs"][nid]["images"]:
            images.append(Image.open(io.BytesIO(comfy_server.view(img))))
    return images


def run_graph(comfy_server, graph: dict[str, Any]) -> dict[str, Any]:
    """Queue and wait with the pack's own client (websocket progress, tolerant of a busy server)."""
    try:
        _, entry = q.run_prompt(q.ComfyClient(comfy_server.url, timeout=120), graph, timeout=1200)
    except q.QueueError as e:
        raise AssertionError(f"{e}\n{comfy_server.log_tail(40)}") from e
    assert entry["status"]["status_str"] == "success"
    return entry


# --------------------------------------------------------------------------- UI format

def test_every_workflow_exists_in_both_formats():
    assert UI_NAMES == API_NAMES
    assert len(UI_NAMES) == 18


@pytest.mark.parametrize("name", UI_NAMES)
def test_every_workflow_has_a_thumbnail_for_the_templates_menu(name):
    thumb = WORKFLOWS / f"{name}.jpg"
    assert thumb.is_file(), f"example_workflows/{name}.jpg is missing (the Templates menu shows it)"
    assert 4_000 < thumb.stat().st_size < 150_000
    with Image.open(thumb) as im:
        assert im.format == "JPEG" and 300 <= im.width <= 800 and im.height >= 150


def test_templates_route_lists_and_serves_every_workflow(comfy_server):
    listed = comfy_server.get_json("/workflow_templates")
    assert sorted(listed[PACK_DIR_NAME]) == UI_NAMES          # api/ twins are not templates
    # in the README's order (nodes/templates.py), not the file system's: the front end shows it as listed
    assert listed[PACK_DIR_NAME] == q.shipped_order() and listed[PACK_DIR_NAME][0] == "t2i_one_photo"
    assert comfy_server.get_json("/api/workflow_templates") == listed
    for name in UI_NAMES:
        served = comfy_server.get_bytes(f"/api/workflow_templates/{PACK_DIR_NAME}/{name}.json")
        assert served == (WORKFLOWS / f"{name}.json").read_bytes()
        assert comfy_server.get_bytes(f"/api/workflow_templates/{PACK_DIR_NAME}/{name}.jpg") == \
            (WORKFLOWS / f"{name}.jpg").read_bytes()


@pytest.mark.parametrize("name", UI_NAMES)
def test_ui_workflow_agrees_with_object_info(name, object_info):
    wf = json.loads((WORKFLOWS / f"{name}.json").read_text())
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"])
    notes = [n for n in wf["nodes"] if n["type"] == "Note"]
    assert len(notes) == 1
    note = notes[0]["widgets_values"][0]
    for needle in ("fcsks fxhks fhyks, ", "CLIP Set Last Layer -2", "0.85", "1024x1024", "20 steps",
                   "dpmpp_2m + karras", "CFG 5"):
        assert needle in note, (name, needle)
    for node in wf["nodes"]:
        if node["type"] in bw.VIRTUAL_NODES:
            continue
        assert node["type"] in object_info, f"{name}: node type {node['type']} unknown to the server"
        info = object_info[node["type"]]
        assert len(node["widgets_values"]) == bw.expected_widget_count(info), (name, node["type"])
        specs = {n: t for n, t, o, _ in bw.input_specs(info)}
        for inp in node["inputs"]:
            assert specs[inp["name"]] == inp["type"], (name, node["type"], inp)
        sockets = [n for n, t, o, opt in bw.input_specs(info) if not bw.is_widget(t, o) and not opt]
        linked = {i["name"] for i in node["inputs"] if i["link"] is not None}
        assert set(sockets) <= linked, f"{name}: {node['type']} has unlinked required inputs"
        assert [o["type"] for o in node["outputs"]] == info["output"]
        assert [o["name"] for o in node["outputs"]] == info["output_name"]
    seen_links = set()
    for link_id, origin, o_slot, target, t_slot, type_ in wf["links"]:
        seen_links.add(link_id)
        out = nodes[origin]["outputs"][o_slot]
        inp = nodes[target]["inputs"][t_slot]
        assert out["type"] == type_ == object_info[nodes[origin]["type"]]["output"][o_slot]
        assert inp["type"] in (type_, "*")             # '*': an input that takes any type (core Preview Any)
        assert link_id in out["links"] and inp["link"] == link_id
    for node in wf["nodes"]:
        for inp in node["inputs"]:
            assert inp["link"] is None or inp["link"] in seen_links
        for out in node["outputs"]:
            assert set(out["links"]) <= seen_links
    assert wf["last_link_id"] == max(seen_links)
    assert wf["last_node_id"] == max(nodes)


def test_committed_workflows_are_what_the_builder_makes(object_info):
    built = bw.build_all(object_info)
    assert sorted(built) == UI_NAMES
    for name, (ui, api) in built.items():
        assert json.loads((WORKFLOWS / f"{name}.json").read_text()) == ui, f"{name}.json is stale: rebuild it"
        assert json.loads((WORKFLOWS / "api" / f"{name}.json").read_text()) == api, f"api/{name}.json is stale"
    assert (WORKFLOWS / "README.md").read_text() == bw.readme([f() for f in bw.ALL])


@pytest.mark.parametrize("name", API_NAMES)
def test_api_workflow_matches_its_ui_twin(name):
    ui = json.loads((WORKFLOWS / f"{name}.json").read_text())
    api = json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())
    real = {str(n["id"]): n for n in ui["nodes"] if n["type"] not in bw.VIRTUAL_NODES}
    assert set(api) == set(real)
    for nid, node in api.items():
        assert node["class_type"] == real[nid]["type"]
        assert node["_meta"]["title"] == real[nid]["title"]
    links = {(str(t), real[str(t)]["inputs"][ts]["name"]): [str(o), os_] for _, o, os_, t, ts, _ in ui["links"]}
    api_links = {(nid, k): v for nid, n in api.items() for k, v in n["inputs"].items() if isinstance(v, list)}
    assert api_links == links


# --------------------------------------------------------------------------- API format, run for real

@pytest.fixture(scope="module")
def validate(pack, comfy_base, fixture_files):
    """ComfyUI's own ``execution.validate_prompt`` in this process (no execution)."""
    import asyncio

    import execution
    import folder_paths
    import nodes as comfy_nodes

    # core nodes that live in comfy_extras (the server loads them all; this process only what the workflows use)
    extras = Path(comfy_nodes.__file__).resolve().parent / "comfy_extras"
    for extra in ("nodes_mask.py", "nodes_post_processing.py", "nodes_preview_any.py"):
        if not asyncio.run(comfy_nodes.load_custom_node(str(extras / extra), module_parent="comfy_extras")):
            raise RuntimeError(f"ComfyUI could not load comfy_extras/{extra}")
    folder_paths.add_model_folder_path("controlnet", str(comfy_base.models / "controlnet"), is_default=True)
    placeholders = [comfy_base.models / "loras" / "hyperlora" / "validation_only_00001_.safetensors",
                    comfy_base.models / "hyper_lora" / "identities" / "validation_only_00001_.safetensors"]
    for path in placeholders:        # list entries for LoraLoader / Load Identity (validation reads names only)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"placeholder")

    def run(graph: dict[str, Any]) -> tuple[bool, Any, Any]:
        ok, error, _outputs, node_errors = asyncio.run(execution.validate_prompt("validation", graph, None))
        return ok, error, node_errors

    yield run
    for path in placeholders:
        path.unlink()


@pytest.mark.parametrize("name", API_NAMES)
def test_api_workflow_passes_comfyuis_validation(name, validate, fixture_files):
    graph = for_fixtures(q.load_api_workflow(q.resolve_workflow(name)), fixture_files)
    for nid in node_ids(graph, "LoraLoader"):
        graph[nid]["inputs"]["lora_name"] = "hyperlora/validation_only_00001_.safetensors"
    for nid in node_ids(graph, "HyperLoRAStudioLoadIdentity"):
        graph[nid]["inputs"]["identity_file"] = "validation_only_00001_.safetensors"
    ok, error, node_errors = validate(graph)
    assert ok, (error, node_errors)
    # and the check can fail: a shipped name the fixture server lacks is refused
    broken = copy.deepcopy(graph)
    (first_loader,) = node_ids(broken, "CheckpointLoaderSimple")[:1] or node_ids(broken, "HyperLoRAStudioLoader")[:1]
    key = "ckpt_name" if broken[first_loader]["class_type"] == "CheckpointLoaderSimple" else "model"
    broken[first_loader]["inputs"][key] = "not_there.safetensors"
    _, _, node_errors = validate(broken)
    assert "not_there.safetensors" in json.dumps(node_errors[first_loader]["errors"])


IDENTITY_NODES = ("HyperLoRAStudioApply", "HyperLoRAStudioApplyFromImages", "HyperLoRAStudioConditioning")
"""The pack's nodes that put an identity on the model or on a prompt (each has a ``strength``)."""


def at_strength_zero(graph: dict[str, Any]) -> dict[str, Any]:
    """The same graph with every identity applied at strength 0."""
    out = copy.deepcopy(graph)
    for nid in (n for t in IDENTITY_NODES for n in node_ids(out, t)):
        out[nid]["inputs"]["strength"] = 0.0
    return out


def without_identity(graph: dict[str, Any]) -> dict[str, Any]:
    """The same picture on the plain model: Apply nodes bypassed (their MODEL input goes on), Identity on
    Prompt replaced by the core Cond Pair Set Props with its mask settings; only what SaveImage needs."""
    out = copy.deepcopy(graph)
    bypass: dict[tuple[str, int], Any] = {}
    for nid in node_ids(out, "HyperLoRAStudioApply") + node_ids(out, "HyperLoRAStudioApplyFromImages"):
        bypass[(nid, 0)] = out[nid]["inputs"]["model"]
    for nid in node_ids(out, "HyperLoRAStudioConditioning"):
        old = out[nid]["inputs"]
        out[nid] = {"class_type": "PairConditioningSetProperties", "inputs": {
            "positive_NEW": old["positive"], "negative_NEW": old["negative"],
            "strength": old.get("mask_strength", 1.0), "set_cond_area": old.get("set_cond_area", "default"),
            **({"mask": old["mask"]} if "mask" in old else {})}}

    def resolve(ref: Any) -> Any:
        while isinstance(ref, list) and (ref[0], ref[1]) in bypass:
            ref = bypass[(ref[0], ref[1])]
        return ref

    for node in out.values():
        node["inputs"] = {k: resolve(v) for k, v in node["inputs"].items()}
    keep: set[str] = set()
    todo = node_ids(out, "SaveImage")
    while todo:
        nid = todo.pop()
        if nid not in keep:
            keep.add(nid)
            todo += [v[0] for v in out[nid]["inputs"].values() if isinstance(v, list)]
    assert not any(out[n]["class_type"] in IDENTITY_NODES for n in keep)
    return {nid: out[nid] for nid in keep}


def _pixels(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(im.convert("RGB"), dtype=np.int16) for im in images])


COMPARED_WITH_PLAIN = ("concept_slider", "controlnet_pose", "two_people", "face_inpaint")
"""Runs that are repeated without the identity nodes and at strength 0 (see test_api_workflow_runs)."""

RUN_ALONE = ("concept_slider", "controlnet_pose", "two_people", "face_inpaint", "instantid_controlnet",
             "face_detailer", "group_photo", "best_of_n", "difflora_best_of_n", "difflora_new_person")


def check_run(server, name: str, graph: dict[str, Any], entry: dict[str, Any]) -> list[Image.Image]:
    """What every run of the shipped workflow ``name`` must give (any server, any precision): its saved
    pictures (sizes and counts), its previews, its saved files; returns the saved pictures."""
    images = _saved_images(server, entry, graph)
    if name in ("best_of_n", "difflora_best_of_n"):     # one SaveImage node, a batch of the kept pictures
        assert len(node_ids(graph, "SaveImage")) == 1
    else:
        assert len(images) == len(node_ids(graph, "SaveImage"))
    if name == "face_inpaint":          # the target photo's size after Scale to Total Pixels (0.04 MP)
        [(w, h)] = [im.size for im in images]
        assert w == h and 180 <= w <= 230
    elif name == "best_of_n":           # 8 generated, the 2 kept
        assert [im.size for im in images] == [(64, 64)] * 2
    elif name == "difflora_best_of_n":  # 4 candidate LoRAs, one image each, the best kept
        assert [im.size for im in images] == [(64, 64)]
        shown = previews(entry, graph)
        (ranking,) = shown["Ranking (every candidate's score)"]
        assert ranking.splitlines()[0].endswith("kept 1 of 4") and len(ranking.splitlines()) == 5, ranking
        (seeds,) = shown["Which seed each candidate has"]
        assert f"DiffLoRA '{DIFFLORA_MODEL}': 4 LoRA(s) from 1 photo(s)" in seeds and "#4: seed 3" in seeds, seeds
    elif name == "difflora_new_person":  # one new person, its picture and its saved LoRA
        assert [im.size for im in images] == [(64, 64)]
        (export,) = node_ids(graph, "HyperLoRAStudioExportLoRA")
        (saved,) = entry["outputs"][export]["hyper_lora_files"]
        assert saved["filename"].startswith("new_person_") and saved["subfolder"] == "difflora", saved
        assert "seed 7" in previews(entry, graph)["Seed and model"][0]
    else:
        assert {im.size for im in images} == {(64, 64)}
    if name in ("face_detailer", "group_photo"):
        # a random SDXL draws no face: every mask is empty, so each paste keeps every pixel of the picture
        before, after = (np.asarray(im.convert("RGB")) for im in images)
        assert np.array_equal(before, after)
    if name == "instantid_controlnet":
        log = server.log_text()
        assert "missing controlnet keys" not in log and "leftover keys" not in log
    crops = [o for nid, o in entry["outputs"].items() if graph[nid]["class_type"] == "PreviewImage"]
    assert len(crops) == len(node_ids(graph, "PreviewImage")) and all(len(o["images"]) >= 1 for o in crops)
    texts = [entry["outputs"].get(nid, {}).get("text") for nid in node_ids(graph, "PreviewAny")]
    assert all(t and all(isinstance(x, str) and x for x in t) for t in texts), texts
    assert "lora key not loaded" not in server.log_text()
    return images


@pytest.mark.slow
@pytest.mark.parametrize("name", RUN_ALONE)
def test_api_workflow_runs(name, comfy_server, fixture_files):
    graph = for_fixtures(q.load_api_workflow(q.resolve_workflow(name)), fixture_files)
    entry = run_graph(comfy_server, graph)
    images = check_run(comfy_server, name, graph, entry)
    if name not in COMPARED_WITH_PLAIN:
        return
    # the identity changes the picture; at strength 0 it is the plain model's picture, bit for bit
    plain_graph = without_identity(graph)
    plain = _pixels(_saved_images(comfy_server, run_graph(comfy_server, plain_graph), plain_graph))
    zero_graph = at_strength_zero(graph)
    zero = _pixels(_saved_images(comfy_server, run_graph(comfy_server, zero_graph), zero_graph))
    with_identity = _pixels(images)
    assert zero.shape == plain.shape == with_identity.shape
    assert np.array_equal(zero, plain)
    assert np.abs(with_identity - plain).max() >= 10, "the identity did not change the image"   # as test_hooks


@pytest.mark.slow
def test_export_lora_then_reuse_with_core_lora_loader(comfy_server, comfy_base, fixture_files):
    export = for_fixtures(q.load_api_workflow(q.resolve_workflow("export_lora")), fixture_files)
    entry = run_graph(comfy_server, export)
    (nid,) = node_ids(export, "HyperLoRAStudioExportLoRA")
    (written,) = entry["outputs"][nid]["hyper_lora_files"]
    rel = f"{written['subfolder']}/{written['filename']}" if written["subfolder"] else written["filename"]
    assert rel.startswith("hyperlora/my_face_") and rel.endswith("_.safetensors")
    assert (comfy_base.models / "loras" / rel).is_file()

    reuse = q.load_api_workflow(q.resolve_workflow("reuse_exported_lora"))
    (lora_node,) = node_ids(reuse, "LoraLoader")
    assert reuse[lora_node]["inputs"]["lora_name"] == "hyperlora/my_face_00001_.safetensors"   # what a first export writes
    reuse = for_fixtures(reuse, fixture_files)
    reuse[lora_node]["inputs"]["lora_name"] = rel
    entry = run_graph(comfy_server, reuse)
    assert [im.size for im in _saved_images(comfy_server, entry, reuse)] == [(64, 64)]
    assert "lora key not loaded" not in comfy_server.log_text()


@pytest.mark.slow
def test_identity_save_then_load(comfy_server, fixture_files):
    save = for_fixtures(q.load_api_workflow(q.resolve_workflow("identity_save")), fixture_files)
    entry = run_graph(comfy_server, save)
    (nid,) = node_ids(save, "HyperLoRAStudioSaveIdentity")
    (written,) = entry["outputs"][nid]["hyper_lora_files"]
    name = f"{written['subfolder']}/{written['filename']}" if written["subfolder"] else written["filename"]
    assert name.startswith("my_face_")
    saved = _saved_images(comfy_server, entry, save)

    load = q.load_api_workflow(q.resolve_workflow("identity_load"))
    (load_node,) = node_ids(load, "HyperLoRAStudioLoadIdentity")
    load = for_fixtures(load, fixture_files)
    load[load_node]["inputs"]["identity_file"] = name
    entry = run_graph(comfy_server, load)
    loaded = _saved_images(comfy_server, entry, load)
    assert [im.size for im in loaded] == [(64, 64)]
    # same identity, seed, prompt and model: the reloaded identity gives the very same image
    assert np.array_equal(np.asarray(loaded[0]), np.asarray(saved[0]))


def test_loader_memory_release_frees_the_weights_while_sampling_and_reads_them_back(comfy_server, fixture_files):
    """t2i_one_photo with the Loader's memory 'release while sampling': the server logs the release as the
    KSampler starts; a new seed samples again without reading anything back; a changed identity input reads
    the weights back from disk and gives the very same image as the first run (the same LoRA)."""
    graph = for_fixtures(q.load_api_workflow(q.resolve_workflow("t2i_one_photo")), fixture_files)
    (loader,) = node_ids(graph, "HyperLoRAStudioLoader")
    (apply_node,) = node_ids(graph, "HyperLoRAStudioApplyFromImages")
    (sampler,) = node_ids(graph, "KSampler")
    graph[loader]["inputs"]["memory"] = "release while sampling"
    graph[sampler]["inputs"]["seed"] = 1234            # not an output any other test has cached
    start = len(comfy_server.log_text())
    first = _saved_images(comfy_server, run_graph(comfy_server, graph), graph)
    log = comfy_server.log_text()[start:]
    assert "of HyperLoRA weights while SDXL samples" in log and f"reading {SMALL_MODEL} back from disk" not in log, log[-3000:]

    graph[sampler]["inputs"]["seed"] = 1235            # only the sampler runs again: nothing to read back
    start = len(comfy_server.log_text())
    run_graph(comfy_server, graph)
    assert f"reading {SMALL_MODEL} back from disk" not in comfy_server.log_text()[start:]

    graph[sampler]["inputs"]["seed"] = 1234
    graph[apply_node]["inputs"]["no_face"] = "error"   # the node runs again; with a face found, same result
    start = len(comfy_server.log_text())
    again = _saved_images(comfy_server, run_graph(comfy_server, graph), graph)
    log = comfy_server.log_text()[start:]
    assert f"reading {SMALL_MODEL} back from disk" in log and "of HyperLoRA weights while SDXL samples" in log, log[-3000:]
    assert np.array_equal(np.asarray(again[0]), np.asarray(first[0]))


@pytest.mark.slow
def test_refine_identity_lowers_the_loss_saves_an_identity_and_generates(comfy_server, comfy_base, fixture_files):
    """photos -> identity -> Refine Identity (random SDXL, 64 px, a few steps) -> saved identity -> image."""
    from hyperlora.identity import load_identity

    graph = for_fixtures(q.load_api_workflow(q.resolve_workflow("refine_identity")), fixture_files)
    (refine_node,) = node_ids(graph, "HyperLoRAStudioRefineIdentity")
    assert graph[refine_node]["inputs"]["mode"] == "coefficients" and graph[refine_node]["inputs"]["steps"] == REFINE_STEPS
    entry = run_graph(comfy_server, graph)
    (report,) = entry["outputs"][refine_node]["text"]
    m = re.search(r"before ([0-9.]+), after ([0-9.]+)", report)
    assert m and f"{REFINE_STEPS} steps" in report, report
    before, after = float(m.group(1)), float(m.group(2))
    assert after < before, report            # the same fixed draws: the refined identity denoises the photo better
    assert [im.size for im in _saved_images(comfy_server, entry, graph)] == [(64, 64)]
    (save_node,) = node_ids(graph, "HyperLoRAStudioSaveIdentity")
    (written,) = entry["outputs"][save_node]["hyper_lora_files"]
    path = comfy_base.base / "output" / "hyper_lora_identities" / written["subfolder"] / written["filename"]
    refined = load_identity(path)
    assert refined.settings["refined"].startswith(f"coefficients, {REFINE_STEPS} steps")
    assert refined.face_embedding is not None and refined.tokens.shape == (8 * 140, 4)
    assert "lora key not loaded" not in comfy_server.log_text()
    shown = previews(entry, graph)                    # what the front end shows in the Preview Any nodes
    assert shown["Refine report (loss before and after)"] == [report]
    assert shown["HyperLoRA model info"][0].startswith(f"HyperLoRA model '{SMALL_MODEL}': "), shown


def previews(entry: dict[str, Any], graph: dict[str, Any]) -> dict[str, list[str]]:
    """``{title: text list}`` of the core Preview Any nodes after a run (the front end shows the first text)."""
    return {graph[nid]["_meta"]["title"]: entry["outputs"][nid]["text"] for nid in node_ids(graph, "PreviewAny")}


@pytest.mark.slow
def test_best_of_n_shows_the_ranking_the_best_score_and_the_loader_info(comfy_server, fixture_files):
    """best_of_n at 64 px, 1 step: the kept images are saved, and the ranking, the first kept score and the
    Loader's info reach the UI through core Preview Any nodes (random weights draw no face: 'no face', NaN)."""
    graph = for_fixtures(q.load_api_workflow(q.resolve_workflow("best_of_n")), fixture_files)
    (best,) = node_ids(graph, "HyperLoRAStudioBestOfN")
    assert {graph[nid]["_meta"]["title"] for nid in node_ids(graph, "PreviewAny")} == {
        "Ranking (every image's score)", "Best score (first of the kept scores)", "HyperLoRA model info"}
    entry = run_graph(comfy_server, graph)
    assert len(_saved_images(comfy_server, entry, graph)) == graph[best]["inputs"]["keep"]
    shown = previews(entry, graph)
    (ranking,) = shown["Ranking (every image's score)"]
    lines = ranking.splitlines()
    assert lines[0].endswith(f"kept {graph[best]['inputs']['keep']} of 8") and len(lines) == 9, ranking
    assert all(re.match(r"(kept|    ) #\d: image \d: ", ln) for ln in lines[1:]), ranking
    assert len(shown["Best score (first of the kept scores)"]) == graph[best]["inputs"]["keep"]
    assert shown["HyperLoRA model info"][0].startswith(f"HyperLoRA model '{SMALL_MODEL}': "), shown


def test_shipped_model_names_are_refused_with_comfyuis_message_when_absent(comfy_server):
    graph = q.load_api_workflow(q.resolve_workflow("t2i_one_photo"))
    with pytest.raises(PromptError) as ei:
        comfy_server.post_prompt(graph)
    body = ei.value.body
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    failing = {graph[nid]["class_type"] for nid in body["node_errors"]}
    assert {"CheckpointLoaderSimple", "HyperLoRAStudioLoader", "LoadImage"} <= failing
