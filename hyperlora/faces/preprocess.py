"""Face crops exactly as the released HyperLoRA weights were trained on (format §6).

Every function takes an RGB ``uint8`` image ``[H, W, 3]`` and the 106 landmarks
``[106, 2]`` (``landmark_2d_106`` of insightface, original-image pixels) of the
chosen face, and returns a new ``uint8`` RGB image.  Nothing here runs a model.

Pixel parity with the release depends on small choices, all of them kept in this
module and made with PIL the same way the training pipeline made them:

* crops use PIL's ``Image.crop`` with a float box (PIL rounds the corners to the
  nearest integer) and fill what lies outside the image with black;
* the soft mask is resized to 512x512 and back with PIL's default resampling and
  blurred with ``ImageFilter.GaussianBlur``;
* the face region is pasted back at the integer-truncated (``int()``, towards
  zero) corner ``c - half``, which may differ by one pixel from the rounded crop
  corner - that is the released behaviour and is kept on purpose.

Ambiguities of the written format (docs/released-format.md), resolved once here:

* "Region: half-size 0.8 * max extent of the polygon" - the extent is that of
  the *unscaled* outline polygon (the largest side of its bounding box), also
  when the mask polygon itself is scaled by 1.4 for the Base condition; the
  scaled polygon is then cut by that region.  This is what the released
  pipeline does.
* Geometry is computed in float64 whatever the landmark dtype (the release ran
  in the landmarks' float32 under numpy's promotion rules of its time; the two
  can differ only when a corner lands exactly on .5 of a pixel).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..errors import ImageInputError

logger = logging.getLogger(__name__)

# Face outline polygon: landmark indices of the 106-point model, in this order (format §6).
OUTLINE_INDICES: tuple[int, ...] = (
    1, 9, 10, 11, 12, 13, 14, 15, 16, 2, 3, 4, 5, 6, 7, 8, 0,
    24, 23, 22, 21, 20, 19, 18, 32, 31, 30, 29, 28, 27, 26, 25, 17,
    101, 105, 104, 103, 102, 50, 51, 49, 48, 43,
)
GRAY_RGB = (127, 127, 127)          # background of the ID condition
BOX_SCALE = 0.75                    # face box half-size = 0.75 * max(w, h) of all 106 points
BOX_SHIFT_UP = 0.125                # face box centre moved up by 0.125 * half-size
REGION_SCALE = 0.8                  # outline region half-size = 0.8 * max extent of the polygon
MASK_WORK_SIZE = 512                # mask (and base face) are blurred at 512x512
MASK_BLUR_RADIUS = 15
ID_MASK_SCALE = 1.0
BASE_MASK_SCALE = 1.4
BASE_BLUR_RADIUS = 45
ARCFACE_CROP_FACTOR = 2.0           # ArcFace input: [c - 2l, c + 2l]
PREVIEW_SIZE = 512                  # size of the crop previews handed back to the user


def _as_landmarks(landmarks_106: np.ndarray) -> np.ndarray:
    """``[106, 2]`` float64 copy; more rows (e.g. 106 + extras) are cut to the first 106."""
    pts = np.asarray(landmarks_106, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2 or pts.shape[0] < 106:
        raise ValueError(f"expected 106 face landmarks of shape [106, 2], got {tuple(pts.shape)}")
    pts = pts[:106]
    if not np.isfinite(pts).all():
        raise ValueError("face landmarks contain NaN or infinite values")
    return pts


def _as_rgb(image_rgb: np.ndarray) -> Image.Image:
    arr = np.asarray(image_rgb)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"expected a uint8 RGB image [H, W, 3], got {arr.dtype} {tuple(arr.shape)}")
    return Image.fromarray(np.ascontiguousarray(arr), mode="RGB")


def _box(cx: float, cy: float, half: float) -> tuple[float, float, float, float]:
    return (cx - half, cy - half, cx + half, cy + half)


def _paste_corner(cx: float, cy: float, half: float) -> tuple[int, int]:
    # int() truncates towards zero (also for negative corners): released behaviour.
    return (int(cx - half), int(cy - half))


def face_box(landmarks_106: np.ndarray) -> tuple[float, float, float]:
    """Face box of all 106 points: ``(cx, cy, l)``; the square is ``[c - l, c + l]``.

    Centre of the min/max box, ``l = 0.75 * max(width, height)``, centre moved up by
    ``0.125 * l`` (format §6).
    """
    pts = _as_landmarks(landmarks_106)
    (x0, y0), (x1, y1) = pts.min(axis=0), pts.max(axis=0)
    half = BOX_SCALE * max(x1 - x0, y1 - y0)
    cx = 0.5 * (x0 + x1)
    cy = 0.5 * (y0 + y1) - BOX_SHIFT_UP * half
    return float(cx), float(cy), float(half)


def outline_polygon(landmarks_106: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """Face outline polygon ``[43, 2]`` (OUTLINE_INDICES order), scaled about its mean point."""
    pts = _as_landmarks(landmarks_106)[list(OUTLINE_INDICES)]
    mean = pts.mean(axis=0)
    return (pts - mean) * float(scale) + mean


def outline_region(landmarks_106: np.ndarray) -> tuple[float, float, float]:
    """Square region around the outline: ``(cx, cy, half)``.

    Centre = mean point of the outline polygon; ``half = 0.8 * max extent`` of the
    *unscaled* polygon's bounding box (see the module docstring).  At least one
    pixel so that a degenerate face never yields an empty crop.
    """
    pts = _as_landmarks(landmarks_106)[list(OUTLINE_INDICES)]
    cx, cy = pts.mean(axis=0)
    extent = (pts.max(axis=0) - pts.min(axis=0)).max()
    return float(cx), float(cy), max(float(REGION_SCALE * extent), 1.0)


def _outline_mask(size: tuple[int, int], polygon: np.ndarray) -> Image.Image:
    """Filled polygon (255 inside) on an ``L`` image of the full image size ``(W, H)``."""
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).polygon([(float(x), float(y)) for x, y in polygon], fill=255)
    return mask


def _blur_at_work_size(region: Image.Image, radius: float) -> Image.Image:
    """Resize to 512x512, Gaussian-blur, resize back (PIL default resampling both ways)."""
    size = region.size
    return region.resize((MASK_WORK_SIZE, MASK_WORK_SIZE)).filter(ImageFilter.GaussianBlur(radius=radius)).resize(size)


def soft_outline_mask(image_size: tuple[int, int], landmarks_106: np.ndarray, *, scale: float) -> tuple[Image.Image, tuple[float, float, float]]:
    """Blurred outline mask of the face region and the region ``(cx, cy, half)``.

    ``image_size`` is PIL's ``(W, H)``.  The mask is the filled polygon cut to the
    region (0 outside the image), blurred with radius 15 at 512x512.
    """
    region = outline_region(landmarks_106)
    mask = _outline_mask(image_size, outline_polygon(landmarks_106, scale)).crop(_box(*region))
    return _blur_at_work_size(mask, MASK_BLUR_RADIUS), region


def face_mask(image_size: tuple[int, int], landmarks_106: np.ndarray, *, grow: float = 1.3,
              feather: float = 8.0) -> np.ndarray:
    """Inpainting mask of one face: float32 ``[H, W]`` in 0..1 for ``image_size`` = PIL's ``(W, H)``.

    The face outline polygon (jaw line and brows, OUTLINE_INDICES) scaled by ``grow`` about its
    mean point (1.3 also covers the forehead and the cheeks' edge), filled with 1, then blurred
    with a Gaussian of ``feather`` pixels (0 = hard edge).  Not part of the released recipe: it is
    for re-painting a face in a photo, nothing the model sees.
    """
    if not (isinstance(grow, (int, float)) and 0.5 <= grow <= 4.0):
        raise ImageInputError(f"grow is {grow!r}; use 0.5-4.0 (1.0 = the face outline, 1.3 = with forehead).")
    if not (isinstance(feather, (int, float)) and 0.0 <= feather <= 256.0):
        raise ImageInputError(f"feather is {feather!r}; use 0-256 pixels.")
    mask = _outline_mask(image_size, outline_polygon(landmarks_106, grow))
    if feather > 0:
        mask = mask.filter(ImageFilter.GaussianBlur(radius=float(feather)))
    return np.asarray(mask, dtype=np.float32) / 255.0


def remove_background(image_rgb: np.ndarray, landmarks_106: np.ndarray, *, scale: float = ID_MASK_SCALE) -> np.ndarray:
    """Face cut out on a uniform gray (127, 127, 127) image of the original size ``[H, W, 3]``."""
    image = _as_rgb(image_rgb)
    mask, region = soft_outline_mask(image.size, landmarks_106, scale=scale)
    out = Image.new("RGB", image.size, GRAY_RGB)
    out.paste(image.crop(_box(*region)), _paste_corner(*region), mask)
    return np.asarray(out)


def crop_square(image_rgb: np.ndarray, cx: float, cy: float, half: float) -> np.ndarray:
    """The square ``[c - half, c + half]`` (PIL-rounded corners), black outside the image."""
    return np.asarray(_as_rgb(image_rgb).crop(_box(cx, cy, half)))


def to_grayscale(image_rgb: np.ndarray) -> np.ndarray:
    """PIL luma (ITU-R 601-2) replicated to 3 channels ``[H, W, 3]`` (what CLIP sees of an ``L`` image)."""
    gray = np.asarray(_as_rgb(image_rgb).convert("L"))
    return np.repeat(gray[:, :, None], 3, axis=2)


def clip_crop(image_rgb: np.ndarray, landmarks_106: np.ndarray, *, remove_bg: bool = True, grayscale: bool = False) -> np.ndarray:
    """ID-condition CLIP input before the CLIP processor: the face box of the (background-removed) image."""
    source = remove_background(image_rgb, landmarks_106) if remove_bg else image_rgb
    crop = crop_square(source, *face_box(landmarks_106))
    return to_grayscale(crop) if grayscale else crop


def arcface_crop(image_rgb: np.ndarray, landmarks_106: np.ndarray) -> np.ndarray:
    """ArcFace input: the square ``[c - 2l, c + 2l]`` of the original image (black outside)."""
    cx, cy, half = face_box(landmarks_106)
    return crop_square(image_rgb, cx, cy, ARCFACE_CROP_FACTOR * half)


def blur_face(image_rgb: np.ndarray, landmarks_106: np.ndarray) -> np.ndarray:
    """Base condition blur ``[H, W, 3]``: the outline region (polygon at scale 1.4) blurred with
    radius 45 at 512x512 and pasted back through the radius-15 soft mask."""
    image = _as_rgb(image_rgb)
    mask, region = soft_outline_mask(image.size, landmarks_106, scale=BASE_MASK_SCALE)
    face = _blur_at_work_size(image.crop(_box(*region)), BASE_BLUR_RADIUS)
    out = image.copy()
    out.paste(face, _paste_corner(*region), mask)
    return np.asarray(out)


def check_base_scales(scales: Sequence[float]) -> tuple[float, float, float, float]:
    """Validate the per-side crop scales ``(left, right, top, bottom)`` of the Base condition."""
    try:
        values = tuple(float(s) for s in scales)
    except (TypeError, ValueError):
        raise ImageInputError(f"base_scales must be four numbers (left, right, top, bottom), got {scales!r}.") from None
    if len(values) != 4 or not all(np.isfinite(values)) or min(values) < 0:
        raise ImageInputError(
            f"base_scales must be four non-negative numbers (left, right, top, bottom), e.g. 1,1,1,1; got {scales!r}."
        )
    return values  # type: ignore[return-value]


def base_crop(image_rgb: np.ndarray, landmarks_106: np.ndarray, scales: Sequence[float] = (1.0, 1.0, 1.0, 1.0)) -> np.ndarray:
    """Base condition input: the blurred-face image cropped around the face box.

    Box ``[cx - l*left, cy - l*top, cx + l*right, cy + l*bottom]``, clipped to the image
    (no black border), ``[h, w, 3]``.
    """
    left, right, top, bottom = check_base_scales(scales)
    blurred = blur_face(image_rgb, landmarks_106)
    height, width = blurred.shape[:2]
    cx, cy, half = face_box(landmarks_106)
    x1, y1 = max(0.0, cx - half * left), max(0.0, cy - half * top)
    x2, y2 = min(float(width), cx + half * right), min(float(height), cy + half * bottom)
    if round(x2) - round(x1) < 1 or round(y2) - round(y1) < 1:
        raise ImageInputError(
            f"The base-condition crop (base_scales {scales!r}) of the face at ({cx:.0f}, {cy:.0f}) is empty "
            f"inside the {width}x{height} image; use larger base_scales."
        )
    return np.asarray(Image.fromarray(blurred).crop((x1, y1, x2, y2)))


def preview(image_rgb: np.ndarray, size: int = PREVIEW_SIZE) -> np.ndarray:
    """Square crop resized to ``[size, size, 3]`` for display (PIL default resampling)."""
    return np.asarray(_as_rgb(image_rgb).resize((size, size)))
