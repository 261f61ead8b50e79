"""Crop an image to a mask's bounds and paste a re-rendered crop back (a FaceDetailer-style pass).

:func:`mask_box` finds the square around a mask (a face mask, say) with some context,
:func:`crop_region` cuts images and masks to it and scales them to a size the sampler likes,
:func:`paste_region` scales a re-rendered crop back and blends it in through the (feathered) mask,
so every pixel outside the mask keeps its value exactly.

ComfyUI layouts, as plain PyTorch: images ``[B, H, W, C]`` float 0..1, masks ``[B, H, W]`` (or
``[H, W]``) float 0..1.  Resizing is antialiased (area-like when shrinking), bicubic for images
and bilinear for masks, clamped to 0..1.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import ImageInputError, SettingError

logger = logging.getLogger(__name__)

MASK_THRESHOLD = 0.01
"""Mask values above this count as inside when the bounds are measured."""
SIZE_MULTIPLE = 8
"""Crop sizes are rounded to this (a latent pixel is 8 image pixels)."""
MAX_PADDING = 4.0
MIN_SIZE, MAX_SIZE = 16, 8192


@dataclass(frozen=True)
class CropBox:
    """A pixel box ``[x0, x1) x [y0, y1)`` inside a ``source_width`` x ``source_height`` image."""

    x0: int
    y0: int
    x1: int
    y1: int
    source_width: int
    source_height: int

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    def describe(self) -> str:
        return f"({self.x0}, {self.y0})-({self.x1}, {self.y1}) of {self.source_width}x{self.source_height}"


@dataclass(frozen=True)
class MaskCrop:
    """What a crop needs to be pasted back: its box and the mask cut to the box ``[B, h, w]``
    at the source's resolution (the blend weights of the paste)."""

    box: CropBox
    mask: Tensor


def _finite(t: Tensor, what: str, fix: str) -> None:
    """ImageInputError when ``t`` holds NaN or infinite values (they would spread into every pixel they touch)."""
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        raise ImageInputError(f"The {what} holds {int(bad.sum())} NaN or infinite value(s) (of {t.numel()}); {fix}")


def as_masks(mask: Tensor, what: str = "mask") -> Tensor:
    """``[H, W]`` or ``[B, H, W]`` float mask -> ``[B, H, W]`` float32 clamped to 0..1.

    ImageInputError for another shape, an empty batch (``B = 0``) or NaN / infinite values
    (NaN is neither inside nor outside: it would pass the bounds and spoil the blend)."""
    if not isinstance(mask, Tensor) or mask.ndim not in (2, 3) or min(mask.shape[-2:]) < 1:
        raise ImageInputError(f"Expected a MASK [B, H, W], got {getattr(mask, 'shape', type(mask).__name__)}.")
    m = mask if mask.ndim == 3 else mask[None]
    if m.shape[0] == 0:
        raise ImageInputError(f"The {what} batch is empty (shape {list(m.shape)}); connect a mask node that made "
                              "at least one mask.")
    _finite(m, what, "make the mask again (e.g. with Face Mask) or check the node it comes from.")
    return m.float().clamp(0.0, 1.0)


def _check_images(images: Tensor, what: str) -> Tensor:
    """``images`` if it is a non-empty IMAGE ``[B >= 1, H, W, C]`` of finite values, else ImageInputError."""
    if not isinstance(images, Tensor) or images.ndim != 4 or min(images.shape[1:3]) < 1:
        raise ImageInputError(f"The {what} must be an IMAGE [B, H, W, C], got "
                              f"{getattr(images, 'shape', type(images).__name__)}.")
    if images.shape[0] == 0:
        raise ImageInputError(f"The {what} batch is empty (shape {list(images.shape)}); connect a node that gives "
                              "at least one image.")
    _finite(images, what, "check the node it comes from (a VAE Decode in fp16 can overflow: run the VAE in fp32, "
                           "e.g. ComfyUI's --fp32-vae).")
    return images


def mask_box(mask: Tensor, *, padding: float = 0.5, square: bool = True) -> CropBox:
    """The box around every pixel above :data:`MASK_THRESHOLD` of any mask in the batch, grown by
    ``padding`` x its size on each side (context for the sampler), made square (side = the longer
    side) when ``square``, and moved to lie inside the image (cut where it is larger than the image).
    An empty mask gives the whole image.
    """
    m = as_masks(mask)
    if not (isinstance(padding, (int, float)) and math.isfinite(padding) and 0.0 <= padding <= MAX_PADDING):
        raise SettingError(f"padding is {padding!r}; use 0 to {MAX_PADDING:g} (0.5 adds half the mask's size "
                           "of context on each side).")
    h, w = m.shape[-2:]
    inside = (m > MASK_THRESHOLD).any(dim=0)
    if not bool(inside.any()):
        logger.info("the mask is empty: the crop is the whole image")
        return CropBox(0, 0, w, h, w, h)
    ys = torch.nonzero(inside.any(dim=1)).flatten()
    xs = torch.nonzero(inside.any(dim=0)).flatten()
    bx0, bx1 = int(xs[0]), int(xs[-1]) + 1
    by0, by1 = int(ys[0]), int(ys[-1]) + 1
    cx, cy = (bx0 + bx1) / 2, (by0 + by1) / 2
    bw, bh = (bx1 - bx0) * (1 + 2 * padding), (by1 - by0) * (1 + 2 * padding)
    if square:
        bw = bh = max(bw, bh)
    bw, bh = min(w, max(1, math.ceil(bw))), min(h, max(1, math.ceil(bh)))
    x0 = min(max(0, round(cx - bw / 2)), w - bw)
    y0 = min(max(0, round(cy - bh / 2)), h - bh)
    return CropBox(x0, y0, x0 + bw, y0 + bh, w, h)


def crop_size(box: CropBox, size: int) -> tuple[int, int]:
    """``(width, height)`` of the scaled crop: the longer side ``size``, the other in proportion,
    both rounded to :data:`SIZE_MULTIPLE` (at least one multiple)."""
    if isinstance(size, bool) or not isinstance(size, int) or not MIN_SIZE <= size <= MAX_SIZE:
        raise SettingError(f"size is {size!r}; use {MIN_SIZE} to {MAX_SIZE} pixels (1024 suits SDXL).")
    scale = size / max(box.width, box.height)

    def snap(v: float) -> int:
        return max(SIZE_MULTIPLE, int(round(v * scale / SIZE_MULTIPLE)) * SIZE_MULTIPLE)

    return snap(box.width), snap(box.height)


def _resize(bhwc: Tensor, width: int, height: int, *, mode: str = "bicubic") -> Tensor:
    """Antialiased resize of ``[B, H, W, C]`` to ``[B, height, width, C]``, clamped to 0..1 (bicubic for
    images; bilinear for masks, which must not overshoot their values)."""
    if bhwc.shape[1] == height and bhwc.shape[2] == width:
        return bhwc.clone()
    x = bhwc.permute(0, 3, 1, 2).float()
    y = F.interpolate(x, size=(height, width), mode=mode, antialias=True, align_corners=False)
    return y.clamp(0.0, 1.0).permute(0, 2, 3, 1).to(bhwc.dtype).contiguous()


def crop_region(images: Tensor, mask: Tensor, *, padding: float = 0.5, size: int = 1024) -> tuple[Tensor, Tensor, MaskCrop]:
    """Images ``[B, H, W, C]`` and mask ``[B or 1, H, W]`` -> (images ``[B, h', w', C]``, masks
    ``[B or 1, h', w']`` scaled to :func:`crop_size`, :class:`MaskCrop` for :func:`paste_region`)."""
    images = _check_images(images, "image")
    m = as_masks(mask)
    if tuple(m.shape[-2:]) != tuple(images.shape[1:3]):
        raise ImageInputError(f"The mask is {m.shape[-1]}x{m.shape[-2]} px but the image {images.shape[2]}x"
                              f"{images.shape[1]} px; make the mask from this image (or resize it to the image).")
    box = mask_box(m, padding=padding)
    width, height = crop_size(box, size)
    cut = images[:, box.y0:box.y1, box.x0:box.x1, :]
    cut_mask = m[:, box.y0:box.y1, box.x0:box.x1]
    scaled_mask = _resize(cut_mask[..., None], width, height, mode="bilinear")[..., 0]
    return _resize(cut, width, height), scaled_mask, MaskCrop(box=box, mask=cut_mask.clone())


def paste_region(destination: Tensor, patch: Tensor, crop: MaskCrop) -> Tensor:
    """``destination`` ``[B, H, W, C]`` with ``patch`` (any size, scaled to the box) blended in
    through the crop's mask: ``out = dest x (1 - m) + patch x m`` inside the box, ``dest`` elsewhere.
    Batches broadcast when one side has one image."""
    destination = _check_images(destination, "destination image")
    patch = _check_images(patch, "re-rendered crop")
    if not isinstance(crop, MaskCrop):
        raise ImageInputError(f"The crop input got a {type(crop).__name__}; connect the crop output of "
                              "HyperLoRA Studio Crop by Mask.")
    box = crop.box
    if (destination.shape[2], destination.shape[1]) != (box.source_width, box.source_height):
        raise ImageInputError(
            f"The destination image is {destination.shape[2]}x{destination.shape[1]} px but the crop was cut from a "
            f"{box.source_width}x{box.source_height} image; connect the image that Crop by Mask cut from.")
    if patch.shape[-1] != destination.shape[-1]:
        raise ImageInputError(f"The crop has {patch.shape[-1]} channels, the destination {destination.shape[-1]}.")
    batch = max(destination.shape[0], patch.shape[0], crop.mask.shape[0])
    for what, n in (("destination", destination.shape[0]), ("crop", patch.shape[0]), ("mask", crop.mask.shape[0])):
        if n not in (1, batch):
            raise ImageInputError(f"The {what} batch has {n} images where {batch} (or 1) were expected.")
    scaled = _resize(patch, box.width, box.height).to(destination.device, destination.dtype)
    weight = crop.mask.to(destination.device, destination.dtype)[..., None]
    out = destination.expand(batch, *destination.shape[1:]).clone()
    region = out[:, box.y0:box.y1, box.x0:box.x1, :]
    out[:, box.y0:box.y1, box.x0:box.x1, :] = region * (1 - weight) + scaled * weight
    return out


__all__ = ["CropBox", "MaskCrop", "as_masks", "crop_region", "crop_size", "mask_box", "paste_region"]
