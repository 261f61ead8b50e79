"""Without insightface the pack still loads and lists every node; face nodes say how to install it.

A second ComfyUI (no SDXL is loaded in it) runs with ``PYTHONPATH`` pointing at a directory
whose ``insightface/__init__.py`` raises ImportError, as a missing or broken wheel does.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import pytest

from tests.comfy import graphs as g
from tests.comfy.client import ComfyServer, execution_error, free_port
from tests.comfy.test_http import EXPECTED

pytestmark = pytest.mark.comfy

BLOCKER = 'raise ImportError("insightface is blocked for this test (simulating a missing or broken wheel)")\n'


@pytest.fixture(scope="module")
def server(comfy_root: Path, comfy_base: SimpleNamespace, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComfyServer]:
    blocked = tmp_path_factory.mktemp("no_insightface")
    (blocked / "insightface").mkdir()
    (blocked / "insightface" / "__init__.py").write_text(BLOCKER, encoding="utf-8")
    s = ComfyServer(root=comfy_root, base=comfy_base.base, port=free_port(), log_path=blocked / "server.log",
                    extra_env={"PYTHONPATH": str(blocked)})
    s.start()
    try:
        yield s
    finally:
        s.stop()


def test_nodes_list_without_insightface(server: ComfyServer):
    info = server.get_json("/object_info")
    assert set(EXPECTED) <= set(info)
    assert "IMPORT FAILED" not in next(ln for ln in server.log_text().splitlines()
                                       if ln.rstrip().endswith("ComfyUI-HyperLoRA") and "seconds" in ln)


def test_face_node_says_how_to_install_insightface(server: ComfyServer):
    p = {"hl": g.loader(), "img": g.load_image("astronaut.png"), "id": g.identity("hl", ["img", 0]),
         "save": {"class_type": "HyperLoRASaveIdentity", "inputs": {"identity": ["id", 0], "filename_prefix": "x"}}}
    entry = server.wait(server.post_prompt(p))
    assert entry["status"]["status_str"] == "error"
    err = execution_error(entry)
    assert err is not None and err["node_type"] == "HyperLoRAIdentityFromImages"
    assert err["exception_type"].endswith("DependencyError")
    assert "pip install insightface" in err["exception_message"]
    assert "blocked for this test" in err["exception_message"] or "insightface" in err["exception_message"]
