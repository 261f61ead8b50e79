"""Crop geometry of hyperlora.faces.preprocess against an independent reading of format §6.

The reference below is written from the format text (docs/released-format.md), differently from the module: numpy
slicing with explicit padding instead of PIL crops, the index list parsed from the format's
wording, the blend written as arithmetic.  PIL is used only where the format names it (the
polygon fill, the 512x512 resize and the Gaussian blur).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from hyperlora.faces import preprocess as pp
from hyperlora.errors import ImageInputError

FACTS_OUTLINE = """1, 9, 10, 11, 12, 13, 14, 15, 16, 2, 3, 4, 5, 6, 7, 8, 0, 24, 23, 22, 21, 20,
  19, 18, 32, 31, 30, 29, 28, 27, 26, 25, 17, 101, 105, 104, 103, 102, 50, 51,
  49, 48, 43"""
OUTLINE = [int(s) for s in FACTS_OUTLINE.replace("\n", " ").split(",")]


def synthetic_landmarks(cx: float, cy: float, size: float, *, seed: int = 0) -> np.ndarray:
    """106 points: the outline indices on an ellipse (in polygon order), the rest inside."""
    rng = np.random.default_rng(seed)
    pts = np.zeros((106, 2))
    inner = rng.uniform(-0.35, 0.35, size=(106, 2)) * size + (cx, cy)
    pts[:] = inner
    angles = np.linspace(math.pi, -math.pi, len(OUTLINE), endpoint=False)   # jaw then brows, a simple loop
    for k, idx in enumerate(OUTLINE):
        pts[idx] = (cx + 0.5 * size * math.cos(angles[k]) + rng.normal(0, 0.5),
                    cy + 0.62 * size * math.sin(angles[k]) + rng.normal(0, 0.5))
    return pts.astype(np.float32)


def photo(h: int, w: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), (xx + yy) % 256], axis=2)
    return np.clip(base + rng.integers(-20, 20, size=(h, w, 3)), 0, 255).astype(np.uint8)


def ref_crop(img: np.ndarray, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    """Crop with Python's round() on the corners and zeros outside the image (numpy only)."""
    a, b, c, d = (int(round(v)) for v in (x0, y0, x1, y1))
    out = np.zeros((d - b, c - a) + img.shape[2:], dtype=img.dtype)
    h, w = img.shape[:2]
    sx0, sy0, sx1, sy1 = max(a, 0), max(b, 0), min(c, w), min(d, h)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - b:sy1 - b, sx0 - a:sx1 - a] = img[sy0:sy1, sx0:sx1]
    return out


def ref_region(lm: np.ndarray) -> tuple[float, float, float]:
    poly = lm[OUTLINE].astype(np.float64)
    centre = poly.sum(axis=0) / len(OUTLINE)
    width, height = poly[:, 0].max() - poly[:, 0].min(), poly[:, 1].max() - poly[:, 1].min()
    return centre[0], centre[1], 0.8 * max(width, height)


def ref_soft_mask(shape: tuple[int, int], lm: np.ndarray, scale: float) -> tuple[np.ndarray, tuple[float, float, float]]:
    cx, cy, half = ref_region(lm)
    poly = lm[OUTLINE].astype(np.float64)
    poly = (poly - (cx, cy)) * scale + (cx, cy)
    canvas = Image.new("L", (shape[1], shape[0]), 0)
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in poly], fill=255)
    region = ref_crop(np.asarray(canvas), cx - half, cy - half, cx + half, cy + half)
    h, w = region.shape
    blurred = Image.fromarray(region).resize((512, 512)).filter(ImageFilter.GaussianBlur(15)).resize((w, h))
    return np.asarray(blurred).astype(np.float64), (cx, cy, half)


def ref_paste(dst: np.ndarray, src: np.ndarray, mask: np.ndarray, corner: tuple[int, int]) -> np.ndarray:
    out = dst.astype(np.float64).copy()
    x, y = corner
    h, w = src.shape[:2]
    H, W = dst.shape[:2]
    ys, xs = slice(max(y, 0), min(y + h, H)), slice(max(x, 0), min(x + w, W))
    s = src[ys.start - y:ys.stop - y, xs.start - x:xs.stop - x].astype(np.float64)
    m = mask[ys.start - y:ys.stop - y, xs.start - x:xs.stop - x, None] / 255.0
    out[ys, xs] = s * m + out[ys, xs] * (1 - m)
    return out


def ref_face_box(lm: np.ndarray) -> tuple[float, float, float]:
    xs, ys = lm[:, 0].astype(np.float64), lm[:, 1].astype(np.float64)
    w, h = np.ptp(xs), np.ptp(ys)
    l = max(w, h) * 3 / 4
    return (xs.max() + xs.min()) / 2, (ys.max() + ys.min()) / 2 - l / 8, l


# ----------------------------------------------------------------------------------------


def test_outline_indices_are_the_format_list():
    assert list(pp.OUTLINE_INDICES) == OUTLINE
    assert len(OUTLINE) == 43


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_face_box(seed):
    lm = synthetic_landmarks(150 + 10 * seed, 170, 120 + 7 * seed, seed=seed)
    assert pp.face_box(lm) == pytest.approx(ref_face_box(lm), abs=1e-9)


def test_outline_polygon_scales_about_mean():
    lm = synthetic_landmarks(200, 210, 150)
    poly1 = pp.outline_polygon(lm, 1.0)
    poly14 = pp.outline_polygon(lm, 1.4)
    np.testing.assert_allclose(poly1, lm[OUTLINE].astype(np.float64))
    mean = poly1.mean(axis=0)
    np.testing.assert_allclose(poly14 - mean, 1.4 * (poly1 - mean), atol=1e-9)
    np.testing.assert_allclose(poly14.mean(axis=0), mean, atol=1e-9)


@pytest.mark.parametrize("centre,size,shape", [((200.3, 215.7), 170, (400, 420)),      # inside
                                                ((30.4, 40.6), 150, (300, 260)),        # cut by the left/top edge
                                                ((250.5, 280.5), 120, (300, 280))])     # .5 corners, cut bottom/right
def test_remove_background_matches_reference(centre, size, shape):
    img = photo(*shape)
    lm = synthetic_landmarks(*centre, size)
    got = pp.remove_background(img, lm)
    assert got.shape == img.shape and got.dtype == np.uint8

    mask, (cx, cy, half) = ref_soft_mask(shape, lm, 1.0)
    region = ref_crop(img, cx - half, cy - half, cx + half, cy + half)
    corner = (math.trunc(cx - half), math.trunc(cy - half))
    expected = ref_paste(np.full(img.shape, 127, np.uint8), region, mask, corner)
    diff = np.abs(got.astype(np.float64) - expected)
    assert diff.max() <= 1.0, diff.max()          # PIL's integer blend rounds
    assert diff.mean() < 0.5

    # gray exactly 127 where the pasted mask is zero (outside the region in particular)
    inside = np.zeros(shape, bool)
    ref_paste_mask = ref_paste(np.zeros(shape + (1,), np.uint8), np.ones(region.shape[:2] + (1,), np.uint8) * 255,
                               mask, corner)[:, :, 0]
    inside |= ref_paste_mask > 0
    assert (got[~inside] == 127).all()
    assert (~inside).sum() > 0
    # where the soft mask is fully on, the pasted region pixel shows exactly (shifted by the corner)
    full = np.argwhere(mask == 255)
    assert len(full) > 0
    ry, rx = full[len(full) // 2]
    np.testing.assert_array_equal(got[ry + corner[1], rx + corner[0]], region[ry, rx])


def test_paste_corner_truncates_while_crop_rounds():
    # cx - half = -3.7: the crop starts at round() = -4, the paste at int() = -3 (released behaviour)
    img = photo(200, 200)
    lm = synthetic_landmarks(60, 90, 100, seed=3)
    cx, cy, half = ref_region(lm)
    shift = (cx - half) - (-3.7)
    lm = lm - np.array([shift, 0], dtype=np.float32)
    cx, cy, half = ref_region(lm)
    assert round(cx - half) == -4 and math.trunc(cx - half) == -3
    got = pp.remove_background(img, lm)
    mask, _ = ref_soft_mask((200, 200), lm, 1.0)
    region = ref_crop(img, cx - half, cy - half, cx + half, cy + half)
    expected = ref_paste(np.full(img.shape, 127, np.uint8), region, mask, (-3, math.trunc(cy - half)))
    assert np.abs(got - expected).max() <= 1.0
    wrong = ref_paste(np.full(img.shape, 127, np.uint8), region, mask, (-4, math.trunc(cy - half)))
    assert np.abs(got - wrong).max() > 5


def test_clip_crop_is_face_box_of_gray_image_black_outside():
    img = photo(240, 260)
    lm = synthetic_landmarks(40, 60, 110)            # face box sticks out to the left and top
    cx, cy, l = ref_face_box(lm)
    assert cx - l < 0 and cy - l < 0
    got = pp.clip_crop(img, lm)
    expected = ref_crop(pp.remove_background(img, lm), cx - l, cy - l, cx + l, cy + l)
    np.testing.assert_array_equal(got, expected)
    # rounded per side, so height and width may differ by one pixel (as in the release)
    assert got.shape[:2] == (round(cy + l) - round(cy - l), round(cx + l) - round(cx - l))
    left_outside = -round(cx - l)
    assert left_outside > 0 and (got[:, :left_outside] == 0).all()      # black outside the image
    assert (got[:, left_outside:] != 0).any()

    plain = pp.clip_crop(img, lm, remove_bg=False)
    np.testing.assert_array_equal(plain, ref_crop(img, cx - l, cy - l, cx + l, cy + l))


def test_grayscale_clip_crop():
    img = photo(300, 300)
    lm = synthetic_landmarks(150, 150, 120)
    color = pp.clip_crop(img, lm).astype(np.float64)
    gray = pp.clip_crop(img, lm, grayscale=True)
    assert gray.shape == color.shape and gray.dtype == np.uint8
    assert (gray[:, :, 0] == gray[:, :, 1]).all() and (gray[:, :, 1] == gray[:, :, 2]).all()
    luma = color[:, :, 0] * 0.299 + color[:, :, 1] * 0.587 + color[:, :, 2] * 0.114
    assert np.abs(gray[:, :, 0] - luma).max() <= 1.0


def test_arcface_crop_is_4l_of_original():
    img = photo(500, 480)
    lm = synthetic_landmarks(240, 260, 90)
    cx, cy, l = ref_face_box(lm)
    got = pp.arcface_crop(img, lm)
    np.testing.assert_array_equal(got, ref_crop(img, cx - 2 * l, cy - 2 * l, cx + 2 * l, cy + 2 * l))
    assert abs(got.shape[0] - 4 * l) <= 1


def test_blur_face_matches_reference():
    img = photo(360, 340)
    lm = synthetic_landmarks(170, 180, 130, seed=4)
    got = pp.blur_face(img, lm)
    mask, (cx, cy, half) = ref_soft_mask(img.shape[:2], lm, 1.4)
    region = ref_crop(img, cx - half, cy - half, cx + half, cy + half)
    h, w = region.shape[:2]
    blurred = np.asarray(Image.fromarray(region).resize((512, 512)).filter(ImageFilter.GaussianBlur(45)).resize((w, h)))
    expected = ref_paste(img, blurred, mask, (math.trunc(cx - half), math.trunc(cy - half)))
    assert np.abs(got - expected).max() <= 1.0
    # far from the face the photo is untouched; at the face centre it is blurred
    assert (got[:5, :5] == img[:5, :5]).all()
    assert np.abs(got[int(cy), int(cx)].astype(int) - img[int(cy), int(cx)]).max() > 0


@pytest.mark.parametrize("scales", [(1, 1, 1, 1), (0.5, 2.0, 1.5, 3.0), (3, 3, 3, 3)])
def test_base_crop_side_scales_clipped_to_image(scales):
    img = photo(400, 380)
    lm = synthetic_landmarks(190, 170, 110, seed=5)
    cx, cy, l = ref_face_box(lm)
    left, right, top, bottom = scales
    x0, y0 = max(cx - l * left, 0), max(cy - l * top, 0)
    x1, y1 = min(cx + l * right, 380), min(cy + l * bottom, 400)
    got = pp.base_crop(img, lm, scales)
    expected = ref_crop(pp.blur_face(img, lm), x0, y0, x1, y1)
    np.testing.assert_array_equal(got, expected)
    assert got.shape == (round(y1) - round(y0), round(x1) - round(x0), 3)
    if scales == (3, 3, 3, 3):
        assert got.shape[:2] == (400, 380)          # clipped to the whole image, no black border


def test_base_scales_validated():
    img, lm = photo(100, 100), synthetic_landmarks(50, 50, 40)
    for bad in [(1, 1, 1), (1, -1, 1, 1), ("a", 1, 1, 1), (float("nan"), 1, 1, 1)]:
        with pytest.raises(ImageInputError, match="base_scales"):
            pp.base_crop(img, lm, bad)
    with pytest.raises(ImageInputError, match="empty"):
        pp.base_crop(img, lm, (0, 0, 0, 0))


def test_tiny_image_and_degenerate_face():
    img = photo(32, 32)
    lm = synthetic_landmarks(16, 16, 14)
    for fn in (pp.remove_background, pp.blur_face, pp.clip_crop, pp.arcface_crop):
        out = fn(img, lm)
        assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3 and min(out.shape[:2]) >= 1
    point = np.full((106, 2), 10.0, np.float32)       # all landmarks on one pixel
    assert pp.remove_background(img, point).shape == img.shape
    assert pp.clip_crop(img, point).shape[0] >= 0


def test_bad_landmarks_rejected():
    img = photo(50, 50)
    with pytest.raises(ValueError, match="106"):
        pp.face_box(np.zeros((68, 2)))
    bad = synthetic_landmarks(25, 25, 20)
    bad[3, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        pp.remove_background(img, bad)


def test_preview_size():
    crop = pp.clip_crop(photo(200, 200), synthetic_landmarks(100, 100, 80))
    assert pp.preview(crop).shape == (512, 512, 3)


def test_face_mask_covers_the_outline_grown_and_feathered():
    lm = synthetic_landmarks(200.0, 180.0, 160.0, seed=3)
    hard = pp.face_mask((400, 360), lm, grow=1.0, feather=0)
    assert hard.shape == (360, 400) and hard.dtype == np.float32
    assert set(np.unique(hard)) <= {0.0, 1.0}
    # the outline is (close to) an ellipse with half-axes 80 and 99.2 px around (200, 180)
    ellipse = math.pi * 0.5 * 160 * 0.62 * 160
    assert abs(hard.sum() / ellipse - 1) < 0.05
    assert hard[180, 200] == 1 and hard[180, 200 + 70] == 1 and hard[180, 200 + 95] == 0 and hard[5, 5] == 0
    grown = pp.face_mask((400, 360), lm, grow=1.3, feather=0)
    assert abs(grown.sum() / hard.sum() - 1.3 ** 2) < 0.05 and bool((grown >= hard).all())
    soft = pp.face_mask((400, 360), lm, grow=1.0, feather=8)
    edge = (soft > 0.05) & (soft < 0.95)
    assert edge.sum() > 0.1 * hard.sum() and soft[180, 200] > 0.99 and soft[5, 5] == 0
    assert abs(soft.sum() / hard.sum() - 1) < 0.02        # a blur moves mass, it does not add any
    for kwargs, match in (({"grow": 0.1}, "grow is 0.1"), ({"feather": -1}, "feather is -1")):
        with pytest.raises(ImageInputError, match=match):
            pp.face_mask((400, 360), lm, **kwargs)
