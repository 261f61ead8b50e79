"""Every node of the pack in a real ComfyUI started with its defaults.

The session's server runs with ``--fp16-unet --fp16-text-enc`` (fp16 weights, manual cast to fp32 at each
layer on a CPU) to halve its memory.  ComfyUI's default on a CPU is different: an fp32 UNet **without**
manual cast, weights in the compute dtype, which is also the code path a GPU's fp16 takes.  Refine Identity
once passed on the session's server and crashed on this one ("Inference tensors cannot be saved for
backward").  So here a second server, started with no precision flag, runs shipped workflows that together
hold every node of the pack (:data:`COVER`; a test checks the cover against the registered nodes) and a Face
Similarity graph, each with the same checks as on the session's server
(:func:`tests.comfy.test_workflows.check_run`).

Its fp32 SDXL takes about 13 GB: the session's server (about 8 GB) is stopped meanwhile and started again
afterwards, and the server is emptied (``POST /free``) before each workflow, whose fp32 models (the SDXL
ControlNet, the LoRA backups) would otherwise pile up past 20 GB, so the run stays under 20 GB.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Iterator

import pytest

from hyperlora.tools import queue as q
from tests.comfy.client import ComfyServer, free_port
from tests.comfy.graphs import FACE, loader
from tests.comfy.test_workflows import (FACE as FACE_FILE, REFINE_STEPS, WORKFLOWS, previews, check_run,  # noqa: F401
                                        fixture_files, for_fixtures, node_ids, run_graph)

pytestmark = [pytest.mark.comfy, pytest.mark.slow]

DEFAULT_DTYPE_LINE = "model weight dtype torch.float32, manual cast: None"
"""What ComfyUI logs when it loads the SDXL UNet with its defaults on a CPU (the setup that failed)."""

COVER = ("refine_identity", "identity_load", "group_photo", "face_detailer", "instantid_controlnet",
         "concept_slider", "interpolate_two_people", "two_people", "difflora_best_of_n", "difflora_new_person")
"""Shipped workflows that together hold every node of the pack but Face Similarity (its own graph below).
``refine_identity`` runs first: it saves the identity that ``identity_load`` loads."""
SIMILARITY = "HyperLoRAStudioFaceSimilarity"


@pytest.fixture(scope="module")
def default_server(comfy_root, comfy_base, comfy_server, tmp_path_factory) -> Iterator[ComfyServer]:
    """ComfyUI with its default precision (only ``--cpu`` and the quiet flags every test server has)."""
    from tests.comfy.memory import watch_memory

    comfy_server.stop()
    server = ComfyServer(root=comfy_root, base=comfy_base.base, port=free_port(),
                         log_path=tmp_path_factory.mktemp("default_server") / "server.log")
    try:
        server.start()
        watch_memory(server, "default precision")
        yield server
    finally:
        server.stop()
        comfy_server.start()
        watch_memory(comfy_server, "fp16, restarted")


def _node_types(name: str) -> set[str]:
    graph = json.loads((WORKFLOWS / "api" / f"{name}.json").read_text(encoding="utf-8"))
    return {n["class_type"] for n in graph.values() if isinstance(n, dict) and "class_type" in n}


def test_the_cover_holds_every_node_of_the_pack(pack):
    covered = set().union(*(_node_types(n) for n in COVER)) | {SIMILARITY}
    missing = sorted(set(pack.nodes) - covered)
    assert not missing, f"add a workflow holding {missing} to COVER (or a graph of their own here)"


@pytest.fixture(scope="module")
def saved_identity(default_server, fixture_files) -> dict[str, Any]:  # noqa: F811 (the imported fixture)
    """refine_identity at the defaults: the refined identity's file, as Save Identity reports it."""
    graph = for_fixtures(q.load_api_workflow(q.resolve_workflow("refine_identity")), fixture_files)
    (refine_node,) = node_ids(graph, "HyperLoRAStudioRefineIdentity")
    entry = run_graph(default_server, graph)
    log = default_server.log_text()
    assert DEFAULT_DTYPE_LINE in log, log[-3000:]   # the failing setup
    assert "Inference tensors" not in log
    check_run(default_server, "refine_identity", graph, entry)
    (report,) = entry["outputs"][refine_node]["text"]
    m = re.search(r"before ([0-9.]+), after ([0-9.]+)", report)
    assert m and f"{REFINE_STEPS} steps" in report, report
    assert math.isfinite(float(m.group(1))) and float(m.group(2)) < float(m.group(1)), report
    assert previews(entry, graph)["Refine report (loss before and after)"] == [report]
    (save_node,) = node_ids(graph, "HyperLoRAStudioSaveIdentity")
    (written,) = entry["outputs"][save_node]["hyper_lora_files"]
    return written


def test_refine_identity_workflow_in_comfyui_started_with_its_defaults(saved_identity):
    assert saved_identity["filename"].startswith("my_face_")


@pytest.mark.parametrize("name", [n for n in COVER if n != "refine_identity"])
def test_workflow_runs_in_comfyui_started_with_its_defaults(name, default_server, fixture_files,  # noqa: F811
                                                            saved_identity):
    graph = for_fixtures(q.load_api_workflow(q.resolve_workflow(name)), fixture_files)
    if name == "identity_load":
        (load_node,) = node_ids(graph, "HyperLoRAStudioLoadIdentity")
        w = saved_identity
        graph[load_node]["inputs"]["identity_file"] = f"{w['subfolder']}/{w['filename']}" if w["subfolder"] \
            else w["filename"]
    default_server.free()       # each workflow from an empty server: their fp32 models together exceed the RAM
    before = len(default_server.log_text())
    entry = run_graph(default_server, graph)
    check_run(default_server, name, graph, entry)
    assert "Traceback" not in default_server.log_text()[before:]


def test_face_similarity_in_comfyui_started_with_its_defaults(default_server):
    """The astronaut scored against herself (the same photo: cosine 1) and a faceless photo (no face)."""
    graph = {
        "loader": loader(),
        "photo": {"class_type": "LoadImage", "inputs": {"image": FACE_FILE}},
        "blank": {"class_type": "LoadImage", "inputs": {"image": "noface.png"}},
        "batch": {"class_type": "ImageBatch", "inputs": {"image1": ["photo", 0], "image2": ["blank", 0]}},
        "score": {"class_type": SIMILARITY, "inputs": {
            "hyper_lora": ["loader", 0], "images": ["batch", 0], "reference_images": ["photo", 0],
            "face_choice": FACE["face_choice"], "face_index": 0, "det_size": FACE["det_size"]}},
        "report": {"class_type": "PreviewAny", "inputs": {"source": ["score", 1]}},
        "annotated": {"class_type": "PreviewImage", "inputs": {"images": ["score", 2]}},
    }
    default_server.free()
    entry = run_graph(default_server, graph)
    (report,) = entry["outputs"]["report"]["text"]
    lines = report.splitlines()
    assert len(lines) >= 3 and "no face" in lines[-1] and "no face" not in lines[-2], report
    score = float(re.search(r"(-?[0-9]+\.[0-9]+)", lines[-2]).group(1))
    assert score == pytest.approx(1.0, abs=1e-3), report
    assert len(entry["outputs"]["annotated"]["images"]) == 2
