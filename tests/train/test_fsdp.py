"""fit's stages under FSDP2: two CPU processes (gloo) shard the generator with torch's ``fully_shard``.

accelerate cannot run FSDP on a CPU (it turns the request into DDP), so tests/train/fsdp_stage_script.py
drives fit's own pieces (Trainer, engine's part groups and ``enter_stage``) on a sharded generator; the
accelerate path itself is covered on a GPU by ``bench/engine_check.py``.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from tests.train.torchrun import run_two

SCRIPT = Path(__file__).with_name("fsdp_stage_script.py")


def _torchrun(script: Path, out: Path) -> subprocess.CompletedProcess:
    return run_two([str(script), str(out)])


def test_fsdp2_stages_leave_frozen_parts_bit_identical(tmp_path: Path) -> None:
    pytest.importorskip("diffusers")
    proc = _torchrun(SCRIPT, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 and r["sharded"] for r in ranks)          # the parameters really were DTensors
    assert ranks[0]["digests"] == ranks[1]["digests"]                     # one model, not two
    assert all(r["teacher_plain"] for r in ranks)                         # distil teacher: a plain gathered copy
    # sampling and export with the sharded generator: no deadlock, one picture and one export, from rank 0
    assert ranks[1]["sample"] is None and ranks[1]["export"] is None
    assert Path(ranks[0]["sample"]).is_file() and Path(ranks[0]["sample"]).read_bytes()[:4] == b"\x89PNG"
    from hyperlora.checkpoint import load_hyper_lora

    exported = load_hyper_lora(Path(ranks[0]["export"]))
    assert exported.arch.base_rank is None                       # distilled: the export leaves the Base-LoRA out
    states = torch.load(tmp_path / "states.pt")
    from hyperlora.train.toy.sdxl import tiny_unet
    from tests.train.test_hypernet import tiny_generator

    gen = tiny_generator(tiny_unet(seed=0), seed=1)
    assert all(torch.equal(states["start"][k], v) for k, v in gen.state_dict().items())
    prev = states["start"]
    for stage in ("1", "2", "3", "distill"):
        parts = set(ranks[0]["parts"][stage])
        now = states[stage]
        changed = {gen.part_of(k) for k in now if not torch.equal(now[k], prev[k])}
        frozen_moved = {gen.part_of(k) for k in now if gen.part_of(k) not in parts and not torch.equal(now[k], prev[k])}
        assert not frozen_moved, (stage, frozen_moved)                    # bit-identical, weight decay 0.1 included
        assert changed == parts, (stage, changed, parts)                  # and the stage's parts did train
        prev = now
