"""Two processes on the CPU train one generator with DDP (gloo), as `accelerate launch` runs GPUs.

``torchrun --nproc_per_node 2`` starts tests/train/ddp_fit_script.py; fit's Accelerator joins the
process group (on a machine without CUDA it asks for the CPU backend itself: without that, Accelerate
would run two independent trainings), the steps run inside it, only the main process exports and reports.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import skip_or_fail

SCRIPT = Path(__file__).with_name("ddp_fit_script.py")


def test_two_cpu_processes_train_one_generator(tmp_path: Path) -> None:
    pytest.importorskip("diffusers")
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        skip_or_fail("torchrun (comes with torch) is not on PATH")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("ACCELERATE_USE_CPU", None)                      # fit must choose the CPU group by itself
    with socket.socket() as sock:                            # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
                           str(SCRIPT), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert r["steps"] == 6 and r["step"] == 6
        assert r["group"] is True and r["world"] == 2 and r["backend"] == "gloo"
    assert ranks[0]["main"] is True and ranks[1]["main"] is False
    assert ranks[1]["export"] is None and ranks[0]["export"] is not None
    from hyperlora.checkpoint import load_hyper_lora

    model = load_hyper_lora(Path(ranks[0]["export"]))         # one export, through the strict loader
    assert model.arch.base_rank is not None
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints and all(p.startswith("step-") for p in checkpoints)
