"""Two CPU processes under ``torchrun`` for the multi-process training tests (gloo on a free local port)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from tests.conftest import skip_or_fail


def run_two(args: Sequence[str], *, env: Mapping[str, str] | None = None, drop_env: Sequence[str] = (),
            cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 ... <args>`` on this machine's CPU: one thread per process, CUDA hidden, a
    free port for the rendezvous; ``env`` adds variables, ``drop_env`` removes them.  Output captured as text;
    the caller asserts the return code.  Skips (fails under CI) when torchrun is not on PATH."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        skip_or_fail("torchrun (comes with torch) is not on PATH")
    full = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    for name in drop_env:
        full.pop(name, None)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return subprocess.run([torchrun, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
                           *args], check=False, env=full, capture_output=True, text=True, timeout=timeout, cwd=cwd)


run_two.__test__ = False  # not a test
