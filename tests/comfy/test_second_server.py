"""A second ComfyUI (no SDXL is loaded in it), started the way users break and extend things:

* ``PYTHONPATH`` points at a directory whose ``insightface/__init__.py`` raises ImportError, as a
  missing or broken wheel does: the pack still loads and lists every node, and a face node says
  how to install insightface;
* ``--extra-model-paths-config`` adds a ``hyper_lora`` and a ``hyper_lora_identities`` folder
  elsewhere: the dropdowns list what is there, beside the default folders.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import pytest

from tests.comfy import graphs as g
from hyperlora import errors
from tests.comfy.client import ComfyServer, execution_error, free_port, raised
from tests.comfy.test_http import EXPECTED
from tests.fixtures.hyperlora_models import write_hyperlora_folder

pytestmark = pytest.mark.comfy

EXTRA_MODEL = "model_from_extra_paths"
EXTRA_IDENTITY = "someone_from_extra_paths.safetensors"
BLOCKER = 'raise ImportError("insightface is blocked for this test (simulating a missing or broken wheel)")\n'


@pytest.fixture(scope="module")
def server(comfy_root: Path, comfy_base: SimpleNamespace, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComfyServer]:
    blocked = tmp_path_factory.mktemp("no_insightface")
    (blocked / "insightface").mkdir()
    (blocked / "insightface" / "__init__.py").write_text(BLOCKER, encoding="utf-8")
    extra = blocked / "elsewhere"
    write_hyperlora_folder(extra / "my_models" / EXTRA_MODEL, preset="tiny", seed=5)   # no hyper_lora/ level
    (extra / "my_identities").mkdir(parents=True)
    (extra / "my_identities" / EXTRA_IDENTITY).write_bytes(
        (comfy_base.base / "models" / "hyper_lora" / "hyper_lora" / "tiny" / "id_projector.safetensors").read_bytes())
    yaml = blocked / "extra_model_paths.yaml"
    yaml.write_text(f"elsewhere:\n    base_path: {extra}\n    hyper_lora: my_models/\n"
                    f"    hyper_lora_identities: my_identities/\n", encoding="utf-8")
    s = ComfyServer(root=comfy_root, base=comfy_base.base, port=free_port(), log_path=blocked / "server.log",
                    extra_env={"PYTHONPATH": str(blocked)},
                    extra_args=("--extra-model-paths-config", str(yaml)))
    s.start()
    try:
        yield s
    finally:
        s.stop()


def test_nodes_list_without_insightface(server: ComfyServer):
    info = server.get_json("/object_info")
    assert set(EXPECTED) <= set(info)
    assert "IMPORT FAILED" not in next(ln for ln in server.log_text().splitlines()
                                       if ln.rstrip().endswith("ComfyUI-HyperLoRA-Studio") and "seconds" in ln)


def test_face_node_says_how_to_install_insightface(server: ComfyServer):
    p = {"hl": g.loader(), "img": g.load_image("astronaut.png"), "id": g.identity("hl", ["img", 0]),
         "save": {"class_type": "HyperLoRAStudioSaveIdentity", "inputs": {"identity": ["id", 0], "filename_prefix": "x"}}}
    entry = server.wait(server.post_prompt(p))
    assert entry["status"]["status_str"] == "error"
    err = execution_error(entry)
    assert err is not None and err["node_type"] == "HyperLoRAStudioIdentityFromImages"
    assert raised(err, errors.DependencyError), err["exception_type"]
    assert "pip install insightface" in err["exception_message"]
    assert "blocked for this test" in err["exception_message"] or "insightface" in err["exception_message"]


def test_extra_model_paths_entries_are_listed(server: ComfyServer):
    info = server.get_json("/object_info")
    models = info["HyperLoRAStudioLoader"]["input"]["required"]["model"][0]
    assert EXTRA_MODEL in models and {"sdxl_small", "tiny"} <= set(models)
    assert models.index(EXTRA_MODEL) < models.index("sdxl_small")   # the user's folders come first
    identities = info["HyperLoRAStudioLoadIdentity"]["input"]["required"]["identity_file"][0]
    assert EXTRA_IDENTITY in identities
