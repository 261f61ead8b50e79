"""hyperlora.checks: finite numbers and file-name prefixes, and the CLI options that use them."""

from __future__ import annotations

import math

import pytest

from hyperlora.checks import (COUNTER_SUFFIX_BYTES, MAX_NAME_BYTES, check_filename_prefix, check_finite,
                              longest_prefix_name,
                              finite_float, is_finite_number)
from hyperlora.errors import QueueError, SettingError
from hyperlora.tools import queue as q
from hyperlora.tools.queue_graph import apply_override, fill_workflow

NON_FINITE = [math.nan, math.inf, -math.inf, float("nan")]


@pytest.mark.parametrize("value", NON_FINITE + ["0.5", None, [1.0]])
def test_check_finite_refuses_and_names_the_setting(value):
    with pytest.raises(SettingError) as ei:
        check_finite(value, "strength", where="HyperLoRA Studio Apply (HyperLoRAStudioApply)", low=-4, high=4,
                     default=0.85)
    msg = str(ei.value)
    assert msg.startswith("HyperLoRA Studio Apply (HyperLoRAStudioApply): strength is ")
    assert "from -4 to 4 (default 0.85)" in msg and "check the node it comes from" in msg


@pytest.mark.parametrize("value", [0, 0.85, -4.0, 1e300, True])
def test_check_finite_passes_numbers(value):
    assert check_finite(value, "x") == float(value)
    assert is_finite_number(value)


def test_check_finite_without_a_node_has_no_link_hint():
    msg = str(pytest.raises(SettingError, check_finite, math.nan, "strength (--strength)").value)
    assert msg.startswith("strength (--strength) is nan, not a finite number") and "link" not in msg


@pytest.mark.parametrize("prefix", ["identity", "people/anna", "hyperlora/identity", "a b/c-d_e.f", "ü/名前",
                                    "x" * longest_prefix_name(), "./x", "a\\b"])
def test_good_prefixes_pass(prefix):
    assert check_filename_prefix(prefix) == prefix


@pytest.mark.parametrize("prefix,problem", [
    ("", "is empty"),
    ("   ", "is empty"),
    ("../x", "has a '..' part"),
    ("people/../../x", "has a '..' part"),
    ("a\\..\\b", "has a '..' part"),
    ("/tmp/x", "is an absolute path"),
    ("\\\\server\\share\\x", "is an absolute path"),
    ("C:x", "is an absolute path"),
    ("c:\\x", "is an absolute path"),
    ("people/", "ends with a folder separator"),
    ("a\nb", "contains the control character '\\n' (position 2)"),
    ("a\x00b", "control character"),
    ("tab\there", "control character"),
    ("x" * (longest_prefix_name() + 1), "longer than the file system allows"),
    ("x" * (MAX_NAME_BYTES - COUNTER_SUFFIX_BYTES), "longer than the file system allows"),   # no room for the temp
    (".", "starting with '.', which would write a hidden file"),
    ("people/.anna", "starting with '.', which would write a hidden file"),
    ("é" * 200, "longer than the file system allows"),          # 400 bytes in UTF-8
    ("x" * 300 + "/name", "longer than the file system allows"),
])
def test_bad_prefixes_are_refused_naming_the_input_and_the_form(prefix, problem):
    with pytest.raises(SettingError) as ei:
        check_filename_prefix(prefix, where="HyperLoRA Studio Save Identity (HyperLoRAStudioSaveIdentity)")
    msg = str(ei.value)
    assert msg.startswith("HyperLoRA Studio Save Identity (HyperLoRAStudioSaveIdentity): filename_prefix ")
    assert problem in msg
    assert "Use a relative name such as 'identity' or 'people/anna'" in msg
    assert len(msg) < 700      # a 300-character prefix is shortened in the message


def test_prefix_must_be_text():
    with pytest.raises(SettingError, match="filename_prefix is a int, not text"):
        check_filename_prefix(5)


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "NaN", "Infinity"])
def test_finite_float_argparse_type(text):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match="not a finite number"):
        finite_float(text)
    assert finite_float("0.85") == 0.85


@pytest.mark.parametrize("value", ["nan", "inf", "-Infinity"])
def test_queue_cli_refuses_a_non_finite_strength_naming_the_option(value, capsys):
    with pytest.raises(SystemExit) as ei:
        q.main(["--workflow", "t2i_one_photo", f"--strength={value}"])
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert "argument --strength:" in err and "not a finite number" in err


def test_queue_cli_refuses_a_non_finite_timeout(capsys):
    with pytest.raises(SystemExit):
        q.main(["--workflow", "t2i_one_photo", "--timeout", "nan"])
    assert "argument --timeout:" in capsys.readouterr().err


def test_queue_library_and_set_refuse_non_finite_values():
    graph = q.load_api_workflow(q.resolve_workflow("t2i_one_photo"))
    with pytest.raises(SettingError, match=r"strength \(--strength\) is nan"):
        fill_workflow(graph, strength=math.nan)
    for raw in ("NaN", "Infinity", "-Infinity"):
        with pytest.raises(QueueError, match=f"--set 'Sampler.cfg={raw}': {raw} is not a finite number"):
            apply_override(graph, f"Sampler.cfg={raw}")
    apply_override(graph, "Sampler (authors' settings).cfg=4.5")     # finite values still go through
    assert [n["inputs"]["cfg"] for n in graph.values() if n["class_type"] == "KSampler"] == [4.5]
