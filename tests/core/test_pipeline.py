"""IMAGE batches -> FaceConditions with the real insightface on the fake AntelopeV2 pack and a tiny CLIP."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch

from hyperlora import pipeline as pl
from hyperlora.faces.options import FaceOptions, option, retry_sizes
from hyperlora.faces import preprocess as pp
from hyperlora.errors import FaceNotFoundError, ImageInputError, SettingError
from tests.fixtures.antelope import blank_image, cached_antelopev2, face_image, paint_face
from tests.fixtures.clip import TINY

# ------------------------------------------------------------------ images_from_comfy (no models)


def test_rgb_batch_truncates_like_comfyui():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.uniform(-0.1, 1.1, (2, 5, 7, 3)).astype(np.float32))
    out = pl.images_from_comfy(x)
    assert len(out) == 2 and all(o.shape == (5, 7, 3) and o.dtype == np.uint8 for o in out)
    expected = np.floor(np.clip(x.numpy(), 0, 1) * np.float32(255)).astype(np.uint8)
    np.testing.assert_array_equal(np.stack(out), expected)
    exact = torch.arange(256, dtype=torch.float32).div(255).reshape(1, 1, 256, 1).expand(1, 1, 256, 3)
    np.testing.assert_array_equal(pl.images_from_comfy(exact)[0][0, :, 0], np.arange(256))   # k/255 -> k


def test_grayscale_and_rgba():
    gray = torch.rand(1, 8, 9, 1)
    out = pl.images_from_comfy(gray)[0]
    assert out.shape == (8, 9, 3) and (out[..., 0] == out[..., 2]).all()
    rgba = torch.rand(1, 8, 9, 4)
    out = pl.images_from_comfy(rgba)[0]
    np.testing.assert_array_equal(out, pl.images_from_comfy(rgba[..., :3])[0])     # alpha dropped


def test_list_of_mixed_sizes_and_dtypes():
    items = [torch.rand(1, 30, 40, 3), torch.rand(20, 10, 3), np.zeros((7, 7, 3), np.uint8) + 9,
             torch.rand(2, 16, 16, 4).to(torch.bfloat16)]
    out = pl.images_from_comfy(items)
    assert [o.shape for o in out] == [(30, 40, 3), (20, 10, 3), (7, 7, 3), (16, 16, 3), (16, 16, 3)]
    assert (out[2] == 9).all()


@pytest.mark.parametrize("bad,match", [
    (torch.zeros(0, 64, 64, 3), "batch is empty"),
    ([], "list is empty"),
    (torch.zeros(64, 64, 3), r"shape \(64, 64, 3\).*\[batch, height, width, channels\]"),
    (torch.zeros(1, 1, 64, 64, 3), r"shape \(1, 1, 64, 64, 3\)"),
    (torch.zeros(1, 3, 64, 64), "channels-first"),
    (torch.zeros(2, 64, 64, 2), r"Image 1 of 2 has 2 channels"),
    (torch.zeros(1, 0, 64, 3), "empty"),
    (torch.full((1, 4, 4, 3), float("nan")), "NaN"),
    (torch.zeros(1, 4, 4, 3, dtype=torch.int32), "dtype int32"),
    ("photo.png", "str"),
    ([torch.rand(1, 8, 8, 3), torch.rand(8, 8, 5)], r"Image 2 of the list has 5 channels"),
    ([torch.rand(1, 8, 8, 3), torch.zeros(0, 8, 8, 3)], r"Image 2 of the list is an empty batch"),
])
def test_bad_inputs_name_the_image(bad, match):
    with pytest.raises(ImageInputError, match=match):
        pl.images_from_comfy(bad)


def test_detection_sizes_user_first_then_released(faces_mod):
    assert retry_sizes(640) == (640, 512, 384, 256)
    assert retry_sizes(1024) == (1024, 640, 512, 384, 256)
    assert retry_sizes(384) == (384, 256)


# ------------------------------------------------------------------ with models

@pytest.fixture(scope="module")
def faces_mod():
    return pytest.importorskip("hyperlora.faces.analysis", reason="hyperlora/faces.py not built yet")


class Counter:
    """Counts calls of the real methods of the real analyzer / encoder (they still run)."""

    def __init__(self, monkeypatch, analyzer, clip):
        self.calls = {"find_faces": 0, "embedding": 0, "clip_forward": 0, "clip_images": 0}
        self.detect_shapes: list[tuple[int, ...]] = []
        find, emb, fwd = analyzer.find_faces, analyzer.embedding, clip.forward

        def find_faces(image, *a, **k):
            self.calls["find_faces"] += 1
            self.detect_shapes.append(image.shape)
            return find(image, *a, **k)

        def embedding(image, *a, **k):
            self.calls["embedding"] += 1
            return emb(image, *a, **k)

        def forward(px):
            self.calls["clip_forward"] += 1
            self.calls["clip_images"] += px.shape[0]
            return fwd(px)

        monkeypatch.setattr(analyzer, "find_faces", find_faces)
        monkeypatch.setattr(analyzer, "embedding", embedding)
        monkeypatch.setattr(clip, "forward", forward)

    def total(self) -> int:
        return self.calls["find_faces"] + self.calls["embedding"] + self.calls["clip_forward"]


@pytest.fixture(scope="module")
def analyzer(cache_dir, faces_mod):
    return faces_mod.FaceAnalyzer(cached_antelopev2(cache_dir), provider="CPU")


@pytest.fixture(autouse=True)
def fresh_cache():
    pl.clear_cache()
    yield
    pl.clear_cache()


@pytest.fixture(scope="module")
def astronaut():
    data = pytest.importorskip("skimage.data")
    return np.ascontiguousarray(data.astronaut())


ALL = dict(need_id=True, need_clip=True, need_base=True)


def one_face(size=(480, 520), centre=(260, 230), height=170, seed=1):
    return face_image(size, [(centre[0], centre[1], height)], seeds=[seed])


def test_astronaut_end_to_end(analyzer, clip, astronaut, faces_mod):
    cond = pl.extract_conditions([astronaut], analyzer=analyzer, clip=clip, **ALL)
    assert cond.used == [0] and cond.skipped == []
    assert cond.id_embeds.shape == (1, 512) and cond.id_embeds.dtype == torch.float32
    assert torch.linalg.norm(cond.id_embeds, dim=1).sub(1).abs().max() < 1e-5
    assert cond.clip_features.shape == (1, 257, TINY["hidden_size"])
    assert cond.base_clip_features.shape == (1, 257, TINY["hidden_size"])
    assert cond.crops[0].shape == (512, 512, 3) and cond.crops[0].dtype == np.uint8
    assert cond.base_crops[0].ndim == 3 and cond.notes[0].startswith("image 1 of 1: took 1 of 1 face(s) (largest)")

    # the same numbers step by step from the parts
    faces = analyzer.find_faces(astronaut, det_sizes=(640, 512, 384, 256))
    face = faces_mod.choose_face(faces, "largest")
    lm = face.landmarks_106
    crop = pp.clip_crop(astronaut, lm)
    base = pp.base_crop(astronaut, lm)
    torch.testing.assert_close(cond.clip_features[0], clip.encode([crop])[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cond.base_clip_features[0], clip.encode([base])[0], atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(cond.crops[0], pp.preview(crop))
    np.testing.assert_array_equal(cond.base_crops[0], base)
    emb = analyzer.embedding(pp.arcface_crop(astronaut, lm))
    np.testing.assert_allclose(cond.id_embeds[0].numpy(), emb / np.linalg.norm(emb), atol=1e-6)
    # background removal on: the CLIP crop holds the uniform gray away from the face
    assert (crop[:3, :3] == 127).all()


def test_face_choice_in_a_two_face_photo(analyzer, clip):
    import re

    img = face_image((400, 720), [(170, 200, 110), (520, 210, 170)], seeds=[11, 12])

    def chosen_x(cond):
        x1, _, x2, _ = map(int, re.search(r"face at \((-?\d+), (-?\d+)\)-\((-?\d+), (-?\d+)\)", cond.notes[0]).groups())
        return (x1 + x2) / 2

    largest = pl.extract_conditions([img], analyzer=analyzer, clip=clip, **ALL)
    left = pl.extract_conditions([img], analyzer=analyzer, clip=clip,
                                 options=FaceOptions(face_choice="left_to_right", face_index=0), **ALL)
    second = pl.extract_conditions([img], analyzer=analyzer, clip=clip,
                                   options=FaceOptions(face_choice="index", face_index=1), **ALL)
    assert "took 1 of 2 face(s)" in largest.notes[0]
    assert abs(chosen_x(largest) - 520) < 30 and abs(chosen_x(left) - 170) < 30 and abs(chosen_x(second) - 170) < 30
    assert not torch.allclose(largest.clip_features, left.clip_features)
    torch.testing.assert_close(left.clip_features, second.clip_features)
    # a face_index beyond the faces found is reported on its own, as the setting it is (not as "no face")
    with pytest.raises(SettingError) as ei:
        pl.extract_conditions([img], analyzer=analyzer, clip=clip, options=FaceOptions(face_choice="index", face_index=5), **ALL)
    assert str(ei.value).startswith("face_index 5 (face_choice 'index', counted largest first) is beyond the faces "
                                    "found in image(s) 1 (image 1 shows 2 face(s), valid 0 to 1). Lower face_index")
    with pytest.raises(SettingError, match=r"image\(s\) 1 \(.*\)\..*Image\(s\) 2 had no face at all"):
        pl.extract_conditions([img, blank_image(300, 300)], analyzer=analyzer, clip=clip,
                              options=FaceOptions(face_choice="index", face_index=5), **ALL)
    # with "skip", a photo with fewer faces than face_index is skipped, the others used
    two = pl.extract_conditions([img, one_face()], analyzer=analyzer, clip=clip,
                                options=FaceOptions(face_choice="index", face_index=1), **ALL)
    assert two.used == [0] and two.skipped == [1]
    # with "error" it stops, naming face_index and the photo (not "no face")
    with pytest.raises(SettingError, match=r"counted from the left\) is beyond the faces found in image\(s\) 2 "
                                           r"\(image 2 shows 1 face\(s\), valid 0 to 0\)"):
        pl.extract_conditions([img, one_face()], analyzer=analyzer, clip=clip,
                              options=FaceOptions(face_choice="left_to_right", face_index=1, no_face="error"), **ALL)


def test_only_some_conditions(analyzer, clip):
    img = one_face()
    c = pl.extract_conditions([img], analyzer=analyzer, clip=None, need_id=True, need_clip=False, need_base=False)
    assert c.clip_features is None and c.base_clip_features is None and c.id_embeds.shape == (1, 512)
    c = pl.extract_conditions([img], analyzer=analyzer, clip=clip, need_id=False, need_clip=True, need_base=False)
    assert c.id_embeds is None and c.clip_features.shape[0] == 1 and c.base_crops == []
    with pytest.raises(ValueError, match="CLIP encoder"):
        pl.extract_conditions([img], analyzer=analyzer, clip=None, need_id=False, need_clip=True, need_base=False)


def test_options_change_the_crops(analyzer, clip):
    img = one_face()
    plain = pl.extract_conditions([img], analyzer=analyzer, clip=clip, **ALL)
    gray = pl.extract_conditions([img], analyzer=analyzer, clip=clip, options=FaceOptions(grayscale=True), **ALL)
    nobg = pl.extract_conditions([img], analyzer=analyzer, clip=clip, options=FaceOptions(remove_background=False),
                                 **ALL)
    g = gray.crops[0]
    assert (g[..., 0] == g[..., 1]).all() and not (plain.crops[0][..., 0] == plain.crops[0][..., 1]).all()
    assert not torch.allclose(plain.clip_features, gray.clip_features)
    assert not torch.allclose(plain.clip_features, nobg.clip_features)
    torch.testing.assert_close(plain.id_embeds, gray.id_embeds)            # ArcFace reads the original photo
    wide = pl.extract_conditions([img], analyzer=analyzer, clip=clip, base_scales=(2, 2, 1, 3), **ALL)
    assert wide.base_crops[0].shape[1] > plain.base_crops[0].shape[1]
    assert wide.base_crops[0].shape[0] > plain.base_crops[0].shape[0]


def test_skip_and_error_policies(analyzer, clip, caplog):
    imgs = [one_face(seed=1), blank_image(300, 300), one_face(seed=2, centre=(240, 250)), blank_image(64, 90)]
    with caplog.at_level(logging.WARNING, logger="hyperlora.pipeline"):
        cond = pl.extract_conditions(imgs, analyzer=analyzer, clip=clip, **ALL)
    assert cond.used == [0, 2] and cond.skipped == [1, 3]
    assert cond.id_embeds.shape[0] == 2 and cond.clip_features.shape[0] == 2 and len(cond.crops) == 2
    assert "image(s) 2, 4 of 4" in caplog.text
    with pytest.raises(FaceNotFoundError, match=r"image\(s\) 2, 4 of 4.*no_face"):
        pl.extract_conditions(imgs, analyzer=analyzer, clip=clip, options=FaceOptions(no_face="error"), **ALL)
    with pytest.raises(SettingError, match="no_face is 'ignore'"):
        pl.extract_conditions(imgs, analyzer=analyzer, clip=clip, options=FaceOptions(no_face="ignore"), **ALL)


def test_no_face_anywhere(analyzer, clip):
    with pytest.raises(FaceNotFoundError) as err:
        pl.extract_conditions([blank_image(200, 200), blank_image(50, 80)], analyzer=analyzer, clip=clip, **ALL)
    msg = str(err.value)
    assert "any of the 2 image(s)" in msg and "640, 512, 384, 256" in msg
    assert "detection size" in msg and "less tight crop" in msg and "frontal" in msg


def test_one_clip_forward_for_all_images(analyzer, clip, monkeypatch):
    counter = Counter(monkeypatch, analyzer, clip)
    imgs = [one_face(seed=s, centre=(250 + 5 * s, 240)) for s in range(3)]
    pl.extract_conditions(imgs, analyzer=analyzer, clip=clip, **ALL)
    assert counter.calls["clip_forward"] == 1 and counter.calls["clip_images"] == 6     # 3 ID + 3 base crops
    assert counter.calls["find_faces"] == 3 and counter.calls["embedding"] == 3


def test_cache_second_call_runs_no_model(analyzer, clip, monkeypatch):
    counter = Counter(monkeypatch, analyzer, clip)
    imgs = [one_face(seed=3), blank_image(100, 100), one_face(seed=4, centre=(200, 260))]
    first = pl.extract_conditions(imgs, analyzer=analyzer, clip=clip, **ALL)
    ran = counter.total()
    assert ran > 0
    second = pl.extract_conditions([im.copy() for im in imgs], analyzer=analyzer, clip=clip, **ALL)
    assert counter.total() == ran                                   # nothing ran again
    torch.testing.assert_close(first.clip_features, second.clip_features, atol=0, rtol=0)
    torch.testing.assert_close(first.id_embeds, second.id_embeds, atol=0, rtol=0)
    assert second.used == first.used and second.skipped == first.skipped
    # another setting, or one changed image, recomputes only what changed
    pl.extract_conditions(imgs, analyzer=analyzer, clip=clip, options=FaceOptions(grayscale=True), **ALL)
    assert counter.total() > ran
    before = dict(counter.calls)
    changed = imgs[2].copy()
    changed[0, 0] = (1, 2, 3)
    pl.extract_conditions([imgs[0], imgs[1], changed], analyzer=analyzer, clip=clip, **ALL)
    assert counter.calls["find_faces"] - before["find_faces"] == 1
    assert counter.calls["clip_images"] - before["clip_images"] == 2
    before = counter.total()
    pl.extract_conditions(imgs, analyzer=analyzer, clip=clip, use_cache=False, **ALL)
    assert counter.total() > before


def test_requeued_identity_runs_no_model_at_all(analyzer, clip, monkeypatch, tmp_path):
    """identity_from_images twice: the second run finds no face, runs no CLIP and no resampler."""
    from dataclasses import replace

    from hyperlora.bundle import identity_from_images
    from hyperlora.checkpoint import load_hyper_lora
    from hyperlora.generate import clear_token_cache
    from tests.fixtures.hyperlora_models import TINY as TINY_HL, write_hyperlora_folder

    model = load_hyper_lora(write_hyperlora_folder(tmp_path / "m", preset=replace(TINY_HL, clip_dim=TINY["hidden_size"]),
                                                   base=True), dtype=torch.float32)
    resampler_calls = []
    for m in (model.resampler, model.base_resampler):
        m.register_forward_hook(lambda *_: resampler_calls.append(1))
    counter = Counter(monkeypatch, analyzer, clip)
    imgs = [one_face(seed=5), one_face(seed=6, centre=(240, 250))]
    clear_token_cache()
    first, _ = identity_from_images(model, imgs, analyzer=analyzer, clip=clip)
    ran, resampled = counter.total(), len(resampler_calls)
    assert ran > 0 and resampled == 2                               # ID and Base resampler
    second, _ = identity_from_images(model, [im.copy() for im in imgs], analyzer=analyzer, clip=clip)
    assert counter.total() == ran and len(resampler_calls) == resampled
    assert torch.equal(first.tokens, second.tokens) and torch.equal(first.base_tokens, second.base_tokens)
    clear_token_cache()


def test_bfloat16_encoder_output(analyzer, clip, clip_dirs):
    bf16 = type(clip).from_pretrained(clip_dirs.model, dtype=torch.bfloat16, require_vit_l14=False)
    cond = pl.extract_conditions([one_face()], analyzer=analyzer, clip=bf16, **ALL)
    assert cond.clip_features.dtype == torch.bfloat16 and cond.id_embeds.dtype == torch.float32


def test_tiny_images(analyzer, clip):
    with pytest.raises(FaceNotFoundError, match="any of the 1 image"):
        pl.extract_conditions([blank_image(32, 32)], analyzer=analyzer, clip=clip, **ALL)
    img = paint_face(blank_image(32, 32), 16, 16, 30)
    try:
        cond = pl.extract_conditions([img], analyzer=analyzer, clip=clip, **ALL)
    except FaceNotFoundError as exc:     # a 30 px face may be below the detector's range: a clean error
        assert "any of the 1 image" in str(exc)
    else:
        assert cond.clip_features.shape == (1, 257, TINY["hidden_size"]) and cond.crops[0].shape == (512, 512, 3)
    one_pixel = np.zeros((1, 1, 3), np.uint8)
    with pytest.raises(FaceNotFoundError):
        pl.extract_conditions([one_pixel], analyzer=analyzer, clip=clip, **ALL)


def test_4k_photo_detects_downscaled_crops_full_res(analyzer, clip, monkeypatch):
    monkeypatch.setattr(pl, "MAX_DETECT_SIDE", 2048)   # opt-in speed-up; the default (None) is released parity
    counter = Counter(monkeypatch, analyzer, clip)
    img = face_image((2160, 3840), [(2500, 1100, 600)], seeds=[5])
    cond = pl.extract_conditions([img], analyzer=analyzer, clip=clip, **ALL)
    assert max(counter.detect_shapes[0][:2]) <= pl.MAX_DETECT_SIDE
    assert cond.used == [0]
    faces = pl.find_faces_scaled(analyzer, img, det_size=640)
    cx, cy, l = pp.face_box(faces[0].landmarks_106)
    x1, y1, x2, y2 = faces[0].bbox
    assert abs((x1 + x2) / 2 - 2500) < 40 and abs((y1 + y2) / 2 - 1100) < 40      # mapped back to 4K pixels
    assert 0.5 * 600 < y2 - y1 < 1.5 * 600
    crop = pp.clip_crop(img, faces[0].landmarks_106)
    assert crop.shape[0] == pytest.approx(2 * l, abs=1) and crop.shape[0] > 600     # full-resolution crop
    np.testing.assert_array_equal(cond.crops[0], pp.preview(crop))


def test_mixed_size_list_from_comfy(analyzer, clip):
    imgs = [one_face(size=(401, 299), centre=(150, 200), height=150, seed=7), one_face(size=(600, 803), seed=8)]
    tensors = [torch.from_numpy(im.astype(np.float32) / 255)[None] for im in imgs]
    rgba = np.dstack([imgs[0], np.full(imgs[0].shape[:2], 255, np.uint8)])
    tensors.append(torch.from_numpy(rgba.astype(np.float32) / 255)[None])
    gray = imgs[1].mean(axis=2, keepdims=True).astype(np.float32) / 255       # [H, W, 1], no skin colour left
    tensors.append(torch.from_numpy(gray))
    arrays = pl.images_from_comfy(tensors)
    assert [a.shape for a in arrays] == [(401, 299, 3), (600, 803, 3), (401, 299, 3), (600, 803, 3)]
    cond = pl.extract_conditions(arrays, analyzer=analyzer, clip=clip, **ALL)
    assert cond.used == [0, 1, 2] and cond.skipped == [3]    # the fake detector needs skin colour
    torch.testing.assert_close(cond.clip_features[0], cond.clip_features[2])     # RGBA = its RGB
    assert all(c.shape == (512, 512, 3) for c in cond.crops)


def test_bad_images_for_extract(analyzer, clip):
    with pytest.raises(ImageInputError, match="No images"):
        pl.extract_conditions([], analyzer=analyzer, clip=clip, **ALL)
    with pytest.raises(ImageInputError, match=r"Image 2 of 2.*float32"):
        pl.extract_conditions([one_face(), one_face().astype(np.float32)], analyzer=analyzer, clip=clip, **ALL)
    with pytest.raises(ImageInputError, match=r"Image 1 of 1"):
        pl.extract_conditions([np.zeros((10, 10), np.uint8)], analyzer=analyzer, clip=clip, **ALL)
    with pytest.raises(SettingError, match="det_size 100"):
        pl.extract_conditions([one_face()], analyzer=analyzer, clip=clip, options=FaceOptions(det_size=100), **ALL)


def test_face_masks_follow_the_chosen_face(analyzer, caplog):
    img = face_image((400, 720), [(170, 200, 110), (520, 210, 170)], seeds=[11, 12])

    def centre_x(mask):
        return float((mask.sum(axis=0) * np.arange(mask.shape[1])).sum() / mask.sum())

    masks, chosen = pl.face_masks([img, img], analyzer=analyzer)
    assert masks.shape == (2, 400, 720) and masks.dtype == np.float32 and len(chosen) == 2
    assert abs(centre_x(masks[0]) - 520) < 30 and masks.max() == 1.0 and masks[0, 5, 5] == 0
    left, _ = pl.face_masks([img], analyzer=analyzer, face_choice="left_to_right", face_index=0, grow=1.0, feather=0)
    assert abs(centre_x(left[0]) - 170) < 30
    assert left[0].sum() < masks[0].sum()                        # smaller face, no growth
    with caplog.at_level(logging.WARNING, logger="hyperlora.pipeline"):
        mixed, chosen = pl.face_masks([img, blank_image(400, 720)], analyzer=analyzer)
    assert chosen[1] is None and not mixed[1].any() and mixed[0].any() and "no face in image 2 of 2" in caplog.text
    with pytest.raises(FaceNotFoundError, match="No face was found in image 2 of 2.*no_face"):
        pl.face_masks([img, blank_image(400, 720)], analyzer=analyzer, no_face="error")
    with pytest.raises(ImageInputError, match="different sizes"):
        pl.face_masks([img, blank_image(300, 300)], analyzer=analyzer)
    with pytest.raises(SettingError, match=r"Image 1 of 1: face_index 5 is out of range: 2 face\(s\) were found"):
        pl.face_masks([img], analyzer=analyzer, face_choice="index", face_index=5)


# ------------------------------------------------------------------ messages that fit the photo, interrupts


@pytest.mark.parametrize("shape,hint", [
    ((40, 60), "the photo is only 60x40 pixels, too small to find a face reliably: use one at least 256 pixels"),
    ((2400, 3000), "the photo is 3000x2400 pixels; the detector sees it shrunk to 640 pixels, so a face narrower "
                   "than about 94 pixels is missed: crop the photo around the person first"),
    ((300, 300), None),
])
def test_no_face_message_fits_the_photo(analyzer, clip, shape, hint):
    with pytest.raises(FaceNotFoundError) as ei:
        pl.extract_conditions([blank_image(*shape)], analyzer=analyzer, clip=clip, **ALL)
    msg = str(ei.value)
    assert msg.startswith("No usable face was found in any of the 1 image(s) checked (image 1: no face found")
    if hint is None:
        assert "pixels" not in msg
    else:
        assert hint in msg
    if shape[0] < 1000:   # the mask node gives the same advice
        with pytest.raises(FaceNotFoundError) as ei:
            pl.face_masks([blank_image(*shape)], analyzer=analyzer, no_face="error")
        assert hint is None or hint in str(ei.value)


def test_many_faceless_photos_list_four_and_count_the_rest(analyzer, clip):
    with pytest.raises(FaceNotFoundError) as ei:
        pl.extract_conditions([blank_image(40, 40 + i) for i in range(7)], analyzer=analyzer, clip=clip, **ALL)
    msg = str(ei.value)
    assert "image 4: no face found (the photo is only 43x40" in msg and "image 5" not in msg and "and 3 more" in msg


class Stop(Exception):
    pass


def test_interrupt_is_checked_between_photos_and_progress_reported(analyzer, clip):
    imgs = [one_face(seed=s, centre=(250 + 3 * s, 240)) for s in range(5)]
    calls: list[int] = []
    seen: list[tuple[int, int]] = []

    def check() -> None:
        calls.append(len(seen))
        if len(seen) == 2:        # Cancel pressed while the third photo is due
            raise Stop

    with pytest.raises(Stop):
        pl.extract_conditions(imgs, analyzer=analyzer, clip=clip, check_interrupt=check,
                              progress=lambda d, t: seen.append((d, t)), **ALL)
    assert seen == [(1, 5), (2, 5)] and calls == [0, 1, 2]
    # uninterrupted: one check per photo, one per CLIP forward of up to CLIP_CHUNK crops
    calls.clear(), seen.clear()
    pl.clear_cache()
    pl.extract_conditions(imgs, analyzer=analyzer, clip=clip, check_interrupt=lambda: calls.append(0),
                          progress=lambda d, t: seen.append((d, t)), **ALL)
    forwards = -(-2 * len(imgs) // pl.CLIP_CHUNK)          # ID + base crop per photo
    assert len(calls) == len(imgs) + forwards and seen[-1] == (5, 5) and len(seen) == 5


def test_interrupt_between_masks(analyzer):
    imgs = [one_face(seed=s) for s in range(4)]
    seen: list[tuple[int, int]] = []

    def check() -> None:
        if len(seen) >= 1:
            raise Stop

    with pytest.raises(Stop):
        pl.face_masks(imgs, analyzer=analyzer, check_interrupt=check, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(1, 4)]
    seen.clear()
    pl.face_masks(imgs, analyzer=analyzer, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_chunked_clip_features_equal_one_forward(analyzer, clip, monkeypatch):
    imgs = [one_face(seed=s, centre=(240 + 2 * s, 250)) for s in range(5)]
    one = pl.extract_conditions(imgs, analyzer=analyzer, clip=clip, use_cache=False, **ALL)
    monkeypatch.setattr(pl, "CLIP_CHUNK", 3)
    counter = Counter(monkeypatch, analyzer, clip)
    chunked = pl.extract_conditions(imgs, analyzer=analyzer, clip=clip, use_cache=False, **ALL)
    assert counter.calls["clip_forward"] == 4 and counter.calls["clip_images"] == 10
    torch.testing.assert_close(chunked.clip_features, one.clip_features, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked.base_clip_features, one.base_clip_features, atol=1e-5, rtol=1e-5)


@dataclasses.dataclass(frozen=True)
class WithBlur(FaceOptions):
    """FaceOptions with one more field, as a new face option would be added."""

    blur: int = option(0, "A new option that changes the crops.", low=0, high=10)
    note: str = option("", "A new option applied after the cache.", cached=False)


def test_a_new_face_option_reaches_the_cache_key(analyzer):
    """Adding a field to FaceOptions is enough for the result cache to tell its values apart."""
    assert WithBlur(blur=1).cache_key() == DEFAULT_KEY + (("blur", 1),)
    assert WithBlur(blur=1, note="x").cache_key() == WithBlur(blur=1).cache_key()      # cached=False
    assert FaceOptions().cache_key() == DEFAULT_KEY
    img = one_face()
    need = dict(need_id=True, need_clip=False, need_base=False)
    pl.extract_conditions([img], analyzer=analyzer, clip=None, options=WithBlur(blur=1), **need)
    assert len(pl.RESULT_CACHE) == 1
    pl.extract_conditions([img], analyzer=analyzer, clip=None, options=WithBlur(blur=1, note="y"), **need)
    assert len(pl.RESULT_CACHE) == 1                       # the same crops: a cache hit
    pl.extract_conditions([img], analyzer=analyzer, clip=None, options=WithBlur(blur=2), **need)
    assert len(pl.RESULT_CACHE) == 2                       # another value of the new option: another entry
    assert WithBlur.from_values({"blur": "3", "det_size": "512", "other": 1}) == WithBlur(blur=3, det_size=512)


DEFAULT_KEY = (("face_choice", "largest"), ("face_index", 0), ("remove_background", True), ("grayscale", False),
               ("det_size", 640))
