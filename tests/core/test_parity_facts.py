"""Independent parity review: the core against docs/released-format.md (§3-§6).

Every expected value here comes from an own re-implementation written from the facts
(float64 numpy for the math, plain PIL calls for the crops, insightface's own
``FaceAnalysis`` and transformers' own ``CLIPVisionModel`` / PIL ``CLIPImageProcessor`` as
reference implementations) - never from the project's helpers.  Tiny fixtures only.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter
from safetensors.numpy import load_file as np_load
from safetensors.torch import load_file as pt_load, save_file as pt_save

from tests.fixtures.antelope import cached_antelopev2, face_image, landmark_template
from tests.fixtures.clip import make_clip_folder
from tests.fixtures.hyperlora_models import TINY, write_hyperlora_folder

OUTLINE = [1, 9, 10, 11, 12, 13, 14, 15, 16, 2, 3, 4, 5, 6, 7, 8, 0, 24, 23, 22, 21, 20, 19, 18, 32, 31,
           30, 29, 28, 27, 26, 25, 17, 101, 105, 104, 103, 102, 50, 51, 49, 48, 43]   # format §6, verbatim
LAYERS = ("to_q", "to_k", "to_v", "to_out")
KOHYA = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out_0"}


# ============================================================== float64 reference of §4-§5


def _ln(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5) * w + b


def _gelu(x: np.ndarray) -> np.ndarray:
    erf = np.vectorize(math.erf)
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def _attn(q_in: np.ndarray, ctx: np.ndarray, sd: dict, p: str, heads: int) -> np.ndarray:
    q, k, v = q_in @ sd[p + "to_q.weight"].T, ctx @ sd[p + "to_k.weight"].T, ctx @ sd[p + "to_v.weight"].T
    n, lq, inner = q.shape
    d = inner // heads
    split = lambda t: t.reshape(n, t.shape[1], heads, d).transpose(0, 2, 1, 3)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d)
    s = np.exp(s - s.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    o = (s @ v).transpose(0, 2, 1, 3).reshape(n, lq, inner)
    return o @ sd[p + "to_out.0.weight"].T


def _lin(x: np.ndarray, sd: dict, p: str) -> np.ndarray:
    return x @ sd[p + "weight"].T + sd[p + "bias"]


def ref_resampler(sd: dict, x: np.ndarray, y: np.ndarray | None, heads: int = 12) -> np.ndarray:
    """format §5.3: x = first condition (ID tokens), y = CLIP; -> [N, Q, K] float64."""
    x = _lin(x, sd, "proj_in.")
    if y is not None:
        y = _lin(y, sd, "proj_in_2.")
    lat = np.repeat(sd["latents"], x.shape[0], axis=0)
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
    for j in range(depth):
        p = f"layers.{j}."
        g = lambda name, t: _ln(t, sd[p + name + ".weight"], sd[p + name + ".bias"])  # noqa: E731
        h = g("norm_attn1", lat)
        lat = lat + _attn(h, h, sd, p + "attn1.", heads)
        lat = lat + _attn(g("norm_attn2_l", lat), g("norm_attn2_x", x), sd, p + "attn2.", heads)
        if y is not None:
            lat = lat + _attn(g("norm_attn3_l", lat), g("norm_attn3_y", y), sd, p + "attn3.", heads)
        lat = lat + _lin(_gelu(_lin(g("norm_ff", lat), sd, p + "ff.net.0.proj.")), sd, p + "ff.net.2.")
    return _lin(lat, sd, "proj_out.")


def ref_id_projector(sd: dict, emb: np.ndarray, num_tokens: int) -> np.ndarray:
    h = _lin(emb, sd, "0.")
    h = h.reshape(emb.shape[0], num_tokens, -1)
    return _ln(h, sd["2.weight"], sd["2.bias"])


def ref_tokens(out: np.ndarray) -> np.ndarray:
    """Mean over the images FIRST, then t / sqrt(sum t^2 + 1e-8) (format §5.4)."""
    t = out.mean(0)
    return t / np.sqrt((t ** 2).sum(-1, keepdims=True) + 1e-8)


def ref_lora(folder: Path, tokens: np.ndarray, kind: str = "id") -> dict[str, np.ndarray]:
    """format §5.5-5.6 from the files: JSON order, 8 tokens/module, down then up per layer."""
    modules = json.loads((folder / "hyper_lora_modules.json").read_text(), object_pairs_hook=list)
    basis = {k: v.astype(np.float64) for k, v in np_load(str(folder / "hyper_lora_modules.safetensors")).items()}
    out = {}
    for i, (name, _info) in enumerate(modules):
        for j, layer in enumerate(LAYERS):
            a, b = tokens[8 * i + 2 * j], tokens[8 * i + 2 * j + 1]
            down = np.einsum("k,kir->ir", a, basis[f"{i}.{layer}.{kind}_down_basis"]).T   # [rank, in]
            up = np.einsum("k,kro->ro", b, basis[f"{i}.{layer}.{kind}_up_basis"]).T       # [out, rank]
            pre = f"{name}_{KOHYA[layer]}"
            out[pre + ".lora_down.weight"], out[pre + ".lora_up.weight"] = down, up
            out[pre + ".alpha"] = np.array(down.shape[0] / 2.0)
    return out


def _f64(path: Path) -> dict[str, np.ndarray]:
    return {k: v.astype(np.float64) for k, v in np_load(str(path)).items()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_hyperlora_folder(tmp_path_factory.mktemp("parity") / "m", preset="tiny", base=True, seed=3)


def _inputs(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((n, 512))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return emb, rng.standard_normal((n, 257, 1024))


# ---------------------------------------------------------------- §3-§4 layout


def test_architecture_follows_json_order_and_shapes(tiny):
    from hyperlora.checkpoint import read_architecture

    arch = read_architecture(tiny)
    assert [m.name for m in arch.modules] == [m[0] for m in TINY.modules]          # never sorted
    assert (arch.hyper_dim, arch.rank, arch.base_rank) == (6, 4, 2)
    assert arch.resampler.embed_dims == (48, 1024)                                   # proj_in = ID, proj_in_2 = CLIP
    assert (arch.num_id_tokens, arch.id_embed_dim, arch.num_tokens) == (4, 512, 40)
    assert arch.resampler.heads * arch.resampler.dim_head == 48 and arch.resampler.heads == 12


# ---------------------------------------------------------------- §5.2-§5.4 tokens


@pytest.mark.parametrize("n", [1, 3])
def test_id_tokens_match_float64_reference(tiny, n):
    from hyperlora.checkpoint import load_hyper_lora

    model = load_hyper_lora(tiny, dtype=torch.float32)
    emb, clip = _inputs(n, seed=n)
    x = ref_id_projector(_f64(tiny / "id_projector.safetensors"), emb, num_tokens=4)
    expected = ref_tokens(ref_resampler(_f64(tiny / "resampler.safetensors"), x, clip))
    got = model.id_tokens(id_embeds=torch.from_numpy(emb).float(), clip_features=torch.from_numpy(clip).float())
    assert tuple(got.shape) == (40, 6)
    np.testing.assert_allclose(got.double().numpy(), expected, atol=2e-5, rtol=0)
    if n > 1:   # normalising per image before the mean would give something else
        per = ref_resampler(_f64(tiny / "resampler.safetensors"), x, clip)
        per = per / np.sqrt((per ** 2).sum(-1, keepdims=True) + 1e-8)
        wrong = per.mean(0)
        assert np.abs(wrong - expected).max() > 1e-3


def test_base_tokens_use_base_resampler_on_base_clip(tiny):
    from hyperlora.checkpoint import load_hyper_lora

    model = load_hyper_lora(tiny, dtype=torch.float32)
    _, clip = _inputs(2, seed=7)
    expected = ref_tokens(ref_resampler(_f64(tiny / "base_resampler.safetensors"), clip, None))
    got = model.base_tokens(torch.from_numpy(clip).float())
    np.testing.assert_allclose(got.double().numpy(), expected, atol=2e-5, rtol=0)


def test_eps_is_inside_the_square_root(tiny, tmp_path):
    """Outputs of size ~1e-5: t/sqrt(sum t^2 + 1e-8) differs clearly from t/(|t| + 1e-8) or t/|t|."""
    from hyperlora.checkpoint import load_hyper_lora

    folder = tmp_path / "small"
    shutil.copytree(tiny, folder)
    sd = pt_load(str(folder / "resampler.safetensors"))
    sd = {k: (v.float() * 1e-5 if k.startswith("proj_out.") else v.float()) for k, v in sd.items()}
    pt_save(sd, str(folder / "resampler.safetensors"), metadata={"format": "pt"})
    model = load_hyper_lora(folder, dtype=torch.float32)
    emb, clip = _inputs(1, seed=11)
    x = ref_id_projector(_f64(folder / "id_projector.safetensors"), emb, num_tokens=4)
    out = ref_resampler(_f64(folder / "resampler.safetensors"), x, clip).mean(0)
    expected = out / np.sqrt((out ** 2).sum(-1, keepdims=True) + 1e-8)
    norms = np.linalg.norm(expected, axis=-1)
    assert norms.max() < 0.9                       # eps really matters at this scale
    got = model.id_tokens(id_embeds=torch.from_numpy(emb).float(), clip_features=torch.from_numpy(clip).float())
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------- §5.5-§5.6 LoRA


@pytest.mark.parametrize("kind", ["id", "base"])
def test_lora_matches_float64_reference(tiny, kind):
    from hyperlora.checkpoint import load_hyper_lora

    model = load_hyper_lora(tiny, dtype=torch.float32)
    rng = np.random.default_rng(5)
    tokens = rng.standard_normal((40, 6))
    tokens /= np.linalg.norm(tokens, axis=1, keepdims=True)
    expected = ref_lora(tiny, tokens, kind)
    got = model.build_lora(torch.from_numpy(tokens).float(), kind=kind)
    assert set(got) == set(expected)
    rank = 4 if kind == "id" else 2
    for key, ref in expected.items():
        g = got[key].double().numpy()
        assert g.shape == ref.shape, key
        if key.endswith(".alpha"):
            assert float(g) == rank / 2
        else:
            assert g.shape[0 if key.endswith(".lora_down.weight") else 1] == rank
            np.testing.assert_allclose(g, ref, atol=1e-5, rtol=0, err_msg=key)
    assert any(k.endswith("_attn2_to_out_0.lora_up.weight") for k in got)
    assert not any(k.endswith("_to_out.lora_up.weight") for k in got)


def test_token_order_follows_json_not_names(tmp_path):
    """Same weights, JSON written sorted: module i still owns tokens 8i..8i+7 of *its* JSON position."""
    from hyperlora.checkpoint import load_hyper_lora

    folder = write_hyperlora_folder(tmp_path / "sorted", preset="tiny", unsorted=False, seed=3)
    model = load_hyper_lora(folder, dtype=torch.float32)
    rng = np.random.default_rng(9)
    tokens = rng.standard_normal((40, 6))
    expected = ref_lora(folder, tokens)
    got = model.build_lora(torch.from_numpy(tokens).float())
    for key, ref in expected.items():
        np.testing.assert_allclose(got[key].double().numpy(), ref, atol=1e-5, rtol=0, err_msg=key)


def test_end_to_end_fp16_released_dtype(tiny):
    """Files' own dtype (fp16 like the release): close to the float64 reference of the whole chain."""
    from hyperlora.checkpoint import load_hyper_lora

    model = load_hyper_lora(tiny)
    assert model.basis_dtype == torch.float16
    emb, clip = _inputs(2, seed=21)
    x = ref_id_projector(_f64(tiny / "id_projector.safetensors"), emb, num_tokens=4)
    tokens = ref_tokens(ref_resampler(_f64(tiny / "resampler.safetensors"), x, clip))
    expected = ref_lora(tiny, tokens)
    got_tokens = model.id_tokens(id_embeds=torch.from_numpy(emb).half(), clip_features=torch.from_numpy(clip).half())
    np.testing.assert_allclose(got_tokens.double().numpy(), tokens, atol=5e-3, rtol=0)
    got = model.build_lora(got_tokens)
    for key, ref in expected.items():
        scale = max(1.0, float(np.abs(ref).max()))
        np.testing.assert_allclose(got[key].double().numpy(), ref, atol=2e-2 * scale, rtol=0, err_msg=key)


# ============================================================== §6 crops, own PIL reference


def ref_face_box(lm):
    (x0, y0), (x1, y1) = lm.min(0), lm.max(0)
    l = 0.75 * max(x1 - x0, y1 - y0)
    return (x0 + x1) / 2, (y0 + y1) / 2 - 0.125 * l, l


def _sq(cx, cy, h):
    return (cx - h, cy - h, cx + h, cy + h)


def ref_soft_mask(size, lm, scale):
    pts = lm[OUTLINE].astype(np.float64)
    c = pts.mean(0)
    poly = (pts - c) * scale + c
    half = 0.8 * (pts.max(0) - pts.min(0)).max()            # extent of the outline (authors' reading)
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).polygon([tuple(p) for p in poly], fill=255)
    m = mask.crop(_sq(c[0], c[1], half))
    m = m.resize((512, 512)).filter(ImageFilter.GaussianBlur(radius=15)).resize(m.size)
    return m, (c[0], c[1], half)


def ref_remove_bg(img, lm):
    pil = Image.fromarray(img)
    m, (cx, cy, h) = ref_soft_mask(pil.size, lm, 1.0)
    out = Image.new("RGB", pil.size, (127, 127, 127))
    out.paste(pil.crop(_sq(cx, cy, h)), (int(cx - h), int(cy - h)), m)
    return out


def ref_clip_crop(img, lm, remove_bg=True, gray=False):
    src = ref_remove_bg(img, lm) if remove_bg else Image.fromarray(img)
    crop = src.crop(_sq(*ref_face_box(lm)))
    return np.asarray(crop.convert("L").convert("RGB") if gray else crop)


def ref_arcface_crop(img, lm):
    cx, cy, l = ref_face_box(lm)
    return np.asarray(Image.fromarray(img).crop(_sq(cx, cy, 2 * l)))


def ref_base_crop(img, lm, lrtb=(1, 1, 1, 1)):
    pil = Image.fromarray(img)
    m, (cx, cy, h) = ref_soft_mask(pil.size, lm, 1.4)
    face = pil.crop(_sq(cx, cy, h))
    face = face.resize((512, 512)).filter(ImageFilter.GaussianBlur(radius=45)).resize(face.size)
    pil.paste(face, (int(cx - h), int(cy - h)), m)
    fx, fy, l = ref_face_box(lm)
    a, b, c, d = lrtb
    box = (max(0, fx - l * a), max(0, fy - l * c), min(pil.width, fx + l * b), min(pil.height, fy + l * d))
    return np.asarray(pil.crop(box))


def _landmarks(cx, cy, size, seed=0):
    """Plausible float32 106-point landmarks (fixture template) in image pixels, jittered."""
    t = landmark_template().astype(np.float64) * (size / 1.3333) + (cx, cy)
    return (t + np.random.default_rng(seed).normal(0, 1.5, t.shape)).astype(np.float32)


def _photo(h=300, w=280, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h // 10 + 1, w // 10 + 1, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(base).resize((w, h), Image.Resampling.BILINEAR))


CASES = [   # (centre x, y, face box size): inside; cut at the top-left (negative corners); cut bottom-right
    (140.3, 150.7, 120.0), (35.6, 30.2, 110.0), (250.5, 270.9, 90.0)]


def test_face_box_and_outline_constants():
    from hyperlora.faces import preprocess as pp

    assert list(pp.OUTLINE_INDICES) == OUTLINE
    lm = _landmarks(*CASES[0])
    np.testing.assert_allclose(pp.face_box(lm), ref_face_box(lm.astype(np.float64)), rtol=0, atol=1e-9)


@pytest.mark.parametrize("case", CASES)
def test_remove_background_and_clip_crop_pixel_exact(case):
    from hyperlora.faces import preprocess as pp

    img, lm = _photo(), _landmarks(*case, seed=1)
    np.testing.assert_array_equal(pp.remove_background(img, lm), np.asarray(ref_remove_bg(img, lm)))
    for bg in (True, False):
        for gray in (False, True):
            got = pp.clip_crop(img, lm, remove_bg=bg, grayscale=gray)
            np.testing.assert_array_equal(got, ref_clip_crop(img, lm, bg, gray))
    if case[0] < 60:    # box outside the image is black, the rest of the gray canvas is 127
        crop = pp.clip_crop(img, lm)
        assert (crop[0, 0] == 0).all() and (crop == 127).all(axis=-1).any()


@pytest.mark.parametrize("case", CASES)
def test_arcface_and_base_crops_pixel_exact(case):
    from hyperlora.faces import preprocess as pp

    img, lm = _photo(seed=2), _landmarks(*case, seed=2)
    np.testing.assert_array_equal(pp.arcface_crop(img, lm), ref_arcface_crop(img, lm))
    for lrtb in ((1, 1, 1, 1), (1.3, 0.7, 1.6, 0.5), (3, 3, 3, 3)):
        np.testing.assert_array_equal(pp.base_crop(img, lm, lrtb), ref_base_crop(img, lm, lrtb), err_msg=str(lrtb))


# ============================================================== §5.1 / §6 CLIP


def test_clip_preprocess_matches_transformers_pil_processor():
    mod = pytest.importorskip("transformers.models.clip.image_processing_pil_clip",
                              reason="transformers without the PIL CLIP processor")
    from hyperlora.encoders import clip_preprocess

    proc = mod.CLIPImageProcessorPil()
    rng = np.random.default_rng(0)
    for shape in ((300, 417), (224, 224), (512, 301), (97, 133)):
        a = rng.integers(0, 256, shape + (3,), dtype=np.uint8)
        ref = proc(Image.fromarray(a), return_tensors="pt").pixel_values
        np.testing.assert_allclose(clip_preprocess([a]).numpy(), ref.numpy(), atol=2e-6, rtol=0)


def test_clip_features_are_penultimate_hidden_state(tmp_path):
    transformers = pytest.importorskip("transformers")
    from hyperlora.encoders import ClipVisionEncoder

    dirs = make_clip_folder(tmp_path)
    ours = ClipVisionEncoder.from_pretrained(dirs.model, dirs.processor, require_vit_l14=False, dtype=torch.float32)
    ref = transformers.CLIPVisionModel.from_pretrained(str(dirs.model), local_files_only=True).eval()
    px = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hs = ref(pixel_values=px, output_hidden_states=True).hidden_states
        got = ours(px)
    assert tuple(got.shape) == (2, 257, 128)
    torch.testing.assert_close(got, hs[-2], atol=1e-5, rtol=1e-5)
    assert (got - hs[-1]).abs().max() > 1e-2


# ============================================================== pipeline routing (§6)


@pytest.fixture(scope="module")
def released(cache_dir, tmp_path_factory):
    """insightface's own FaceAnalysis on the fake pack: the released recipe's reference."""
    app_mod = pytest.importorskip("insightface.app")
    root = tmp_path_factory.mktemp("ifroot")
    (root / "models").mkdir()
    os.symlink(cached_antelopev2(cache_dir), root / "models" / "antelopev2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        app = app_mod.FaceAnalysis(name="antelopev2", root=str(root), providers=["CPUExecutionProvider"])
        app.prepare(ctx_id=0, det_size=(640, 640))
    return app


@pytest.fixture(scope="module")
def analyzer(cache_dir):
    from hyperlora.faces.analysis import FaceAnalyzer

    return FaceAnalyzer(cached_antelopev2(cache_dir), provider="CPU")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from hyperlora.encoders import ClipVisionEncoder

    dirs = make_clip_folder(tmp_path_factory.mktemp("clip"))
    return ClipVisionEncoder.from_pretrained(dirs.model, dirs.processor, require_vit_l14=False, dtype=torch.float32)


def _released_faces(app, img):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return app.get(np.ascontiguousarray(img[..., ::-1]))


def _check_routing(img, app, analyzer, clip):
    from hyperlora.encoders import clip_preprocess
    from hyperlora.pipeline import extract_conditions

    cond = extract_conditions([img], analyzer=analyzer, clip=clip, need_id=True, need_clip=True, need_base=True,
                              use_cache=False)
    lm = _released_faces(app, img)[0].landmark_2d_106
    np.testing.assert_array_equal(cond.base_crops[0], ref_base_crop(img, lm))
    with torch.no_grad():
        feats = clip(clip_preprocess([ref_clip_crop(img, lm), ref_base_crop(img, lm)]))
    torch.testing.assert_close(cond.clip_features[0].float(), feats[0].float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cond.base_clip_features[0].float(), feats[1].float(), atol=1e-4, rtol=1e-4)
    arc = _released_faces(app, ref_arcface_crop(img, lm))[0].normed_embedding
    np.testing.assert_allclose(cond.id_embeds[0].numpy(), arc, atol=1e-6, rtol=0)


def test_pipeline_feeds_each_encoder_its_crop(released, analyzer, clip):
    _check_routing(face_image((480, 520), [(260, 230, 170)], seeds=[1]), released, analyzer, clip)


def test_detection_retry_sizes_then_arcface_at_640(analyzer, clip):
    from hyperlora.pipeline import extract_conditions

    img = face_image((1024, 1024), [(512, 520, 660)], seeds=[4])    # fake detector: found at 384, not 640/512
    analyzer.stats.reset()
    extract_conditions([img], analyzer=analyzer, clip=clip, need_id=True, need_clip=False, need_base=False,
                       use_cache=False)
    assert analyzer.stats.det_sizes == [640, 512, 384, 640]


def test_large_photo_uses_full_resolution_landmarks(released, analyzer, clip):
    _check_routing(face_image((2100, 2300), [(1100, 1000, 260)], seeds=[2]), released, analyzer, clip)


def test_large_photo_parity_once_downscale_is_off(released, analyzer, clip, monkeypatch):
    """The xfail above is due to the detection downscale alone: without it the pipeline is exact."""
    import hyperlora.pipeline as pl

    monkeypatch.setattr(pl, "MAX_DETECT_SIDE", 10 ** 9)
    _check_routing(face_image((2100, 2300), [(1100, 1000, 260)], seeds=[2]), released, analyzer, clip)


def test_comfy_image_to_uint8_truncates_like_release():
    from hyperlora.pipeline import images_from_comfy

    x = torch.rand(1, 7, 9, 3, generator=torch.Generator().manual_seed(1)) * 1.2 - 0.1
    ref = (x[0].numpy().clip(0.0, 1.0) * 255.0).astype(np.uint8)
    np.testing.assert_array_equal(images_from_comfy(x)[0], ref)


def test_identity_routes_id_clip_and_base_features(tiny):
    """bundle: x = ArcFace -> id_projector, y = CLIP of the ID crop; base resampler <- base-crop CLIP."""
    from hyperlora.bundle import identity_from_conditions
    from hyperlora.checkpoint import load_hyper_lora
    from hyperlora.pipeline import FaceConditions

    model = load_hyper_lora(tiny, dtype=torch.float32)
    emb, clip_id = _inputs(2, seed=31)
    _, clip_base = _inputs(2, seed=32)
    cond = FaceConditions(id_embeds=torch.from_numpy(emb).float(), clip_features=torch.from_numpy(clip_id).float(),
                          base_clip_features=torch.from_numpy(clip_base).float(), crops=[], used=[0, 1], skipped=[])
    ident = identity_from_conditions(model, cond, settings={})
    x = ref_id_projector(_f64(tiny / "id_projector.safetensors"), emb, num_tokens=4)
    np.testing.assert_allclose(ident.tokens.double().numpy(),
                               ref_tokens(ref_resampler(_f64(tiny / "resampler.safetensors"), x, clip_id)), atol=2e-5)
    np.testing.assert_allclose(ident.base_tokens.double().numpy(),
                               ref_tokens(ref_resampler(_f64(tiny / "base_resampler.safetensors"), clip_base, None)),
                               atol=2e-5)
