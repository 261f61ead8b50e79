"""TrainableHyperLoRA: per-sample functional LoRA == the pack's build + merge path, gradients, init, order.

Also holds the small helpers the other model tests import (tiny generator, toy sample dataset).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from hyperlora.checkpoint import load_hyper_lora
from hyperlora.lora_functional import LORA_SCALE, LoraTerm, applied, diffusers_lora_targets
from hyperlora.train.export import export_folder
from hyperlora.train.hypernet import PARTS, TrainableHyperLoRA, unet_modules
from hyperlora.train.toy.sdxl import tiny_unet

CLIP_DIM = 32
CLIP_LEN = 5
TEXT_LEN = 7
TINY = dict(rank=4, base_rank=2, hyper_dim=8, clip_dim=CLIP_DIM, heads=4, dim=32, depth=2, dim_head=8, ff_mult=2,
            num_id_tokens=4, id_token_dim=24)
"""Generator sizes of the tests: heads 4 (not the default 12) so the heads metadata matters."""


def tiny_generator(unet: torch.nn.Module, *, seed: int = 0, random_up: bool = True) -> TrainableHyperLoRA:
    """A tiny generator for ``unet``; ``random_up`` gives the up bases random values (an untrained
    generator's LoRA is zero, which would make every comparison trivial)."""
    gen = TrainableHyperLoRA.new(unet_modules(unet), seed=seed, **TINY)
    if random_up:
        g = torch.Generator().manual_seed(seed + 100)
        with torch.no_grad():
            for kind in ("id", "base"):
                for _, _, up in gen.basis_groups(kind):
                    up.copy_(torch.randn(up.shape, generator=g) * 0.3)
            for layer in gen.resampler.layers:              # open the ArcFace branch too
                w = layer.attn2.to_out[0].weight
                w.copy_(torch.randn(w.shape, generator=g) * w.shape[1] ** -0.5)
    return gen


def sample(g: torch.Generator, identity: str = "a", *, latent: int = 8) -> dict:
    """One training sample in the shard format (TRAIN_DESIGN.md), tiny sizes for tiny_unet."""
    a = torch.randn(512, generator=g)
    return dict(arcface=a / a.norm(), clip_id=torch.randn(CLIP_LEN, CLIP_DIM, generator=g).half(),
                clip_base=torch.randn(CLIP_LEN, CLIP_DIM, generator=g).half(),
                latents=torch.randn(4, latent, latent, generator=g),
                time_ids=torch.tensor([64.0, 64, 0, 0, 64, 64]),
                text=torch.randn(TEXT_LEN, 64, generator=g).half(), pooled=torch.randn(32, generator=g).half(),
                text_plain=torch.randn(TEXT_LEN, 64, generator=g).half(),
                pooled_plain=torch.randn(32, generator=g).half(), identity=identity)


class ToyDataset(torch.utils.data.Dataset):
    """``n`` random samples of ``ids`` identities (what ShardDataset yields, held in memory)."""

    def __init__(self, n: int = 8, *, seed: int = 0, ids: int = 3) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items = [sample(g, f"id{i % ids}") for i in range(n)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def unet_call(unet: torch.nn.Module, batch: dict, t: torch.Tensor) -> torch.Tensor:
    return unet(batch["latents"], t, encoder_hidden_states=batch["text"],
                added_cond_kwargs={"text_embeds": batch["pooled"], "time_ids": batch["time_ids"]}).sample


def stacked(items: list[dict]) -> dict:
    return {k: torch.stack([it[k] for it in items]).float() for k in items[0] if k != "identity"}


@pytest.fixture(scope="module")
def unet() -> torch.nn.Module:
    return tiny_unet(seed=0).requires_grad_(False).eval()


# --------------------------------------------------------------------------------- tests


def test_unet_modules_follow_the_released_sdxl_order() -> None:
    """On SDXL's own UNet config (meta device, no memory): the 140 modules, names, sizes and order of the release."""
    from diffusers import UNet2DConditionModel

    from hyperlora.train.frozen import unet_config
    from tests.fixtures.hyperlora_models import sdxl_lora_module_specs

    with torch.device("meta"):
        sdxl = UNet2DConditionModel.from_config(unet_config())
    got = [(m.name, m.hidden_size, m.cross_attention_dim) for m in unet_modules(sdxl)]
    assert got == sdxl_lora_module_specs()


def test_unet_modules_of_the_tiny_unet(unet: torch.nn.Module) -> None:
    mods = unet_modules(unet)
    assert len(mods) == 14
    assert mods[0].name == "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1"
    assert mods[-1].name.startswith("lora_unet_mid_block_")
    assert [m.cross_attention_dim for m in mods[:2]] == [None, 64]
    targets = diffusers_lora_targets(unet)
    assert all(f"{m.name}_to_out_0" in targets for m in mods)


def test_untrained_generator_gives_zero_lora(unet: torch.nn.Module) -> None:
    gen = TrainableHyperLoRA.new(unet_modules(unet), seed=3, **TINY)
    g = torch.Generator().manual_seed(0)
    batch = stacked([sample(g), sample(g)])
    idf, basef = gen(batch["arcface"], batch["clip_id"], batch["clip_base"])
    assert all(float(u.detach().abs().max()) == 0.0 for _, u in idf.values())
    assert all(float(d.detach().abs().max()) > 0.0 for d, _ in idf.values())
    t = torch.tensor([10, 500])
    plain = unet_call(unet, batch, t)
    with applied(diffusers_lora_targets(unet), [LoraTerm(idf), LoraTerm(basef)]):
        out = unet_call(unet, batch, t)
    assert torch.equal(out, plain)


def test_tokens_are_per_sample_and_unit_length(unet: torch.nn.Module) -> None:
    gen = tiny_generator(unet)
    g = torch.Generator().manual_seed(1)
    items = [sample(g), sample(g), sample(g)]
    batch = stacked(items)
    tok = gen.id_tokens(batch["arcface"], batch["clip_id"])
    assert tok.shape == (3, 8 * 14, TINY["hyper_dim"])
    assert torch.allclose(tok.norm(dim=-1), torch.ones(3, 8 * 14), atol=1e-5)
    one = gen.id_tokens(batch["arcface"][1:2], batch["clip_id"][1:2])
    assert torch.allclose(one[0], tok[1], atol=1e-6)            # no mixing across the batch
    assert not torch.allclose(tok[0], tok[1], atol=1e-3)


def test_functional_per_sample_lora_equals_build_and_merge(unet: torch.nn.Module, tmp_path: Path) -> None:
    """(a) A batch of 3 different samples with their own ID + Base LoRAs, applied functionally, equals
    export -> load_hyper_lora -> build_lora -> merge into a copy of the UNet's weights, sample by sample."""
    gen = tiny_generator(unet, seed=5)
    g = torch.Generator().manual_seed(2)
    items = [sample(g, f"p{i}") for i in range(3)]
    batch = stacked(items)
    t = torch.tensor([999, 500, 20])
    targets = diffusers_lora_targets(unet)
    with torch.no_grad():
        idf, basef = gen(batch["arcface"], batch["clip_id"], batch["clip_base"])
        with applied(targets, [LoraTerm(idf, LORA_SCALE), LoraTerm(basef, LORA_SCALE)]):
            functional = unet_call(unet, batch, t)
        plain = unet_call(unet, batch, t)
        ours = gen.id_tokens(batch["arcface"], batch["clip_id"])
        ours_base = gen.base_tokens(batch["clip_base"])

    folder = export_folder(gen, tmp_path / "m", dtype=torch.float32)
    loaded = load_hyper_lora(folder, dtype=torch.float32)
    assert loaded.arch.resampler.heads == TINY["heads"]            # from the metadata, not the default 12
    for b in range(3):
        one = {k: v[b:b + 1] for k, v in batch.items()}
        tok = loaded.id_tokens(id_embeds=one["arcface"], clip_features=one["clip_id"], use_cache=False)
        btok = loaded.base_tokens(one["clip_base"], use_cache=False)
        torch.testing.assert_close(tok, ours[b], atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(btok, ours_base[b], atol=2e-6, rtol=1e-5)
        merged = copy.deepcopy(unet)
        mt = diffusers_lora_targets(merged)
        with torch.no_grad():
            for kind, tk in (("id", tok), ("base", btok)):
                lora = loaded.build_lora(tk, kind=kind, strategy="bmm")
                for key, down in lora.items():
                    if not key.endswith(".lora_down.weight"):
                        continue
                    prefix = key[: -len(".lora_down.weight")]
                    up = lora[prefix + ".lora_up.weight"]
                    alpha = float(lora[prefix + ".alpha"])
                    mt[prefix].weight += (alpha / down.shape[0]) * (up @ down)
            ref = unet_call(merged, one, t[b:b + 1])
        torch.testing.assert_close(functional[b:b + 1], ref, atol=2e-5, rtol=1e-4)
        assert float((ref - plain[b:b + 1]).abs().max()) > 1e-3      # the LoRA does something
    assert float((functional[0] - functional[1]).abs().max()) > 1e-3


def test_gradients_reach_basis_and_resampler(unet: torch.nn.Module) -> None:
    gen = tiny_generator(unet, seed=6)
    g = torch.Generator().manual_seed(3)
    batch = stacked([sample(g), sample(g)])
    idf, basef = gen(batch["arcface"], batch["clip_id"], batch["clip_base"])
    with applied(diffusers_lora_targets(unet), [LoraTerm(idf), LoraTerm(basef)]):
        loss = unet_call(unet, batch, torch.tensor([300, 700])).square().mean()
        loss.backward()
    grads = {n: p.grad for n, p in gen.named_parameters()}
    for name in ("id_down_0", "id_up_0", "base_down_0", "base_up_0", "resampler.latents",
                 "resampler.proj_in_2.weight", "resampler.layers.0.attn3.to_q.weight",
                 "resampler.layers.1.attn2.to_k.weight", "id_projector.0.weight", "base_resampler.latents",
                 "base_resampler.proj_out.weight"):
        assert grads[name] is not None and float(grads[name].abs().max()) > 0, name
    assert all(p.grad is None for p in unet.parameters())


def test_from_released_round_trips(unet: torch.nn.Module, tmp_path: Path) -> None:
    gen = tiny_generator(unet, seed=7)
    folder = export_folder(gen, tmp_path / "m", dtype=torch.float32)
    again = TrainableHyperLoRA.from_released(folder)
    assert again.arch == gen.arch
    a, b = gen.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in again.parameters())


def test_every_parameter_has_one_part(unet: torch.nn.Module) -> None:
    gen = tiny_generator(unet)
    seen = {gen.part_of(n) for n, _ in gen.named_parameters()}
    assert seen == set(PARTS)
    clip = {n for n, _ in gen.part_parameters(["clip_branch"])}
    assert "resampler.proj_in_2.weight" in clip and "resampler.layers.1.norm_attn3_y.bias" in clip
    assert not any("attn2" in n for n in clip)
