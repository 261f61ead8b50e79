"""Issue 18: requirements.txt pulled onnxruntime-gpu next to an installed CPU onnxruntime on a machine without
CUDA (the two install the same module and shadow each other).  requirements.txt now names no runtime outside
macOS; hyperlora.tools.face_runtime (install.py) keeps an installed one or picks one for the machine."""

from __future__ import annotations

import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement

from hyperlora.tools import face_runtime as fr
from tests.conftest import REPO_ROOT

LINUX = {"sys_platform": "linux", "platform_system": "Linux"}
MAC = {"sys_platform": "darwin", "platform_system": "Darwin"}
WINDOWS = {"sys_platform": "win32", "platform_system": "Windows"}


def _requirements() -> list[Requirement]:
    lines = (REPO_ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines()
    return [Requirement(ln.split("#", 1)[0].strip()) for ln in lines if ln.split("#", 1)[0].strip()]


def _names_on(reqs: list[Requirement], env: dict[str, str]) -> set[str]:
    return {r.name for r in reqs if r.marker is None or r.marker.evaluate(env)}


def test_requirements_force_no_onnxruntime_build_outside_macos() -> None:
    reqs = _requirements()
    for env in (LINUX, WINDOWS):
        installed = _names_on(reqs, env)
        assert not {n for n in installed if n.startswith("onnxruntime")}, installed
        assert {"insightface", "safetensors", "transformers"} <= installed
    assert "onnxruntime" in _names_on(reqs, MAC) and "onnxruntime-gpu" not in _names_on(reqs, MAC)
    assert all(r.name != "onnxruntime-gpu" for r in reqs)


def test_pyproject_dependencies_are_requirements_txt() -> None:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert sorted(map(str, map(Requirement, project["dependencies"]))) == sorted(map(str, _requirements()))
    extras = project["optional-dependencies"]
    assert extras["cuda"] == ["onnxruntime-gpu>=1.17"] and extras["cpu"] == ["onnxruntime>=1.17"]


@pytest.mark.parametrize("installed,cuda,provider,install,says", [
    ({}, False, None, "onnxruntime>=1.17", "installing onnxruntime (no CUDA GPU"),
    ({}, True, None, "onnxruntime-gpu>=1.17", "installing onnxruntime-gpu (an NVIDIA GPU"),
    ({"onnxruntime": "1.20.0"}, False, False, None, "keeping onnxruntime 1.20.0"),
    ({"onnxruntime-gpu": "1.20.0"}, True, True, None, "keeping onnxruntime-gpu 1.20.0 (CUDA provider available)"),
    ({"onnxruntime-directml": "1.20.0"}, False, False, None, "keeping onnxruntime-directml"),
    ({"onnxruntime": "1.20.0", "onnxruntime-gpu": "1.19.0"}, False, False, None, "both onnxruntime 1.20.0 and"),
    ({"onnxruntime": "1.20.0"}, True, False, None, "has no CUDA provider, so face analysis runs on the CPU"),
    ({"onnxruntime-gpu": "1.20.0"}, False, False, None, "PyTorch sees no CUDA GPU"),
    ({"onnxruntime": "1.20.0"}, False, None, None, "does not import; repair it"),
    ({}, False, False, None, "not installed by pip"),
])
def test_choice_keeps_an_installed_runtime_and_never_adds_a_second(installed, cuda, provider, install, says) -> None:
    plan = fr.choose(installed, cuda, provider)
    assert plan.install == install and says in plan.lines[0] and len(plan.lines) == 1
    if installed:
        assert plan.install is None                 # never a second build next to an installed one


def test_fix_commands_leave_exactly_one_build() -> None:
    gpu, cpu = fr.fix_command(True), fr.fix_command(False)
    assert gpu.endswith('-m pip install "onnxruntime-gpu>=1.17"') and "uninstall -y onnxruntime onnxruntime-gpu" in gpu
    assert cpu.endswith('-m pip install "onnxruntime>=1.17"') and "uninstall -y onnxruntime onnxruntime-gpu" in cpu
    both = fr.choose({"onnxruntime": "1", "onnxruntime-gpu": "1"}, True, False).lines[0]
    assert both.endswith(gpu)


def test_install_py_dry_run_on_this_python() -> None:
    done = subprocess.run([sys.executable, str(REPO_ROOT / "install.py"), "--dry-run"], cwd="/",
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines and all(ln.startswith("face_runtime: ") for ln in lines)
    expected = fr.choose(fr.installed_builds(), fr.cuda_visible(), fr.cuda_provider()).lines
    assert lines[:len(expected)] == [f"face_runtime: {ln}" for ln in expected]
