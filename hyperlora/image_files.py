"""Reading photo files (the command-line tools, training and evaluation): the size is checked from the
file's header before anything is decoded.

A 20000 x 20000 image decodes to 1.2 GB of RGB and several times that in float copies; such a file (or
a "decompression bomb", a tiny file that claims a huge size) is refused at once, naming the file, the
size and the fix.  Pillow's own check only warns up to 179 megapixels and decodes them.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import numpy as np

from .errors import ImageInputError

logger = logging.getLogger(__name__)

MAX_IMAGE_PIXELS = 100_000_000
"""Most pixels (width x height) a photo file may have: 100 megapixels, more than the photos of any common
camera; faces are analysed at 640 px and CLIP sees 224 px, so nothing is lost by scaling a larger file down."""


def _too_large(name: str, size: str) -> ImageInputError:
    return ImageInputError(
        f"The image '{name}' is {size}; photos of at most {MAX_IMAGE_PIXELS / 1e6:.0f} megapixels are read, as "
        "decoding a larger one takes gigabytes of memory. Scale it down (e.g. to 4096 pixels on the longer side) "
        "and use that file.")


def check_image_size(width: int, height: int, name: str) -> None:
    """ImageInputError when a ``width`` x ``height`` image has more than :data:`MAX_IMAGE_PIXELS` pixels."""
    if width * height > MAX_IMAGE_PIXELS:
        raise _too_large(name, f"{width}x{height} pixels ({width * height / 1e6:.0f} megapixels, "
                               f"{width * height * 3 / 1e9:.1f} GB decoded)")


def read_image(source: str | os.PathLike[str] | bytes, name: str | None = None) -> np.ndarray:
    """An image file (a path, or its bytes) -> uint8 RGB ``[H, W, 3]``, EXIF orientation applied (as ComfyUI's
    Load Image does).  The size in the header is checked (:func:`check_image_size`) before decoding;
    ImageInputError naming the file for one too large or unreadable."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    shown = name or (f"{len(source)} bytes" if isinstance(source, bytes) else str(source))
    fp = io.BytesIO(source) if isinstance(source, bytes) else Path(source)
    try:
        with Image.open(fp) as img:                    # reads the header only
            check_image_size(img.width, img.height, shown)
            img.load()
            return np.asarray(ImageOps.exif_transpose(img).convert("RGB")).copy()
    except Image.DecompressionBombError as exc:        # Pillow refuses > 179 MP at open, before our check
        raise _too_large(shown, f"larger than Pillow will decode ({exc})") from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise ImageInputError(f"The image '{shown}' cannot be read ({exc}); give a JPEG or PNG file.") from exc


__all__ = ["MAX_IMAGE_PIXELS", "check_image_size", "read_image"]
