"""This pack beside the authors' ComfyUI-HyperLoRA plugin, and their workflows converted for it.

A second ComfyUI (no SDXL is loaded in it) starts with both packs in custom_nodes/: this repository
and a copy of the authors' plugin (tests/fixtures/authors.py; it imports diffusers at start-up, which
the test extra installs: without diffusers these tests skip, under CI they fail). The models and input
folders are the session's (tests/comfy/models.py).

* both packs load and list all their nodes; each id is registered by one pack only, and the authors'
  nodes have the sockets and widgets the converter's table (version 1.0.0) says;
* the saved specs of our nodes (hyperlora/tools/node_specs.json, the converter's input) are what this
  server reports;
* one of our shipped workflows (export_lora) validates and runs there;
* the authors' loader connected to one of our nodes is refused with our message naming the fix;
* each of the authors' five example workflows converts: every node of ours exists in /object_info with
  the widget count it reports, the links are consistent, and where no other pack is left (the T2I and
  ControlNet examples, by default) the API form passes ComfyUI's validation with the fixture models;
* by default each example converts to node types that the session's server (core ComfyUI 0.3.64 and this
  pack only) registers, except the nodes no core node replaces, each named in one line;
  slow: the converted T2I example also runs on the session's SDXL server (64 px, 1 step).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest

from hyperlora.spec import NODE_PREFIX
from hyperlora.tools import convert_workflow as cw
from hyperlora.tools import queue as q
from hyperlora.tools.graph_format import (VIRTUAL_NODES, expected_widget_count, input_specs, is_widget,
                                          load_node_specs, node_specs)
from tests.comfy.client import ComfyServer, PromptError, execution_error, free_port
from tests.comfy.conftest import REPO_ROOT
from tests.comfy.graphs import FACE as FACE_OPTIONS
from tests.comfy.graphs import ui_to_api
from tests.comfy.models import ANTELOPE, CHECKPOINT, CLIP_FOLDER, PACK_DIR_NAME, SMALL_MODEL
from tests.comfy.test_workflows import fixture_files, validate  # noqa: F401  (fixtures used below)
from tests.core.test_convert_workflow import check_links
from tests.conftest import skip_or_fail
from tests.fixtures.authors import EXAMPLES, authors_plugin, example

pytestmark = pytest.mark.comfy

AUTHORS_DIR_NAME = "ComfyUI-HyperLoRA"          # where users have the authors' plugin
FACE = "astronaut.png"
NEEDS_OTHER_PACKS = {"HyperLoRA-T2I-FaceDetailer", "HyperLoRA-T2I-InstantID", "HyperLoRA-T2I-ConceptSlider"}
FOREIGN_MESSAGE = ("HYPER_LORA object", "HyperLoRA Studio Loader")   # our named message (nodes/common.py)


@pytest.fixture(scope="module")
def coexist(comfy_root: Path, comfy_base: SimpleNamespace,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    if importlib.util.find_spec("diffusers") is None:
        skip_or_fail("the authors' plugin imports diffusers at start-up: pip install diffusers (in the test extra)")
    authors = authors_plugin()
    assert PACK_DIR_NAME != AUTHORS_DIR_NAME
    base = tmp_path_factory.mktemp("coexist")
    nodes_dir = base / "custom_nodes"
    nodes_dir.mkdir()
    os.symlink(REPO_ROOT, nodes_dir / PACK_DIR_NAME)
    shutil.copytree(authors, nodes_dir / AUTHORS_DIR_NAME, ignore=shutil.ignore_patterns(".git", "__pycache__"))
    os.symlink(comfy_base.models, base / "models")
    os.symlink(comfy_base.input, base / "input")
    server = ComfyServer(root=comfy_root, base=base, port=free_port(), log_path=base / "server.log")
    server.start()
    try:
        yield SimpleNamespace(server=server, base=base, models=comfy_base.models,
                              info=server.get_json("/object_info", timeout=120))
    finally:
        server.stop()


def _module(folder: str) -> str:
    return f"custom_nodes.{folder}"


def _ours(info: dict[str, Any]) -> set[str]:
    return {k for k, v in info.items() if v.get("python_module") == _module(PACK_DIR_NAME)}


def for_fixture_models(api: dict[str, Any], files: dict[str, str] | None = None) -> dict[str, Any]:
    """Fixture model and image names in an API graph; 64 px, 1 step where a sampler is."""
    for node in api.values():
        inputs, kind = node["inputs"], node["class_type"]
        if kind == cw.LOADER:
            inputs.update(model=SMALL_MODEL, clip_vision=CLIP_FOLDER, insightface=ANTELOPE, dtype="fp32")
        elif kind == "LoadImage":
            inputs["image"] = FACE
        elif kind == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = CHECKPOINT
        elif kind == "ControlNetLoader" and files:
            inputs["control_net_name"] = files["controlnet"]
        elif kind == "EmptyLatentImage":
            inputs.update(width=64, height=64)
        elif kind == "KSampler":
            inputs.update(steps=1, cfg=1.0)
    return api


# --------------------------------------------------------------------------- both packs in one ComfyUI

def test_both_packs_load_and_list_all_their_nodes(coexist):
    log = coexist.server.log_text()
    for folder in (PACK_DIR_NAME, AUTHORS_DIR_NAME):
        line = next((ln for ln in log.splitlines() if ln.rstrip().endswith(f"custom_nodes/{folder}")
                     and "seconds" in ln), "")
        assert line and "IMPORT FAILED" not in line, log[-3000:]
    info = coexist.info
    theirs = {k for k, v in info.items() if v.get("python_module") == _module(AUTHORS_DIR_NAME)}
    ours = _ours(info)
    assert theirs == set(cw.AUTHORS_NODES)                 # all eleven, none lost to an id of ours
    assert ours == {k for k in load_node_specs() if k.startswith(NODE_PREFIX)}
    assert len(ours) >= 12 and not ours & theirs
    assert all(k.startswith(NODE_PREFIX) for k in ours)


def test_authors_nodes_are_what_the_converter_expects(coexist):
    for type_, spec in cw.AUTHORS_NODES.items():
        info = coexist.info[type_]
        specs = input_specs(info)
        assert tuple(n for n, t, o, _ in specs if not is_widget(t, o)) == spec.sockets, type_
        assert tuple(n for n, t, o, _ in specs if is_widget(t, o)) == spec.widgets, type_
        assert tuple(info["output"]) == spec.outputs, type_
        assert info["display_name"] == spec.title, type_


def test_saved_specs_are_what_the_server_reports(coexist):
    saved = load_node_specs()
    assert node_specs(coexist.info, list(saved)) == saved, \
        "hyperlora/tools/node_specs.json is stale: run python workflows/build_workflows.py --server URL"


def test_our_workflow_validates_and_runs_beside_the_authors(coexist):
    graph = for_fixture_models(q.load_api_workflow(q.resolve_workflow("export_lora")))
    (export,) = q.find_nodes(graph, cw.EXPORT)
    graph[export]["inputs"]["filename_prefix"] = "coexist/my_face"
    entry = coexist.server.run(graph, timeout=600)
    (written,) = entry["outputs"][export]["hyper_lora_files"]
    path = coexist.models / "loras" / written["subfolder"] / written["filename"]
    try:
        assert written["subfolder"] == "coexist" and path.is_file() and path.stat().st_size > 10_000
    finally:
        path.unlink(missing_ok=True)


def test_authors_loader_into_our_node_names_the_fix(coexist):
    graph = {
        "theirs": {"class_type": "HyperLoRAUniLoader", "inputs": {
            "image_processor": f"{CLIP_FOLDER}_processor", "image_encoder": CLIP_FOLDER, "encoder_types": "clip",
            "face_analyzer": ANTELOPE, "model": SMALL_MODEL, "dtype": "fp32"}},
        "img": {"class_type": "LoadImage", "inputs": {"image": FACE}},
        "id": {"class_type": cw.IDENTITY, "inputs": {"hyper_lora": ["theirs", 0], "images": ["img", 0],
                                                     **FACE_OPTIONS}},
        "save": {"class_type": NODE_PREFIX + "SaveIdentity",
                 "inputs": {"identity": ["id", 0], "filename_prefix": "coexist/never"}},
    }
    try:
        prompt_id = coexist.server.post_prompt(graph)
    except PromptError as e:                       # refused at validation: the message must be in the answer
        answer = json.dumps(e.body)
    else:                                          # or the run fails in our node with it
        entry = coexist.server.wait(prompt_id, timeout=600)
        error = execution_error(entry)
        assert error is not None and error["node_type"] == cw.IDENTITY, (entry["status"], coexist.server.log_tail())
        answer = error["exception_message"]
    for needle in FOREIGN_MESSAGE:
        assert needle in answer, answer[:3000]


# --------------------------------------------------------------------------- the authors' examples, converted

@pytest.mark.parametrize("core_nodes", [False, True], ids=["keep_other_packs", "default"])
@pytest.mark.parametrize("name", EXAMPLES)
def test_authors_example_converted_fits_this_server(name, core_nodes, coexist, validate, fixture_files):  # noqa: F811
    conv = cw.convert(json.loads(example(name).read_text(encoding="utf-8")), source=f"{name}.json",
                      core_nodes=core_nodes)
    ui = conv.workflow
    check_links(ui)
    info = coexist.info
    ours = [n for n in ui["nodes"] if n["type"].startswith(NODE_PREFIX)]
    assert ours
    for node in ours:
        assert node["type"] in _ours(info)
        assert len(node["widgets_values"]) == expected_widget_count(info[node["type"]]), node
        sockets = {n: t for n, t, o, _ in input_specs(info[node["type"]]) if not is_widget(t, o)}
        assert {i["name"]: i["type"] for i in node["inputs"]} == sockets
        assert [o["type"] for o in node["outputs"]] == list(info[node["type"]]["output"])
    missing = {n["type"] for n in ui["nodes"] if n["type"] not in info and n["type"] not in VIRTUAL_NODES}
    assert bool(missing) == (not core_nodes or name in NEEDS_OTHER_PACKS), missing
    if missing:
        return                                     # nodes of packs this server does not have: not validatable
    api = for_fixture_models(ui_to_api(ui, info), fixture_files)
    ok, error, node_errors = validate(api)
    assert ok, (error, node_errors)
    broken = json.loads(json.dumps(api))           # and the check can fail: an absent model is refused
    (loader,) = [k for k, v in broken.items() if v["class_type"] == cw.LOADER]
    broken[loader]["inputs"]["model"] = "not_there"
    _, _, node_errors = validate(broken)
    assert "not_there" in json.dumps(node_errors[loader]["errors"])


@pytest.fixture(scope="module")
def core_and_ours(comfy_server) -> dict[str, Any]:
    """/object_info of the session's server: core ComfyUI 0.3.64 and this pack, nothing else."""
    info = comfy_server.get_json("/object_info", timeout=120)
    modules = {v["python_module"] for v in info.values()}
    assert {m for m in modules if m.startswith("custom_nodes.")} == {_module(PACK_DIR_NAME)}
    return info


@pytest.mark.parametrize("name", EXAMPLES)
def test_default_conversion_needs_only_core_comfyui_and_this_pack(name, core_and_ours):
    conv = cw.convert(json.loads(example(name).read_text(encoding="utf-8")), source=f"{name}.json")
    missing = sorted((n["id"], n["type"]) for n in conv.workflow["nodes"]
                     if n["type"] not in core_and_ours and n["type"] not in VIRTUAL_NODES)
    assert bool(missing) == (name in NEEDS_OTHER_PACKS)
    assert all(t in cw.OTHER_PACK_NODES and t not in cw.CORE_REPLACED for _, t in missing), missing
    assert [line.split(" needs ")[0] for line in conv.needs_packs] == [f"#{i} {t}" for i, t in missing]
    for line, (_, t) in zip(conv.needs_packs, missing):
        assert f"needs {cw.OTHER_PACK_NODES[t].pack}, which no core node replaces" in line


@pytest.mark.slow
def test_converted_t2i_example_runs(comfy_server):
    conv = cw.convert(json.loads(example("HyperLoRA-T2I").read_text(encoding="utf-8")),
                      source="HyperLoRA-T2I.json")
    api = for_fixture_models(ui_to_api(conv.workflow, comfy_server.get_json("/object_info", timeout=120)))
    entry = comfy_server.run(api, timeout=1200)
    (preview,) = [nid for nid, n in api.items() if n["class_type"] == "PreviewImage"]
    assert len(entry["outputs"][preview]["images"]) == 1
    assert "lora key not loaded" not in comfy_server.log_text()
