"""The face options' node inputs are made from the fields of ``FaceOptions`` (one place per option), and
the inputs saved workflows hold are unchanged (names, kinds, defaults)."""

from __future__ import annotations

import dataclasses
import sys

import pytest

pytestmark = pytest.mark.comfy

SAVED = {   # what saved workflows hold: input name -> (kind or choices, default)
    "face_choice": (["largest", "left_to_right", "index", "highest_score"], "largest"),
    "face_index": ("INT", 0),
    "remove_background": ("BOOLEAN", True),
    "grayscale": ("BOOLEAN", False),
    "no_face": (["skip", "error"], "skip"),
    "det_size": (["640", "512", "384", "256"], "640"),
}


def test_the_face_inputs_of_the_nodes_are_those_of_saved_workflows(pack):
    for node_id in ("HyperLoRAStudioIdentityFromImages", "HyperLoRAStudioApplyFromImages"):
        required = pack.nodes[node_id].INPUT_TYPES()["required"]
        for name, (kind, default) in SAVED.items():
            assert (required[name][0], required[name][1]["default"]) == (kind, default), (node_id, name)
        assert required["face_index"][1]["min"] == 0 and required["face_index"][1]["max"] == 64
    scoring = pack.nodes["HyperLoRAStudioFaceSimilarity"].INPUT_TYPES()["required"]
    assert [n for n in scoring if n in SAVED] == ["face_choice", "face_index", "det_size"]


def test_a_new_face_option_becomes_a_node_input(pack):
    common = sys.modules[pack.module.__name__ + ".nodes.common"]
    options = pack.core("faces.options")

    @dataclasses.dataclass(frozen=True)
    class WithMore(options.FaceOptions):
        blur: int = options.option(0, "How much to blur.", low=0, high=10)
        look: str = options.option("plain", "How to look.", choices=("plain", "fancy"))

    inputs = common.face_inputs(WithMore)
    assert list(inputs) == list(SAVED) + ["blur", "look"]
    assert inputs["blur"] == ("INT", {"default": 0, "min": 0, "max": 10, "step": 1, "tooltip": "How much to blur."})
    assert inputs["look"] == (["plain", "fancy"], {"default": "plain", "tooltip": "How to look."})
    got = common.face_options({"blur": 3, "look": "fancy", "det_size": "512", "images": None}, WithMore)
    assert got == WithMore(blur=3, look="fancy", det_size=512)
    assert ("blur", 3) in got.cache_key() and ("look", "fancy") in got.cache_key()
