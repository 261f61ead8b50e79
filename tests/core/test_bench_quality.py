"""The identity-quality scripts run (their --smoke modes, as CI runs every bench's smoke mode)."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path


BENCH = Path(__file__).resolve().parents[2] / "bench"


def bench_script(name: str):
    spec = importlib.util.spec_from_file_location(f"hyperlora_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_eval_identity_smoke_prints_the_table_and_writes_the_csv(tmp_path, capsys):
    ev = bench_script("eval_identity")
    args = ev.smoke(tmp_path)
    argv = ["--pairs", str(args.pairs), "--generated", str(args.generated), "--models", *args.models,
            "--insightface", str(args.insightface), "--clip", str(args.clip), "--provider", "CPU",
            "--csv", str(tmp_path / "out.csv")]
    assert ev.main(argv) == 0
    out = capsys.readouterr().out
    same = re.search(r"^same_person\s+2\s+(\S+)\s+(\S+)\s+(\S+)\s+(\d+) %", out, re.M)
    other = re.search(r"^other_person\s+2\s+(\S+)\s+(\S+)\s+(\S+)\s+(\d+) %", out, re.M)
    assert same and other, out
    assert float(same.group(1)) > 0.99 and same.group(4) == "0"         # the same stand-in people, found
    assert float(other.group(1)) < float(same.group(1)) and other.group(4) == "50"   # another person; no face
    rows = (tmp_path / "out.csv").read_text().splitlines()
    assert rows[0] == ",".join(ev.COLUMNS) and len(rows) == 5
    assert rows[4].split(",")[5] == "False" and rows[4].split(",")[6] == ""   # the faceless image: no ID sim

