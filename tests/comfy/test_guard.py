"""Every registered node of the pack, found by introspection (so a node added later is covered too):
NaN and infinity on any FLOAT input and a bad filename_prefix are refused before the node runs,
with a SettingError naming the input and the node."""

from __future__ import annotations

import math
import sys
from typing import Any

import pytest

pytestmark = pytest.mark.comfy

NON_FINITE = (math.nan, math.inf, -math.inf)


@pytest.fixture(scope="module")
def guard(pack) -> Any:
    return sys.modules[f"{pack.module.__name__}.nodes.guard"]


def _call(cls: type, kwargs: dict[str, Any]) -> Any:
    if getattr(cls, "INPUT_IS_LIST", False):
        kwargs = {k: [v] for k, v in kwargs.items()}
    return getattr(cls(), cls.FUNCTION)(**kwargs)


def _float_cases(pack, guard) -> list[tuple[str, str]]:
    return [(node_id, name) for node_id, cls in sorted(pack.nodes.items()) for name in guard.float_inputs(cls)]


def test_every_registered_node_is_guarded(pack, guard):
    assert len(pack.nodes) >= 12
    for node_id, cls in pack.nodes.items():
        assert guard.is_guarded(cls), node_id


def test_the_nodes_with_float_inputs_are_found(pack, guard):
    cases = _float_cases(pack, guard)
    found = {n for n, _ in cases}
    # the FLOAT inputs known today; nodes added later join the loop below on their own
    assert {"HyperLoRAStudioApply", "HyperLoRAStudioApplyFromImages", "HyperLoRAStudioConditioning",
            "HyperLoRAStudioFaceMask", "HyperLoRAStudioMixIdentities", "HyperLoRAStudioConceptSlider"} <= found
    assert ("HyperLoRAStudioConditioning", "mask_strength") in cases          # optional inputs too
    assert ("HyperLoRAStudioMixIdentities", "weight_4") in cases


def test_every_float_input_of_every_node_refuses_nan_and_infinity(pack, guard):
    cases = _float_cases(pack, guard)
    for node_id, name in cases:
        cls = pack.nodes[node_id]
        inputs = guard.declared_inputs(cls)
        # every other input None (the node would fail on those at once), the other FLOATs at their defaults
        kwargs = {k: None for k in inputs}
        kwargs.update({k: opts.get("default", 0.0) for k, opts in guard.float_inputs(cls).items()})
        for bad in NON_FINITE:
            with pytest.raises(pack.errors.SettingError) as ei:
                _call(cls, {**kwargs, name: bad})
            msg = str(ei.value)
            display = pack.module.NODE_DISPLAY_NAME_MAPPINGS[node_id]
            assert msg.startswith(f"{display} ({node_id}): {name} is {bad}, not a finite number"), msg
            opts = guard.float_inputs(cls)[name]
            if "min" in opts and "max" in opts:
                assert f"from {opts['min']:g} to {opts['max']:g}" in msg


def test_every_filename_prefix_is_checked_at_queue_time_and_at_run_time(pack, guard):
    with_prefix = {nid: cls for nid, cls in pack.nodes.items() if guard.prefix_inputs(cls)}
    assert {"HyperLoRAStudioSaveIdentity", "HyperLoRAStudioExportLoRA"} <= set(with_prefix)
    for node_id, cls in with_prefix.items():
        assert cls.VALIDATE_INPUTS(filename_prefix="people/anna") is True
        assert cls.VALIDATE_INPUTS(filename_prefix=None) is True          # linked: checked when it runs
        for bad, problem in (("../x", "'..' part"), ("/etc/x", "absolute path"), ("", "is empty"),
                             ("a\x07b", "control character"), ("n" * 300, "longer than the file system")):
            answer = cls.VALIDATE_INPUTS(filename_prefix=bad)
            assert isinstance(answer, str) and problem in answer and "filename_prefix" in answer, (node_id, answer)
            kwargs = {k: None for k in guard.declared_inputs(cls)}
            with pytest.raises(pack.errors.SettingError, match=problem):
                _call(cls, {**kwargs, "filename_prefix": bad})


def test_a_node_registered_later_is_guarded_too(pack, guard):
    class LaterNode:
        FUNCTION = "go"
        RETURN_TYPES = ("FLOAT",)

        @classmethod
        def INPUT_TYPES(cls) -> dict:
            return {"required": {"amount": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 2.0})},
                    "optional": {"filename_prefix": ("STRING", {"default": "x"})}}

        def go(self, amount: float, filename_prefix: str = "x") -> tuple[float]:
            return (amount * 2,)

    guard.guard_node("HyperLoRAStudioLater", "HyperLoRA Studio Later", LaterNode)
    assert LaterNode().go(0.5) == (1.0,)                      # positional calls are bound by name
    with pytest.raises(pack.errors.SettingError, match=r"HyperLoRA Studio Later \(HyperLoRAStudioLater\): amount"):
        LaterNode().go(math.nan)
    with pytest.raises(pack.errors.SettingError, match="'..' part"):
        LaterNode().go(amount=1.0, filename_prefix="../up")
    guard.guard_node("HyperLoRAStudioLater", "HyperLoRA Studio Later", LaterNode)   # twice: still one wrapper
    assert LaterNode.go.__wrapped__.__name__ == "go" and not hasattr(LaterNode.go.__wrapped__, "__wrapped__")


def test_the_socket_check_and_the_prefix_check_share_validate_inputs(pack, guard):
    """Nodes with our socket types carry nodes.common.guard_sockets' VALIDATE_INPUTS(input_types); the
    prefix check joins it (ComfyUI calls one function), and list nodes get the lists ComfyUI passes."""
    import inspect

    save = pack.nodes["HyperLoRAStudioSaveIdentity"]
    assert inspect.getfullargspec(save.VALIDATE_INPUTS).args == ["node_cls", "input_types", "filename_prefix"]
    good = {"identity": "HYPERLORA_STUDIO_IDENTITY"}
    assert save.VALIDATE_INPUTS(input_types=good, filename_prefix="people/anna") is True
    assert "'..' part" in save.VALIDATE_INPUTS(input_types=good, filename_prefix="../x")
    assert "The input 'identity' is connected to a IMAGE output" in save.VALIDATE_INPUTS(
        input_types={"identity": "IMAGE"}, filename_prefix="ok")
    for node_id in ("HyperLoRAStudioIdentityFromImages", "HyperLoRAStudioApplyFromImages", "HyperLoRAStudioFaceMask"):
        cls = pack.nodes[node_id]
        assert cls.INPUT_IS_LIST is True
        right = {"hyper_lora": "HYPERLORA_STUDIO_MODEL", "images": "IMAGE"}
        assert cls.VALIDATE_INPUTS(input_types=[right]) is True, node_id          # what ComfyUI passes: a list
        msg = cls.VALIDATE_INPUTS(input_types=[{"hyper_lora": "HYPER_LORA", "images": "IMAGE"}])
        assert isinstance(msg, str) and "authors' ComfyUI-HyperLoRA plugin" in msg, node_id
