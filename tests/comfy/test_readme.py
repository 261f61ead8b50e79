"""The README's node reference tells the truth: every node and every input that the running
ComfyUI reports for this pack is documented there, with its id."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.comfy

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_documents_every_node_and_input(comfy_server, pack):
    info = comfy_server.get_json("/object_info")
    ours = {k: v for k, v in info.items() if k in pack.nodes}
    assert set(ours) == set(pack.nodes) and len(ours) >= 12
    text = README.read_text(encoding="utf-8")
    for node_id, node in ours.items():
        head = f"### {node['display_name']} (`{node_id}`)"
        assert head in text, f"README lacks the section {head!r}"
        section = text.split(head, 1)[1].split("\n### ", 1)[0]
        for group in ("required", "optional"):
            for name in node["input"].get(group, {}):
                assert f"| `{name}`" in section, f"README's {node_id} section does not document input {name!r}"
