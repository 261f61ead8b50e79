"""Training data: ``prepare.decode_image`` skips a decompression bomb by its header, before decoding it."""
from __future__ import annotations

import resource
import time

from hyperlora.train.prepare import decode_image
from tests.core.test_image_files import png_header_only


def test_prepare_skips_a_decompression_bomb_before_decoding(tmp_path):
    path = png_header_only(tmp_path / "bomb.png", 20000, 20000)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    assert decode_image(path.read_bytes()) is None
    assert time.monotonic() - started < 2.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 200_000      # KiB: nothing was decoded
