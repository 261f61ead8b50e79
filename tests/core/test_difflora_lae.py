"""DiffLoRA's LoRA space and LoRA weights autoencoder (hyperlora/difflora/lora_space.py, lae.py).

Every identity is checked against a slow float64 reference that forms the full ``[out, in]`` matrices.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from hyperlora.difflora.lora_space import (
    LoraLayout,
    LoraModule,
    canonical_factors,
    factors,
    product_sq_error,
    relative_frobenius,
    stack_factors,
    to_lora,
)
from hyperlora.errors import LoraError
from hyperlora.lora import lora_delta

F64 = torch.float64


def _random_lora(layout: LoraLayout, gen: torch.Generator, *, alpha: float | None = None,
                 dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for m in layout.modules:
        out[m.prefix + ".lora_down.weight"] = torch.randn(m.rank, m.in_features, generator=gen).to(dtype)
        out[m.prefix + ".lora_up.weight"] = torch.randn(m.out_features, m.rank, generator=gen).to(dtype)
        if alpha is not None:
            out[m.prefix + ".alpha"] = torch.tensor(alpha, dtype=dtype)
    return out


LAYOUT = LoraLayout((LoraModule("lora_unet_a_to_q", 16, 24, 4), LoraModule("lora_unet_a_to_k", 32, 16, 4),
                     LoraModule("lora_te_b_fc", 24, 32, 4)))


# --------------------------------------------------------------------------- layout


def test_layout_of_check_and_json_round_trip():
    gen = torch.Generator().manual_seed(0)
    lora = _random_lora(LAYOUT, gen, alpha=2.0)
    layout = LoraLayout.of(lora)
    assert layout == LAYOUT
    assert layout.prefixes == ("lora_unet_a_to_q", "lora_unet_a_to_k", "lora_te_b_fc")
    assert layout.max_rank == 4 and layout.num_params == 4 * (40 + 48 + 56)
    back = LoraLayout.from_json(layout.to_json())
    assert back == layout and hash(back) == hash(layout)
    layout.check(lora)  # fits: no error


def test_layout_check_names_missing_extra_and_wrong_shape():
    gen = torch.Generator().manual_seed(1)
    lora = _random_lora(LAYOUT, gen)
    missing = {k: v for k, v in lora.items() if not k.startswith("lora_te_b_fc")}
    with pytest.raises(LoraError, match=r"no 'lora_te_b_fc\.lora_down\.weight'.*LoraLayout\.of"):
        LAYOUT.check(missing)
    extra = dict(lora, **{"lora_x.lora_down.weight": torch.zeros(4, 8), "lora_x.lora_up.weight": torch.zeros(8, 4)})
    with pytest.raises(LoraError, match=r"'lora_x\.lora_down\.weight'.*does not know"):
        LAYOUT.check(extra)
    wrong = dict(lora, **{"lora_unet_a_to_k.lora_up.weight": torch.zeros(31, 4)})
    with pytest.raises(LoraError, match=r"'lora_unet_a_to_k\.lora_up\.weight' is \[31, 4\].*\[32, 4\]"):
        LAYOUT.check(wrong)
    rank8 = dict(lora, **{"lora_te_b_fc.lora_up.weight": torch.zeros(24, 8),
                          "lora_te_b_fc.lora_down.weight": torch.zeros(8, 32)})
    with pytest.raises(LoraError, match=r"'lora_te_b_fc\.lora_up\.weight' is \[24, 8\]"):
        LAYOUT.check(rank8)


def test_layout_json_refusals():
    good = LAYOUT.to_dict()
    with pytest.raises(LoraError, match="version 2"):
        LoraLayout.from_dict(dict(good, version=2))
    with pytest.raises(LoraError, match="exactly 'format', 'version' and 'modules'"):
        LoraLayout.from_dict(dict(good, extra=1))
    bad = json.loads(json.dumps(good))
    bad["modules"][1]["rank"] = 0
    with pytest.raises(LoraError, match="'lora_unet_a_to_k' has rank = 0"):
        LoraLayout.from_dict(bad)
    with pytest.raises(LoraError, match="not valid JSON"):
        LoraLayout.from_json("{")
    dup = LAYOUT.modules + (LAYOUT.modules[0],)
    with pytest.raises(LoraError, match="twice"):
        LoraLayout(dup)


# --------------------------------------------------------------------------- factors


@pytest.mark.parametrize("alpha", [None, 2.0, 16.0, -3.0])
def test_factors_fold_alpha_and_to_lora_inverts(alpha):
    gen = torch.Generator().manual_seed(2)
    lora = _random_lora(LAYOUT, gen, alpha=alpha, dtype=F64)
    fs = factors(lora, LAYOUT)
    for m, (up, down) in zip(LAYOUT.modules, fs):
        assert up.shape == (m.out_features, m.rank) and down.shape == (m.rank, m.in_features)
        torch.testing.assert_close(up @ down, lora_delta(lora, m.prefix), rtol=1e-12, atol=1e-12)
        if alpha is not None and alpha > 0:  # the scale is split evenly: both sides carry sqrt(alpha / r)
            torch.testing.assert_close(down, lora[m.prefix + ".lora_down.weight"] * math.sqrt(alpha / m.rank))
    back = to_lora(fs, LAYOUT)
    assert set(back) == {p + s for p in LAYOUT.prefixes for s in (".lora_down.weight", ".lora_up.weight", ".alpha")}
    for m in LAYOUT.modules:
        assert float(back[m.prefix + ".alpha"]) == m.rank
        torch.testing.assert_close(lora_delta(back, m.prefix), lora_delta(lora, m.prefix), rtol=1e-12, atol=1e-12)


def test_stack_factors_batches_in_layout_order():
    gen = torch.Generator().manual_seed(3)
    loras = [_random_lora(LAYOUT, gen, alpha=4.0) for _ in range(3)]
    stacked = stack_factors(loras, LAYOUT)
    assert [tuple(u.shape) for u, _ in stacked] == [(3, 16, 4), (3, 32, 4), (3, 24, 4)]
    for b, lora in enumerate(loras):
        for (u, d), m in zip(stacked, LAYOUT.modules):
            torch.testing.assert_close(u[b] @ d[b], lora_delta(lora, m.prefix))
    with pytest.raises(LoraError, match="LoRA 2 has no 'lora_te_b_fc"):
        stack_factors([loras[0], {k: v for k, v in loras[1].items() if "te_b" not in k}], LAYOUT)


# --------------------------------------------------------------------------- canonical form


def _refactor(up: torch.Tensor, down: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(up M, M^-1 down)`` for a random well-conditioned ``M`` per batch entry."""
    r = up.shape[-1]
    m = torch.randn(*up.shape[:-2], r, r, generator=gen, dtype=up.dtype) + 3 * torch.eye(r, dtype=up.dtype)
    return up @ m, torch.linalg.solve(m, down)


def test_canonical_factors_product_and_invariance_batched():
    gen = torch.Generator().manual_seed(4)
    up = torch.randn(6, 20, 4, generator=gen, dtype=F64)
    down = torch.randn(6, 4, 28, generator=gen, dtype=F64)
    u1, d1 = canonical_factors(up, down)
    up2, down2 = _refactor(up, down, gen)
    assert not torch.allclose(up2, up)
    u2, d2 = canonical_factors(up2, down2)
    assert u1.shape == (6, 20, 4) and d1.shape == (6, 4, 28)
    torch.testing.assert_close(u1 @ d1, up @ down, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(u1, u2, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(d1, d2, rtol=1e-9, atol=1e-9)
    # a sign flip of one component (M = diag(-1, 1, 1, 1)) is undone by the sign rule
    flip = torch.diag(torch.tensor([-1.0, 1.0, 1.0, 1.0], dtype=F64))
    u3, d3 = canonical_factors(up @ flip, flip @ down)
    torch.testing.assert_close(u3, u1, rtol=1e-10, atol=1e-10)
    # the form itself: orthogonal components, balanced norms, descending, largest up entry positive
    gram_u = u1.transpose(-1, -2) @ u1
    gram_d = d1 @ d1.transpose(-1, -2)
    torch.testing.assert_close(gram_u, gram_d, rtol=1e-9, atol=1e-9)
    diag = torch.diagonal(gram_u, dim1=-2, dim2=-1)
    torch.testing.assert_close(gram_u, torch.diag_embed(diag), rtol=1e-9, atol=1e-9)
    assert bool((diag[:, :-1] >= diag[:, 1:]).all())
    top = torch.gather(u1, -2, u1.abs().argmax(-2, keepdim=True))
    assert bool((top > 0).all())


def test_canonical_factors_rank_above_min_size_pads_zero_components():
    gen = torch.Generator().manual_seed(5)
    up, down = torch.randn(3, 6, generator=gen, dtype=F64), torch.randn(6, 10, generator=gen, dtype=F64)
    u, d = canonical_factors(up, down)
    assert u.shape == (3, 6) and d.shape == (6, 10)
    torch.testing.assert_close(u @ d, up @ down, rtol=1e-10, atol=1e-10)
    assert float(u[:, 3:].abs().max()) == 0.0 and float(d[3:].abs().max()) == 0.0


# --------------------------------------------------------------------------- invariant errors


def test_product_sq_error_matches_full_matrix_reference_and_is_invariant():
    gen = torch.Generator().manual_seed(6)
    ua, da = torch.randn(5, 24, 4, generator=gen, dtype=F64), torch.randn(5, 4, 16, generator=gen, dtype=F64)
    ub, db = torch.randn(5, 24, 3, generator=gen, dtype=F64), torch.randn(5, 3, 16, generator=gen, dtype=F64)
    ref = ((ua @ da - ub @ db) ** 2).sum(dim=(-1, -2))
    got = product_sq_error(ua, da, ub, db)
    assert got.shape == (5,)
    torch.testing.assert_close(got, ref, rtol=1e-11, atol=1e-9)
    ua2, da2 = _refactor(ua, da, gen)
    ub2, db2 = _refactor(ub, db, gen)
    torch.testing.assert_close(product_sq_error(ua2, da2, ub2, db2), ref, rtol=1e-9, atol=1e-8)
    assert float(product_sq_error(ua, da, ua2, da2).max()) < 1e-13 * float(ref.max())  # rounding of a 0
    rel = relative_frobenius(ua, da, ub, db)
    torch.testing.assert_close(rel, ref.sqrt() / (ua @ da).flatten(1).norm(dim=1), rtol=1e-10, atol=1e-12)


def test_product_sq_error_gradient_matches_reference():
    gen = torch.Generator().manual_seed(7)
    ua, da = torch.randn(12, 3, generator=gen, dtype=F64), torch.randn(3, 9, generator=gen, dtype=F64)
    ub = torch.randn(12, 3, generator=gen, dtype=F64, requires_grad=True)
    db = torch.randn(3, 9, generator=gen, dtype=F64, requires_grad=True)
    product_sq_error(ua, da, ub, db).backward()
    g_fast = (ub.grad.clone(), db.grad.clone())
    ub.grad = db.grad = None
    ((ua @ da - ub @ db) ** 2).sum().backward()
    torch.testing.assert_close(g_fast[0], ub.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(g_fast[1], db.grad, rtol=1e-10, atol=1e-10)
