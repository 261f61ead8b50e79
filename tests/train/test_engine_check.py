"""bench/engine_check.py: without CUDA it says so and exits 0; its frozen-parts check catches a moved part."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[2]


def test_without_cuda_it_says_so_and_exits_0() -> None:
    res = subprocess.run([sys.executable, "bench/engine_check.py"], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert res.returncode == 0, res.stderr
    assert "No CUDA device here" in res.stdout and "--smoke" in res.stdout


def test_frozen_check_flags_a_frozen_part_that_moved(tmp_path: Path) -> None:
    """Stage-end checkpoints of a generator where stage 2 also moved a Base basis: the check says FAILED."""
    pytest.importorskip("diffusers")
    sys.path.insert(0, str(REPO))
    from bench.engine_check import frozen_check
    from hyperlora.train.config import DISTILL_PARTS, STAGE_PARTS
    from hyperlora.train.export import GENERATOR_FILE, STATE_FILE, arch_to_json
    from hyperlora.train.toy.sdxl import tiny_unet
    from tests.train.test_hypernet import tiny_generator

    gen = tiny_generator(tiny_unet(seed=0), seed=1)
    state = {k: v.clone() for k, v in gen.state_dict().items()}
    parts = {2: STAGE_PARTS[2], 3: STAGE_PARTS[3], 4: DISTILL_PARTS}

    def write(step: int, sd: dict) -> None:
        d = tmp_path / "checkpoints" / f"step-{step:06d}"
        d.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in sd.items()}, str(d / GENERATOR_FILE))
        (d / STATE_FILE).write_text('{"arch": %s}' % __import__("json").dumps(arch_to_json(gen.arch)))

    write(1, state)
    for i in (2, 3, 4):
        state = {k: (v + 1.0 if gen.part_of(k) in parts[i] else v) for k, v in state.items()}
        if i == 2:
            state = {k: (v + 1.0 if gen.part_of(k) == "base_basis" else v) for k, v in state.items()}
        write(i, state)
    ok, note = frozen_check(tmp_path, 1)
    assert not ok and "base_basis" in note
