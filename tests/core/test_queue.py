"""hyperlora.tools.queue without a ComfyUI server: workflow lookup, filling, messages, server-down error."""

from __future__ import annotations

import json
import logging
import socket

import pytest

from hyperlora.spec import TRIGGER_PREFIX
from hyperlora.tools import queue as q
from hyperlora.errors import QueueError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_shipped_api_workflow_resolves_and_loads():
    names = sorted(p.stem for p in q.API_DIR.glob("*.json"))
    assert {"t2i_one_photo", "t2i_several_photos", "interpolate_two_people", "concept_slider", "controlnet_pose",
            "export_lora", "reuse_exported_lora", "identity_save", "identity_load"} <= set(names)
    for name in names:
        graph = q.load_api_workflow(q.resolve_workflow(name))
        assert all("class_type" in n and "_meta" in n for n in graph.values())


def test_unknown_workflow_lists_the_shipped_ones():
    with pytest.raises(QueueError, match=r"no_such_flow.*t2i_one_photo"):
        q.resolve_workflow("no_such_flow")


def test_ui_workflow_needs_a_server_and_bad_files_are_named(tmp_path):
    ui = q.WORKFLOW_DIR / "t2i_one_photo.json"
    assert q.read_workflow(ui)["nodes"]                          # the CLI reads it as it is ...
    with pytest.raises(QueueError, match=r"UI workflow.*queue it with python -m hyperlora.tools.queue.*"
                                         r"example_workflows/api/t2i_one_photo.json"):
        q.load_api_workflow(ui)                                  # ... the API loader alone cannot convert it
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"1": {"inputs": {}}}))
    with pytest.raises(QueueError, match="bad.json is not a ComfyUI workflow"):
        q.load_api_workflow(bad)


def test_deeply_nested_json_is_one_line_not_a_recursion_error(tmp_path, capsys):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(QueueError, match=r"deep.json: its JSON is nested too deeply"):
        q.read_workflow(deep)
    assert q.main(["--workflow", str(deep), "--server", "http://127.0.0.1:9"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: Cannot read the workflow") and err.count("\n") == 1


def test_fill_sets_photos_prompt_seed_strength_models_by_title_and_type():
    g = q.load_api_workflow(q.resolve_workflow("concept_slider"))
    filled = q.fill_workflow(g, images=["orig.png", "edit.png"], prompt="a chef", negative="ugly", seed=7,
                             strength=0.7, model="m1", checkpoint="c.safetensors", steps=1, width=64, height=96)
    assert g != filled                                   # a copy, the input is untouched
    by_title = {n["_meta"]["title"]: n for n in filled.values()}
    assert by_title["Original photo"]["inputs"]["image"] == "orig.png"   # slots in node-id order
    assert by_title["Edited photo"]["inputs"]["image"] == "edit.png"
    assert by_title["Positive prompt (starts with the trigger words)"]["inputs"]["text"] == TRIGGER_PREFIX + "a chef"
    assert by_title["Negative prompt"]["inputs"]["text"] == "ugly"
    ks = by_title["Sampler (authors' settings)"]["inputs"]
    assert (ks["seed"], ks["steps"], ks["cfg"], ks["sampler_name"], ks["scheduler"]) == (7, 1, 5.0, "dpmpp_2m", "karras")
    assert by_title["Image size"]["inputs"]["width"] == 64 and by_title["Image size"]["inputs"]["height"] == 96
    assert by_title["Apply identity LoRA"]["inputs"]["strength"] == 0.7
    assert by_title["Apply slider LoRA"]["inputs"]["strength"] == 1.0          # the slider keeps its own strength
    assert by_title["Load HyperLoRA"]["inputs"]["model"] == "m1"
    assert by_title["Load SDXL checkpoint"]["inputs"]["ckpt_name"] == "c.safetensors"
    assert by_title["Apply identity LoRA"]["inputs"]["model"] == [
        next(i for i, n in filled.items() if n["class_type"] == "CheckpointLoaderSimple"), 0]


def test_fill_keeps_a_prompt_that_has_the_trigger_words_and_can_skip_them():
    g = q.load_api_workflow(q.resolve_workflow("t2i_one_photo"))
    text = lambda f: next(n["inputs"]["text"] for n in f.values() if n["_meta"]["title"].startswith("Positive"))  # noqa: E731
    assert text(q.fill_workflow(g, prompt="fcsks fxhks fhyks, a pilot")) == "fcsks fxhks fhyks, a pilot"
    assert text(q.fill_workflow(g, prompt="a pilot", add_trigger=False)) == "a pilot"


def test_photo_count_must_match_the_slots():
    g = q.load_api_workflow(q.resolve_workflow("t2i_several_photos"))
    with pytest.raises(QueueError, match=r"takes 3 face photo\(s\).*'Face photo 1'.*but 1 were given"):
        q.fill_workflow(g, images=["a.png"])
    filled = q.fill_workflow(g, images=["a.png", "b.png", "c.png"])
    assert [filled[i]["inputs"]["image"] for i in q.photo_slots(filled)] == ["a.png", "b.png", "c.png"]


def test_pose_image_and_overrides():
    g = q.load_api_workflow(q.resolve_workflow("controlnet_pose"))
    filled = q.fill_workflow(g, images=["face.png"], pose_image="pose.png",
                             overrides=["Apply pose ControlNet.strength=0.5", "Load HyperLoRA.dtype=fp32",
                                        "Save image.filename_prefix=x/y"])
    by_title = {n["_meta"]["title"]: n["inputs"] for n in filled.values()}
    assert by_title["Pose image"]["image"] == "pose.png"
    assert by_title["Face photo"]["image"] == "face.png"
    assert by_title["Apply pose ControlNet"]["strength"] == 0.5
    assert by_title["Load HyperLoRA"]["dtype"] == "fp32"
    assert by_title["Save image"]["filename_prefix"] == "x/y"
    with pytest.raises(QueueError, match="no 'Pose image'"):
        q.fill_workflow(q.load_api_workflow(q.resolve_workflow("t2i_one_photo")), pose_image="p.png")
    with pytest.raises(QueueError, match="no node with id or title 'Nope'"):
        q.fill_workflow(g, overrides=["Nope.x=1"])
    with pytest.raises(QueueError, match="not of the form"):
        q.fill_workflow(g, overrides=["strength=1"])
    with pytest.raises(QueueError, match="gets 'model' from a link"):
        q.fill_workflow(g, overrides=["Apply identity LoRA.model=3"])


def test_rejection_message_names_node_title_and_comfy_details():
    g = q.load_api_workflow(q.resolve_workflow("t2i_one_photo"))
    ckpt = next(i for i, n in g.items() if n["class_type"] == "CheckpointLoaderSimple")
    answer = {"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                        "details": ""},
              "node_errors": {ckpt: {"errors": [{"type": "value_not_in_list", "message": "Value not in list",
                                                 "details": "ckpt_name: 'x.safetensors' not in ['a.safetensors']"}],
                                     "class_type": "CheckpointLoaderSimple"}}}
    msg = q.format_rejection(g, answer, 400)
    assert msg.splitlines()[0] == "ComfyUI rejected the workflow (HTTP 400): Prompt outputs failed validation"
    assert (f"node {ckpt} (CheckpointLoaderSimple 'Load SDXL checkpoint'): Value not in list: "
            "ckpt_name: 'x.safetensors' not in ['a.safetensors']") in msg


def test_failed_run_message_has_exception_and_node():
    g = q.load_api_workflow(q.resolve_workflow("t2i_one_photo"))
    nid = next(i for i, n in g.items() if n["class_type"] == "HyperLoRAStudioApplyFromImages")
    entry = {"status": {"status_str": "error", "completed": False, "messages": [
        ["execution_start", {}],
        ["execution_error", {"node_id": nid, "node_type": "HyperLoRAStudioApplyFromImages",
                             "exception_type": "FaceNotFoundError", "exception_message": "No face in image 1.\n"}]]}}
    with pytest.raises(QueueError) as ei:
        q.raise_for_failure(g, entry)
    assert str(ei.value) == (f"ComfyUI failed in node {nid} (HyperLoRAStudioApplyFromImages 'Apply HyperLoRA from "
                             f"images'): FaceNotFoundError: No face in image 1.")
    q.raise_for_failure(g, {"status": {"status_str": "success", "messages": []}})


def test_server_down_names_the_url_and_says_to_start_comfyui(capsys):
    url = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(QueueError) as ei:
        q.queue_workflow("t2i_one_photo", server=url, images=[])
    msg = str(ei.value)
    assert msg.startswith(f"Cannot reach ComfyUI at {url}")
    assert "Start ComfyUI" in msg and "--server" in msg
    assert q.main(["--server", url, "--workflow", "t2i_one_photo"]) == 1
    assert f"error: Cannot reach ComfyUI at {url}" in capsys.readouterr().err


def test_missing_image_file_is_named(tmp_path):
    client = q.ComfyClient("http://127.0.0.1:9")
    with pytest.raises(QueueError, match=r"Cannot read the image .*nope.png"):
        client.upload_image(tmp_path / "nope.png")


def test_missing_nodes_are_grouped_by_where_they_come_from():
    """A node the server lacks is named with its origin and the fix: this pack, the authors' plugin,
    ComfyUI's core (update ComfyUI) or another custom-node pack (install it)."""
    assert q.node_origin("HyperLoRAStudioApply") == "ours"
    assert q.node_origin("HyperLoRALoader") == q.node_origin("HyperLoRAApplyLoRA") == "authors"
    assert q.node_origin("KSampler") == q.node_origin("LoraModelLoader") == q.node_origin("Epsilon Scaling") == "core"
    assert q.node_origin("PreviewAny") == q.node_origin("LoadAudio") == "core"
    assert q.node_origin("ImpactWildcardEncode") == q.node_origin("Ksampler") == "other"
    graph = q.load_api_workflow(q.resolve_workflow("t2i_one_photo"))
    graph["90"] = {"class_type": "HyperLoRALoader", "inputs": {}, "_meta": {"title": "theirs"}}
    graph["91"] = {"class_type": "ImpactWildcardEncode", "inputs": {}, "_meta": {"title": "third party"}}
    info = {n["class_type"]: {} for n in graph.values()}
    for gone in ("KSampler", "HyperLoRAStudioApplyFromImages", "HyperLoRALoader", "ImpactWildcardEncode"):
        info.pop(gone)
    client = q.ComfyClient("http://127.0.0.1:1")
    client.object_info = lambda: info           # the server's answer, without a server
    with pytest.raises(QueueError) as ei:
        client.check_nodes(graph)
    msg = str(ei.value)
    assert msg.startswith("The ComfyUI server at http://127.0.0.1:1 lacks node type(s) used by this workflow: "
                          "HyperLoRAStudioApplyFromImages: from ComfyUI-HyperLoRA-Studio")
    assert "; HyperLoRALoader: from the authors' plugin ComfyUI-HyperLoRA" in msg and "convert_workflow" in msg
    assert "; KSampler: ComfyUI core node(s) (in ComfyUI 0.3.64): update ComfyUI" in msg
    assert ("; ImpactWildcardEncode: neither ComfyUI 0.3.64 core nor ComfyUI-HyperLoRA-Studio nodes, so they come "
            "from another custom-node pack: install that pack") in msg


def test_every_node_of_the_shipped_workflows_is_ours_or_core():
    for path in sorted(q.API_DIR.glob("*.json")):
        for node in q.load_api_workflow(path).values():
            assert q.node_origin(node["class_type"]) in ("ours", "core"), (path.name, node["class_type"])


def _controlnet_node_errors(graph):
    """ComfyUI 0.3.64's node_errors when the ControlNet file is missing (the shape execution.py gives)."""
    loader = q.find_nodes(graph, "ControlNetLoader")[0]
    save = q.find_nodes(graph, "SaveImage")[0]
    return loader, save, {loader: {
        "errors": [{"type": "value_not_in_list", "message": "Value not in list",
                    "details": "control_net_name: 'OpenPoseXL2.safetensors' not in []",
                    "extra_info": {"input_name": "control_net_name", "input_config": None,
                                   "received_value": "OpenPoseXL2.safetensors"}}],
        "dependent_outputs": [save], "class_type": "ControlNetLoader"}}


def test_half_run_message_names_the_node_the_file_and_the_outputs_never_made():
    g = q.load_api_workflow(q.resolve_workflow("controlnet_pose"))
    loader, save, node_errors = _controlnet_node_errors(g)
    assert q.never_made(g, node_errors) == [save]
    msg = q.format_partial(g, node_errors)
    assert "\n" not in msg
    assert msg == (f"ComfyUI ran only part of the workflow: node {loader} 'Load pose ControlNet (SDXL)' "
                   f"(ControlNetLoader): control_net_name 'OpenPoseXL2.safetensors' is not on the server: put it "
                   f"into ComfyUI's models/controlnet. Outputs never made: node {save} 'Save image' (SaveImage). "
                   f"Fix the node(s) above and queue again.")
    other = {loader: {"errors": [{"type": "custom_validation_failed", "message": "Custom validation failed for node",
                                  "details": "image - Invalid image file: x.png", "extra_info": {}}],
                      "dependent_outputs": [save, "77"], "class_type": "ControlNetLoader"}}
    assert ("(ControlNetLoader): Custom validation failed for node: image - Invalid image file: x.png. Outputs "
            f"never made: node {save} 'Save image' (SaveImage), node 77 '?' (?).") in q.format_partial(g, other)
    assert issubclass(q.PartialRunError, QueueError)


def test_progress_lines_name_nodes_by_title(caplog):
    g = q.load_api_workflow(q.resolve_workflow("t2i_one_photo"))
    ks = q.find_nodes(g, "KSampler")[0]
    ckpt = q.find_nodes(g, "CheckpointLoaderSimple")[0]
    with caplog.at_level(logging.INFO, logger="hyperlora.tools.queue"):
        q._log_progress({"type": "executing", "data": {"node": ckpt, "prompt_id": "p"}}, g)
        q._log_progress({"type": "progress", "data": {"node": ks, "value": 3, "max": 20}}, g)
        q._log_progress({"type": "execution_cached", "data": {"nodes": [ckpt, "999"]}}, g)
        q._log_progress({"type": "executing", "data": {"node": "999"}}, g)
    assert [r.getMessage() for r in caplog.records] == [
        "running Load SDXL checkpoint", "Sampler (authors' settings): step 3/20",
        "cached: Load SDXL checkpoint, node 999", "running node 999"]


def test_photo_slots_of_a_converted_workflow_follow_the_images_into_the_identity():
    from hyperlora.tools import convert_workflow as cw
    from tests.core.test_convert_workflow import authors_api

    theirs = authors_api()
    theirs["4"]["_meta"] = {"title": "Load Image"}
    theirs["30"] = {"class_type": "LoadImage", "inputs": {"image": "second.png"}, "_meta": {"title": "Load Image"}}
    theirs["31"] = {"class_type": "ImageBatch", "inputs": {"image1": ["4", 0], "image2": ["30", 0]}}
    theirs["32"] = {"class_type": "LoadImage", "inputs": {"image": "pose.png"}, "_meta": {"title": "Load Image"}}
    for nid in ("5", "6", "8"):
        theirs[nid]["inputs"]["images"] = ["31", 0]
    g = cw.convert(theirs, source="theirs_api.json").workflow
    assert not q.find_nodes(g, "LoadImage", "photo")
    assert q.photo_slots(g) == ["4", "30"]                     # not the pose image (#32): it feeds no identity
    filled = q.fill_workflow(g, images=["a.png", "b.png"])
    assert (filled["4"]["inputs"]["image"], filled["30"]["inputs"]["image"], filled["32"]["inputs"]["image"]) == \
        ("a.png", "b.png", "pose.png")
    del g["6"], g["8"]                                         # no identity node left: no slot, and --set is named
    with pytest.raises(QueueError, match=r"no face photo slot.*--set 'Load Image.image=me.png'"):
        q.fill_workflow(g, images=["a.png"])


def _ui_node(nid, type_, widgets=(), inputs=(), outputs=(), mode=0, title=None):
    node = {"id": nid, "type": type_, "pos": [0, 0], "size": [300, 100], "flags": {}, "order": nid, "mode": mode,
            "inputs": [dict(i) for i in inputs], "outputs": [dict(o) for o in outputs],
            "properties": {}, "widgets_values": list(widgets)}
    if title:
        node["title"] = title
    return node


def test_ui_workflow_becomes_the_api_graph_the_front_end_queues():
    """Reroutes and bypassed nodes are passed, muted and front-end-only nodes left out, a widget fed by
    a primitive keeps its saved value, seed and upload extras skipped (ComfyUI tier: every shipped workflow)."""
    from hyperlora.tools.graph_format import api_from_ui, load_node_specs, ui_node_types

    info = load_node_specs()
    info["LoadImage"] = {"input": {"required": {"image": [["me.png"], {"image_upload": True}]}},
                         "output": ["IMAGE", "MASK"], "output_name": ["IMAGE", "MASK"], "display_name": "Load Image"}
    loader = ["m", "clip_vit_large_14", "antelopev2", "auto", "auto"]
    face = ["largest", 0, True, False, "skip", "640"]
    ui = {"nodes": [
        _ui_node(1, "HyperLoRAStudioLoader", loader, outputs=[{"name": "hyper_lora", "type": "HYPERLORA_STUDIO_MODEL",
                                                             "links": [1]}]),
        _ui_node(2, "LoadImage", ["me.png", "image"], outputs=[{"name": "IMAGE", "type": "IMAGE", "links": [2]}],
                 title="Face photo"),
        _ui_node(3, "Reroute", inputs=[{"name": "", "type": "*", "link": 2}],
                 outputs=[{"name": "", "type": "IMAGE", "links": [3]}]),
        _ui_node(4, "ImageBatch", mode=4, inputs=[{"name": "image1", "type": "IMAGE", "link": 3},
                                                  {"name": "image2", "type": "IMAGE", "link": None}],
                 outputs=[{"name": "IMAGE", "type": "IMAGE", "links": [4]}]),
        _ui_node(5, "HyperLoRAStudioIdentityFromImages", face,
                 inputs=[{"name": "hyper_lora", "type": "HYPERLORA_STUDIO_MODEL", "link": 1},
                         {"name": "images", "type": "IMAGE", "link": 4}]),
        _ui_node(6, "PrimitiveNode", ["from the primitive"],
                 outputs=[{"name": "STRING", "type": "STRING", "links": [5], "widget": {"name": "text"}}]),
        _ui_node(7, "CLIPTextEncode", ["from the primitive"],
                 inputs=[{"name": "clip", "type": "CLIP", "link": 6},
                         {"name": "text", "type": "STRING", "link": 5, "widget": {"name": "text"}}]),
        _ui_node(8, "CheckpointLoaderSimple", ["x.safetensors"], mode=2,
                 outputs=[{"name": "CLIP", "type": "CLIP", "links": [6]}]),
        _ui_node(9, "Note", ["a note"]),
    ], "links": [[1, 1, 0, 5, 0, "HYPERLORA_STUDIO_MODEL"], [2, 2, 0, 3, 0, "IMAGE"], [3, 3, 0, 4, 0, "IMAGE"],
                 [4, 4, 0, 5, 1, "IMAGE"], [5, 6, 0, 7, 1, "STRING"], [6, 8, 0, 7, 0, "CLIP"]]}
    assert ui_node_types(ui) == ["HyperLoRAStudioLoader", "LoadImage", "HyperLoRAStudioIdentityFromImages",
                                 "CLIPTextEncode"]
    api = api_from_ui(ui, info)
    assert api == {
        # saved before the Loader gained its optional 'memory' widget: filled with its default, as the front end does
        "1": {"inputs": {**dict(zip(["model", "clip_vision", "insightface", "dtype", "provider"], loader)),
                         "memory": "auto"},
              "class_type": "HyperLoRAStudioLoader", "_meta": {"title": "HyperLoRA Studio Loader"}},
        "2": {"inputs": {"image": "me.png"}, "class_type": "LoadImage", "_meta": {"title": "Face photo"}},
        "5": {"inputs": {**dict(zip(["face_choice", "face_index", "remove_background", "grayscale", "no_face",
                                     "det_size"], face)), "hyper_lora": ["1", 0], "images": ["2", 0]},
              "class_type": "HyperLoRAStudioIdentityFromImages",
              "_meta": {"title": "HyperLoRA Studio Identity from Images"}},
        "7": {"inputs": {"text": "from the primitive"}, "class_type": "CLIPTextEncode",
              "_meta": {"title": "CLIP Text Encode (Prompt)"}},
    }
    ui["nodes"][4]["widgets_values"] = face[:-1]               # saved by another version of the node
    with pytest.raises(ValueError, match=r"node #5 'HyperLoRAStudioIdentityFromImages' .* has 5 widget values but "
                                         r"the server's HyperLoRAStudioIdentityFromImages takes 6"):
        api_from_ui(ui, info)
    del info["LoadImage"]
    with pytest.raises(ValueError, match=r"node #2 'Face photo' \(LoadImage\): the server has no node type LoadImage"):
        api_from_ui(ui, info)
    ui["definitions"] = {"subgraphs": [{"id": "5a1f", "name": "My part"}]}
    ui["nodes"].append(_ui_node(10, "5a1f"))
    with pytest.raises(QueueError, match=r"x.json has subgraph node\(s\) #10 'My part'.*Unpack Subgraph"):
        q.ui_to_api_graph(ui, info, "x.json")


def test_shipped_order_is_the_readmes_and_orders_a_templates_listing():
    """The Templates menu order (nodes/templates.py; ComfyUI tier: the server's answer) is the README's."""
    from pathlib import Path

    order = q.shipped_order()
    assert order[0] == "t2i_one_photo"
    assert sorted(order) == sorted(p.stem for p in q.WORKFLOW_DIR.glob("*.json")) and len(order) == 18
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Workflows\n", 1)[1].split("\n## ", 1)[0]
    assert [line.split("`")[1] for line in section.splitlines() if line.startswith("| `")] == order
    glob_like = ["identity_load", "concept_slider", "zz_users_own", "t2i_one_photo", "aa_users_own"]
    assert q.in_shipped_order(glob_like, order) == ["t2i_one_photo", "concept_slider", "identity_load",
                                                    "aa_users_own", "zz_users_own"]
