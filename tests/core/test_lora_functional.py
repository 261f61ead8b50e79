"""hyperlora.lora_functional: per-sample factors from tokens and bases, applied inside Linear layers,
checked against HyperLoRAModel.build_lora and an independent float64 reference of merged weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hyperlora.checkpoint import load_hyper_lora
from hyperlora.spec import KOHYA_LAYER, LORA_LAYERS
from hyperlora.errors import LoraError
from hyperlora.lora_functional import (LORA_SCALE, LoraTerm, applied, basis_factors, diffusers_lora_targets,
                                       factors_from_lora, low_rank_delta)
from tests.fixtures.hyperlora_models import write_hyperlora_folder
from tests.fixtures.loras import random_tokens


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = write_hyperlora_folder(tmp_path_factory.mktemp("lf") / "tiny", base=True, dtype=torch.float32, seed=3)
    return load_hyper_lora(folder, dtype=torch.float32)


def _tokens(model, b: int, seed: int = 0) -> torch.Tensor:
    q, k = model.arch.num_tokens, model.arch.hyper_dim
    return torch.stack([random_tokens(q, k, seed=seed + i) for i in range(b)])


def _linears(model, seed: int = 0) -> dict[str, nn.Linear]:
    """One Linear per LoRA prefix with the module's in/out sizes (random weights and biases)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m in model.arch.modules:
        for layer in LORA_LAYERS:
            lin = nn.Linear(m.in_features(layer), m.out_features(layer))
            with torch.no_grad():
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.2)
                lin.bias.copy_(torch.randn(lin.bias.shape, generator=g) * 0.1)
            out[f"{m.name}_{KOHYA_LAYER[layer]}"] = lin
    return out


@pytest.mark.parametrize("kind", ["id", "base"])
def test_factors_equal_build_lora_per_sample(model, kind):
    tokens = _tokens(model, 3)
    factors = basis_factors(tokens, model.basis_groups(kind), model.arch.modules)
    assert len(factors) == 4 * len(model.arch.modules)
    for b in range(3):
        lora = model.build_lora(tokens[b], kind=kind, dtype=torch.float32)
        for prefix, (down, up) in factors.items():
            assert down.shape[0] == 3 and up.shape[0] == 3
            assert torch.allclose(down[b], lora[f"{prefix}.lora_down.weight"], atol=1e-6, rtol=1e-5), prefix
            assert torch.allclose(up[b], lora[f"{prefix}.lora_up.weight"], atol=1e-6, rtol=1e-5), prefix
            assert float(lora[f"{prefix}.alpha"]) / down.shape[1] == LORA_SCALE


def _reference_outputs(lin: nn.Linear, x: torch.Tensor, lora_terms: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
                       ) -> torch.Tensor:
    """float64: per sample b, merge W + sum scale[b] * up[b] @ down[b] into the weight, then x @ W^T + bias."""
    outs = []
    for b in range(x.shape[0]):
        w = lin.weight.detach().double().clone()
        for down, up, scale in lora_terms:
            d = down[min(b, down.shape[0] - 1)].detach().double()
            u = up[min(b, up.shape[0] - 1)].detach().double()
            for r in range(d.shape[0]):   # rank-1 outer products, deliberately not a matmul
                w += float(scale[b]) * torch.outer(u[:, r], d[r])
        outs.append(x[b].double() @ w.t() + lin.bias.detach().double())
    return torch.stack(outs)


def test_applied_equals_merged_weights_per_sample(model):
    tokens = _tokens(model, 3, seed=5)
    id_f = basis_factors(tokens, model.basis_groups("id"), model.arch.modules)
    base_f = basis_factors(tokens[:1], model.basis_groups("base"), model.arch.modules)   # B = 1 broadcasts
    id_scale = torch.tensor([0.5, 0.25, -0.4])
    base_scale = 0.3
    layers = _linears(model)
    g = torch.Generator().manual_seed(9)
    for prefix, lin in layers.items():
        x = torch.randn(3, 7, lin.in_features, generator=g)
        with applied(layers, [LoraTerm(id_f, id_scale), LoraTerm(base_f, base_scale)]):
            got = lin(x)
        ref = _reference_outputs(lin, x, [(id_f[prefix][0], id_f[prefix][1], id_scale),
                                          (base_f[prefix][0], base_f[prefix][1], torch.full((3,), base_scale))])
        assert torch.allclose(got.double(), ref, atol=1e-5, rtol=1e-5), prefix
        assert torch.allclose(lin(x), x @ lin.weight.t() + lin.bias)    # hooks gone after the block


def test_layer_scales_and_factors_from_lora(model):
    tokens = _tokens(model, 1, seed=2)
    lora = model.build_lora(tokens[0], kind="id", dtype=torch.float32)
    factors = factors_from_lora(lora)
    layers = _linears(model, seed=1)
    prefix = next(iter(layers))
    lin = layers[prefix]
    x = torch.randn(2, 5, lin.in_features)
    with applied(layers, [LoraTerm(factors, 0.8, layer_scales={prefix: 0.5})]):
        got = lin(x)
    dw = 0.8 * 0.5 * LORA_SCALE * lora[f"{prefix}.lora_up.weight"].double() @ lora[f"{prefix}.lora_down.weight"].double()
    ref = x.double() @ (lin.weight.double() + dw).t() + lin.bias.double()
    assert torch.allclose(got.double(), ref, atol=1e-5)


def test_gradients_reach_tokens_and_bases(model):
    down_b = [d.clone().requires_grad_(True) for _, d, _ in model.basis_groups("id")]
    up_b = [u.clone().requires_grad_(True) for _, _, u in model.basis_groups("id")]
    groups = [(g, d, u) for (g, _, _), d, u in zip(model.basis_groups("id"), down_b, up_b)]
    tokens = _tokens(model, 2).requires_grad_(True)
    factors = basis_factors(tokens, groups, model.arch.modules)
    layers = _linears(model)
    with applied(layers, [LoraTerm(factors, LORA_SCALE)]):
        loss = sum(lin(torch.ones(2, 3, lin.in_features)).square().sum() for lin in layers.values())
    loss.backward()
    assert tokens.grad is not None and float(tokens.grad.abs().sum()) > 0
    assert all(float(d.grad.abs().sum()) > 0 for d in down_b)
    assert all(float(u.grad.abs().sum()) > 0 for u in up_b)


def test_low_rank_delta_refuses_a_batch_mismatch():
    with pytest.raises(LoraError):
        low_rank_delta(torch.zeros(4, 3, 8), torch.zeros(2, 2, 8), torch.zeros(2, 5, 2))
    out = low_rank_delta(torch.ones(4, 3, 8), torch.ones(1, 2, 8), torch.ones(1, 5, 2))   # B = 1 broadcasts
    assert out.shape == (4, 3, 5) and torch.all(out == 16.0)


def test_applied_checks_prefixes_and_shapes_and_removes_hooks_after_errors(model):
    tokens = _tokens(model, 1)
    factors = basis_factors(tokens, model.basis_groups("id"), model.arch.modules)
    layers = _linears(model)
    partial = dict(list(layers.items())[1:])
    with pytest.raises(LoraError, match="no matching layer"):
        with applied(partial, [LoraTerm(factors)]):
            pass
    with applied(partial, [LoraTerm(factors)], strict=False):
        pass
    wrong = dict(layers)
    first = next(iter(wrong))
    wrong[first] = nn.Linear(3, 3)
    with pytest.raises(LoraError, match="maps"):
        with applied(wrong, [LoraTerm(factors)]):
            pass
    lin = layers[first]
    with pytest.raises(RuntimeError):
        with applied(layers, [LoraTerm(factors)]):
            raise RuntimeError("boom")
    assert not lin._forward_hooks


def test_diffusers_lora_targets_maps_kohya_prefixes():
    def attn() -> nn.Module:
        a = nn.Module()
        a.to_q, a.to_k, a.to_v = nn.Linear(4, 4), nn.Linear(6, 4), nn.Linear(6, 4)
        a.to_out = nn.ModuleList([nn.Linear(4, 4), nn.Dropout()])
        return a

    block = nn.Module()
    block.attn1, block.attn2, block.ff = attn(), attn(), nn.Linear(4, 4)
    unet = nn.Module()
    unet.down_blocks = nn.ModuleList([nn.Module(), nn.Module()])
    unet.down_blocks[1].attentions = nn.ModuleList([nn.Module()])
    unet.down_blocks[1].attentions[0].transformer_blocks = nn.ModuleList([block])
    targets = diffusers_lora_targets(unet)
    base = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn"
    assert set(targets) == {f"{base}{a}_{layer}" for a in (1, 2) for layer in ("to_q", "to_k", "to_v", "to_out_0")}
    assert targets[f"{base}2_to_out_0"] is block.attn2.to_out[0]
    assert targets[f"{base}1_to_k"] is block.attn1.to_k
    with pytest.raises(LoraError):
        diffusers_lora_targets(unet, [f"{base}3_to_q"])
