"""hyperlora.image_files: photo files are size-checked from their header before decoding, where the pack
reads image files (the refine CLI, training data, evaluation, the identity benchmark)."""

from __future__ import annotations

import resource
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hyperlora.errors import ImageInputError
from hyperlora.image_files import MAX_IMAGE_PIXELS, check_image_size, read_image


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG of a few hundred bytes that claims ``width`` x ``height`` RGB pixels (a decompression bomb's shape:
    decoding it would allocate the full size)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\x00" + bytes(3 * width))          # one row; the rest is missing
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rows) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("size", [(20000, 20000), (12000, 9000)])
def test_an_oversized_image_is_refused_before_decoding(tmp_path, size):
    """20000x20000 used to cost about 20 s and 10 GB before it was refused; 12000x9000 (108 MP) is below
    Pillow's own refusal and was decoded."""
    path = png_header_only(tmp_path / "bomb.png", *size)
    assert path.stat().st_size < 200_000
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    says = f"{size[0]}x{size[1]} pixels" if size[0] * size[1] < 179e6 else "larger than Pillow will decode .*400000000 pixels"
    with pytest.raises(ImageInputError, match=f"bomb.png' is {says}.*; photos of at most 100 megapixels are read"):
        read_image(path)
    from hyperlora.tools.refine import load_photos
    with pytest.raises(ImageInputError, match="bomb.png"):
        load_photos([path], 64)
    assert time.monotonic() - started < 2.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 200_000      # KiB: nothing was decoded


def test_photos_within_the_limit_are_read_with_their_orientation(tmp_path):
    image = np.zeros((30, 20, 3), dtype=np.uint8)
    image[:10] = (255, 0, 0)
    pil = Image.fromarray(image)
    exif = pil.getexif()
    exif[0x0112] = 6                        # "rotate 90 CW to display", as a phone writes it
    pil.save(tmp_path / "photo.jpg", exif=exif, quality=95)
    got = read_image(tmp_path / "photo.jpg")
    assert got.shape == (20, 30, 3) and got.dtype == np.uint8
    check_image_size(10000, MAX_IMAGE_PIXELS // 10000, "x")         # exactly the limit passes
    with pytest.raises(ImageInputError, match="cannot be read"):
        read_image(b"not an image", "upload.png")
