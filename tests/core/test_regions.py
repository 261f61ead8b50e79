"""Crop by mask bounds and paste back: the box, the scaled sizes, and that a paste changes pixels only
through the mask (outside it every value is the destination's, bit for bit)."""

from __future__ import annotations

import pytest
import torch

from hyperlora.errors import ImageInputError, SettingError
from hyperlora.regions import CropBox, MaskCrop, crop_region, crop_size, mask_box, paste_region


def _image(h: int = 120, w: int = 200, seed: int = 0) -> torch.Tensor:
    return torch.rand((1, h, w, 3), generator=torch.Generator().manual_seed(seed))


def _rect_mask(h: int, w: int, x0: int, y0: int, x1: int, y1: int, value: float = 1.0) -> torch.Tensor:
    m = torch.zeros((1, h, w))
    m[:, y0:y1, x0:x1] = value
    return m


def test_box_is_the_padded_square_around_the_mask():
    box = mask_box(_rect_mask(120, 200, 90, 40, 110, 70), padding=0.5)   # 20 x 30 px, centre (100, 55)
    assert (box.width, box.height) == (60, 60)                           # longer side 30 x (1 + 2 x 0.5)
    assert (box.x0, box.y0, box.x1, box.y1) == (70, 25, 130, 85)
    assert (box.source_width, box.source_height) == (200, 120)
    unpadded = mask_box(_rect_mask(120, 200, 90, 40, 110, 70), padding=0.0, square=False)
    assert (unpadded.x0, unpadded.y0, unpadded.x1, unpadded.y1) == (90, 40, 110, 70)


def test_box_is_moved_inside_and_cut_to_the_image():
    near_edge = mask_box(_rect_mask(120, 200, 0, 0, 20, 20), padding=1.0)
    assert (near_edge.x0, near_edge.y0, near_edge.width, near_edge.height) == (0, 0, 60, 60)
    huge = mask_box(_rect_mask(120, 200, 50, 10, 150, 110), padding=1.0)
    assert (huge.x0, huge.y0, huge.x1, huge.y1) == (0, 0, 200, 120)     # 300 x 300 wanted, the image is smaller
    empty = mask_box(torch.zeros((1, 120, 200)))
    assert (empty.x0, empty.y0, empty.x1, empty.y1) == (0, 0, 200, 120)


def test_crop_sizes_are_multiples_of_eight():
    assert crop_size(CropBox(0, 0, 60, 60, 200, 120), 1024) == (1024, 1024)
    assert crop_size(CropBox(0, 0, 200, 120, 200, 120), 1024) == (1024, 616)    # 614.4 -> 616
    assert crop_size(CropBox(0, 0, 3, 300, 300, 300), 64) == (8, 64)
    with pytest.raises(SettingError, match="size"):
        crop_size(CropBox(0, 0, 60, 60, 200, 120), 10)


def test_crop_scales_image_and_mask():
    image = _image()
    mask = _rect_mask(120, 200, 90, 40, 110, 70, value=0.8)
    crop, crop_mask, info = crop_region(image, mask, padding=0.5, size=120)
    assert crop.shape == (1, 120, 120, 3) and crop_mask.shape == (1, 120, 120)
    assert isinstance(info, MaskCrop) and info.mask.shape == (1, 60, 60)
    assert torch.equal(info.mask, mask[:, 25:85, 70:130])
    # at twice the size, a pixel of the crop centre is near the source pixel it came from
    assert torch.allclose(crop[0, 60:62, 60:62].mean((0, 1)), image[0, 55, 100], atol=0.25)
    assert float(crop_mask.max()) == pytest.approx(0.8, abs=1e-3) and float(crop_mask.min()) == 0.0


def test_paste_changes_only_what_the_mask_lets_through():
    dest = _image(seed=1)
    mask = torch.zeros((1, 120, 200))
    mask[:, 45:65, 92:108] = 1.0
    mask[:, 40:70, 88:112] = torch.maximum(mask[:, 40:70, 88:112], torch.full((1, 30, 24), 0.5))
    _, _, info = crop_region(dest, mask, padding=0.5, size=64)
    white = torch.ones((1, 64, 64, 3))
    out = paste_region(dest, white, info)
    outside = (mask[0] == 0)
    assert torch.equal(out[0][outside], dest[0][outside])                 # bit for bit outside the mask
    assert torch.allclose(out[0, 50, 100], torch.ones(3))                  # fully inside: the new pixels
    half = out[0, 41, 89]
    assert torch.allclose(half, 0.5 * dest[0, 41, 89] + 0.5, atol=1e-6)    # soft edge: the blend
    assert not torch.equal(dest, out)                                      # input untouched, new tensor
    assert torch.equal(paste_region(dest, white, MaskCrop(info.box, torch.zeros_like(info.mask))), dest)


def test_paste_broadcasts_and_checks():
    dest = _image(seed=2).repeat(2, 1, 1, 1)
    _, _, info = crop_region(dest, _rect_mask(120, 200, 10, 10, 40, 40), size=32)
    assert paste_region(dest, torch.zeros((1, 32, 32, 3)), info).shape == (2, 120, 200, 3)
    with pytest.raises(ImageInputError, match="cut from a 200x120 image"):
        paste_region(_image(100, 100), torch.zeros((1, 32, 32, 3)), info)
    with pytest.raises(ImageInputError, match="Crop by Mask"):
        paste_region(dest, torch.zeros((1, 32, 32, 3)), {"box": info.box})
    with pytest.raises(ImageInputError, match=r"where 3 \(or 1\)"):
        paste_region(dest, torch.zeros((3, 32, 32, 3)), info)
    with pytest.raises(ImageInputError, match="mask is 50x40"):
        crop_region(dest, torch.zeros((1, 40, 50)))
    with pytest.raises(SettingError, match="padding"):
        crop_region(dest, torch.zeros((1, 120, 200)), padding=float("nan"))
