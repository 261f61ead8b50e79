"""Kohya LoRA export and strict loading (hyperlora/lora_file.py via hyperlora.lora)."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from hyperlora.errors import LoraError
from hyperlora.lora import SDXL_ARCHITECTURE, lora_prefixes, weighted_sum
from hyperlora.lora_file import load_lora_file, lora_metadata, read_lora_metadata, save_lora_file
from hyperlora.spec import TRIGGER_WORDS
from tests.fixtures.hyperlora_models import TINY, sdxl_lora_module_specs, write_hyperlora_folder
from tests.fixtures.loras import random_lora

# The kohya names ComfyUI maps onto SDXL's UNet attention weights: "lora_unet_" + the diffusers
# module path with "." -> "_" (comfy/lora.py model_lora_keys_unet), to_out.0 -> to_out_0.
SDXL_ATTENTION_PREFIX = re.compile(
    r"^lora_unet_(down_blocks_[12]_attentions_[01]|up_blocks_[01]_attentions_[012]|mid_block_attentions_0)"
    r"_transformer_blocks_\d_attn[12]_(to_q|to_k|to_v|to_out_0)$"
)


@pytest.fixture(scope="module")
def sdxl_lora() -> dict[str, torch.Tensor]:
    """A LoRA with the released layout: 140 SDXL attention modules x 4 layers, rank 8, alpha 4."""
    return random_lora(sdxl_lora_module_specs(), rank=8, seed=7, dtype=torch.float16)


def test_export_round_trip_fp32_is_bit_exact(tmp_path):
    lora = random_lora(TINY.modules, rank=4, seed=1)
    path = tmp_path / "me.safetensors"
    save_lora_file(lora, path, metadata=lora_metadata(title="me"), dtype=None)
    back = load_lora_file(path)
    assert set(back) == set(lora)  # safetensors stores keys sorted; order carries no meaning in a LoRA
    for key, t in lora.items():
        assert back[key].dtype == torch.float32 and torch.equal(back[key], t), key
    assert [p.name for p in tmp_path.iterdir()] == ["me.safetensors"]  # no temporary file left


def test_export_default_fp16_and_plain_safetensors_load(tmp_path, sdxl_lora):
    lora32 = {k: v.float() for k, v in sdxl_lora.items()}
    path = tmp_path / "sdxl.safetensors"
    save_lora_file(lora32, path)
    plain = load_file(str(path))  # what ComfyUI's comfy.utils.load_torch_file does for .safetensors
    assert set(plain) == set(sdxl_lora)
    for key, t in plain.items():
        want = lora32[key].to(torch.float32 if key.endswith(".alpha") else torch.float16)
        assert t.dtype == want.dtype and t.is_contiguous() and torch.equal(t, want), key
    assert plain[lora_prefixes(sdxl_lora)[0] + ".alpha"].shape == ()
    # 11.6 M numbers in fp16 (format §4) -> about 23 MB
    assert 23_000_000 < path.stat().st_size < 23_500_000


def test_exported_keys_follow_the_kohya_sdxl_pattern(tmp_path, sdxl_lora):
    path = tmp_path / "sdxl.safetensors"
    save_lora_file(sdxl_lora, path)
    keys = list(load_file(str(path)))
    prefixes = lora_prefixes(load_lora_file(path))
    assert len(prefixes) == 560 and len(keys) == 3 * 560
    bad = [p for p in prefixes if not SDXL_ATTENTION_PREFIX.match(p)]
    assert not bad, bad[:3]
    for p in prefixes:
        assert {f"{p}.lora_down.weight", f"{p}.lora_up.weight", f"{p}.alpha"} <= set(keys)


def test_export_metadata(tmp_path, sdxl_lora):
    path = tmp_path / "anna.safetensors"
    meta = lora_metadata(
        title="anna", model_name="sdxl_hyper_id_lora_v1_fidelity", model_fingerprint="abc123",
        num_images=3, strength_hint=0.85,
    )
    save_lora_file(sdxl_lora, path, metadata=meta)
    got = read_lora_metadata(path)
    expected = {
        "ss_network_dim": "8",
        "ss_network_alpha": "4",
        "ss_network_module": "networks.lora",
        "ss_base_model_version": "sdxl_base_v1-0",
        "ss_sd_model_name": "stable-diffusion-xl-v1-base",
        "modelspec.architecture": SDXL_ARCHITECTURE,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.title": "anna",
        "modelspec.trigger_phrase": TRIGGER_WORDS,
        "ss_output_name": "anna",
        "hyperlora_model_name": "sdxl_hyper_id_lora_v1_fidelity",
        "hyperlora_model_fingerprint": "abc123",
        "hyperlora_num_images": "3",
        "hyperlora_strength_hint": "0.85",
        "hyperlora_trigger_words": "fcsks fxhks fhyks",
    }
    assert {k: got.get(k) for k in expected} == expected
    assert "3 photos" in got["modelspec.description"] and "fcsks fxhks fhyks, " in got["modelspec.description"]
    assert all(isinstance(v, str) for v in got.values())


def test_metadata_of_combined_loras(tmp_path):
    a = random_lora(TINY.modules, rank=4, seed=1)
    b = random_lora(TINY.modules, rank=2, seed=2)
    save_lora_file(weighted_sum([a, a], [0.5, 0.5]), tmp_path / "same.safetensors")
    meta = read_lora_metadata(tmp_path / "same.safetensors")
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("8", "8")
    mixed = dict(a)
    mixed.update({k: v for k, v in b.items() if k.startswith(TINY.modules[0][0])})
    save_lora_file(mixed, tmp_path / "mixed.safetensors", metadata={"extra": "1", "n": 3})  # type: ignore[dict-item]
    meta = read_lora_metadata(tmp_path / "mixed.safetensors")
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("Dynamic", "Dynamic")
    assert (meta["extra"], meta["n"]) == ("1", "3")


def test_save_errors_keep_existing_file(tmp_path):
    lora = random_lora(TINY.modules, rank=4, seed=3)
    with pytest.raises(LoraError, match=r"written as \.safetensors; '.*me\.ckpt' has another extension"):
        save_lora_file(lora, tmp_path / "me.ckpt")
    path = tmp_path / "me.safetensors"
    save_lora_file(lora, path)
    before = path.read_bytes()
    huge = dict(lora)
    key = lora_prefixes(lora)[1] + ".lora_up.weight"
    huge[key] = lora[key] * 1e6  # overflows fp16
    with pytest.raises(LoraError, match=rf"'{re.escape(key)}' has NaN or infinite values in torch.float16"):
        save_lora_file(huge, path)
    assert path.read_bytes() == before
    nan = dict(lora)
    nan[key] = torch.full_like(lora[key], float("nan"))
    with pytest.raises(LoraError, match=rf"'{re.escape(key)}' has NaN or infinite values\.$"):
        save_lora_file(nan, path)
    assert path.read_bytes() == before
    save_lora_file(huge, path, dtype=torch.float32)  # a wider dtype works
    assert torch.equal(load_lora_file(path)[key], huge[key])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["me.safetensors"]


def test_load_refuses_what_is_not_a_lora(tmp_path):
    with pytest.raises(LoraError, match="does not exist"):
        load_lora_file(tmp_path / "missing.safetensors")

    pickled = tmp_path / "old.ckpt"
    torch.save({"x.lora_down.weight": torch.zeros(1, 1)}, pickled)
    with pytest.raises(LoraError, match="pickled PyTorch file.*never unpickles"):
        load_lora_file(pickled)

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(LoraError, match="not a readable .safetensors LoRA file"):
        load_lora_file(junk)

    other = tmp_path / "other.safetensors"
    save_file({"model.weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(LoraError, match=r"holds no kohya LoRA weights .*'model\.weight'"):
        load_lora_file(other)

    identity = tmp_path / "id.safetensors"
    save_file({"tokens": torch.zeros(8, 6)}, str(identity), metadata={"format": "hyperlora.identity"})
    with pytest.raises(LoraError, match="HyperLoRA identity file, not a LoRA"):
        load_lora_file(identity)

    folder = write_hyperlora_folder(tmp_path / "model", preset="tiny")
    for name in ("hyper_lora_modules.safetensors", "resampler.safetensors"):
        with pytest.raises(LoraError, match="part of a HyperLoRA model, not a LoRA"):
            load_lora_file(folder / name)


def test_load_refuses_damaged_or_exotic_loras(tmp_path):
    lora = random_lora(TINY.modules, rank=4, seed=4)
    prefix = lora_prefixes(lora)[2]
    nan = dict(lora)
    nan[prefix + ".lora_down.weight"] = torch.full_like(lora[prefix + ".lora_down.weight"], float("nan"))
    save_file(nan, str(tmp_path / "nan.safetensors"))
    with pytest.raises(LoraError, match=rf"damaged: '{prefix}\.lora_down\.weight' holds NaN"):
        load_lora_file(tmp_path / "nan.safetensors")
    locon = dict(lora)
    locon[prefix + ".lora_mid.weight"] = torch.zeros(4, 4, 3, 3)
    save_file(locon, str(tmp_path / "locon.safetensors"))
    with pytest.raises(LoraError, match=rf"'{prefix}\.lora_mid\.weight', which is not part of a plain kohya LoRA"):
        load_lora_file(tmp_path / "locon.safetensors")


def test_safetensors_whose_header_size_starts_with_0x80_loads(tmp_path):
    """Regression (found by hypothesis): a header length whose low byte is 0x80, the pickle opcode, is still safetensors."""
    lora = random_lora(TINY.modules[:1], rank=2, seed=5)
    path = tmp_path / "x.safetensors"
    for n in range(256):
        save_lora_file(lora, path, metadata={"pad": "x" * n})
        if path.read_bytes()[:1] == b"\x80":
            break
    assert path.read_bytes()[:1] == b"\x80"
    back = load_lora_file(path)
    assert all(torch.equal(back[k], lora[k].half() if not k.endswith(".alpha") else lora[k]) for k in lora)
