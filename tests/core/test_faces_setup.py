"""AntelopeV2 folder discovery, provider mapping, lazy import and DependencyError (no model runs)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hyperlora.errors import DependencyError, ModelFileError, SettingError
from hyperlora.spec import ANTELOPE_FILES as PACK_FILES
from hyperlora.spec import ANTELOPE_REQUIRED_FILES as REQUIRED_FILES
from hyperlora.faces.setup import (
    AUTO_ORDER,
    antelopev2_dir,
    find_antelopev2,
    is_antelopev2_entry,
    insightface_major,
    resolve_providers,
)
from tests.fixtures.antelope import PACK_FILES as FIXTURE_FILES
from tests.fixtures.antelope import make_antelopev2

REPO = Path(__file__).resolve().parents[2]


def test_pack_file_names_match_the_release():
    # format §1: the five file names of the released pack
    assert set(PACK_FILES) == {"scrfd_10g_bnkps.onnx", "2d106det.onnx", "1k3d68.onnx", "genderage.onnx", "glintr100.onnx"}
    assert set(FIXTURE_FILES) == set(PACK_FILES)
    assert set(REQUIRED_FILES) == {"scrfd_10g_bnkps.onnx", "2d106det.onnx", "glintr100.onnx"}


def test_find_normal_folder(tmp_path):
    folder = make_antelopev2(tmp_path / "antelopev2")
    assert find_antelopev2(folder) == folder
    assert find_antelopev2(str(folder)) == folder


def test_find_nested_folder_from_either_level(tmp_path):
    outer = tmp_path / "models" / "antelopev2"
    inner = make_antelopev2(outer, nested=True)
    assert inner == outer / "antelopev2"
    assert not (outer / "scrfd_10g_bnkps.onnx").exists()
    assert find_antelopev2(outer) == inner
    assert find_antelopev2(inner) == inner


def test_find_from_insightface_root(tmp_path):
    root = tmp_path / "insightface"
    folder = make_antelopev2(root / "models" / "antelopev2")
    assert find_antelopev2(root) == folder


def test_extras_are_optional(tmp_path):
    folder = make_antelopev2(tmp_path / "antelopev2", extras=False)
    assert sorted(p.name for p in folder.glob("*.onnx")) == sorted(REQUIRED_FILES)
    assert find_antelopev2(folder) == folder


@pytest.mark.parametrize("layout", ["flat", "nested", "named_nested", "root", "partial", "empty"])
def test_dropdown_rule_equals_loader_rule(tmp_path, layout):
    """The Loader's dropdown lists a folder iff antelopev2_dir finds the files, and find_antelopev2
    (what the Loader calls) accepts exactly those folders: no folder is listed and then refused."""
    entry = tmp_path / "models" / ("buffalo" if layout == "named_nested" else "antelopev2")
    if layout == "flat":
        make_antelopev2(entry)
    elif layout == "nested":
        make_antelopev2(entry, nested=True)
    elif layout == "named_nested":
        make_antelopev2(entry / "buffalo")
    elif layout == "root":
        make_antelopev2(entry / "models" / "antelopev2")
    elif layout == "partial":   # the detector and recognition, but no landmark model
        make_antelopev2(entry)
        (entry / "2d106det.onnx").unlink()
    else:
        entry.mkdir(parents=True)
    found = antelopev2_dir(entry)
    if layout in ("partial", "empty"):
        assert found is None and not is_antelopev2_entry(entry)
        with pytest.raises(ModelFileError):
            find_antelopev2(entry)
    else:
        assert found is not None and find_antelopev2(entry) == found
        assert all((found / f).is_file() for f in REQUIRED_FILES)
        # the dropdown lists pack folders (itself or one level too deep), not an insightface root
        assert is_antelopev2_entry(entry) == (layout != "root")
    assert not is_antelopev2_entry(entry.parent)   # 'models' above a pack is never an entry


def test_missing_folder_names_folder_files_and_place(tmp_path):
    missing = tmp_path / "nowhere" / "antelopev2"
    with pytest.raises(ModelFileError) as err:
        find_antelopev2(missing)
    msg = str(err.value)
    assert str(missing) in msg and "does not exist" in msg
    for name in PACK_FILES:
        assert name in msg
    assert "models/insightface/models/antelopev2" in msg
    assert "never downloads" in msg


def test_partial_folder_names_missing_files(tmp_path):
    folder = make_antelopev2(tmp_path / "antelopev2")
    (folder / "glintr100.onnx").unlink()
    with pytest.raises(ModelFileError) as err:
        find_antelopev2(folder)
    msg = str(err.value)
    assert f"{folder} lacks glintr100.onnx. The pack has five files" in msg


def test_empty_file_is_reported(tmp_path):
    folder = make_antelopev2(tmp_path / "antelopev2")
    (folder / "2d106det.onnx").write_bytes(b"")
    with pytest.raises(ModelFileError, match=r"2d106det\.onnx is empty"):
        find_antelopev2(folder)


def test_folder_without_onnx_files(tmp_path):
    (tmp_path / "antelopev2").mkdir()
    with pytest.raises(ModelFileError, match="holds no AntelopeV2 .onnx files"):
        find_antelopev2(tmp_path / "antelopev2")


# ----------------------------------------------------------------------------- providers

CPU = "CPUExecutionProvider"


@pytest.mark.parametrize(
    "choice, available, expected",
    [
        ("CPU", [CPU], [CPU]),
        ("cpu", [CPU, "CUDAExecutionProvider"], [CPU]),
        ("CUDA", ["CUDAExecutionProvider", CPU], ["CUDAExecutionProvider", CPU]),
        ("ROCm", ["ROCMExecutionProvider", CPU], ["ROCMExecutionProvider", CPU]),
        ("ROCm", ["MIGraphXExecutionProvider", CPU], ["MIGraphXExecutionProvider", CPU]),
        ("CoreML", ["CoreMLExecutionProvider", CPU], ["CoreMLExecutionProvider", CPU]),
        ("auto", ["AzureExecutionProvider", CPU], [CPU]),
        ("auto", [CPU, "CUDAExecutionProvider", "TensorrtExecutionProvider"], ["CUDAExecutionProvider", CPU]),
        ("auto", [CPU, "CoreMLExecutionProvider"], ["CoreMLExecutionProvider", CPU]),
        ("auto", [CPU, "ROCMExecutionProvider"], ["ROCMExecutionProvider", CPU]),
        ("auto", [CPU, "DmlExecutionProvider"], ["DmlExecutionProvider", CPU]),
        ("auto", ["OpenVINOExecutionProvider"], ["OpenVINOExecutionProvider"]),
    ],
)
def test_provider_mapping(choice, available, expected):
    assert resolve_providers(choice, available) == expected


def test_auto_order_prefers_gpus_and_ends_with_cpu():
    assert AUTO_ORDER[0] == "CUDAExecutionProvider" and AUTO_ORDER[-1] == CPU


def test_unavailable_provider_lists_what_is_available():
    with pytest.raises(DependencyError) as err:
        resolve_providers("CUDA", ["AzureExecutionProvider", CPU])
    msg = str(err.value)
    assert "'CUDA'" in msg and "CUDAExecutionProvider" in msg
    assert "available: AzureExecutionProvider, CPUExecutionProvider" in msg
    assert "onnxruntime-gpu" in msg


def test_unknown_provider_name():
    with pytest.raises(SettingError, match=r"Unknown face analysis provider 'TPU'.*auto, CUDA, ROCm, CoreML, CPU"):
        resolve_providers("TPU", [CPU])


def test_no_provider_at_all():
    with pytest.raises(DependencyError, match="no execution provider"):
        resolve_providers("auto", [])


def test_real_onnxruntime_auto_is_available():
    ort = pytest.importorskip("onnxruntime")
    providers = resolve_providers("auto")
    assert providers[0] in ort.get_available_providers()
    assert providers[-1] == CPU


def test_insightface_major():
    assert insightface_major("0.7.3") == 0
    assert insightface_major("2.1") == 2
    assert insightface_major("weird") == 0


# ----------------------------------------------------------------------------- lazy import


def _run(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=str(REPO), env=env, timeout=120)


def test_importing_faces_imports_no_insightface():
    res = _run("""
        import sys
        import hyperlora.faces.analysis, hyperlora.faces.setup
        bad = [m for m in ("insightface", "onnxruntime", "cv2") if m in sys.modules]
        print("LOADED", bad)
    """)
    assert res.returncode == 0, res.stderr
    assert "LOADED []" in res.stdout


@pytest.mark.parametrize("package, advice", [
    ("insightface", ("-m pip install insightface", "0.7.3 and 2.x")),
    ("onnxruntime", ("-m pip install onnxruntime",)),
])
def test_missing_package_gives_dependency_error(tmp_path, package, advice):
    folder = make_antelopev2(tmp_path / "antelopev2", extras=False)
    res = _run(f"""
        import sys
        sys.modules[{package!r}] = None  # what a missing package looks like to `import`
        from hyperlora.errors import DependencyError
        from hyperlora.faces.analysis import FaceAnalyzer
        try:
            FaceAnalyzer({str(folder)!r})
        except DependencyError as exc:
            print("DEPERR", exc)
    """)
    assert res.returncode == 0, res.stderr
    assert f"DEPERR {package} could not be imported" in res.stdout
    for text in advice:
        assert text in res.stdout


def test_insightface_built_for_another_numpy_says_so(tmp_path):
    """A compiled insightface that does not match numpy must not be told to 'install insightface'."""
    pkg = tmp_path / "fakepkgs" / "insightface"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        "raise ValueError('numpy.dtype size changed, may indicate binary incompatibility. Expected 96')\n")
    res = _run(f"""
        import sys
        sys.path.insert(0, {str(tmp_path / "fakepkgs")!r})
        from hyperlora.errors import DependencyError
        from hyperlora.faces.setup import import_backend
        try:
            import_backend()
        except DependencyError as exc:
            print("DEPERR", exc)
    """)
    assert res.returncode == 0, res.stderr
    assert "built for another numpy version" in res.stdout
    assert "-U insightface" in res.stdout


def test_import_backend_turns_off_the_albumentations_update_check():
    """insightface 0.7.3 imports albumentations, which would contact pypi.org at import time."""
    res = _run("""
        import os
        os.environ.pop("NO_ALBUMENTATIONS_UPDATE", None)
        from hyperlora.faces.setup import import_backend
        import_backend()
        print("FLAG", os.environ.get("NO_ALBUMENTATIONS_UPDATE"))
    """)
    assert res.returncode == 0, res.stderr
    assert "FLAG 1" in res.stdout


def test_missing_folder_is_reported_before_any_import_or_download(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    res = _run(f"""
        import os, sys
        os.environ["HOME"] = {str(home)!r}
        from hyperlora.errors import ModelFileError
        from hyperlora.faces.analysis import FaceAnalyzer
        try:
            FaceAnalyzer({str(tmp_path / "missing")!r})
        except ModelFileError as exc:
            print("MFERR", exc)
        print("IMPORTED", "insightface" in sys.modules)
    """)
    assert res.returncode == 0, res.stderr
    assert "MFERR" in res.stdout and "IMPORTED False" in res.stdout
    assert not (home / ".insightface").exists()
