"""Resampler / IDProjector: state_dict keys pinned to the released names (format §4), forward vs reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from hyperlora.checkpoint import read_architecture
from hyperlora.spec import ResamplerConfig
from hyperlora.generate import HyperLoRAModel
from hyperlora.resampler import IDProjector, Resampler
from safetensors.torch import load_file
from tests.core import ref_hyperlora as ref
from tests.fixtures.hyperlora_models import write_hyperlora_folder

RELEASED = ResamplerConfig(dim=1024, depth=4, heads=12, dim_head=64, ff_mult=4, num_queries=1120, output_dim=128,
                           embed_dims=(1024, 1024))


def format_resampler_keys(*, two: bool, dim: int = 1024, q: int = 1120, k: int = 128, e: int = 1024,
                         inner: int = 768, ff: int = 4096, depth: int = 4) -> dict[str, tuple[int, ...]]:
    """Written from the format text (docs/released-format.md) (§4), independently of the fixture and the package."""
    keys: dict[str, tuple[int, ...]] = {"latents": (1, q, dim), "proj_in.weight": (dim, e), "proj_in.bias": (dim,),
                                        "proj_out.weight": (k, dim), "proj_out.bias": (k,)}
    if two:
        keys.update({"proj_in_2.weight": (dim, e), "proj_in_2.bias": (dim,)})
    for j in range(depth):
        norms = ["norm_attn1", "norm_attn2_l", "norm_attn2_x", "norm_ff"] + (["norm_attn3_l", "norm_attn3_y"] if two else [])
        for n in norms:
            keys[f"layers.{j}.{n}.weight"] = (dim,)
            keys[f"layers.{j}.{n}.bias"] = (dim,)
        for a in ["attn1", "attn2"] + (["attn3"] if two else []):
            for w in ("to_q", "to_k", "to_v"):
                keys[f"layers.{j}.{a}.{w}.weight"] = (inner, dim)
            keys[f"layers.{j}.{a}.to_out.0.weight"] = (dim, inner)
        keys[f"layers.{j}.ff.net.0.proj.weight"] = (ff, dim)
        keys[f"layers.{j}.ff.net.0.proj.bias"] = (ff,)
        keys[f"layers.{j}.ff.net.2.weight"] = (dim, ff)
        keys[f"layers.{j}.ff.net.2.bias"] = (dim,)
    return keys


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_released_resampler_keys_two_conditions() -> None:
    r = Resampler(RELEASED, device="meta")
    assert _shapes(r) == format_resampler_keys(two=True)
    assert len(_shapes(r)) == 5 + 2 + 4 * (12 + 12 + 4)
    assert not any(k.endswith(".bias") and ".attn" in k for k in _shapes(r))  # no attention biases


def test_base_resampler_keys_one_condition() -> None:
    cfg = ResamplerConfig(**{**RELEASED.__dict__, "embed_dims": (1024,)})
    assert _shapes(Resampler(cfg, device="meta")) == format_resampler_keys(two=False)


def test_id_projector_keys() -> None:
    p = IDProjector(id_embed_dim=512, embed_dim=1024, num_tokens=16, device="meta")
    assert _shapes(p) == {"0.weight": (16 * 1024, 512), "0.bias": (16 * 1024,), "2.weight": (1024,), "2.bias": (1024,)}


def test_full_size_model_on_meta_matches_released_headers(tmp_path: Path) -> None:
    """Full-size architecture from (sparse) released-layout headers; every module's keys/shapes pinned."""
    folder = write_hyperlora_folder(tmp_path / "full", preset="full", sparse=True, base=True)
    arch = read_architecture(folder)
    model = HyperLoRAModel(arch, device="meta")
    sd = _shapes(model)
    res = {k[len("resampler."):]: v for k, v in sd.items() if k.startswith("resampler.")}
    base = {k[len("base_resampler."):]: v for k, v in sd.items() if k.startswith("base_resampler.")}
    idp = {k[len("id_projector."):]: v for k, v in sd.items() if k.startswith("id_projector.")}
    assert res == format_resampler_keys(two=True)
    assert base == format_resampler_keys(two=False)
    assert idp == {"0.weight": (16384, 512), "0.bias": (16384,), "2.weight": (1024,), "2.bias": (1024,)}
    assert len(sd) == len(res) + len(base) + len(idp)  # basis buffers are not in the state_dict
    # grouped basis: every basis number accounted for (format: ~1.49e9 for the ID basis)
    id_numbers = sum(d.numel() + u.numel() for _, d, u in model.basis_groups("id"))
    base_numbers = sum(d.numel() + u.numel() for _, d, u in model.basis_groups("base"))
    assert id_numbers == 1_486_356_480 and base_numbers == id_numbers // 2
    shapes = sorted((g.in_features, g.out_features, len(g.entries), tuple(d.shape))
                    for g, d, _ in model.basis_groups("id"))
    assert shapes == [(640, 640, 60, (60, 5120, 128)), (1280, 1280, 360, (360, 10240, 128)),
                      (2048, 640, 20, (20, 16384, 128)), (2048, 1280, 120, (120, 16384, 128))]


def test_forward_matches_reference(tmp_path: Path) -> None:
    folder = write_hyperlora_folder(tmp_path / "m", seed=3)
    arch = read_architecture(folder)
    r = Resampler(arch.resampler)
    r.load_state_dict({k: v.float() for k, v in load_file(str(folder / "resampler.safetensors")).items()}, strict=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 48, generator=g)
    y = torch.randn(2, 9, 1024, generator=g)
    with torch.no_grad():
        fast = r(x, y)
    sd = ref.load64(folder / "resampler.safetensors")
    for n in range(2):
        slow = ref.resampler(sd, x[n].double(), y[n].double(), heads=12)
        assert ref.max_rel_diff(fast[n], slow) <= 1e-5
    # heads is not readable from shapes: a different split gives a different output
    r6 = Resampler(ResamplerConfig(**{**arch.resampler.__dict__, "heads": 6, "dim_head": 8}))
    r6.load_state_dict(r.state_dict())
    with torch.no_grad():
        assert ref.max_rel_diff(r6(x, y)[0], ref.resampler(sd, x[0].double(), y[0].double(), heads=6)) <= 1e-5
        assert ref.max_rel_diff(r6(x, y)[0], fast[0].double()) > 1e-3


def test_exact_gelu_and_layernorm_eps() -> None:
    r = Resampler(ResamplerConfig(dim=8, depth=1, heads=2, dim_head=4, ff_mult=2, num_queries=8, output_dim=3,
                                  embed_dims=(5,)))
    layer = r.layers[0]
    assert all(m.eps == 1e-5 for m in r.modules() if isinstance(m, nn.LayerNorm))
    # float64 and a fixed seed: in float32 the erf formula and ATen's GELU kernel differ by a few
    # ulps for some random weights, which made an fp32 comparison at 1e-7 flaky
    torch.manual_seed(0)
    gp = layer.ff.net[0].double()
    torch.nn.init.normal_(gp.proj.weight)
    x = torch.linspace(-3, 3, 8, dtype=torch.float64).reshape(1, 1, 8)
    want = gp.proj(x) * 0.5 * (1 + torch.erf(gp.proj(x) / 2**0.5))
    assert torch.allclose(gp(x), want, rtol=0, atol=1e-12)
    tanh = torch.nn.functional.gelu(gp.proj(x), approximate="tanh")
    assert not torch.allclose(gp(x), tanh, rtol=0, atol=1e-6)


def test_two_condition_resampler_needs_y() -> None:
    r = Resampler(ResamplerConfig(dim=8, depth=1, heads=2, dim_head=4, ff_mult=2, num_queries=8, output_dim=3,
                                  embed_dims=(5, 6)))
    with pytest.raises(ValueError, match="two conditions"):
        r(torch.randn(1, 2, 5))
