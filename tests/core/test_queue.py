"""hyperlora.tools.queue without a ComfyUI server: workflow lookup, filling, messages, server-down error."""

from __future__ import annotations

import json
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


def test_ui_workflow_is_refused_with_a_pointer_to_its_api_twin(tmp_path):
    ui = q.WORKFLOW_DIR / "t2i_one_photo.json"
    with pytest.raises(QueueError, match=r"UI workflow.*example_workflows/api/t2i_one_photo.json"):
        q.load_api_workflow(ui)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"1": {"inputs": {}}}))
    with pytest.raises(QueueError, match="not an API workflow"):
        q.load_api_workflow(bad)


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
