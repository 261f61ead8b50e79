"""Shared pytest set-up for both test tiers.

* ``cache_dir``: where expensive generated fixtures (full-size random
  checkpoints) are kept between runs; ``HYPERLORA_TEST_CACHE`` or
  ``~/.cache/hyperlora/test-models``.  Builders key their files by a version
  string, so a stale cache is never used.
* ``skip_or_fail``: a test that needs a piece of the environment (a ComfyUI checkout,
  Chromium, a C compiler) skips without it on a developer's machine, but under ``CI=true``
  the same absence fails the run: CI must not pass by skipping its real tiers.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from typing import NoReturn

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


ON_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def skip_or_fail(reason: str) -> NoReturn:
    """``pytest.skip(reason)``, or a failure under ``CI=true``."""
    if ON_CI:
        pytest.fail(f"CI=true, so this is a failure, not a skip: {reason}", pytrace=False)
    pytest.skip(reason)


def test_cache_root() -> Path:
    root = Path(os.environ.get("HYPERLORA_TEST_CACHE", Path.home() / ".cache" / "hyperlora" / "test-models"))
    root.mkdir(parents=True, exist_ok=True)
    return root


test_cache_root.__test__ = False  # not a test


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    return test_cache_root()


@pytest.fixture(scope="session", autouse=True)
def integrity_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tests (and the ComfyUI servers they start) keep the verified-hash cache of hyperlora.integrity in a
    temporary folder, never in the user's ``~/.cache/hyperlora``."""
    folder = tmp_path_factory.mktemp("hyperlora_cache")
    os.environ["HYPERLORA_CACHE"] = str(folder)
    # the trained toy VAE decoder (minutes of training, keyed by a hash of its code, config and settings) is kept
    # across sessions in the test cache; hyperlora.train.toy.decoder.TOY_CACHE_ENV (named here: tests/core never
    # imports hyperlora.train)
    os.environ.setdefault("HYPERLORA_TOY_CACHE", str(test_cache_root()))
    return folder


@pytest.fixture()
def a_file(tmp_path: Path) -> Path:
    """A plain file, for the CLI tests that pass it where a folder goes."""
    path = tmp_path / "a_file"
    path.write_text("x")
    return path
