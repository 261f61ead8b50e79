"""LoRA algebra (hyperlora/lora.py) against an independent float64 reference."""

from __future__ import annotations

import math

import pytest
import torch

from hyperlora.errors import LoraError
from hyperlora.lora import (
    difference,
    lora_delta,
    lora_num_params,
    lora_prefixes,
    lora_rank,
    mix_tokens,
    scale_lora,
    weighted_sum,
)
from tests.fixtures.hyperlora_models import TINY, sdxl_lora_module_specs
from tests.fixtures.loras import random_lora, random_tokens, reference_deltas, reference_normalize

MODULES = TINY.modules  # 5 modules, mixed sizes, unsorted names


def assert_deltas(lora, expected: dict[str, torch.Tensor], *, rtol: float = 1e-5) -> None:
    """Every module's dW (float64 reference of ``lora``) equals ``expected`` relative to its scale."""
    got = reference_deltas(lora)
    assert list(got) == list(expected)
    for prefix, want in expected.items():
        scale = want.abs().max().item() + 1e-12
        err = (got[prefix] - want).abs().max().item()
        assert err <= rtol * scale, f"{prefix}: max abs error {err:.3g} vs scale {scale:.3g}"


def snapshot(lora):
    return {k: v.clone() for k, v in lora.items()}


def assert_unchanged(lora, before) -> None:
    assert list(lora) == list(before)
    for k in lora:
        assert torch.equal(lora[k], before[k]), k


# ----------------------------------------------------------------- structure


def test_prefixes_rank_and_param_count():
    lora = random_lora(MODULES, rank=4)
    prefixes = lora_prefixes(lora)
    assert len(prefixes) == 4 * len(MODULES)
    assert prefixes[:4] == [f"{MODULES[0][0]}_{L}" for L in ("to_q", "to_k", "to_v", "to_out_0")]
    assert lora_rank(lora) == 4
    # to_q/to_out: hidden->hidden, to_k/to_v: cross->hidden
    want = sum(4 * ((c or h) + h) * 2 + 4 * (h + h) * 2 for _, h, c in MODULES)
    assert lora_num_params(lora) == want


def test_released_size_param_count():
    """format §4: the LoRA the released models build holds about 11.6 million numbers."""
    lora = random_lora(sdxl_lora_module_specs(), rank=8, dtype=torch.float16)
    assert lora_num_params(lora) == 11_612_160
    assert len(lora_prefixes(lora)) == 560


def test_lora_delta_matches_reference_and_default_alpha():
    lora = random_lora(MODULES, rank=4, alpha=2.0, seed=1)
    ref = reference_deltas(lora)
    for prefix, want in ref.items():
        got = lora_delta(lora, prefix)
        assert got.dtype == torch.float32 and got.shape == want.shape
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    no_alpha = random_lora(MODULES, rank=4, seed=1, with_alpha=False)
    prefix = lora_prefixes(no_alpha)[0]
    assert prefix == lora_prefixes(lora)[0]
    up = no_alpha[prefix + ".lora_up.weight"].double()
    down = no_alpha[prefix + ".lora_down.weight"].double()
    torch.testing.assert_close(lora_delta(no_alpha, prefix).double(), up @ down, rtol=1e-5, atol=1e-6)
    with pytest.raises(LoraError, match=rf"no module 'nope' \(it has 20 modules, e.g. '{prefix}'\)"):
        lora_delta(lora, "nope")
    broken = dict(lora)
    del broken[prefix + ".lora_up.weight"]
    with pytest.raises(LoraError, match=rf"no '{prefix}\.lora_up\.weight'"):
        lora_delta(broken, prefix)


# ----------------------------------------------------------------- scale / sum / difference


@pytest.mark.parametrize("s", [0.85, -1.5, 0.0, 3.0])
def test_scale_lora(s):
    lora = random_lora(MODULES, rank=4, seed=2)
    before = snapshot(lora)
    out = scale_lora(lora, s)
    assert_unchanged(lora, before)
    assert list(out) == list(lora)
    assert_deltas(out, {p: s * d for p, d in reference_deltas(lora).items()})


def test_scale_keeps_dtype_and_device():
    lora = random_lora(MODULES, rank=4, seed=3, dtype=torch.float16)
    out = scale_lora(lora, 0.5)
    assert all(out[k].dtype == torch.float16 and out[k].device == lora[k].device for k in out)
    ref = reference_deltas(lora)
    assert_deltas(out, {p: 0.5 * d for p, d in ref.items()}, rtol=2e-3)


def test_weighted_sum_equals_sum_of_weighted_deltas():
    a = random_lora(MODULES, rank=4, seed=10)
    b = random_lora(MODULES, rank=4, seed=11, alpha=3.0)
    c = random_lora(MODULES, rank=2, seed=12, with_alpha=False)  # other rank, alpha absent (= rank)
    weights = [0.5, -0.25, 1.75]
    before = [snapshot(x) for x in (a, b, c)]
    out = weighted_sum([a, b, c], weights)
    for x, snap in zip((a, b, c), before):
        assert_unchanged(x, snap)
    ra, rb, rc = reference_deltas(a), reference_deltas(b), reference_deltas(c)
    assert_deltas(out, {p: weights[0] * ra[p] + weights[1] * rb[p] + weights[2] * rc[p] for p in ra})
    # ranks concatenated, alpha = rank (scale 1), key order of LoRA 1, three keys per module
    assert lora_rank(out) == 10
    first = lora_prefixes(a)[0]
    assert out[first + ".lora_down.weight"].shape == (10, a[first + ".lora_down.weight"].shape[1])
    assert out[first + ".alpha"].item() == 10.0
    assert list(out) == list(a)


def test_weighted_sum_float64_is_exact_to_rounding():
    a = random_lora(MODULES, rank=3, seed=20, dtype=torch.float64)
    b = random_lora(MODULES, rank=5, seed=21, dtype=torch.float64)
    out = weighted_sum([a, b], [0.3, 0.7])
    assert out[lora_prefixes(out)[0] + ".lora_up.weight"].dtype == torch.float64
    ra, rb = reference_deltas(a), reference_deltas(b)
    assert_deltas(out, {p: 0.3 * ra[p] + 0.7 * rb[p] for p in ra}, rtol=1e-12)


def test_weighted_sum_mixed_dtypes_promotes():
    a = random_lora(MODULES, rank=4, seed=22, dtype=torch.float16)
    b = random_lora(MODULES, rank=4, seed=23, dtype=torch.float32)
    out = weighted_sum([a, b], [1.0, 1.0])
    assert {t.dtype for t in out.values()} == {torch.float32}
    ra, rb = reference_deltas(a), reference_deltas(b)
    assert_deltas(out, {p: ra[p] + rb[p] for p in ra})


def test_difference_then_add_restores():
    a = random_lora(MODULES, rank=4, seed=30)
    b = random_lora(MODULES, rank=4, seed=31)
    ra, rb = reference_deltas(a), reference_deltas(b)
    slider = difference(a, b, 0.7)
    assert_deltas(slider, {p: 0.7 * (ra[p] - rb[p]) for p in ra})
    restored = weighted_sum([b, difference(a, b)], [1.0, 1.0])
    assert_deltas(restored, ra)
    assert lora_rank(restored) == 12
    # a - a is zero in weight space
    zero = reference_deltas(difference(a, a, 2.0))
    assert max(d.abs().max().item() for d in zero.values()) < 1e-6


def test_single_lora_sum_is_scale():
    a = random_lora(MODULES, rank=4, seed=32)
    assert_deltas(weighted_sum([a], [2.0]), {p: 2.0 * d for p, d in reference_deltas(a).items()})


# ----------------------------------------------------------------- errors


def test_sum_refuses_missing_module_naming_the_key():
    a = random_lora(MODULES, rank=4, seed=40)
    b = random_lora(MODULES[:-1], rank=4, seed=41)
    missing = f"{MODULES[-1][0]}_to_q.lora_down.weight"
    with pytest.raises(LoraError, match=f"LoRA 2 has no '{missing}', which LoRA 1 has"):
        weighted_sum([a, b], [1, 1])
    with pytest.raises(LoraError, match=f"LoRA 2 has '{missing}', which LoRA 1 lacks"):
        weighted_sum([b, a], [1, 1])


def test_sum_refuses_other_shapes_naming_the_key():
    a = random_lora(MODULES, rank=4, seed=42)
    name, hidden, _ = MODULES[0]
    other = [(name, hidden, 77)] + list(MODULES[1:])  # other cross-attention width
    b = random_lora(other, rank=4, seed=43)
    key = f"{name}_to_k.lora_down.weight"
    with pytest.raises(LoraError, match=rf"'{key}' is \[4, 77\] in LoRA 2 but \[4, 40\] in LoRA 1"):
        weighted_sum([a, b], [1, 1])
    c = random_lora([(name, hidden + 8, None)] + list(MODULES[1:]), rank=4, seed=44)
    with pytest.raises(LoraError, match="different"):
        difference(a, c)


@pytest.mark.parametrize(
    ("loras", "weights", "message"),
    [
        ([], [], "empty list of LoRAs"),
        (["a", "a"], [1.0], "2 LoRAs but 1 weights"),
        (["a"], [float("nan")], "weight of LoRA 1 must be a finite number"),
        (["a"], ["x"], "weight of LoRA 1 must be a number"),
    ],
)
def test_sum_argument_errors(loras, weights, message):
    a = random_lora(MODULES, rank=4)
    with pytest.raises(LoraError, match=message):
        weighted_sum([a for _ in loras], weights)


def test_structure_errors_name_the_key():
    a = random_lora(MODULES, rank=4)
    prefix = lora_prefixes(a)[0]
    bad = dict(a)
    bad[prefix + ".dora_scale"] = torch.ones(1)
    with pytest.raises(LoraError, match=rf"'{prefix}\.dora_scale', which is not part of a plain kohya LoRA"):
        scale_lora(bad, 1.0)
    bad = dict(a)
    del bad[prefix + ".lora_up.weight"]
    with pytest.raises(LoraError, match=rf"no '{prefix}\.lora_up\.weight'"):
        lora_prefixes(bad)
    bad = dict(a)
    bad[prefix + ".lora_up.weight"] = torch.zeros(5, 3)
    with pytest.raises(LoraError, match="rank"):
        weighted_sum([bad], [1])
    bad = dict(a)
    bad[prefix + ".lora_down.weight"] = torch.zeros(4, 16, 1, 1)
    with pytest.raises(LoraError, match="2-D floating-point matrix"):
        lora_prefixes(bad)
    with pytest.raises(LoraError, match="no LoRA weights"):
        lora_prefixes({})
    with pytest.raises(LoraError, match="list of LoRAs"):
        weighted_sum(a, [1.0])  # type: ignore[arg-type]


# ----------------------------------------------------------------- token mixing


def reference_mix(tokens, weights):
    total = sum(weights)
    acc = sum(w / total * reference_normalize(t) for t, w in zip(tokens, weights))
    return reference_normalize(acc)


def test_mix_endpoints_and_same():
    a = random_tokens(40, 6, seed=1)
    b = random_tokens(40, 6, seed=2)
    torch.testing.assert_close(mix_tokens([a, b], [1.0, 0.0]), a, rtol=0, atol=1e-6)
    torch.testing.assert_close(mix_tokens([a, b], [0.0, 1.0]), b, rtol=0, atol=1e-6)
    torch.testing.assert_close(mix_tokens([a, a], [0.3, 0.7]), a, rtol=0, atol=1e-6)
    torch.testing.assert_close(mix_tokens([a], [5.0]), a, rtol=0, atol=1e-6)


@pytest.mark.parametrize("weights", [[0.5, 0.5], [0.2, 0.8], [2.0, 1.0, 1.0], [1.5, -0.5]])
def test_mix_matches_reference_and_is_unit_norm(weights):
    tokens = [random_tokens(1120 // 28, 128, seed=s) for s in range(len(weights))]
    got = mix_tokens(tokens, weights)
    assert got.shape == tokens[0].shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), reference_mix(tokens, weights), rtol=0, atol=1e-6)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(got.shape[0]), rtol=0, atol=1e-5)


def test_mix_weights_are_relative_and_inputs_normalised():
    a = random_tokens(16, 6, seed=3)
    b = random_tokens(16, 6, seed=4)
    torch.testing.assert_close(mix_tokens([a, b], [2, 2]), mix_tokens([a, b], [0.5, 0.5]), rtol=0, atol=1e-6)
    # un-normalised inputs are normalised first: scaling an input changes nothing
    torch.testing.assert_close(mix_tokens([3 * a, b], [0.5, 0.5]), mix_tokens([a, b], [0.5, 0.5]), rtol=0, atol=1e-6)
    # the midpoint differs from both ends (the mix does something)
    mid = mix_tokens([a, b], [0.5, 0.5])
    assert (mid - a).abs().max() > 0.05 and (mid - b).abs().max() > 0.05


def test_mix_keeps_dtype():
    a = random_tokens(8, 6, seed=5).double()
    b = random_tokens(8, 6, seed=6).double()
    out = mix_tokens([a, b], [0.5, 0.5])
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, reference_mix([a, b], [0.5, 0.5]), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("tokens", "weights", "message"),
    [
        ([], [], "empty list of identities"),
        (["a", "b"], [1.0], "2 identities but 1 weights"),
        (["a", "b"], [1.0, -1.0], "add up to 0"),
        (["a", "b"], [0.0, 0.0], "add up to 0"),
        (["a", "b"], [1.0, math.inf], "weight of identity 2 must be a finite number"),
        (["a", "c"], [0.5, 0.5], r"Identity 2 has tokens \[8, 5\] but identity 1 has \[8, 6\]"),
        (["a", "v"], [0.5, 0.5], "2-D float matrix"),
        (["a", "n"], [0.5, 0.5], "Identity 2's tokens contain NaN"),
    ],
)
def test_mix_errors(tokens, weights, message):
    pool = {
        "a": random_tokens(8, 6, seed=1),
        "b": random_tokens(8, 6, seed=2),
        "c": random_tokens(8, 5, seed=3),
        "v": torch.ones(6),
        "n": torch.full((8, 6), float("nan")),
    }
    with pytest.raises(LoraError, match=message):
        mix_tokens([pool[t] for t in tokens], weights)


def test_step_window_keyframes() -> None:
    from hyperlora.lora import step_window

    assert step_window(0.0, 1.0) == []                                   # always on: no schedule at all
    assert step_window(0.2, 1.0) == [(0.0, 0.0), (1.0, 0.2)]
    assert step_window(0.0, 0.6) == [(1.0, 0.0), (0.0, 0.6)]
    assert step_window(0.25, 0.65) == [(0.0, 0.0), (1.0, 0.25), (0.0, 0.65)]
    for start, end in ((0.5, 0.5), (0.7, 0.3)):
        with pytest.raises(LoraError, match=r"end_percent .* must be larger than start_percent"):
            step_window(start, end)
    for start, end, name in ((-0.1, 1.0, "start_percent"), (0.0, 1.5, "end_percent"), (float("nan"), 1.0, "start_percent")):
        with pytest.raises(LoraError, match=f"{name} is .* between 0 and 1"):
            step_window(start, end)
