"""The ComfyUI tier: a real ComfyUI checkout (``COMFYUI_PATH``), started once for the session.

* Without ``COMFYUI_PATH`` (or when it is not a ComfyUI checkout) every test here is skipped
  with the reason, at collection.
* ``comfy_base``: a temporary ComfyUI base directory with this pack linked into
  ``custom_nodes/`` and random-weight models in the released layouts (see ``models.py``).
* ``comfy_server``: ComfyUI started once on 127.0.0.1 (CPU, fp16 UNet/text encoders to halve
  the RAM of the random SDXL checkpoint), stopped at the end of the session.
* ``pack``: the pack loaded through ComfyUI's own custom-node loader *in this process*
  (ComfyUI's root first on ``sys.path``, so its ``nodes.py`` is not shadowed by our ``nodes/``).
"""

from __future__ import annotations

import fcntl
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest

from tests.comfy.client import ComfyServer, free_port

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
PACK_DIR_NAME = "ComfyUI-HyperLoRA"
# fp16 weights halve the RAM of the random SDXL checkpoint on the CPU (about 5 GB instead of 10 GB)
SERVER_ARGS = ("--fp16-unet", "--fp16-text-enc")


def comfy_checkout() -> tuple[Path | None, str]:
    """``(root, "")`` when COMFYUI_PATH is a ComfyUI checkout, else ``(None, reason)``."""
    value = os.environ.get("COMFYUI_PATH", "")
    if not value:
        return None, "COMFYUI_PATH is not set: the ComfyUI tier needs a ComfyUI checkout (0.3.64 or newer)"
    root = Path(value).expanduser().resolve()
    missing = [f for f in ("main.py", "nodes.py", "folder_paths.py", "comfy/model_patcher.py") if not (root / f).is_file()]
    if missing:
        return None, f"COMFYUI_PATH={value} is not a ComfyUI checkout (missing {', '.join(missing)})"
    return root, ""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root, reason = comfy_checkout()
    if root is not None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def comfy_root() -> Path:
    root, reason = comfy_checkout()
    if root is None:
        pytest.skip(reason)
    return root


@pytest.fixture(scope="session")
def comfy(comfy_root: Path) -> Any:
    """ComfyUI's ``comfy`` package imported in this process (CPU)."""
    from tests.fixtures.sdxl import import_comfy

    return import_comfy(comfy_root)


@pytest.fixture(scope="session")
def comfy_base(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path, comfy: Any) -> SimpleNamespace:
    """A ComfyUI base directory with the pack and the fixture models (see tests/comfy/models.py)."""
    from tests.comfy.models import build_base

    return build_base(tmp_path_factory.mktemp("comfy_base"), cache_dir=cache_dir, comfy=comfy, repo=REPO_ROOT)


@pytest.fixture(scope="session")
def comfy_server(comfy_root: Path, comfy_base: SimpleNamespace, cache_dir: Path) -> Iterator[ComfyServer]:
    """The SDXL-capable server.  A lock file in the test cache makes concurrent test sessions
    on one machine take turns (two SDXL servers need about 2 x 10 GB of RAM)."""
    server = ComfyServer(root=comfy_root, base=comfy_base.base, port=free_port(),
                         log_path=comfy_base.base / "server.log", extra_args=SERVER_ARGS)
    with open(cache_dir / ".comfy_sdxl_server.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print("\n[tests/comfy] another test session runs an SDXL ComfyUI server; waiting for it to finish",
                  file=sys.stderr)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            server.start()
            yield server
        finally:
            server.stop()
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def pack(comfy: Any, comfy_root: Path, comfy_base: SimpleNamespace) -> SimpleNamespace:
    """This pack loaded in-process through ComfyUI's ``nodes.load_custom_node`` (folders -> ``comfy_base``)."""
    from tests.comfy.inprocess import load_pack

    ns = load_pack(comfy_root, comfy_base.base)
    ns.base = comfy_base
    return ns
