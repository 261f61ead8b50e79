"""python -m hyperlora.tools.refine on a tiny random diffusers SDXL folder (real diffusers classes, SDXL
conditioning: two text encoders, pooled text embedding, size ids) and a HyperLoRA model made for its
attention layers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from hyperlora.checkpoint import load_hyper_lora
from hyperlora.identity import Identity, load_identity, save_identity
from hyperlora.lora import normalize_tokens
from hyperlora.lora_file import load_lora_file
from tests.conftest import skip_or_fail
from tests.fixtures.antelope import face_image
from tests.fixtures.clip import tiny_text_config, write_tiny_tokenizer
from tests.fixtures.hyperlora_models import Preset, write_hyperlora_folder

try:
    import diffusers
except ImportError:   # pragma: no cover - CI installs it with the test extra
    diffusers = None


def tiny_sdxl(folder: Path) -> Path:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=(2, 4), norm_num_groups=8, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8)
    unet.save_pretrained(folder / "unet")
    diffusers.AutoencoderKL(block_out_channels=(16,), latent_channels=4, norm_num_groups=8,
                            down_block_types=("DownEncoderBlock2D",),
                            up_block_types=("UpDecoderBlock2D",)).save_pretrained(folder / "vae")
    for name, cls, extra in (("", CLIPTextModel, {}), ("_2", CLIPTextModelWithProjection, {"projection_dim": 32})):
        tok = write_tiny_tokenizer(folder / f"tokenizer{name}")
        tok.save_pretrained(folder / f"tokenizer{name}")
        cls(CLIPTextConfig(**tiny_text_config(tok, **extra))).save_pretrained(folder / f"text_encoder{name}")
    diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                            beta_end=0.012).save_pretrained(folder / "scheduler")
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    if diffusers is None:
        skip_or_fail("pip install diffusers (the refine CLI runs a diffusers UNet)")
    from hyperlora.lora_functional import diffusers_lora_targets

    root = tmp_path_factory.mktemp("refine_cli")
    sdxl = tiny_sdxl(root / "sdxl")
    unet = diffusers.UNet2DConditionModel.from_pretrained(sdxl, subfolder="unet")
    targets = diffusers_lora_targets(unet)
    specs = [(p[: -len("_to_q")], m.in_features, targets[p[: -len("_to_q")] + "_to_k"].in_features
              if "_attn2" in p else None) for p, m in targets.items() if p.endswith("_to_q")]
    assert len(targets) == 4 * len(specs) and len(specs) == 8     # attn1 + attn2 of 4 transformer blocks (down, mid, 2 up)
    preset = Preset(modules=tuple(specs), hyper_dim=4, rank=2, dim=32, depth=1, heads=12, dim_head=4, ff_mult=2,
                    id_embed_dim=512, num_id_tokens=4, id_token_dim=48, clip_dim=128)
    hl_dir = write_hyperlora_folder(root / "hl", preset=preset, seed=4)
    model = load_hyper_lora(hl_dir, dtype=torch.float32)
    tokens = normalize_tokens(torch.randn(model.arch.num_tokens, 4, generator=torch.Generator().manual_seed(2)))
    emb = torch.randn(512)
    save_identity(Identity(tokens, None, model.name, model.fingerprint, 1, {}, emb / emb.norm()), root / "id.safetensors")
    Image.fromarray(face_image((40, 48), [(24, 20, 30)], seeds=[1])).save(root / "photo.png")
    return root, sdxl, hl_dir, tokens


@pytest.mark.parametrize("mode", ["coefficients", "lora"])
def test_refine_cli_writes_the_refined_identity_or_lora(setup, mode, capsys):
    from hyperlora.tools.refine import main

    root, sdxl, hl_dir, tokens = setup
    out, lora_out = root / f"{mode}_id.safetensors", root / f"{mode}_lora.safetensors"
    argv = ["--identity", str(root / "id.safetensors"), "--hyper-lora", str(hl_dir), "--sdxl", str(sdxl),
            "--photo", str(root / "photo.png"), "--prompt", "fcsks fxhks fhyks, a photo of a person",
            "--mode", mode, "--steps", "3", "--size", "16", "--learning-rate", "0.05", "--lora-out", str(lora_out)]
    if mode == "coefficients":
        argv += ["--out", str(out)]
    assert main(argv) == 0
    report = capsys.readouterr().out
    assert f"refined in {mode} mode: 3 steps" in report and "before" in report and "after" in report
    lora = load_lora_file(lora_out)
    assert len([k for k in lora if k.endswith(".lora_down.weight")]) == 32
    if mode == "coefficients":
        refined = load_identity(out)
        assert refined.tokens.shape == tokens.shape and not torch.allclose(refined.tokens, tokens)
        assert refined.settings["refined"].startswith("coefficients, 3 steps")
    else:
        assert not out.exists()


def test_refine_cli_reports_user_errors(setup, tmp_path, capsys):
    from hyperlora.tools.refine import main

    root, _sdxl, hl_dir, _ = setup
    argv = ["--identity", str(root / "id.safetensors"), "--hyper-lora", str(hl_dir), "--sdxl", str(tmp_path),
            "--photo", str(root / "photo.png"), "--prompt", "x", "--out", str(tmp_path / "o.safetensors")]
    assert main(argv) == 1
    with pytest.raises(SystemExit):
        main(argv[:-2] + ["--mode", "lora"])              # lora mode without --lora-out
