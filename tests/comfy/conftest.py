"""The ComfyUI tier: a real ComfyUI checkout, started once for the session.

* The checkout is ``COMFYUI_PATH``, else the ComfyUI this pack sits in (``ComfyUI/custom_nodes/<pack>``,
  so a user's ``python -m pytest`` tests against their own ComfyUI).  Without one every test here
  is skipped with the reason at collection; under ``CI=true`` the run stops with that reason instead.
* ``comfy_base``: a temporary ComfyUI base directory with this pack linked into
  ``custom_nodes/`` and random-weight models in the released layouts (see ``models.py``).
* ``comfy_server``: ComfyUI started once on 127.0.0.1 (CPU, fp16 UNet/text encoders to halve
  the RAM of the random SDXL checkpoint), stopped at the end of the session.  Its memory is sampled
  (tests/comfy/memory.py) and printed at the end of the run; ``HYPERLORA_SERVER_RSS_LIMIT_GB`` makes
  a higher peak fail the run.
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
from tests.comfy.memory import SERVERS as _servers, watch_memory   # (server, sampler) of this session
from tests.comfy.models import ANTELOPE, CLIP_FOLDER, SMALL_MODEL
from tests.conftest import ON_CI

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
# fp16 weights halve the RAM of the random SDXL checkpoint on the CPU (about 5 GB instead of 10 GB)
SERVER_ARGS = ("--fp16-unet", "--fp16-text-enc")
RSS_LIMIT_ENV = "HYPERLORA_SERVER_RSS_LIMIT_GB"


COMFY_FILES = ("main.py", "nodes.py", "folder_paths.py", "comfy/model_patcher.py")


def comfy_checkout() -> tuple[Path | None, str]:
    """``(root, "")`` for COMFYUI_PATH or the ComfyUI holding this pack, else ``(None, reason)``."""
    value = os.environ.get("COMFYUI_PATH", "")
    if not value:
        for pack in (Path(__file__).absolute().parents[2], REPO_ROOT):   # as linked, and as resolved
            host = pack.parent.parent                                     # <ComfyUI>/custom_nodes/<this pack>
            if pack.parent.name == "custom_nodes" and all((host / f).is_file() for f in COMFY_FILES):
                return host.resolve(), ""
        return None, ("COMFYUI_PATH is not set and this checkout is not inside ComfyUI/custom_nodes/: the ComfyUI "
                      "tier needs a ComfyUI checkout (0.3.64 or newer)")
    root = Path(value).expanduser().resolve()
    missing = [f for f in COMFY_FILES if not (root / f).is_file()]
    if missing:
        return None, f"COMFYUI_PATH={value} is not a ComfyUI checkout (missing {', '.join(missing)})"
    return root, ""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root, reason = comfy_checkout()
    if root is not None:
        return
    ours = [item for item in items if HERE in Path(str(item.fspath)).resolve().parents]
    if ours and ON_CI:
        raise pytest.UsageError(f"CI=true and the ComfyUI tier cannot run ({len(ours)} tests): {reason}")
    skip = pytest.mark.skip(reason=reason)
    for item in ours:
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
            watch_memory(server, "fp16")
            yield server
        finally:
            for srv, sampler in _servers:
                if srv is server:
                    sampler.stop()
            server.stop()
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """The SDXL server serves this tier only: after the tier's last test it is stopped, so the core and training
    tiers that follow get its memory (about 12 GB) and CPU back. Its fixture's own teardown stops it again (a no-op)."""
    here = Path(__file__).resolve().parent
    if nextitem is not None and Path(str(nextitem.path)).resolve().is_relative_to(here):
        return
    for server, sampler in _servers:
        sampler.stop()
        server.stop()


def _over_limit() -> list[str]:
    from tests.comfy.memory import GB

    limit = os.environ.get(RSS_LIMIT_ENV)
    if not limit:
        return []
    return [f"the ComfyUI server's peak RSS {max(s.peak['VmRSS'], s.peak['VmHWM']) / GB:.2f} GB is above "
            f"{RSS_LIMIT_ENV}={limit}" for _srv, s in _servers if max(s.peak["VmRSS"], s.peak["VmHWM"]) > float(limit) * GB]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _over_limit() and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for _server, sampler in _servers:
        terminalreporter.write_line(f"[tests/comfy] ComfyUI server memory ({sampler.label}): {sampler.describe()}")
    for line in _over_limit():
        terminalreporter.write_line(f"[tests/comfy] FAILED: {line}", red=True)


@pytest.fixture(scope="session")
def pack(comfy: Any, comfy_root: Path, comfy_base: SimpleNamespace) -> SimpleNamespace:
    """This pack loaded in-process through ComfyUI's ``nodes.load_custom_node`` (folders -> ``comfy_base``)."""
    from tests.comfy.inprocess import load_pack

    ns = load_pack(comfy_root, comfy_base.base)
    ns.base = comfy_base
    return ns


@pytest.fixture(scope="module")
def small(pack) -> Any:
    """The small HyperLoRA model, loaded by the Loader node in fp32 on the CPU (one per module)."""
    handle, _info = pack.nodes["HyperLoRAStudioLoader"]().load(model=SMALL_MODEL, clip_vision=CLIP_FOLDER,
                                                               insightface=ANTELOPE, dtype="fp32", provider="CPU")
    return handle
