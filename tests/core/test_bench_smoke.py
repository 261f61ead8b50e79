"""The bench scripts' quick modes run in CI: they must start, measure and exit 0 (no timings asserted)."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# the runnable bench scripts (bench/common.py is a helper module)
BENCHES = sorted(p for p in (REPO / "bench").glob("*.py") if '__name__ == "__main__"' in p.read_text(encoding="utf-8"))


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_bench_resampler_smoke(capsys) -> None:
    """In this process (torch is imported already): the smoke run measures every row and checks accuracy."""
    sys.path.insert(0, str(REPO))
    from bench.bench_resampler import main

    assert main(["--smoke"]) == 0
    out = capsys.readouterr().out
    diffs = [float(x) for x in re.findall(r"(?:fused|unfused) (\d\.\d+e[-+]\d+)", out)]
    assert len(diffs) == 4 and max(diffs) < 1e-5              # fused and unfused vs float64, 1 and 2 photos
    rows = [ln for ln in out.splitlines() if ln.startswith("| fused") or ln.startswith("| unfused")]
    assert len(rows) == 4
    assert "| bf16 fused | 1 |" in out


def test_resampler_flops_by_hand() -> None:
    """The bench's analytic FLOP count, for a config small enough to count every matmul by hand."""
    sys.path.insert(0, str(REPO))
    from bench.bench_resampler import RELEASED, resampler_flops
    from hyperlora.spec import ResamplerConfig

    cfg = ResamplerConfig(dim=4, depth=1, heads=1, dim_head=2, ff_mult=2, num_queries=3, output_dim=5,
                          embed_dims=(6,))
    # proj_in 2*7*6*4; attn1: q,k,v,out 4*(2*3*4*2), scores+values 2*(2*3*3*2); attn2: q,out 2*(2*3*4*2),
    # k,v 2*(2*7*4*2), scores+values 2*(2*3*7*2); ff 2*(2*3*4*8); proj_out 2*3*4*5
    by_hand = 336 + 192 + 72 + 96 + 224 + 168 + 384 + 120
    assert resampler_flops(cfg, 7, None) == by_hand
    assert resampler_flops(cfg, 7, None, n=3) == 3 * by_hand
    # released: about 154 GFLOP per photo
    assert 150e9 < resampler_flops(RELEASED, 16, 257) < 160e9


def test_gpu_check_without_cuda_says_so_and_exits_0() -> None:
    res = _run("bench/gpu_check.py", env={"CUDA_VISIBLE_DEVICES": ""})
    assert res.returncode == 0, res.stderr
    assert "No CUDA device here" in res.stdout and "Nothing was measured" in res.stdout


def test_gpu_check_smoke_without_cuda_runs_every_part_on_the_cpu() -> None:
    """--smoke on a machine without CUDA runs the check's code end to end on the CPU; the CUDA-only
    measurements are skipped, each with a row saying so (before, it printed only "No CUDA device here")."""
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
    res = subprocess.run([sys.executable, "bench/gpu_check.py", "--smoke"], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env={**env, "CUDA_VISIBLE_DEVICES": ""})
    assert res.returncode == 0, res.stderr[-2000:]
    assert "On the CPU (no CUDA device here" in res.stdout
    rows = [ln.split(" | ") for ln in res.stdout.splitlines() if ln.startswith("| ") and not ln.startswith("| part")]
    by_what = {r[1]: r[2] for r in rows}
    measured = [w for w in by_what if w.startswith(("build_lora", "floor: one streaming", "id_tokens, 1 photo",
                                                     "id_tokens, 4 photo", "face analysis with CPU",
                                                     "face analysis + tiny CLIP"))]
    assert len(measured) == 6, by_what
    for what in measured:
        assert re.fullmatch(r"\d+\.\d ms", by_what[what]), (what, by_what[what])
    skipped = [w for w, v in by_what.items() if v.startswith("skipped: CUDA only")]
    assert {"theoretical floor (memory clock x bus width)", "CUDA execution provider of onnxruntime",
            "peak GPU memory: CLIP", "peak GPU memory: model, build, resampler"} <= set(skipped)
    assert by_what["merged / plain step time"].startswith("skipped: set COMFYUI_PATH")


def test_bench_vs_authors_smoke_prints_the_table(capsys) -> None:
    """The issue-21 table: identity + LoRA with its four stages, the load, the build against its floor;
    the CPU's model and flags and the auto decision printed (the authors' column is skipped in --smoke)."""
    sys.path.insert(0, str(REPO))
    from bench.bench_vs_authors import clip_flops, main

    assert main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^CPU: .+ threads", out, re.M) and re.search(r"^flags: ", out, re.M)
    from hyperlora.precision import cpu_precision, read_cpu_features

    # the decision of this CPU (fp32 on AVX2, bf16 with bf16 matrix hardware), with its reason
    assert f"ours 'auto' on this CPU: {cpu_precision(read_cpu_features()).reason}" in out
    for row in ("**identity + LoRA from one photo**", "- face analysis", "- CLIP", "- resampler", "- build",
                "load model + CLIP + faces"):
        assert re.search(rf"^\| {re.escape(row)} \| \**\d+\.\d\d s", out, re.M), row
    assert re.search(r"^\| - build \|.*GB/s\); ours \d+\.\dx \|$", out, re.M)
    # ViT-L/14 up to its penultimate layer: about 155 GFLOP per photo
    assert 150e9 < clip_flops(23) < 160e9


def test_there_are_benches():
    assert {"bench_core", "bench_faces", "bench_preprocess", "bench_sampling", "bench_integrity", "bench_resampler",
            "bench_refine", "eval_identity", "gpu_check", "bench_precision", "bench_vs_authors", "bench_graph_memory"} <= {b.stem for b in BENCHES}


@pytest.mark.parametrize("bench", BENCHES, ids=lambda p: p.stem)
def test_every_bench_has_a_smoke_option(bench):
    """Every bench script has a quick --smoke mode (so CI can run it and it cannot rot unnoticed)."""
    tree = ast.parse(bench.read_text(encoding="utf-8"))
    options = {a.value for node in ast.walk(tree) if isinstance(node, ast.Call)
               and getattr(node.func, "attr", "") == "add_argument" for a in node.args if isinstance(a, ast.Constant)}
    assert "--smoke" in options, f"{bench.name} has no --smoke mode"


def test_ci_runs_every_bench_in_smoke_mode():
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert 'for bench in "$repo"/bench/*.py; do' in ci and 'python "$bench" --smoke' in ci
    assert "__main__" in ci            # helper modules (bench/common.py) are skipped
