"""hyperlora/bundle.py: the functions the nodes call, against an independent float64 reference.

Tiny random model with a Base-LoRA; tokens are random (face analysis is tested elsewhere).
The reference rebuilds every LoRA matrix straight from the basis files' layout (format §5.5):
down = (sum_k a_k * down_basis[k])^T, up = (sum_k b_k * up_basis[k])^T, dW = 0.5 * up @ down.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hyperlora.bundle import (architecture_target_shapes, clip_width_needed, concept_slider, conditions_needed,
                              lora_from_identity, lora_target_shapes, mix_identities)
from hyperlora.checkpoint import load_hyper_lora
from hyperlora.errors import IdentityFileError, LoraError, SettingError
from hyperlora.identity import Identity
from tests.fixtures.hyperlora_models import TINY, write_hyperlora_folder
from tests.fixtures.loras import random_tokens

LAYERS = ("to_q", "to_k", "to_v", "to_out")
KOHYA = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out_0"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_hyperlora_folder(tmp_path_factory.mktemp("bundle") / "tiny_base", base=True, seed=11)


@pytest.fixture(scope="module")
def model(folder):
    return load_hyper_lora(folder, dtype=torch.float32)


def _identity(model, seed: int, *, base: bool = True) -> Identity:
    q, k = model.arch.resampler.num_queries, model.arch.hyper_dim
    qb = model.arch.base_resampler.num_queries
    return Identity(tokens=random_tokens(q, k, seed=seed), base_tokens=random_tokens(qb, k, seed=seed + 100) if base else None,
                    model_name=model.name, model_fingerprint=model.fingerprint, num_images=1, settings={})


def _reference_deltas(folder: Path, tokens: torch.Tensor, kind: str = "id") -> dict[str, torch.Tensor]:
    basis = load_file(str(folder / "hyper_lora_modules.safetensors"))
    t = tokens.double()
    out = {}
    for i, (name, _h, _c) in enumerate(TINY.modules):
        for j, layer in enumerate(LAYERS):
            a, b = t[8 * i + 2 * j], t[8 * i + 2 * j + 1]
            down = torch.einsum("k,kir->ir", a, basis[f"{i}.{layer}.{kind}_down_basis"].double()).T
            up = torch.einsum("k,kro->ro", b, basis[f"{i}.{layer}.{kind}_up_basis"].double()).T
            out[f"{name}_{KOHYA[layer]}"] = 0.5 * up @ down
    return out


def _deltas(lora: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for prefix in {k.split(".")[0] for k in lora}:
        down, up = lora[f"{prefix}.lora_down.weight"].double(), lora[f"{prefix}.lora_up.weight"].double()
        out[prefix] = float(lora[f"{prefix}.alpha"]) / down.shape[0] * up @ down
    return out


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5), k


def test_what_the_model_reads(model):
    assert conditions_needed(model) == (True, True, True)
    assert clip_width_needed(model) == TINY.clip_dim


def test_id_base_and_both(folder, model):
    ident = _identity(model, 1)
    ref_id = _reference_deltas(folder, ident.tokens)
    ref_base = _reference_deltas(folder, ident.base_tokens, "base")
    _close(_deltas(lora_from_identity(model, ident, kind="id")), ref_id)
    _close(_deltas(lora_from_identity(model, ident, kind="base")), ref_base)
    _close(_deltas(lora_from_identity(model, ident, kind="id+base")), {k: ref_id[k] + ref_base[k] for k in ref_id})
    with pytest.raises(SettingError, match="kind is 'both'"):
        lora_from_identity(model, ident, kind="both")


def test_base_needs_base_tokens(model):
    with pytest.raises(IdentityFileError, match="no Base-LoRA tokens"):
        lora_from_identity(model, _identity(model, 2, base=False), kind="base")


def test_mix_modes(folder, model):
    a, b = _identity(model, 3), _identity(model, 4)
    w = (0.7, 0.3)
    mixed = w[0] * a.tokens.double() + w[1] * b.tokens.double()
    mixed = mixed / torch.sqrt((mixed**2).sum(-1, keepdim=True) + 1e-8)
    _close(_deltas(mix_identities(model, [a, b], w, mode="coefficients")), _reference_deltas(folder, mixed))
    ra, rb = _reference_deltas(folder, a.tokens), _reference_deltas(folder, b.tokens)
    delta = mix_identities(model, [a, b], w, mode="weight_delta")
    _close(_deltas(delta), {k: w[0] * ra[k] + w[1] * rb[k] for k in ra})
    assert next(v for k, v in delta.items() if k.endswith("lora_down.weight")).shape[0] == 2 * TINY.rank


def test_concept_slider_is_signed_difference(folder, model):
    edited, original = _identity(model, 5), _identity(model, 6)
    re, ro = _reference_deltas(folder, edited.tokens), _reference_deltas(folder, original.tokens)
    _close(_deltas(concept_slider(model, edited, original, strength=-1.5)), {k: -1.5 * (re[k] - ro[k]) for k in re})


def test_identity_of_another_model_is_refused(model):
    other = _identity(model, 7)
    other.model_fingerprint = "0" * 16
    with pytest.raises(IdentityFileError):
        lora_from_identity(model, other)


def test_lora_target_shapes(model):
    shapes = lora_target_shapes(lora_from_identity(model, _identity(model, 8)))
    name, hidden, cross = TINY.modules[0]
    assert shapes[f"{name}_to_k"] == (hidden, cross or hidden)
    assert shapes[f"{name}_to_out_0"] == (hidden, hidden)
    assert len(shapes) == 4 * len(TINY.modules)
    # what the no-face pass-through checks the model against: the same map, without a LoRA
    assert architecture_target_shapes(model.arch) == shapes


def test_model_without_base(tmp_path):
    m = load_hyper_lora(write_hyperlora_folder(tmp_path / "nobase", seed=12), dtype=torch.float32)
    q, k = m.arch.resampler.num_queries, m.arch.hyper_dim
    ident = Identity(tokens=random_tokens(q, k, seed=9), base_tokens=None, model_name=m.name,
                     model_fingerprint=m.fingerprint, num_images=1, settings={})
    with pytest.raises(LoraError, match="has no Base-LoRA"):
        lora_from_identity(m, ident, kind="base")
    assert conditions_needed(m) == (True, True, False)


def test_outputs_are_plain_tensors(model):
    ident = _identity(model, 13)
    lora = lora_from_identity(model, ident)
    assert not any(t.is_inference() for t in lora.values())
    down = next(t for k, t in lora.items() if k.endswith("lora_down.weight"))
    down.mul_(1.0)                        # in-place use outside inference mode works
    assert len({t.untyped_storage().data_ptr() for t in lora.values()}) == len(lora)
