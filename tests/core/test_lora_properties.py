"""Randomised (hypothesis) checks of the LoRA algebra, token mixing and the file round trips.

Shapes, ranks, alphas, weights and value scales are drawn by hypothesis; tensor
values come from a drawn seed.  Every dW is compared with the float64 reference
of tests/fixtures/loras.py.  Derandomised, so CI runs the same examples each time.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is in the test extra: pip install -e .[test]")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from hyperlora.identity import Identity, load_identity, save_identity  # noqa: E402
from hyperlora.lora import (  # noqa: E402
    difference,
    lora_rank,
    mix_tokens,
    normalize_tokens,
    scale_lora,
    weighted_sum,
)
from hyperlora.lora_file import load_lora_file, save_lora_file  # noqa: E402
from tests.fixtures.loras import random_lora, reference_deltas, reference_normalize  # noqa: E402

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, database=None)

modules_st = st.lists(
    st.tuples(st.integers(1, 12), st.one_of(st.none(), st.integers(1, 12))), min_size=1, max_size=3
).map(lambda specs: [(f"lora_unet_m{i}_attn", h, c) for i, (h, c) in enumerate(specs)])
weight_st = st.floats(-3.0, 3.0, allow_nan=False, allow_infinity=False)


@st.composite
def loras_st(draw, modules, *, n_min: int = 1, n_max: int = 4, dtype=torch.float64, scales=(-2, 2)):
    """``n`` random LoRAs over the same modules with their own rank, alpha (or none) and value scale."""
    n = draw(st.integers(n_min, n_max))
    out = []
    for _ in range(n):
        rank = draw(st.integers(1, 5))
        with_alpha = draw(st.booleans())
        alpha = draw(st.floats(0.25, 16.0)) if with_alpha else None
        lora = random_lora(modules, rank=rank, alpha=alpha, with_alpha=with_alpha,
                           seed=draw(st.integers(0, 2**31 - 1)), dtype=dtype)
        scale = 10.0 ** draw(st.integers(*scales))
        out.append({k: (v * scale if k.endswith(".lora_up.weight") else v) for k, v in lora.items()})
    return out


def assert_close_deltas(got_lora, terms: list[tuple[float, dict[str, torch.Tensor]]], *, rtol: float = 1e-10):
    """dW of ``got_lora`` == sum_j w_j * ref_j, with tolerance relative to sum_j |w_j| * max|ref_j|."""
    got = reference_deltas(got_lora)
    for prefix, dw in got.items():
        want = sum(w * ref[prefix] for w, ref in terms)
        bound = sum(abs(w) * ref[prefix].abs().max().item() for w, ref in terms) + 1e-300
        err = (dw - want).abs().max().item()
        assert err <= rtol * bound, f"{prefix}: error {err:.3g} vs bound {bound:.3g}"


@SETTINGS
@given(data=st.data(), modules=modules_st)
def test_weighted_sum_is_exact(data, modules):
    loras = data.draw(loras_st(modules))
    weights = data.draw(st.lists(weight_st, min_size=len(loras), max_size=len(loras)))
    out = weighted_sum(loras, weights)
    assert_close_deltas(out, [(w, reference_deltas(x)) for w, x in zip(weights, loras)])
    assert lora_rank(out) == sum(lora_rank(x) for x in loras)


@SETTINGS
@given(data=st.data(), modules=modules_st, s=weight_st)
def test_scaling_is_linear(data, modules, s):
    loras = data.draw(loras_st(modules))
    weights = data.draw(st.lists(weight_st, min_size=len(loras), max_size=len(loras)))
    lhs = scale_lora(weighted_sum(loras, weights), s)
    rhs_terms = [(s * w, reference_deltas(x)) for w, x in zip(weights, loras)]
    assert_close_deltas(lhs, rhs_terms)


@SETTINGS
@given(data=st.data(), modules=modules_st)
def test_sum_is_order_independent(data, modules):
    loras = data.draw(loras_st(modules, n_min=2))
    weights = data.draw(st.lists(weight_st, min_size=len(loras), max_size=len(loras)))
    perm = data.draw(st.permutations(range(len(loras))))
    a = reference_deltas(weighted_sum(loras, weights))
    b = weighted_sum([loras[i] for i in perm], [weights[i] for i in perm])
    assert_close_deltas(b, [(1.0, a)])


@SETTINGS
@given(data=st.data(), modules=modules_st, s=weight_st)
def test_difference_antisymmetric_and_restores(data, modules, s):
    a, b = data.draw(loras_st(modules, n_min=2, n_max=2))
    ra, rb = reference_deltas(a), reference_deltas(b)
    assert_close_deltas(difference(a, b, s), [(s, ra), (-s, rb)])
    assert_close_deltas(difference(b, a, s), [(-s, ra), (s, rb)])
    assert_close_deltas(weighted_sum([difference(a, b, s), b], [1.0, s]), [(s, ra)])


@SETTINGS
@given(data=st.data(), modules=modules_st)
def test_fp16_sum_keeps_dtype_and_is_close(data, modules):
    # fp16 keeps ~3 digits only for values of normal size: weights and values stay away from its subnormals
    loras = data.draw(loras_st(modules, dtype=torch.float16, scales=(0, 1)))
    fp16_weight = st.one_of(st.just(0.0), st.floats(0.1, 3.0), st.floats(-3.0, -0.1))
    weights = data.draw(st.lists(fp16_weight, min_size=len(loras), max_size=len(loras)))
    out = weighted_sum(loras, weights)
    assert {t.dtype for t in out.values()} == {torch.float16}
    assert_close_deltas(out, [(w, reference_deltas(x)) for w, x in zip(weights, loras)], rtol=5e-3)


# ----------------------------------------------------------------- token mixing


@st.composite
def tokens_st(draw, *, n_min: int = 1, n_max: int = 4):
    q, k = draw(st.integers(1, 24)), draw(st.integers(1, 16))
    n = draw(st.integers(n_min, n_max))
    seeds = draw(st.lists(st.integers(0, 2**31 - 1), min_size=n, max_size=n))
    tokens = []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        tokens.append(torch.randn(q, k, generator=g) * 10.0 ** draw(st.integers(-2, 2)))
    return tokens


def weights_for(data, n: int) -> list[float]:
    ws = data.draw(st.lists(st.floats(-2.0, 2.0, allow_nan=False), min_size=n, max_size=n))
    hypothesis.assume(abs(math.fsum(ws)) > 0.05)
    return ws


@SETTINGS
@given(data=st.data(), tokens=tokens_st())
def test_mix_matches_reference_and_is_unit_norm(data, tokens):
    ws = weights_for(data, len(tokens))
    got = mix_tokens(tokens, ws)
    total = math.fsum(ws)
    acc = sum((w / total) * reference_normalize(t) for t, w in zip(tokens, ws))
    want = reference_normalize(acc)
    strong = acc.norm(dim=-1) > 1e-2  # tokens that do not (almost) cancel out
    torch.testing.assert_close(got.double()[strong], want[strong], rtol=0, atol=2e-5)
    torch.testing.assert_close(got.norm(dim=-1)[strong], torch.ones(int(strong.sum())), rtol=0, atol=1e-5)
    assert bool(torch.isfinite(got).all())


@SETTINGS
@given(data=st.data(), tokens=tokens_st(n_min=2), c=st.sampled_from([0.1, 3.0, -1.0, -7.5]))
def test_mix_ignores_weight_scale_and_order(data, tokens, c):
    ws = weights_for(data, len(tokens))
    base = mix_tokens(tokens, ws)
    torch.testing.assert_close(mix_tokens(tokens, [c * w for w in ws]), base, rtol=0, atol=1e-5)
    perm = data.draw(st.permutations(range(len(tokens))))
    torch.testing.assert_close(mix_tokens([tokens[i] for i in perm], [ws[i] for i in perm]), base, rtol=0, atol=1e-5)


@SETTINGS
@given(data=st.data(), tokens=tokens_st(n_min=2))
def test_mix_endpoints_and_same_identity(data, tokens):
    # identities hold normalised tokens (format §5.4); for those mix([a, b], [1, 0]) == a
    tokens = [(t.double() / t.double().norm(dim=-1, keepdim=True)).float() for t in tokens]
    j = data.draw(st.integers(0, len(tokens) - 1))
    one_hot = [1.0 if i == j else 0.0 for i in range(len(tokens))]
    want = tokens[j]
    torch.testing.assert_close(mix_tokens(tokens, one_hot), want, rtol=0, atol=1e-6)
    ws = [abs(w) + 0.1 for w in data.draw(st.lists(weight_st, min_size=len(tokens), max_size=len(tokens)))]
    torch.testing.assert_close(mix_tokens([tokens[j]] * len(tokens), ws), want, rtol=0, atol=1e-6)


# ----------------------------------------------------------------- files


@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(data=st.data(), modules=modules_st)
def test_lora_file_round_trip(data, modules):
    (lora,) = data.draw(loras_st(modules, n_min=1, n_max=1, dtype=torch.float32))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.safetensors"
        save_lora_file(lora, path, dtype=None)
        back = load_lora_file(path)
    assert set(back) == set(lora)
    assert all(torch.equal(back[k], lora[k]) for k in lora)


@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(tokens=tokens_st(n_min=1, n_max=2), name=st.text(max_size=30),
       extra=st.dictionaries(st.text(max_size=10), st.text(max_size=20), max_size=4), n=st.integers(0, 1000))
def test_identity_round_trip(tokens, name, extra, n):
    tokens = [normalize_tokens(t) for t in tokens]           # identities hold unit tokens, as the resampler makes them
    ident = Identity(tokens=tokens[0], base_tokens=tokens[1] if len(tokens) > 1 else None,
                     model_name=name, model_fingerprint=name[::-1], num_images=n, settings=extra)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "id.safetensors"
        save_identity(ident, path)
        back = load_identity(path)
    assert torch.equal(back.tokens, ident.tokens)
    assert (back.base_tokens is None) == (ident.base_tokens is None)
    if back.base_tokens is not None:
        assert torch.equal(back.base_tokens, ident.base_tokens)
    assert (back.model_name, back.model_fingerprint, back.num_images, back.settings) == (name, name[::-1], n, extra)
