"""hyperlora.train.frozen: the frozen SDXL parts from a diffusers folder and from a SAI single file, offline."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch

from hyperlora.errors import ModelFileError
from hyperlora.train import frozen
from hyperlora.train.toy.sdxl import tiny_sdxl_folder
from tests.train.sai_checkpoint import unet_to_sai, vae_to_sai, write_sai_checkpoint


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory) -> Path:
    return tiny_sdxl_folder(tmp_path_factory.mktemp("sdxl") / "tiny")


@pytest.fixture(scope="module")
def single_file(sdxl, tmp_path_factory) -> Path:
    return write_sai_checkpoint(sdxl, tmp_path_factory.mktemp("ckpt") / "tiny_sdxl.safetensors")


@pytest.fixture()
def offline(monkeypatch):
    """Any network connection attempt fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("hyperlora.train.frozen tried to open a network connection")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _config(sdxl: Path, part: str) -> dict:
    return json.loads((sdxl / part / "config.json").read_text())


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_single_file_unet_and_vae_equal_the_folder(sdxl, single_file, offline):
    unet_dir = frozen.load_unet(sdxl)
    unet_file = frozen.load_unet(single_file, config=_config(sdxl, "unet"))
    _same_state(unet_dir, unet_file)
    assert not any(p.requires_grad for p in unet_file.parameters()) and not unet_file.training
    x = torch.randn(2, 4, 16, 16)
    ctx = torch.randn(2, 77, 64)
    added = {"text_embeds": torch.randn(2, 32), "time_ids": torch.tensor([[128., 128, 0, 0, 128, 128]] * 2)}
    with torch.no_grad():
        a = unet_dir(x, 10, ctx, added_cond_kwargs=added).sample
        b = unet_file(x, 10, ctx, added_cond_kwargs=added).sample
    assert torch.equal(a, b)

    vae_dir = frozen.load_vae(sdxl)
    vae_file = frozen.load_vae(single_file, config=_config(sdxl, "vae"))
    _same_state(vae_dir, vae_file)
    assert vae_file.config.scaling_factor == vae_dir.config.scaling_factor


def test_single_file_text_encoders_equal_the_folder(sdxl, single_file, offline):
    te_dir = frozen.load_text_encoders(sdxl)
    configs = (_config(sdxl, "text_encoder"), _config(sdxl, "text_encoder_2"))
    te_file = frozen.load_text_encoders(single_file, tokenizer=sdxl / "tokenizer", configs=configs)
    _same_state(te_dir.text_encoder, te_file.text_encoder)
    _same_state(te_dir.text_encoder_2, te_file.text_encoder_2)
    # SDXL's second tokenizer pads with "!" (open_clip), the first with <|endoftext|>
    assert te_file.tokenizer_2.pad_token == "!" and te_file.tokenizer.pad_token == "<|endoftext|>"
    same_tokens = frozen.TextEncoders(te_dir.tokenizer, te_dir.tokenizer_2, te_file.text_encoder, te_file.text_encoder_2)
    a, pa = te_dir.encode(["a photo of a man", "x"])
    b, pb = same_tokens.encode(["a photo of a man", "x"])
    assert torch.equal(a, b) and torch.equal(pa, pb)


def test_encode_is_sdxl_penultimate_concat_and_pooled_projection(sdxl):
    te = frozen.load_text_encoders(sdxl)
    captions = ["fcsks fxhks fhyks, a woman", "a man in a hat"]
    hidden, pooled = te.encode(captions)
    assert hidden.shape == (2, 77, 64) and pooled.shape == (2, 32)
    assert te.dims == (64, 32)
    ids1 = te.tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    ids2 = te.tokenizer_2(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        h1 = te.text_encoder(ids1, output_hidden_states=True).hidden_states[-2]
        o2 = te.text_encoder_2(ids2, output_hidden_states=True)
    assert torch.allclose(hidden, torch.cat([h1, o2.hidden_states[-2]], -1))
    assert torch.allclose(pooled, o2.text_embeds)
    # the last layer is not used: hidden states differ from the final (post-norm) output
    assert not torch.allclose(hidden[..., :32], te.text_encoder(ids1).last_hidden_state)
    assert not torch.equal(hidden[0], hidden[1])


def test_full_size_sdxl_key_map_on_meta(offline):
    """The shipped SDXL UNet / VAE configs and diffusers' converter agree on every key and shape of the
    full-size SAI layout (meta tensors: no memory)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    cfg = frozen.unet_config()
    assert cfg["cross_attention_dim"] == 2048 and cfg["transformer_layers_per_block"] == [1, 2, 10]
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg)
    sai = unet_to_sai(unet.state_dict(), cfg)
    assert len(sai) == len(unet.state_dict()) == 1680
    assert "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight" in sai
    assert tuple(sai["model.diffusion_model.label_emb.0.0.weight"].shape) == (1280, 2816)
    state = frozen.check_state(unet, frozen.sai_unet_to_diffusers(sai, cfg), "meta", "UNet")
    assert state.keys() == unet.state_dict().keys()

    vcfg = json.loads(frozen.VAE_CONFIG.read_text())
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(vcfg)
    vsai = vae_to_sai(vae.state_dict(), vcfg)
    assert tuple(vsai["first_stage_model.encoder.mid.attn_1.q.weight"].shape) == (512, 512, 1, 1)
    state = frozen.check_state(vae, convert_ldm_vae_checkpoint(vsai, vcfg), "meta", "VAE")
    assert state.keys() == vae.state_dict().keys()
    assert vae.config.scaling_factor == 0.13025


def test_wrong_files_raise_model_file_errors(tmp_path, single_file, sdxl):
    from safetensors.torch import save_file

    with pytest.raises(ModelFileError, match="does not exist"):
        frozen.load_unet(tmp_path / "missing.safetensors")
    with pytest.raises(ModelFileError, match="not a diffusers SDXL folder"):
        frozen.load_unet(tmp_path)
    other = tmp_path / "sd15_like.safetensors"
    save_file({"cond_stage_model.transformer.x": torch.zeros(2)}, str(other))
    with pytest.raises(ModelFileError, match="model.diffusion_model"):
        frozen.load_unet(other)
    # the tiny UNet's tensors against the full SDXL config: named keys, no crash
    with pytest.raises(ModelFileError, match="does not match SDXL"):
        frozen.load_unet(single_file)
    with pytest.raises(ModelFileError, match="tokenizer"):
        frozen.load_text_encoders(single_file, tokenizer=tmp_path)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 20)
    with pytest.raises(ModelFileError, match="not a readable"):
        frozen.load_vae(broken)


def test_noise_scheduler_is_sdxl_ddpm(sdxl):
    from diffusers import DDPMScheduler

    built_in = frozen.load_noise_scheduler(None)
    from_folder = frozen.load_noise_scheduler(sdxl)
    for s in (built_in, from_folder):
        assert isinstance(s, DDPMScheduler)
        assert s.config.num_train_timesteps == 1000 and s.config.prediction_type == "epsilon"
    expected = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    assert torch.allclose(built_in.betas, expected) and torch.allclose(from_folder.betas, expected)


_SPECS_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[3])
from tests.fixtures.sdxl import import_comfy, checkpoint_specs
comfy = import_comfy(sys.argv[1])
json.dump([[k, list(s)] for k, s, _d, _v in checkpoint_specs(comfy, "SDXL")], open(sys.argv[2], "w"))
"""


def test_comfyui_sdxl_checkpoint_layout_converts_on_meta(tmp_path):
    """Every tensor of a full SDXL checkpoint as ComfyUI itself saves it (keys and shapes from ComfyUI's model
    classes on meta, in a subprocess) lands in the models built from the shipped configs; no memory is used."""
    import os
    import subprocess
    import sys

    root = os.environ.get("COMFYUI_PATH", "")
    if not root or not (Path(root) / "comfy" / "model_detection.py").is_file():
        pytest.skip("COMFYUI_PATH is not set to a ComfyUI checkout (needed for ComfyUI's SDXL key layout)")
    out = tmp_path / "specs.json"
    repo = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", _SPECS_SCRIPT, root, str(out), str(repo)], check=True, timeout=300,
                   capture_output=True)
    raw = {k: torch.empty(shape, device="meta") for k, shape in json.loads(out.read_text())}
    assert len(raw) > 2500
    used = 0
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        model, state = frozen.convert_sai(part, raw)
        checked = frozen.check_state(model, state, "comfy-sdxl", part)
        assert checked.keys() == {k for k in model.state_dict() if not k.endswith("position_ids")}
        used += len(checked)
    te2, _ = frozen.convert_sai("text_encoder_2", raw)
    assert te2.config.hidden_size == 1280 and te2.config.num_hidden_layers == 32
    # all but logit_scale (unused) and CLIP-G's fused in_proj (split into q, k, v: 2 keys -> 6) are consumed
    assert used == len(raw) - 1 + 32 * 4


def test_folder_with_only_the_fp16_variant_and_broken_part(sdxl, tmp_path):
    import shutil

    folder = tmp_path / "variant"
    shutil.copytree(sdxl, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(folder / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    unet = frozen.load_unet(folder)
    _same_state(unet, frozen.load_unet(sdxl))
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelFileError, match="vae"):
        frozen.load_vae(folder)


@pytest.mark.parametrize("part,weights", [("unet", "diffusion_pytorch_model"), ("text_encoder_2", "model")])
def test_a_folder_with_only_pickled_weights_is_refused_before_any_unpickling(sdxl, tmp_path, monkeypatch, part,
                                                                             weights):
    """Issue 18: a diffusers folder whose part holds only a .bin was handed to diffusers, and only diffusers'
    weights_only default stopped it.  The pack refuses it itself, naming the file and the fix."""
    import shutil

    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    shutil.copytree(sdxl, folder)
    st = folder / part / f"{weights}.safetensors"
    torch.save(load_file(str(st)), folder / part / f"{weights}.bin")
    st.unlink()

    def no_unpickling(*args, **kwargs):
        raise AssertionError("a pickled file was opened")

    monkeypatch.setattr(torch, "load", no_unpickling)
    load = frozen.load_unet if part == "unet" else frozen.load_text_encoders
    with pytest.raises(ModelFileError) as ei:
        load(folder)
    msg = str(ei.value)
    assert f"'{folder / part / weights}.bin' is a pickled PyTorch file" in msg
    assert "never opens pickles" in msg and "single-file SDXL .safetensors checkpoint" in msg
