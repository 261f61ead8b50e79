"""The A.5 filter functions and the pluggable aesthetic scorer (linear and MLP LAION head layouts)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from hyperlora.errors import ModelFileError, SettingError
from hyperlora.train import aesthetic, filters
from tests.fixtures.clip import make_full_clip_folder


@pytest.mark.parametrize("caption, found", [
    ("We are at the beach", ["we"]),
    ("a photo of them and THEIR dog", ["them", "their"]),
    ("the cat is ours; ourselves", ["ours", "ourselves"]),
    ("they're smiling", ["they"]),
    ("Us, together", ["us"]),
    ("a woman in a hat", []),
    ("the user wears weather gear, theme: thematic", []),   # pronouns inside other words do not count
    ("usual ourang-utan theirsss", []),
    ("", []),
])
def test_plural_pronouns_whole_words_any_case(caption, found):
    assert filters.plural_pronouns(caption) == found
    assert filters.has_plural_pronoun(caption) == bool(found)


def test_min_side_and_face_area():
    assert filters.big_enough(768, 1024, 768) and not filters.big_enough(767, 2000, 768)
    assert filters.face_area_ratio([0, 0, 10, 10], 100, 100) == pytest.approx(0.01)
    assert filters.face_area_ratio([-10, -10, 10, 10], 100, 100) == pytest.approx(0.01)   # clipped to the image
    assert filters.face_reason([], 100, 100, 0.03) == "no_face"
    assert filters.face_reason([[0, 0, 50, 50], [60, 60, 90, 90]], 100, 100, 0.03) == "many_faces"
    assert filters.face_reason([[0, 0, 17, 17]], 100, 100, 0.03) == "small_face"       # 0.0289
    assert filters.face_reason([[0, 0, 18, 18]], 100, 100, 0.03) is None               # 0.0324
    assert filters.face_reason([[0, 0, 10, 30]], 100, 100, 0.03) == "small_face"       # exactly 0.03: not above


def test_report_counts_and_merges():
    a, b = filters.FilterReport(), filters.FilterReport()
    a.seen, a.kept = 3, 1
    a.drop("small")
    a.drop("corrupt")
    b.seen = 2
    b.drop("small")
    b.drop("aesthetic")
    a.add(b)
    assert a.seen == 5 and a.dropped["small"] == 2 and a.dropped["aesthetic"] == 1
    assert filters.FilterReport.from_dict(a.as_dict()) == a
    with pytest.raises(ValueError):
        a.drop("blurry")
    assert any("plural" in line for line in a.lines())


def test_no_scorer_keeps_everything():
    s = aesthetic.load_scorer("none", clip_folder=None)
    assert s.score([np.zeros((4, 4, 3), np.uint8)] * 2) == [math.inf, math.inf]
    with pytest.raises(SettingError, match="aesthetic-clip"):
        aesthetic.load_scorer("head.safetensors", clip_folder=None)


def test_head_layouts(tmp_path):
    torch.manual_seed(0)
    lin = torch.nn.Linear(768, 1)
    save_file({"weight": lin.weight.detach(), "bias": lin.bias.detach()}, str(tmp_path / "linear.safetensors"))
    head = aesthetic.load_head(tmp_path / "linear.safetensors")
    x = torch.randn(3, 768)
    assert torch.allclose(head(x), lin(x), atol=1e-6)

    # improved-aesthetic-predictor: Linear layers at Sequential indices 0, 2, 4, 6, 7 (dropout between, no activation)
    dims = [768, 1024, 128, 64, 16, 1]
    mlp = [torch.nn.Linear(i, o) for i, o in zip(dims[:-1], dims[1:])]
    state = {}
    for idx, layer in zip((0, 2, 4, 6, 7), mlp):
        state[f"layers.{idx}.weight"] = layer.weight.detach()
        state[f"layers.{idx}.bias"] = layer.bias.detach()
    save_file(state, str(tmp_path / "mlp.safetensors"))
    head = aesthetic.load_head(tmp_path / "mlp.safetensors")
    expected = x
    for layer in mlp:
        expected = layer(expected)
    assert len(head) == 5 and torch.allclose(head(x), expected, atol=1e-5)

    save_file({"layers.0.weight": torch.zeros(4, 8), "layers.2.weight": torch.zeros(1, 5)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ModelFileError, match="reads 5 features"):
        aesthetic.load_head(tmp_path / "bad.safetensors")
    save_file({"layers.0.weight": torch.zeros(4, 8)}, str(tmp_path / "wide.safetensors"))
    with pytest.raises(ModelFileError, match="4 outputs"):
        aesthetic.load_head(tmp_path / "wide.safetensors")
    (tmp_path / "head.pth").write_bytes(b"pickle")
    with pytest.raises(ModelFileError, match="not a .safetensors"):
        aesthetic.load_head(tmp_path / "head.pth")


def test_laion_scorer_on_normalised_projected_clip_embedding(tmp_path):
    from transformers import CLIPModel

    from hyperlora.encoders import clip_preprocess

    folder = make_full_clip_folder(tmp_path / "clip")     # tiny CLIPModel: projection 64
    torch.manual_seed(1)
    w, b = torch.randn(1, 64), torch.tensor([5.0])
    save_file({"weight": w, "bias": b}, str(tmp_path / "head.safetensors"))
    scorer = aesthetic.load_scorer(tmp_path / "head.safetensors", clip_folder=folder)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (90, 120, 3), dtype=np.uint8) for _ in range(3)]
    scores = scorer.score(images)
    model = CLIPModel.from_pretrained(str(folder)).eval()
    with torch.no_grad():   # CLIP's image features: projection of the post-layernorm class token
        emb = model.visual_projection(model.vision_model(pixel_values=clip_preprocess(images)).pooler_output)
    emb = emb / emb.norm(dim=-1, keepdim=True)
    assert scores == pytest.approx((emb @ w.T + b).reshape(-1).tolist(), abs=1e-4)
    assert len(set(round(s, 4) for s in scores)) == 3

    save_file({"weight": torch.randn(1, 768), "bias": b}, str(tmp_path / "l14.safetensors"))
    with pytest.raises(ModelFileError, match="768"):
        aesthetic.load_scorer(tmp_path / "l14.safetensors", clip_folder=folder)


@pytest.mark.parametrize("layout", ["comfy", "open_clip"])
def test_projected_clip_from_comfyui_clip_vision_files(tmp_path, layout):
    """ComfyUI's clip_vision files (HF keys + visual_projection, or open_clip with visual.proj) give the
    same projected embedding as the weights put into transformers by hand; a file without projection is refused."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from tests.fixtures.clip import TINY, make_clip_vision_file, make_clip_folder

    path = make_clip_vision_file(tmp_path / f"{layout}.safetensors", layout)
    model = aesthetic.load_projected_clip(path)
    assert model.config.projection_dim == TINY["projection_dim"] and model.config.num_hidden_layers == 3
    from safetensors.torch import load_file

    state = load_file(str(path))
    proj = state["visual_projection.weight"] if layout == "comfy" else state["visual.proj"].T
    comfy = load_file(str(make_clip_vision_file(tmp_path / "ref.safetensors", "comfy")))
    ref = CLIPVisionModelWithProjection(CLIPVisionConfig(
        **{k: v for k, v in TINY.items() if k != "projection_dim"}, projection_dim=TINY["projection_dim"],
        hidden_act="quick_gelu")).eval()
    sd = ref.state_dict()
    pre = "vision_model." if any(k.startswith("vision_model.") for k in sd) else ""
    ref.load_state_dict({**{pre + k[len("vision_model."):]: v for k, v in comfy.items() if k.startswith("vision_model.")},
                         "visual_projection.weight": proj}, strict=False)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(model(pixel_values=x).image_embeds, ref(pixel_values=x).image_embeds, atol=1e-4)
    folders = make_clip_folder(tmp_path / "released")      # vision tower only: no projection
    with pytest.raises(ModelFileError, match="no image projection"):
        aesthetic.load_projected_clip(folders.model)
