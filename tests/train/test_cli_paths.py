"""Issue 18: every training subcommand answers a wrong path (a file where a folder goes) with one line naming the
option, the path and the fix, and exit code 2 - never a raw traceback (FileExistsError, NotADirectoryError)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from hyperlora.train.__main__ import main as cli
from tests.conftest import REPO_ROOT


def _one_line(err: str, prog: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("INFO", "WARNING"))]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: ") and "Traceback" not in err, err
    return lines[0]


def test_prepare_out_is_a_file(tmp_path: Path, a_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (64, 64)).save(photos / "a.png")
    (photos / "a.txt").write_text("a photo")
    common = ["--input", str(photos), "--sdxl", str(tmp_path), "--clip", str(tmp_path), "--antelope", str(tmp_path)]
    assert cli(["prepare", "--out", str(a_file), *common]) == 2
    assert _one_line(capsys.readouterr().err, "prepare") == (
        f"prepare: --out '{a_file}' is a file; give a folder path (it is created when missing).")
    assert cli(["prepare", "--out", str(a_file / "shards"), *common]) == 2
    assert f"is inside '{a_file}', which is a file" in _one_line(capsys.readouterr().err, "prepare")


def test_fit_export_demo_out_is_a_file(tmp_path: Path, a_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = REPO_ROOT / "hyperlora" / "train" / "configs" / "fit_toy.json"
    assert json.loads(config.read_text())                           # a real config: only the path is wrong
    assert cli(["fit", "--config", str(config), "--out", str(a_file)]) == 2
    assert _one_line(capsys.readouterr().err, "fit") == (
        f"fit: --out '{a_file}' is a file; give a folder path (it is created when missing).")
    assert cli(["export", "--run", str(tmp_path), "--out", str(a_file / "model")]) == 2
    assert f"export: --out '{a_file / 'model'}' is inside '{a_file}'" in _one_line(capsys.readouterr().err, "export")
    assert cli(["demo", "--quick", "--out", str(a_file)]) == 2
    assert f"demo: --out '{a_file}' is a file" in _one_line(capsys.readouterr().err, "demo")
    assert cli(["demo", "--quick", "--out", str(tmp_path / "tree"), "--work", str(a_file)]) == 2
    assert f"demo: --work '{a_file}' is a file" in _one_line(capsys.readouterr().err, "demo")
    assert not (tmp_path / "tree").exists()


def test_difflora_demo_wrong_paths_and_name(tmp_path: Path, a_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["difflora-demo", "--quick", "--out", str(a_file)]) == 2
    assert _one_line(capsys.readouterr().err, "difflora-demo") == (
        f"difflora-demo: --out '{a_file}' is a file; give a folder path (it is created when missing).")
    assert cli(["difflora-demo", "--quick", "--out", str(tmp_path / "tree"), "--work", str(a_file)]) == 2
    assert f"difflora-demo: --work '{a_file}' is a file" in _one_line(capsys.readouterr().err, "difflora-demo")
    assert cli(["difflora-demo", "--quick", "--out", str(tmp_path / "tree"), "--name", "a/b"]) == 2
    assert _one_line(capsys.readouterr().err, "difflora-demo") == (
        "difflora-demo: --name 'a/b' must be a plain folder name (no slashes).")
    assert not (tmp_path / "tree").exists()                         # refused before anything was written
