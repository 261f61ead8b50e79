"""The cached full-size random fp16 checkpoint (3 GB): load, architecture, LoRA vs reference."""

from __future__ import annotations

import pytest
import torch

from hyperlora.checkpoint import load_hyper_lora, model_files
from tests.core import ref_hyperlora as ref
from tests.fixtures.hyperlora_models import full_model_folder


@pytest.mark.slow
def test_full_size_fp16_checkpoint(cache_dir) -> None:
    folder = full_model_folder(cache_dir)
    assert sum(p.stat().st_size for p in model_files(folder)) > 3.1e9
    model = load_hyper_lora(folder)
    arch = model.arch
    assert len(arch.modules) == 140 and arch.hyper_dim == 128 and arch.rank == 8 and arch.num_tokens == 1120
    r = arch.resampler
    assert (r.depth, r.heads, r.dim_head, r.dim, r.num_queries) == (4, 12, 64, 1024, 1120)
    assert (arch.id_embed_dim, arch.num_id_tokens) == (512, 16)
    assert model.basis_dtype == torch.float16 and model.module_dtype == torch.float16

    g = torch.Generator().manual_seed(0)
    e = torch.nn.functional.normalize(torch.randn(1, 512, generator=g), dim=-1)
    c = torch.randn(1, 257, 1024, generator=g)
    toks = model.id_tokens(id_embeds=e, clip_features=c)
    assert toks.shape == (1120, 128) and bool(torch.isfinite(toks).all())
    assert torch.allclose(toks.norm(dim=-1), torch.ones(1120), atol=1e-4)
    assert float(toks.std()) > 0.01  # not degenerate

    lora = model.build_lora(toks)
    assert len(lora) == 140 * 4 * 3
    numbers = sum(v.numel() for k, v in lora.items() if not k.endswith(".alpha"))
    assert numbers == 11_612_160  # format §4: about 11.6 million
    first = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    assert lora[f"{first}.lora_down.weight"].shape == (8, 2048)
    assert lora[f"{first}.lora_up.weight"].shape == (640, 8)
    assert float(lora[f"{first}.alpha"]) == 4.0

    # a few modules of each size, first / middle / last in JSON order, against the float64 reference
    picks = [0, 1, 5, 69, 100, 139]
    slow = ref.lora(folder, toks, modules=picks)
    for key, want in slow.items():
        got = lora[key]
        assert got.dtype == torch.float16 and got.shape == want.shape, key
        if not key.endswith(".alpha"):
            assert ref.max_rel_diff(got, want) < 5e-3, key
    # the default CPU kernel (native AVX2 where available) vs PyTorch's torch.mv, every value
    mv = model.build_lora(toks, strategy="mv")
    for key, got in lora.items():
        scale = float(mv[key].double().abs().max())
        assert float((got.double() - mv[key].double()).abs().max()) <= 2e-3 * scale, key
    lora32 = model.build_lora(toks, dtype=torch.float32, strategy="bmm")
    for key in slow:
        if not key.endswith(".alpha"):
            assert ref.max_rel_diff(lora32[key], slow[key]) < 5e-3, key
