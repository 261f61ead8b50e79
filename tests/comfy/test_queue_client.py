"""python -m hyperlora.tools.queue against a real ComfyUI on 127.0.0.1 (the session server of conftest.py)."""

from __future__ import annotations

import copy
import json
import logging

import numpy as np
import pytest
from PIL import Image

from hyperlora.tools import convert_workflow as cw
from hyperlora.tools import queue as q
from hyperlora.errors import QueueError
from tests.comfy.models import ANTELOPE, CHECKPOINT, CLIP_FOLDER, SMALL_MODEL, astronaut, faceless_photo
from tests.fixtures.authors import example


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    Image.fromarray(astronaut()).save(d / "me.png")
    Image.fromarray(faceless_photo()).save(d / "wall.jpg")
    return d


FIXTURE_SETTINGS = [f"Load HyperLoRA.clip_vision={CLIP_FOLDER}", f"Load HyperLoRA.insightface={ANTELOPE}"]


def test_cli_uploads_fills_queues_follows_and_downloads(comfy_server, photos, tmp_path, capsys, caplog):
    out = tmp_path / "out"
    args = ["--server", comfy_server.url, "--workflow", "t2i_one_photo", "--image", str(photos / "me.png"),
            "--prompt", "an astronaut in a garden", "--seed", "11", "--strength", "0.8", "--model", SMALL_MODEL,
            "--checkpoint", CHECKPOINT, "--steps", "1", "--width", "64", "--height", "64", "--out", str(out),
            "--timeout", "1200"]
    for s in FIXTURE_SETTINGS:
        args += ["--set", s]
    with caplog.at_level(logging.INFO, logger="hyperlora.tools.queue"):
        assert q.main(args) == 0
    printed = capsys.readouterr().out.split()
    assert len(printed) == 1
    path = out / printed[0].rsplit("/", 1)[-1]
    assert path.is_file() and str(path) == printed[0]
    with Image.open(path) as im:
        assert im.size == (64, 64)
        # ComfyUI stores the prompt it ran in the PNG: the client's filling reached the server
        ran = im.info["prompt"]
    assert "fcsks fxhks fhyks, an astronaut in a garden" in ran
    assert '"strength": 0.8' in ran and '"seed": 11' in ran and "me.png" in ran
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("queued prompt ") for m in messages)
    # websocket progress events, nodes named by their titles
    assert "running Apply HyperLoRA from images" in messages and "running Save image" in messages
    assert "Sampler (authors' settings): step 1/1" in messages
    assert not any(m.startswith("running node ") for m in messages)
    assert messages[-1].startswith("downloaded 1 image(s)")


def test_polling_fallback_gives_the_same_image(comfy_server, photos, tmp_path):
    common = dict(server=comfy_server.url, images=[photos / "me.png"], prompt="an astronaut in a garden", seed=11,
                  strength=0.8, model=SMALL_MODEL, checkpoint=CHECKPOINT, steps=1, width=64, height=64,
                  overrides=FIXTURE_SETTINGS, timeout=1200)
    a = q.queue_workflow("t2i_one_photo", out_dir=tmp_path / "ws", **common)
    b = q.queue_workflow("t2i_one_photo", out_dir=tmp_path / "poll", use_websocket=False, **common)
    with Image.open(a[0]) as ia, Image.open(b[0]) as ib:
        assert np.array_equal(np.asarray(ia), np.asarray(ib))


def test_missing_node_type_names_the_pack(comfy_server):
    graph = q.load_api_workflow(q.resolve_workflow("t2i_one_photo"))
    graph = copy.deepcopy(graph)
    nid = q.find_nodes(graph, "HyperLoRAStudioApplyFromImages")[0]
    graph[nid]["class_type"] = "HyperLoRAStudioFromTheFuture"
    graph["99"] = {"class_type": "SomeOtherPackNode", "inputs": {}, "_meta": {"title": "x"}}
    with pytest.raises(QueueError) as ei:
        q.queue_workflow(graph, server=comfy_server.url)
    msg = str(ei.value)
    assert f"The ComfyUI server at {comfy_server.url} lacks node type(s)" in msg
    assert "HyperLoRAStudioFromTheFuture: from ComfyUI-HyperLoRA-Studio" in msg and "restart ComfyUI" in msg
    assert "SomeOtherPackNode: neither ComfyUI 0.3.64 core nor ComfyUI-HyperLoRA-Studio nodes" in msg


def test_the_core_node_list_matches_the_running_comfyui(comfy_server):
    """The client's list of core node ids (hyperlora/tools/core_nodes.py) against what the server itself
    reports as core (python_module 'nodes', 'comfy_extras.*', 'comfy_api_nodes.*') and as a pack's."""
    from hyperlora.tools.core_nodes import CORE_NODE_TYPES

    info = comfy_server.get_json("/object_info", timeout=120)
    core = {k for k, v in info.items() if v["python_module"].split(".")[0] in ("nodes", "comfy_extras", "comfy_api_nodes")}
    packs = {k for k, v in info.items() if v["python_module"].startswith("custom_nodes.")}
    assert len(core) > 400 and core <= CORE_NODE_TYPES, sorted(core - CORE_NODE_TYPES)
    assert {q.node_origin(k) for k in core} == {"core"}
    assert {q.node_origin(k) for k in packs} == {"ours"}


def test_rejected_prompt_shows_comfyuis_validation_message(comfy_server, photos):
    with pytest.raises(QueueError) as ei:
        q.queue_workflow("t2i_one_photo", server=comfy_server.url, images=[photos / "me.png"],
                         checkpoint="no_such_model.safetensors", model=SMALL_MODEL, overrides=FIXTURE_SETTINGS)
    msg = str(ei.value)
    assert msg.startswith("ComfyUI rejected the workflow (HTTP 400): Prompt outputs failed validation")
    assert "(CheckpointLoaderSimple 'Load SDXL checkpoint'): Value not in list: ckpt_name: 'no_such_model.safetensors'" in msg


def test_execution_error_shows_exception_and_node(comfy_server, photos):
    with pytest.raises(QueueError) as ei:
        q.queue_workflow("t2i_one_photo", server=comfy_server.url, images=[photos / "wall.jpg"], model=SMALL_MODEL,
                         checkpoint=CHECKPOINT, steps=1, width=64, height=64, timeout=1200,
                         overrides=[*FIXTURE_SETTINGS, "Apply HyperLoRA from images.no_face=error"])
    msg = str(ei.value)
    assert msg.startswith("ComfyUI failed in node ")
    assert "(HyperLoRAStudioApplyFromImages 'Apply HyperLoRA from images'): " in msg
    assert "face" in msg.lower()


def test_half_run_exits_non_zero_naming_the_node_the_file_and_the_outputs_never_made(comfy_server, photos, tmp_path,
                                                                                     capsys):
    """controlnet_pose without its ControlNet file: ComfyUI accepts the prompt, drops the sampling
    branch (node_errors) and runs only the face-crops preview; the client downloads that and fails."""
    out = tmp_path / "out"
    args = ["--server", comfy_server.url, "--workflow", "controlnet_pose", "--image", str(photos / "me.png"),
            "--pose", str(photos / "me.png"), "--model", SMALL_MODEL, "--checkpoint", CHECKPOINT, "--steps", "1",
            "--width", "64", "--height", "64", "--out", str(out), "--timeout", "1200",
            "--set", "Load pose ControlNet (SDXL).control_net_name=no_such_controlnet.safetensors"]
    for s in FIXTURE_SETTINGS:
        args += ["--set", s]
    assert q.main(args) == q.PARTIAL_EXIT != 0
    captured = capsys.readouterr()
    assert captured.out == ""                                  # no image path is offered as the result
    err = captured.err
    assert err.startswith("error: ComfyUI ran only part of the workflow: ") and err.count("\n") == 1
    graph = q.load_api_workflow(q.resolve_workflow("controlnet_pose"))
    (cn,) = q.find_nodes(graph, "ControlNetLoader")
    (save,) = q.find_nodes(graph, "SaveImage")
    assert (f"node {cn} 'Load pose ControlNet (SDXL)' (ControlNetLoader): control_net_name "
            f"'no_such_controlnet.safetensors' is not on the server: put it into ComfyUI's models/controlnet") in err
    assert f"Outputs never made: node {save} 'Save image' (SaveImage)." in err
    previews = sorted(out.iterdir())
    assert len(previews) == 1 and f"{previews[0].name}." in err          # what did run is kept, and named
    with Image.open(previews[0]) as im:
        assert im.size[0] > 0


def test_every_shipped_ui_workflow_becomes_its_api_twin(comfy_server):
    """The client's UI -> API conversion with the server's /object_info gives the committed API twins."""
    from hyperlora.tools.graph_format import api_from_ui

    info = comfy_server.get_json("/object_info", timeout=120)
    names = sorted(p.stem for p in q.WORKFLOW_DIR.glob("*.json"))
    assert len(names) >= 16
    for name in names:
        ui = json.loads((q.WORKFLOW_DIR / f"{name}.json").read_text(encoding="utf-8"))
        assert api_from_ui(ui, info) == q.load_api_workflow(q.API_DIR / f"{name}.json"), name


def test_converted_authors_workflow_is_queued_from_its_ui_file(comfy_server, photos, tmp_path, capsys, caplog):
    """A newcomer's path: convert the authors' T2I example (UI, default: core nodes only), queue the file
    as it is with --image (the photo node is found through the identity node it feeds)."""
    ours = tmp_path / "HyperLoRA-T2I-studio.json"
    assert cw.main([str(example("HyperLoRA-T2I")), str(ours)]) == 0
    capsys.readouterr()
    out = tmp_path / "out"
    args = ["--server", comfy_server.url, "--workflow", str(ours), "--image", str(photos / "me.png"),
            "--model", SMALL_MODEL, "--checkpoint", CHECKPOINT, "--steps", "1", "--width", "64", "--height", "64",
            "--seed", "5", "--out", str(out), "--timeout", "1200",
            "--set", f"HyperLoRA Studio Loader.clip_vision={CLIP_FOLDER}",
            "--set", f"HyperLoRA Studio Loader.insightface={ANTELOPE}"]
    with caplog.at_level(logging.INFO, logger="hyperlora.tools.queue"):
        assert q.main(args) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out.split()
    assert len(printed) == 1                                   # the authors' example previews its one image
    with Image.open(printed[0]) as im:
        assert im.size == (64, 64)
        ran = json.loads(im.info["prompt"])
    photo_nodes = [n for n in ran.values() if n["class_type"] == "LoadImage"]
    assert [n["inputs"]["image"] for n in photo_nodes] == ["me.png"]
    assert any(m.startswith("turned the UI workflow ") for m in (r.getMessage() for r in caplog.records))
