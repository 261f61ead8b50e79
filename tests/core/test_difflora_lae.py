"""DiffLoRA's LoRA space and LoRA weights autoencoder (hyperlora/difflora/lora_space.py, lae.py).

Every identity is checked against a slow float64 reference that forms the full ``[out, in]`` matrices.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from hyperlora.difflora.lae import LaeConfig, LoraAutoencoder
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
from hyperlora.errors import LoraError, SettingError
from hyperlora.lora import lora_delta

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: one thread is several times faster than two fighting over a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    assert LoraLayout(list(layout.modules)) == layout  # a list is stored as a tuple (hashable)
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
    torch.testing.assert_close(d3, d1, rtol=1e-10, atol=1e-10)
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


# --------------------------------------------------------------------------- the LAE


SMALL = LaeConfig(latent_channels=8, width=32, depth=1, heads=4)


def test_lae_config_json_round_trip_and_refusals():
    cfg = LaeConfig(tokens_per_module=2, latent_channels=4, width=48, depth=3, heads=6, share_projections=True,
                    regulariser="latent_norm", regulariser_weight=0.01)
    assert LaeConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert LaeConfig.from_dict({}) == LaeConfig()
    with pytest.raises(SettingError, match=r"unknown field\(s\) \['latent_size'\]"):
        LaeConfig.from_dict({"latent_size": 4})
    with pytest.raises(SettingError, match="width \\(30\\) must be divisible by heads \\(4\\)"):
        LaeConfig(width=30, heads=4)
    with pytest.raises(SettingError, match="regulariser is 'l1'"):
        LaeConfig(regulariser="l1")
    with pytest.raises(SettingError, match="depth is 0"):
        LaeConfig(depth=0)


def test_lae_shapes_mixed_ranks_shared_projections_and_lora_output():
    layout = LoraLayout((LoraModule("lora_a", 16, 24, 4), LoraModule("lora_b", 16, 24, 4),
                         LoraModule("lora_c", 8, 12, 2)))
    gen = torch.Generator().manual_seed(8)
    loras = [_random_lora(layout, gen, alpha=1.0) for _ in range(3)]
    torch.manual_seed(0)
    own = LoraAutoencoder(LaeConfig(tokens_per_module=2, latent_channels=5, width=32, depth=1, heads=4), layout)
    shared = LoraAutoencoder(LaeConfig(tokens_per_module=2, latent_channels=5, width=32, depth=1, heads=4,
                                       share_projections=True), layout)
    assert len(own.enc_in) == 3 and len(shared.enc_in) == 2  # lora_a and lora_b share one map
    n_own = sum(p.numel() for p in own.parameters())
    n_shared = sum(p.numel() for p in shared.parameters())
    assert n_own - n_shared == (40 * 32 + 32) + (32 * 40 + 40)  # one input map and one head fewer
    for lae in (own, shared):
        z = lae.encode(loras)
        assert z.shape == (3, 6, 5) and lae.num_tokens == 6 and lae.latent_shape == (6, 5)
        fs = lae.decode(z)
        assert [tuple(u.shape) for u, _ in fs] == [(3, 16, 4), (3, 16, 4), (3, 8, 2)]
        assert [tuple(d.shape) for _, d in fs] == [(3, 4, 24), (3, 4, 24), (3, 2, 12)]
        out = lae.decode_loras(z)
        assert len(out) == 3
        for lora in out:
            layout.check(lora)
        with pytest.raises(LoraError, match=r"decodes latents \[B, 6, 5\], got \[3, 3, 5\]"):
            lae.decode(z[:, :3])
    with pytest.raises(LoraError, match="no 'lora_c.lora_down.weight'"):
        own.encode([{k: v for k, v in loras[0].items() if not k.startswith("lora_c")}])


def test_decoder_flops_by_hand_and_against_torch_flop_counter():
    """``decoder_flops``: a count by hand for a layout small enough, then torch's FLOP counter on the decoder
    (train mode, math attention: the fused inference path hides its products from the counter) for mixed ranks,
    with and without shared heads, batch 1 and 3.  Stated tolerance: exact (the count follows the counter's rules)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from hyperlora.difflora.lae import decoder_flops

    layout = LoraLayout((LoraModule("a", 16, 24, 4), LoraModule("b", 32, 16, 2)))
    cfg = LaeConfig(tokens_per_module=2, latent_channels=4, width=32, depth=1, heads=2)
    # T = 4 tokens: from_latent 2*4*4*32 = 1024; layer: qkv 2*4*32*96 = 24576, scores + sum 2*(2*4*4*32) = 2048,
    # out 2*4*32*32 = 8192, feed-forward 2*(2*4*32*128) = 65536; dec_mix 2 modules x 2*64*128 = 32768;
    # heads: a 2*4*32*40 = 10240, b 2*2*32*48 = 6144
    by_hand = 1024 + 24576 + 2048 + 8192 + 65536 + 32768 + 10240 + 6144
    assert decoder_flops(cfg, layout) == by_hand == 150528
    assert decoder_flops(cfg, layout, 3) == 3 * by_hand and decoder_flops(cfg, layout, 0) == 0
    with pytest.raises(SettingError, match="batch is -1"):
        decoder_flops(cfg, layout, -1)

    mixed = LoraLayout((LoraModule("lora_a", 16, 24, 4), LoraModule("lora_b", 16, 24, 4),
                        LoraModule("lora_c", 8, 12, 2)))
    for config in (LaeConfig(tokens_per_module=2, latent_channels=5, width=32, depth=2, heads=4),
                   LaeConfig(tokens_per_module=1, latent_channels=3, width=16, depth=1, heads=2,
                             share_projections=True)):
        torch.manual_seed(0)
        lae = LoraAutoencoder(config, mixed).train()
        for batch in (1, 3):
            z = torch.randn(batch, *lae.latent_shape)
            with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
                lae.decode_loras(z)
            assert decoder_flops(config, mixed, batch) == counter.get_total_flops()


def test_lae_latent_is_invariant_to_refactorisation_and_alpha():
    gen = torch.Generator().manual_seed(9)
    lora = _random_lora(LAYOUT, gen, alpha=2.0, dtype=F64)
    torch.manual_seed(1)
    lae = LoraAutoencoder(SMALL, LAYOUT).double()
    z = lae.encode([lora])
    # the same dW with alpha = rank and a refactorised (up M, M^-1 down)
    other: dict[str, torch.Tensor] = {}
    for m in LAYOUT.modules:
        up, down = factors(lora, LAYOUT)[LAYOUT.prefixes.index(m.prefix)]
        up2, down2 = _refactor(up, down, gen)
        other.update({m.prefix + ".lora_up.weight": up2, m.prefix + ".lora_down.weight": down2,
                      m.prefix + ".alpha": torch.tensor(float(m.rank), dtype=F64)})
    torch.testing.assert_close(lae.encode([other]), z, rtol=1e-8, atol=1e-8)
    # a genuinely different LoRA does get another latent
    assert float((lae.encode([_random_lora(LAYOUT, gen, dtype=F64)]) - z).detach().abs().max()) > 1e-3


def test_lae_loss_matches_full_matrix_reference():
    gen = torch.Generator().manual_seed(10)
    loras = [_random_lora(LAYOUT, gen, alpha=8.0, dtype=F64) for _ in range(4)]
    torch.manual_seed(2)
    lae = LoraAutoencoder(LaeConfig(latent_channels=8, width=32, depth=1, heads=4, regulariser="none"),
                          LAYOUT).double()
    lae.calibrate(loras)
    lae.eval()
    got = lae.loss(loras)
    with torch.no_grad():
        rec = lae.decode(lae.encode(loras))
    ref = []
    for m, (u, d) in zip(LAYOUT.modules, rec):
        for b, lora in enumerate(loras):
            target = lora_delta(lora, m.prefix)
            ref.append(((target - u[b] @ d[b]) ** 2).sum() / (target ** 2).sum())
    torch.testing.assert_close(got.reconstruction, torch.stack(ref).mean(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got.total, got.reconstruction)
    assert float(got.regulariser) == 0.0
    # the latent-norm regulariser is the weighted mean square of the latent
    lae2 = LoraAutoencoder(LaeConfig(latent_channels=8, width=32, depth=1, heads=4, regulariser="latent_norm",
                                     regulariser_weight=0.5), LAYOUT).double()
    l2 = lae2.loss(loras)
    torch.testing.assert_close(l2.regulariser, lae2.encode(loras).square().mean())
    torch.testing.assert_close(l2.total, l2.reconstruction + 0.5 * l2.regulariser)
    # the report is the relative Frobenius error of the weight deltas, per module
    rep = lae.reconstruction_report(loras)
    assert set(rep) == {"modules", "per_lora", "mean", "max"} and list(rep["modules"]) == list(LAYOUT.prefixes)
    want = [float(torch.stack([(lora_delta(lo, m.prefix) - u[b] @ d[b]).norm() / lora_delta(lo, m.prefix).norm()
                               for b, lo in enumerate(loras)]).mean()) for m, (u, d) in zip(LAYOUT.modules, rec)]
    assert rep["modules"] == pytest.approx(dict(zip(LAYOUT.prefixes, want)), rel=1e-9)
    assert rep["mean"] == pytest.approx(sum(want) / 3, rel=1e-9) and len(rep["per_lora"]) == 4


# --------------------------------------------------------------------------- training on a synthetic family

FAMILY_DIM = 3
FAMILY_SPREAD = 0.3
TRAINED_BOUND = 0.2
"""Held-out mean relative Frobenius error the trained LAE must reach (measured 0.10; untrained: 1.00)."""


def _family(n: int, gen: torch.Generator, base: list[tuple[torch.Tensor, torch.Tensor]]):
    """``n`` members of a 3-parameter LoRA family (``dW`` quadratic in the parameters), each stored with a random
    refactorisation ``(up M, M^-1 down)`` so only the product carries information."""
    c = torch.cat([torch.ones(n, 1), FAMILY_SPREAD * torch.randn(n, FAMILY_DIM, generator=gen)], 1)
    out = []
    for u_basis, d_basis in base:
        up = torch.einsum("nk,kor->nor", c, u_basis)
        down = torch.einsum("nk,kri->nri", c, d_basis)
        out.append(_refactor(up, down, gen))
    return out


@pytest.fixture(scope="module")
def family():
    gen = torch.Generator().manual_seed(11)
    base = []
    for m in LAYOUT.modules:  # a centre with distinct singular values, plus 3 random directions
        u_basis = torch.randn(FAMILY_DIM + 1, m.out_features, m.rank, generator=gen) * 0.02
        d_basis = torch.randn(FAMILY_DIM + 1, m.rank, m.in_features, generator=gen) * 0.02
        sv = torch.tensor([2.0, 1.6, 1.2, 0.8]) * 0.04
        u_basis[0] = torch.linalg.qr(torch.randn(m.out_features, m.rank, generator=gen))[0] * sv
        d_basis[0] = (torch.linalg.qr(torch.randn(m.in_features, m.rank, generator=gen))[0] * sv).T
        base.append((u_basis, d_basis))
    train = _family(2048, gen, base)
    held_out = _family(64, torch.Generator().manual_seed(12), base)
    centre = [(u[0].expand(64, -1, -1), d[0].expand(64, -1, -1)) for u, d in base]
    return train, held_out, centre


@pytest.fixture(scope="module")
def trained(family):
    train, held_out, _ = family
    torch.manual_seed(3)
    lae = LoraAutoencoder(LaeConfig(latent_channels=8, width=64, depth=1, heads=4), LAYOUT)
    lae.calibrate([(u[:256], d[:256]) for u, d in train])
    untrained = lae.reconstruction_report(held_out)
    steps = 250
    opt = torch.optim.AdamW(lae.parameters(), lr=5e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=5e-3, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(13)
    first = last = None
    lae.train()
    first, last = _train(lae, train, opt, sched, gen, steps)
    lae.eval()
    return lae, untrained, first, last


def _train(lae, train, opt, sched, gen, steps):
    first = last = None
    for _ in range(steps):
        idx = torch.randint(0, 2048, (32,), generator=gen)
        loss = lae.loss([(u[idx], d[idx]) for u, d in train], generator=gen)
        opt.zero_grad()
        loss.total.backward()
        opt.step()
        sched.step()
        first = float(loss.reconstruction.detach()) if first is None else first
        last = float(loss.reconstruction.detach())
    return first, last


def test_trained_lae_reconstructs_held_out_family_members(family, trained):
    _, held_out, centre = family
    lae, untrained, first, last = trained
    report = lae.reconstruction_report(held_out)
    # the untrained LAE gives nothing like the LoRA; the trained one reconstructs unseen members
    assert untrained["mean"] > 0.9
    assert report["mean"] < TRAINED_BOUND, report
    assert max(report["modules"].values()) < 1.5 * TRAINED_BOUND
    assert last < 0.25 * first
    # and it encodes the individual, not just the family's centre (which is far off every member)
    centre_err = float(torch.stack([relative_frobenius(u, d, cu, cd)
                                    for (u, d), (cu, cd) in zip(held_out, centre)]).mean())
    assert centre_err > 0.5 and report["mean"] < 0.4 * centre_err


def test_latent_scale_normalises_latents(family, trained):
    _, held_out, _ = family
    lae, *_ = trained
    scale = lae.latent_scale(held_out)
    z = lae.encode(held_out).detach()
    assert math.isfinite(scale) and scale > 0
    assert float((z / scale).std()) == pytest.approx(1.0, rel=1e-5)
    # the DiT's round trip: z / scale -> (sampled) -> * scale decodes the same LoRA
    with torch.no_grad():
        rec = lae.decode((z / scale) * scale)
    rel = torch.stack([relative_frobenius(u.double(), d.double(), u2.double(), d2.double())
                       for (u, d), (u2, d2) in zip(held_out, rec)]).mean()
    assert float(rel) == pytest.approx(lae.reconstruction_report(held_out)["mean"], rel=1e-4)
