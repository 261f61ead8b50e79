"""Issue 18: the core command line tools answer a wrong path with one line (option, path, fix), no traceback;
:func:`hyperlora.errors.os_error_line` words the file-system errors no check foresaw."""

from __future__ import annotations

import errno
import logging
from pathlib import Path

import pytest

from hyperlora.errors import SettingError, check_folder_option, os_error_line
from hyperlora.tools import download as dl
from hyperlora.tools import refine as rf


def test_download_models_dir_is_a_file(a_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert dl.main(["--models-dir", str(a_file), "--skip-clip", "--skip-antelopev2"]) == 1
    err = capsys.readouterr().err
    assert err == f"error: --models-dir '{a_file}' is a file; give a folder path (it is created when missing).\n"
    assert dl.main(["--models-dir", str(a_file / "models"), "--checksums-only"]) == 1
    assert f"is inside '{a_file}', which is a file" in capsys.readouterr().err
    assert dl.main(["--models-dir", str(tmp_path / "missing"), "--checksums-only"]) == 1
    assert capsys.readouterr().err.startswith(f"error: --models-dir '{tmp_path / 'missing'}' does not exist; give ")


def test_refine_output_paths_are_checked_before_any_work(a_file: Path, tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    common = ["--identity", str(tmp_path / "missing.safetensors"), "--hyper-lora", str(tmp_path), "--sdxl",
              str(tmp_path), "--photo", str(a_file), "--prompt", "a photo"]
    with caplog.at_level(logging.ERROR, logger="hyperlora.tools.refine"):
        assert rf.main([*common, "--out", str(a_file / "refined.safetensors")]) == 1
        assert rf.main([*common, "--lora-out", str(tmp_path), "--mode", "lora"]) == 1
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert messages == [f"the folder of --out '{a_file}' is a file; give a folder path (it is created when missing).",
                        f"--lora-out '{tmp_path}' is a folder; give a file path to write."]


def test_os_error_line_names_the_path_and_the_fix(a_file: Path) -> None:
    with pytest.raises(OSError) as ei:
        (a_file / "sub").mkdir(parents=True)
    assert ei.value.errno in (errno.ENOTDIR, errno.EEXIST)
    line = os_error_line(ei.value)
    assert line.startswith(f"cannot use '{a_file}") and "give a folder path" in line and "\n" not in line
    assert os_error_line(OSError(errno.ENOSPC, "No space left on device", "/x")) == (
        "cannot use '/x' (No space left on device): the disk is full; free some space or choose another disk.")
    assert check_folder_option(a_file.parent / "new", "--out") == a_file.parent / "new"
    with pytest.raises(SettingError, match="--out '.*a_file' is a file"):
        check_folder_option(a_file, "--out")
