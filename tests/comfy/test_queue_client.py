"""python -m hyperlora.tools.queue against a real ComfyUI on 127.0.0.1 (the session server of conftest.py)."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
from PIL import Image

from hyperlora.tools import queue as q
from hyperlora.errors import QueueError
from tests.comfy.models import ANTELOPE, CHECKPOINT, CLIP_FOLDER, SMALL_MODEL, astronaut, faceless_photo


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
    assert any(m.startswith("running node ") for m in messages)          # websocket progress events
    assert any("step 1/1" in m for m in messages)
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
