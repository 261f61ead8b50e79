"""CLIP vision encoder: preprocessing parity, penultimate layer, single-file layouts, shape check."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from hyperlora.encoders import ClipProcessorConfig, ClipVisionEncoder, clip_preprocess
from hyperlora.errors import DependencyError, ModelFileError
from tests.fixtures.clip import TINY, full_vit_l14_file, make_clip_vision_file

transformers = pytest.importorskip("transformers")


def images(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = [(300, 200), (180, 420), (224, 224), (10, 7), (1000, 999), (225, 224)]
    out = []
    for h, w in shapes:
        yy, xx = np.mgrid[0:h, 0:w]
        smooth = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx * yy) % 256], axis=2)
        out.append(np.clip(smooth + rng.integers(-30, 30, (h, w, 3)), 0, 255).astype(np.uint8))
    return out


@pytest.fixture(scope="module")
def encoder(clip):
    return clip          # tests/core/conftest.py


# ------------------------------------------------------------------ preprocessing


def _pil_processor():
    try:
        from transformers import CLIPImageProcessorPil
    except ImportError:
        try:
            from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
        except ImportError:        # transformers 4: the plain class is the PIL implementation
            from transformers import CLIPImageProcessor as CLIPImageProcessorPil
    return CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})


def test_preprocess_equals_transformers_pil_processor():
    from PIL import Image

    imgs = images()
    ours = clip_preprocess(imgs)
    assert ours.shape == (len(imgs), 3, 224, 224) and ours.dtype == torch.float32
    proc = _pil_processor()
    for i, img in enumerate(imgs):
        ref = proc(images=Image.fromarray(img), return_tensors="pt")["pixel_values"][0]
        assert ref.shape == (3, 224, 224)
        torch.testing.assert_close(ours[i], ref.float(), atol=1e-5, rtol=0, msg=f"image {i} {img.shape}")


def test_preprocess_close_to_default_processor():
    """transformers 5's default CLIPImageProcessor resizes with torchvision: close, not equal."""
    from PIL import Image

    imgs = images()[:3]
    ours = clip_preprocess(imgs)
    proc = transformers.CLIPImageProcessor.from_dict(json.loads(json.dumps({
        "size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}})))
    for i, img in enumerate(imgs):
        ref = proc(images=Image.fromarray(img), return_tensors="pt")["pixel_values"][0].float()
        assert (ours[i] - ref).abs().mean() < 0.05


def test_preprocess_known_values():
    """A uniform image maps to (v/255 - mean)/std exactly, whatever its size."""
    img = np.zeros((50, 80, 3), np.uint8)
    img[:] = (255, 128, 0)
    px = clip_preprocess([img])[0]
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    for c, v in enumerate((255, 128, 0)):
        assert px[c].flatten().unique().numel() == 1
        assert px[c, 0, 0].item() == pytest.approx((v / 255 - mean[c]) / std[c], abs=1e-5)


def test_preprocess_grayscale_and_rgba_inputs():
    rgb = images()[0]
    gray = rgb[:, :, 1]
    out = clip_preprocess([gray, gray[:, :, None], np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)])])
    torch.testing.assert_close(out[0], out[1])
    torch.testing.assert_close(out[2], clip_preprocess([rgb])[0])
    with pytest.raises(ValueError, match="uint8"):
        clip_preprocess([rgb.astype(np.float32)])


def test_processor_config_from_folder(clip_dirs, tmp_path):
    cfg = ClipProcessorConfig.from_folder(clip_dirs.processor)
    assert cfg == ClipProcessorConfig()           # the old-style released file = standard values
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}}))
    assert clip_preprocess(images()[:1], ClipProcessorConfig.from_folder(tmp_path)).shape == (1, 3, 336, 336)
    with pytest.raises(ModelFileError, match="does not exist"):
        ClipProcessorConfig.from_folder(tmp_path / "nope")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ModelFileError, match="not readable JSON"):
        ClipProcessorConfig.from_folder(tmp_path / "bad")


# ------------------------------------------------------------------ features


def test_penultimate_hidden_states_match_transformers(encoder, clip_dirs):
    ref_model = transformers.CLIPVisionModel.from_pretrained(str(clip_dirs.model)).eval()
    px = encoder.preprocess(images()[:3])
    with torch.no_grad():
        out = ref_model(pixel_values=px, output_hidden_states=True)
    feats = encoder(px)
    assert feats.shape == (3, 257, TINY["hidden_size"])
    assert len(out.hidden_states) == TINY["num_hidden_layers"] + 1
    torch.testing.assert_close(feats, out.hidden_states[-2], atol=1e-5, rtol=1e-5)
    # not the last layer, and not after the post layer norm
    assert (feats - out.last_hidden_state).abs().max() > 1e-2
    assert (feats[:, 0] - out.pooler_output).abs().max() > 1e-2


def test_encode_batch_and_dtype(encoder, clip_dirs):
    imgs = images()
    feats = encoder.encode(imgs)
    assert feats.shape == (len(imgs), 257, TINY["hidden_size"])
    assert torch.isfinite(feats).all()
    single = encoder.encode(imgs[1:2])
    torch.testing.assert_close(feats[1:2], single, atol=1e-4, rtol=1e-4)     # batching changes nothing
    bf16 = ClipVisionEncoder.from_pretrained(clip_dirs.model, dtype=torch.bfloat16, require_vit_l14=False)
    assert bf16.dtype == torch.bfloat16
    out = bf16.encode(imgs[:2])
    assert out.dtype == torch.bfloat16
    assert (out.float() - feats[:2]).abs().max() / feats[:2].abs().max() < 0.1


@pytest.mark.parametrize("layout", ["comfy", "hf", "open_clip"])
def test_single_file_layouts_give_same_features(encoder, tmp_path, layout):
    path = make_clip_vision_file(tmp_path / f"clip_vision_{layout}.safetensors", layout)
    single = ClipVisionEncoder.from_single_file(path, require_vit_l14=False)
    px = encoder.preprocess(images()[:2])
    torch.testing.assert_close(single(px), encoder(px), atol=1e-6, rtol=1e-6)
    assert single.shape == encoder.shape


# ------------------------------------------------------------------ shape check and bad files


def test_tiny_model_rejected_by_default(clip_dirs, tmp_path):
    with pytest.raises(ModelFileError, match=r"hidden size 128, 3 layers, patch 14, 224 px.*needs OpenAI CLIP ViT-L/14"):
        ClipVisionEncoder.from_pretrained(clip_dirs.model, clip_dirs.processor)
    path = make_clip_vision_file(tmp_path / "tiny.safetensors", "comfy")
    with pytest.raises(ModelFileError, match=r"tiny.safetensors is a hidden size 128"):
        ClipVisionEncoder.from_single_file(path)


def test_vit_h_shaped_file_message(tmp_path):
    dims = dict(TINY, hidden_size=1280, intermediate_size=32, num_hidden_layers=2)
    path = make_clip_vision_file(tmp_path / "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors", "open_clip",
                                 dims=dims, dtype=torch.float16)
    with pytest.raises(ModelFileError) as err:
        ClipVisionEncoder.from_single_file(path)
    msg = str(err.value)
    assert "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors" in msg and "hidden size 1280" in msg
    assert "hidden size 1024, 24 layers, patch 14, 224 px" in msg and "ViT-H" in msg and "models/clip_vision" in msg


def test_336px_file_message(tmp_path):
    path = make_clip_vision_file(tmp_path / "clip_l_336.safetensors", "comfy", dims=dict(TINY, image_size=336))
    with pytest.raises(ModelFileError, match="336 px"):
        ClipVisionEncoder.from_single_file(path)


def test_not_clip_files(tmp_path):
    other = tmp_path / "dino.safetensors"
    save_file({"encoder.layer.0.attention.weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(ModelFileError, match="not a CLIP vision model"):
        ClipVisionEncoder.from_single_file(other)
    siglip = tmp_path / "siglip.safetensors"
    save_file({"vision_model.embeddings.patch_embedding.weight": torch.zeros(4, 3, 14, 14)}, str(siglip))
    with pytest.raises(ModelFileError, match="SigLIP"):
        ClipVisionEncoder.from_single_file(siglip)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00garbage")
    with pytest.raises(ModelFileError, match="not a readable"):
        ClipVisionEncoder.from_single_file(broken)
    ckpt = tmp_path / "clip.pt"
    ckpt.write_bytes(b"x")
    with pytest.raises(ModelFileError, match="not a .safetensors"):
        ClipVisionEncoder.from_single_file(ckpt)
    with pytest.raises(ModelFileError, match="does not exist"):
        ClipVisionEncoder.from_single_file(tmp_path / "missing.safetensors")


def test_incomplete_file_and_folder(tmp_path, clip_dirs):
    path = make_clip_vision_file(tmp_path / "full.safetensors", "comfy")
    from safetensors.torch import load_file

    state = load_file(str(path))
    del state["vision_model.encoder.layers.1.mlp.fc2.bias"]
    save_file(state, str(tmp_path / "cut.safetensors"))
    with pytest.raises(ModelFileError, match=r"missing \['encoder.layers.1.mlp.fc2.bias'\]|missing \['vision_model.encoder.layers.1.mlp.fc2.bias'\]"):
        ClipVisionEncoder.from_single_file(tmp_path / "cut.safetensors", require_vit_l14=False)
    empty = tmp_path / "clip_vit" / "empty"
    empty.mkdir(parents=True)
    with pytest.raises(ModelFileError, match="config.json is missing"):
        ClipVisionEncoder.from_pretrained(empty)


def test_missing_transformers_is_dependency_error(clip_dirs, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)     # makes `import transformers` raise ImportError
    with pytest.raises(DependencyError, match="pip install"):
        ClipVisionEncoder.from_pretrained(clip_dirs.model, require_vit_l14=False)


@pytest.mark.slow
def test_full_size_vit_l14(cache_dir):
    """Random full-size ViT-L/14 (fp16 file, ~600 MB, cached): strict shape check passes, [N, 257, 1024]."""
    path = full_vit_l14_file(cache_dir)
    enc = ClipVisionEncoder.from_single_file(path, dtype=torch.float32)
    assert enc.shape.hidden_size == 1024 and enc.shape.num_layers == 24 and enc.shape.num_heads == 16
    assert len(enc.model.encoder.layers if hasattr(enc.model, "encoder") else enc.model.vision_model.encoder.layers) == 23
    feats = enc.encode(images()[:1])
    assert feats.shape == (1, 257, 1024) and torch.isfinite(feats).all()
    fp16 = ClipVisionEncoder.from_single_file(path)
    assert fp16.dtype == torch.float16      # dtype as stored unless asked
