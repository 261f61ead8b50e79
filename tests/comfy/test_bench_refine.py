"""bench/bench_refine.py --smoke runs (it builds ComfyUI's SDXL UNet class, so it lives in the ComfyUI tier)."""

from __future__ import annotations

import re

import pytest

from tests.core.test_bench_quality import bench_script

pytestmark = pytest.mark.comfy


def test_bench_refine_smoke(comfy_root, capsys):
    from tests.comfy.conftest import comfy_checkout

    root, _reason = comfy_checkout()
    assert bench_script("bench_refine").main(["--smoke", "--comfyui", str(root)]) == 0
    out = capsys.readouterr().out
    for name in ("plain fwd+bwd", "lora step", "coefficients step"):
        assert re.search(rf"^{re.escape(name)}\s+[0-9.]+\s+[0-9.]+\s+[0-9.]+\s+[0-9.]+", out, re.M), out
    assert "coefficients / lora step:" in out


@pytest.mark.slow
def test_eval_identity_through_the_server(comfy_server, comfy_base, tmp_path, capsys):
    """eval_identity generates through the queue client on the random SDXL (64 px, 1 step) and scores:
    the plumbing end to end (random weights draw no face, so ID sim is n/a and the failure rate 100 %)."""
    from PIL import Image

    from tests.comfy.models import ANTELOPE, CHECKPOINT, CLIP_FOLDER, SMALL_MODEL, astronaut
    from tests.fixtures.clip import make_full_clip_folder

    ev = bench_script("eval_identity")
    Image.fromarray(astronaut()).save(tmp_path / "astronaut.png")
    (tmp_path / "pairs.csv").write_text("photo,prompt\nastronaut.png,fcsks fxhks fhyks, a photo of an astronaut\n")
    argv = ["--pairs", str(tmp_path / "pairs.csv"), "--server", comfy_server.url, "--models", SMALL_MODEL,
            "--checkpoint", CHECKPOINT, "--insightface", str(comfy_base.models / "insightface" / "models" / ANTELOPE),
            "--clip", str(make_full_clip_folder(tmp_path / "clip")), "--provider", "CPU", "--steps", "1",
            "--size", "64", "--set", f"Load HyperLoRA.clip_vision={CLIP_FOLDER}",
            "--set", f"Load HyperLoRA.insightface={ANTELOPE}", "--out", str(tmp_path / "gen"),
            "--csv", str(tmp_path / "eval.csv")]
    assert ev.main(argv) == 0
    out = capsys.readouterr().out
    assert re.search(rf"^{SMALL_MODEL}\s+1\s+\S+\s+\S+\s+-?[0-9.]+\s+\d+ %", out, re.M), out
    assert (tmp_path / "gen" / SMALL_MODEL / "1.png").is_file()
    rows = (tmp_path / "eval.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith(f"{SMALL_MODEL},1,")
