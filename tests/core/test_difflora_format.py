"""The DiffLoRA model folder (hyperlora/difflora/format.py): round trip and strict refusals."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from hyperlora.difflora.format import (
    CONFIG_FILE,
    DIT_FILE,
    FORMAT_VERSION,
    LAE_FILE,
    read_difflora_folder,
    save_difflora_folder,
)
from hyperlora.difflora.lae import LaeConfig, LoraAutoencoder
from hyperlora.difflora.lora_space import LoraLayout, LoraModule
from hyperlora.errors import ModelFileError, SettingError

LAYOUT = LoraLayout((LoraModule("lora_unet_x_to_q", 16, 8, 2), LoraModule("lora_unet_x_to_out_0", 8, 16, 2)))
CONFIG = LaeConfig(latent_channels=4, width=16, depth=1, heads=2)
DIT_CONFIG = {"width": 32, "depth": 2, "kind": "test-dit"}
CONDITION = {"face": "arcface-512", "image": "clip-vit-l14", "tokens": 4}


def _lae() -> LoraAutoencoder:
    torch.manual_seed(0)
    lae = LoraAutoencoder(CONFIG, LAYOUT)
    lae.module_scale.fill_(0.05)
    return lae


def _dit_state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {"blocks.0.weight": torch.randn(32, 32, generator=gen), "blocks.0.bias": torch.zeros(32),
            "out.weight": torch.randn(4, 32, generator=gen).half()}


def _save(folder, **over):
    lae = over.pop("lae", None) or _lae()
    kw = dict(lae=lae, lae_config=CONFIG, layout=LAYOUT, dit_state=_dit_state(), dit_config=DIT_CONFIG,
              condition=CONDITION, latent_scale=1.7)
    kw.update(over)
    return save_difflora_folder(folder, **kw)


def test_round_trip(tmp_path):
    lae = _lae()
    folder = _save(tmp_path / "model", lae=lae)
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG_FILE, DIT_FILE, LAE_FILE]  # no temporary files left
    files = read_difflora_folder(folder)
    assert files.lae_config == CONFIG and files.layout == LAYOUT and files.version == FORMAT_VERSION
    assert files.dit_config == DIT_CONFIG and files.condition == CONDITION and files.latent_scale == 1.7
    assert set(files.lae_state) == set(lae.state_dict())
    for k, v in lae.state_dict().items():
        assert torch.equal(files.lae_state[k], v), k
    for k, v in _dit_state().items():
        assert files.dit_state[k].dtype == v.dtype and torch.equal(files.dit_state[k], v), k
    rebuilt = files.build_lae()
    z = torch.randn(2, lae.num_tokens, CONFIG.latent_channels)
    with torch.no_grad():
        for (u1, d1), (u2, d2) in zip(lae.eval().decode(z), rebuilt.decode(z)):
            assert torch.equal(u1, u2) and torch.equal(d1, d2)
    body = json.loads((folder / CONFIG_FILE).read_text())
    assert list(body) == ["format", "version", "lae", "dit", "layout", "condition", "latent_scale"]
    # saving again into the same folder overwrites it
    _save(folder, latent_scale=2.5)
    assert read_difflora_folder(folder).latent_scale == 2.5


def _edit_json(folder, fn):
    body = json.loads((folder / CONFIG_FILE).read_text())
    fn(body)
    (folder / CONFIG_FILE).write_text(json.dumps(body))


@pytest.mark.parametrize("edit, pattern", [
    (lambda b: b.update(version=2), r"format version 2; this pack reads version 1\. Update the pack"),
    (lambda b: b.update(format="something"), r"format 'something', not 'hyperlora-difflora'"),
    (lambda b: b.update(extra=1), r"unknown field 'extra'"),
    (lambda b: b.pop("condition"), r"lacks the field 'condition'"),
    (lambda b: b.update(latent_scale=0), r"latent_scale is 0; it must be a finite number > 0"),
    (lambda b: b.update(dit=[1]), r"'dit' must be a JSON object"),
    (lambda b: b["lae"].update(depth_x=3), r"unknown field\(s\) \['depth_x'\].*difflora\.json is damaged"),
    (lambda b: b["lae"].update(depth=2), r"lae\.safetensors' lacks the tensor 'encoder\.layers\.1\."),
    (lambda b: b["layout"]["modules"][0].update(rank=3),
     (r"lae\.safetensors' has 'enc_rank_pos' of shape \[2, 16\], but the config and layout need \[3, 16\]; "
      r"it does not match the LAE that difflora\.json describes; save the model again")),
])
def test_json_refusals_name_the_file_and_the_fix(tmp_path, edit, pattern):
    folder = _save(tmp_path / "m")
    _edit_json(folder, edit)
    with pytest.raises(ModelFileError, match=pattern) as info:
        read_difflora_folder(folder)
    assert "difflora.json" in str(info.value) or "lae.safetensors" in str(info.value)


def test_tensor_file_refusals(tmp_path):
    folder = _save(tmp_path / "m")
    good = load_file(str(folder / LAE_FILE))
    meta = {"format": "hyperlora-difflora", "version": "1", "part": "lae"}

    save_file(dict(good, extra=torch.zeros(2)), str(folder / LAE_FILE), metadata=meta)
    with pytest.raises(ModelFileError, match=r"lae\.safetensors' has the unknown tensor 'extra'.*save the model again"):
        read_difflora_folder(folder)

    missing = dict(good)
    missing.pop("to_latent.bias")
    save_file(missing, str(folder / LAE_FILE), metadata=meta)
    with pytest.raises(ModelFileError, match=r"lacks the tensor 'to_latent\.bias' \(1 missing in all\)"):
        read_difflora_folder(folder)

    save_file(dict(good, **{"from_latent.weight": torch.zeros(16, 5)}), str(folder / LAE_FILE), metadata=meta)
    with pytest.raises(ModelFileError, match=r"'from_latent\.weight' of shape \[16, 5\], but the config and layout "
                                             r"need \[16, 4\]"):
        read_difflora_folder(folder)

    bad = dict(good)
    bad["from_latent.bias"] = bad["from_latent.bias"].clone()
    bad["from_latent.bias"][3] = math.nan
    save_file(bad, str(folder / LAE_FILE), metadata=meta)
    with pytest.raises(ModelFileError, match=r"lae\.safetensors': tensor 'from_latent\.bias' contains 1 NaN/inf"):
        read_difflora_folder(folder)

    # the DiT file in the LAE's place (files of two parts mixed) is named as such
    (folder / LAE_FILE).write_bytes((folder / DIT_FILE).read_bytes())
    with pytest.raises(ModelFileError, match=r"is not the DiffLoRA lae file .*part 'dit'.*copy the whole folder"):
        read_difflora_folder(folder)

    # a pickle is never opened
    torch.save(good, folder / LAE_FILE)
    with pytest.raises(ModelFileError, match=r"lae\.safetensors' is a pickled PyTorch file.*never unpickles"):
        read_difflora_folder(folder)

    (folder / LAE_FILE).write_bytes(b"<html>not found</html>")
    with pytest.raises(ModelFileError, match=r"lae\.safetensors' is not a valid safetensors file"):
        read_difflora_folder(folder)

    (folder / DIT_FILE).unlink()
    save_file(good, str(folder / LAE_FILE), metadata=meta)
    with pytest.raises(ModelFileError, match=r"has no dit\.safetensors; copy the whole folder"):
        read_difflora_folder(folder)


def test_missing_json_and_folder(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist or is not a folder"):
        read_difflora_folder(tmp_path / "nope")
    folder = _save(tmp_path / "m")
    (folder / CONFIG_FILE).unlink()
    with pytest.raises(ModelFileError, match=r"not a DiffLoRA model folder: it has no difflora\.json"):
        read_difflora_folder(folder)


def test_save_refusals(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(SettingError, match=r"holds other files \(e.g. .notes.txt.\) and no difflora.json"):
        _save(other)
    assert (other / "notes.txt").read_text() == "mine" and len(list(other.iterdir())) == 1
    with pytest.raises(SettingError, match="latent_scale is nan"):
        _save(tmp_path / "a", latent_scale=math.nan)
    with pytest.raises(SettingError, match="dit_config cannot be written as JSON"):
        _save(tmp_path / "b", dit_config={"f": object()})
    nan_dit = _dit_state()
    nan_dit["out.weight"][0, 0] = math.inf
    with pytest.raises(SettingError, match=r"The DiT state: tensor 'out\.weight' holds NaN/inf"):
        _save(tmp_path / "c", dit_state=nan_dit)
    with pytest.raises(SettingError, match=r"tensor 'steps' is torch\.int64"):
        _save(tmp_path / "d", dit_state=dict(_dit_state(), steps=torch.tensor(3)))
    with pytest.raises(SettingError, match="built with another config or layout"):
        _save(tmp_path / "e", lae_config=LaeConfig(latent_channels=4, width=16, depth=2, heads=2))
    state = _lae().state_dict()
    state.pop("module_scale")
    with pytest.raises(SettingError, match=r"lacks the tensor 'module_scale'.*LoraAutoencoder\(lae_config, layout\)"):
        _save(tmp_path / "f", lae=state)
    assert not any((tmp_path / n).exists() for n in "abcdef")  # nothing written for a refused save


def test_interrupted_overwrite_leaves_no_half_model(tmp_path, monkeypatch):
    """A save that dies after the new LAE file but before the JSON leaves a folder the reader refuses, never a
    mix of the new LAE and the old DiT read as one model."""
    import hyperlora.difflora.format as fmt

    folder = _save(tmp_path / "m")
    real = fmt.save_file_atomic

    def dies_on_dit(tensors, path, **kw):
        if path.name == DIT_FILE:
            raise OSError(28, "No space left on device")
        return real(tensors, path, **kw)

    monkeypatch.setattr(fmt, "save_file_atomic", dies_on_dit)
    with pytest.raises(OSError, match="No space left"):
        _save(folder, latent_scale=3.0)
    with pytest.raises(ModelFileError, match="has no difflora.json \\(or a save into it was interrupted\\)"):
        read_difflora_folder(folder)
    monkeypatch.setattr(fmt, "save_file_atomic", real)
    _save(folder, latent_scale=3.0)  # saving again repairs it
    assert read_difflora_folder(folder).latent_scale == 3.0


def test_a_part_whose_header_length_starts_with_byte_0x80_is_read(tmp_path):
    """A safetensors file starts with its header length (8 bytes, little endian): 0x..80 begins with the byte a
    pickle begins with, and such a file is still read (the pickle check comes only after a failed header)."""
    folder = _save(tmp_path / "model")
    tensors = load_file(str(folder / LAE_FILE))
    with open(folder / LAE_FILE, "rb") as fh:
        meta = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))["__metadata__"]
    for pad in range(256):                       # a padding metadata entry that makes the length 0x..80
        save_file(tensors, str(folder / LAE_FILE), metadata={**meta, "padding": "x" * pad})
        if (folder / LAE_FILE).read_bytes()[:1] == b"\x80":
            break
    else:
        pytest.fail("no padding gave a header length ending in 0x80")
    files = read_difflora_folder(folder)
    assert all(torch.equal(files.lae_state[k], v) for k, v in tensors.items())
