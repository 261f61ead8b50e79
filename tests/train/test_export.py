"""(b) export_folder: the released layout and key names, fp16, heads metadata, strict loader round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hyperlora.checkpoint import load_hyper_lora, read_architecture
from hyperlora.errors import SettingError
from hyperlora.safetensors_io import read_header
from hyperlora.spec import (BASE_RESAMPLER_FILE, BASIS_FILE, DEFAULT_HEADS, ID_PROJECTOR_FILE, MARKER_FILE,
                            RESAMPLER_FILE, RESAMPLER_HEADS_META)
from hyperlora.train.export import export_folder
from hyperlora.train.hypernet import TrainableHyperLoRA, unet_modules
from hyperlora.train.toy.sdxl import tiny_unet
from tests.fixtures.hyperlora_models import Preset, write_hyperlora_folder

from .test_hypernet import CLIP_DIM, TINY, tiny_generator

FILES = (BASIS_FILE, RESAMPLER_FILE, ID_PROJECTOR_FILE, BASE_RESAMPLER_FILE)


@pytest.fixture(scope="module")
def unet() -> torch.nn.Module:
    return tiny_unet(seed=0).requires_grad_(False).eval()


def _preset(gen: TrainableHyperLoRA) -> Preset:
    """The released-format fixture's preset with the generator's sizes (heads 4 x 8)."""
    return Preset(modules=tuple((m.name, m.hidden_size, m.cross_attention_dim) for m in gen.arch.modules),
                  hyper_dim=TINY["hyper_dim"], rank=TINY["rank"], dim=TINY["dim"], depth=TINY["depth"],
                  heads=TINY["heads"], dim_head=TINY["dim_head"], ff_mult=TINY["ff_mult"], id_embed_dim=512,
                  num_id_tokens=TINY["num_id_tokens"], id_token_dim=TINY["id_token_dim"], clip_dim=CLIP_DIM)


def _layout(folder: Path) -> dict[str, dict[str, tuple[str, tuple[int, ...]]]]:
    out = {}
    for name in FILES:
        if (folder / name).is_file():
            hdr = read_header(folder / name)
            out[name] = {k: (v.dtype, tuple(v.shape)) for k, v in hdr.tensors.items()}
    return out


def test_export_has_the_released_keys_shapes_and_json(unet: torch.nn.Module, tmp_path: Path) -> None:
    gen = tiny_generator(unet, seed=1)
    ours = export_folder(gen, tmp_path / "ours")
    ref = write_hyperlora_folder(tmp_path / "ref", preset=_preset(gen), base=True, dtype=torch.float16)
    assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in ref.iterdir())
    assert _layout(ours) == _layout(ref)                                      # keys, shapes and F16
    assert json.loads((ours / MARKER_FILE).read_text(), object_pairs_hook=list) == \
        json.loads((ref / MARKER_FILE).read_text(), object_pairs_hook=list)   # same modules, same order


def test_export_round_trips_through_the_strict_loader(unet: torch.nn.Module, tmp_path: Path) -> None:
    gen = tiny_generator(unet, seed=2)
    folder = export_folder(gen, tmp_path / "m")
    for name in (RESAMPLER_FILE, BASE_RESAMPLER_FILE):
        assert read_header(folder / name).metadata[RESAMPLER_HEADS_META] == str(TINY["heads"])
    arch = read_architecture(folder)
    assert arch.resampler.heads == TINY["heads"] and arch.base_resampler.heads == TINY["heads"]
    assert arch.modules == gen.arch.modules and arch == gen.arch
    loaded = load_hyper_lora(folder)
    assert loaded.basis_dtype == torch.float16
    for kind in ("id", "base"):                                               # the basis, fp16-rounded
        for (g, d, u), (_, d2, u2) in zip(loaded.basis_groups(kind), gen.basis_groups(kind)):
            assert torch.equal(d, d2.detach().half()) and torch.equal(u, u2.detach().half())
    sd = gen.resampler.state_dict()
    assert all(torch.equal(v, sd[k].half()) for k, v in loaded.resampler.state_dict().items())
    tokens = loaded.id_tokens(id_embeds=torch.nn.functional.normalize(torch.randn(2, 512), dim=-1),
                              clip_features=torch.randn(2, 5, CLIP_DIM), use_cache=False)
    lora = loaded.build_lora(tokens, kind="id")
    m0 = gen.arch.modules[0].name
    assert lora[f"{m0}_to_q.lora_down.weight"].shape == (TINY["rank"], gen.arch.modules[0].hidden_size)
    assert lora[f"{m0}_to_out_0.lora_up.weight"].shape == (gen.arch.modules[0].hidden_size, TINY["rank"])
    assert float(lora[f"{m0}_to_q.alpha"]) == TINY["rank"] / 2
    assert len(lora) == 3 * 4 * len(gen.arch.modules)
    base = loaded.build_lora(loaded.base_tokens(torch.randn(1, 5, CLIP_DIM), use_cache=False), kind="base")
    assert base[f"{m0}_to_k.lora_down.weight"].shape[0] == TINY["base_rank"]


def test_released_files_without_metadata_keep_twelve_heads(tmp_path: Path) -> None:
    ref = write_hyperlora_folder(tmp_path / "ref", preset="tiny")
    assert RESAMPLER_HEADS_META not in read_header(ref / RESAMPLER_FILE).metadata
    assert read_architecture(ref).resampler.heads == DEFAULT_HEADS


def test_export_without_base_and_reexport_cleans_up(unet: torch.nn.Module, tmp_path: Path) -> None:
    gen = TrainableHyperLoRA.new(unet_modules(unet), **{**TINY, "base_rank": None})
    assert not gen.has_base
    with_base = tiny_generator(unet)
    folder = export_folder(with_base, tmp_path / "m")
    assert (folder / BASE_RESAMPLER_FILE).is_file()
    export_folder(gen, folder)                                                # same folder, no base now
    assert not (folder / BASE_RESAMPLER_FILE).exists()
    arch = read_architecture(folder)
    assert arch.base_rank is None and arch.base_resampler is None
    load_hyper_lora(folder)


def test_export_dtype_and_errors(unet: torch.nn.Module, tmp_path: Path) -> None:
    gen = tiny_generator(unet)
    f32 = export_folder(gen, tmp_path / "f32", dtype=torch.float32)
    assert {v.dtype for v in read_header(f32 / BASIS_FILE).tensors.values()} == {"F32"}
    with pytest.raises(SettingError, match="distill_base"):
        export_folder(gen, tmp_path / "d", distill_base=0.25)                # nothing was distilled
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(SettingError, match="not a HyperLoRA folder"):
        export_folder(gen, tmp_path / "busy")
    with torch.no_grad():
        gen.id_up_0.fill_(1e6)                                                # overflows fp16
    with pytest.raises(SettingError, match="NaN/inf"):
        export_folder(gen, tmp_path / "big")


def test_distilled_generator_exports_without_base(unet: torch.nn.Module, tmp_path: Path) -> None:
    gen = tiny_generator(unet)
    gen.distilled_base = 0.25
    folder = export_folder(gen, tmp_path / "m", distill_base=0.25)
    assert not (folder / BASE_RESAMPLER_FILE).exists()
    assert read_architecture(folder).base_rank is None
    with pytest.raises(SettingError, match="absorbed 0.25"):
        export_folder(gen, tmp_path / "n", distill_base=0.5)


def test_default_sizes_are_the_released_architecture(tmp_path: Path) -> None:
    """TrainableHyperLoRA.new on SDXL's UNet with the defaults has the released architecture exactly
    (the 140 modules in order, K 128, rank 8, 1024-wide depth-4 12x64 resampler, 16 ID tokens)."""
    from diffusers import UNet2DConditionModel

    from hyperlora.train.frozen import unet_config

    with torch.device("meta"):
        sdxl = UNet2DConditionModel.from_config(unet_config())
    gen = TrainableHyperLoRA.new(unet_modules(sdxl), base_rank=None, device="meta")
    released = write_hyperlora_folder(tmp_path / "full", preset="full", sparse=True)   # headers only
    assert gen.arch == read_architecture(released)
    from tests.fixtures.hyperlora_models import FULL, iter_basis_numbers

    assert sum(p.numel() for n, p in gen.named_parameters() if n.startswith(("id_down_", "id_up_"))) == \
        sum(iter_basis_numbers(FULL))
