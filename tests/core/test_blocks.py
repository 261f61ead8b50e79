"""Block strengths: which block and attention kind every SDXL module belongs to, and the scaled LoRA's
weight updates against the float64 reference (each multiplier scales exactly its modules)."""

from __future__ import annotations

import math

import pytest
import torch

from hyperlora.blocks import BlockStrengths, apply_block_strengths, classify_prefix
from hyperlora.errors import LoraError, SettingError
from hyperlora.lora import lora_prefixes
from tests.fixtures.hyperlora_models import sdxl_lora_module_specs
from tests.fixtures.loras import random_lora, reference_deltas

# SDXL's attention modules per block group (diffusers names): down_blocks.1 (2 x 2 transformer blocks) and
# down_blocks.2 (2 x 10) are the input blocks, mid_block (1 x 10) the middle, up_blocks.0 (3 x 10) and
# up_blocks.1 (3 x 2) the output blocks; each transformer block has attn1 and attn2.
EXPECTED_MODULES = {"input": 2 * (4 + 20), "middle": 2 * 10, "output": 2 * (30 + 6)}


@pytest.fixture(scope="module")
def lora() -> dict[str, torch.Tensor]:
    """The 140 SDXL module names with small random matrices (rank 2, alpha 1 = rank / 2 as released)."""
    modules = [(name, 8, 6 if cross else None) for name, _hidden, cross in sdxl_lora_module_specs()]
    return random_lora(modules, rank=2, seed=3, dtype=torch.float16)


def _group(prefix: str) -> tuple[str, str]:
    """Independent classification by the diffusers module path, written out differently on purpose."""
    parts = prefix.split("_")
    block = {"down": "input", "mid": "middle", "up": "output"}[parts[2]]
    kind = {"attn1": "self", "attn2": "cross"}[next(p for p in parts if p.startswith("attn") and p[4:].isdigit())]
    return block, kind


def test_every_sdxl_module_is_classified():
    counts = {"input": 0, "middle": 0, "output": 0}
    kinds = {"self": 0, "cross": 0}
    for name, _, cross in sdxl_lora_module_specs():
        for layer in ("to_q", "to_k", "to_v", "to_out_0"):
            block, kind = classify_prefix(f"{name}_{layer}")
            assert (block, kind) == _group(f"{name}_{layer}")
            assert kind == ("cross" if cross else "self")
        counts[block] += 1
        kinds[kind] += 1
    assert counts == EXPECTED_MODULES
    assert kinds == {"self": 70, "cross": 70}


@pytest.mark.parametrize("prefix, expected", [
    ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", ("input", "self")),
    ("lora_unet_middle_block_1_transformer_blocks_3_attn2_to_k", ("middle", "cross")),
    ("lora_unet_output_blocks_2_1_transformer_blocks_9_attn2_to_out_0", ("output", "cross")),
    ("lora_unet_down_blocks_1_attentions_0_proj_in", ("input", None)),
    ("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_v", ("middle", "self")),
])
def test_ldm_names_and_non_attention_modules(prefix, expected):
    assert classify_prefix(prefix) == expected


@pytest.mark.parametrize("prefix", ["lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "lora_unet_time_embed_0",
                                    "unet.down_blocks.1.attn1"])
def test_modules_outside_the_blocks_are_refused(prefix):
    with pytest.raises(LoraError, match="block multiplier"):
        classify_prefix(prefix)


def test_defaults_pass_the_very_same_lora(lora):
    assert BlockStrengths().is_identity
    assert apply_block_strengths(lora, BlockStrengths()) is lora
    assert apply_block_strengths(lora) is lora


FIELDS = ("input", "middle", "output", "self_attention", "cross_attention")


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("value", [0.3, 2.0, -1.0])
def test_each_multiplier_scales_exactly_its_modules(lora, field, value):
    scaled = apply_block_strengths(lora, BlockStrengths(**{field: value}))
    ref, got = reference_deltas(lora), reference_deltas(scaled)
    assert list(got) == list(ref)
    touched = 0
    for prefix, delta in ref.items():
        block, kind = _group(prefix)
        hit = field in (block, f"{kind}_attention")
        touched += hit
        factor = value if hit else 1.0
        assert torch.allclose(got[prefix], factor * delta, rtol=1e-12, atol=0), prefix
        if not hit:   # untouched modules: the very same tensors
            for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha"):
                assert scaled[prefix + suffix] is lora[prefix + suffix]
        else:         # only the scalar changes; the matrices are shared, so up @ down is the same product
            assert scaled[prefix + ".lora_up.weight"] is lora[prefix + ".lora_up.weight"]
            assert scaled[prefix + ".alpha"].dtype == torch.float64
            assert float(scaled[prefix + ".alpha"]) == pytest.approx(1.0 * value, rel=1e-15)
    expected = {"input": 48, "middle": 20, "output": 72, "self_attention": 70, "cross_attention": 70}[field] * 4
    assert touched == expected


def test_block_and_attention_multipliers_multiply(lora):
    strengths = BlockStrengths(input=0.5, output=1.5, self_attention=2.0, cross_attention=0.25)
    got = reference_deltas(apply_block_strengths(lora, strengths))
    for prefix, delta in reference_deltas(lora).items():
        block, kind = _group(prefix)
        factor = {"input": 0.5, "middle": 1.0, "output": 1.5}[block] * {"self": 2.0, "cross": 0.25}[kind]
        assert torch.allclose(got[prefix], factor * delta, rtol=1e-12, atol=0)


def test_zero_leaves_the_block_out(lora):
    scaled = apply_block_strengths(lora, BlockStrengths(middle=0.0))
    kept = lora_prefixes(scaled)
    assert len(kept) == (140 - 20) * 4
    assert not any(_group(p)[0] == "middle" for p in kept)
    assert set(kept) == {p for p in lora_prefixes(lora) if _group(p)[0] != "middle"}
    assert apply_block_strengths(lora, BlockStrengths(self_attention=0.0, cross_attention=0.0)) == {}


def test_lora_without_alpha_counts_alpha_as_rank():
    lora = random_lora([("lora_unet_up_blocks_0_attentions_0_transformer_blocks_0_attn2", 4, 3)], rank=2,
                       with_alpha=False)
    scaled = apply_block_strengths(lora, BlockStrengths(output=0.5))
    for prefix, delta in reference_deltas(lora).items():
        assert float(scaled[prefix + ".alpha"]) == 1.0      # rank 2 x 0.5
        assert torch.allclose(reference_deltas(scaled)[prefix], 0.5 * delta, rtol=1e-12, atol=0)


def test_text_encoder_module_is_refused_only_when_scaling():
    lora = random_lora([("lora_te1_text_model_encoder_layers_0_self_attn", 4, None)], rank=2)
    assert apply_block_strengths(lora) is lora
    with pytest.raises(LoraError, match="lora_te1_text_model_encoder_layers_0_self_attn_to_q"):
        apply_block_strengths(lora, BlockStrengths(input=0.5))


@pytest.mark.parametrize("bad", [math.nan, math.inf, 4.5, -5.0, True, "1"])
def test_bad_multipliers_name_the_setting(bad):
    with pytest.raises(SettingError, match="cross_attention"):
        BlockStrengths(cross_attention=bad)
