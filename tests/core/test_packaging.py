"""A non-editable install carries every core package, the C kernel source and the shipped workflows,
and the queue client finds the workflows there (not only in a checkout)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(out)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"building the wheel failed:\n{proc.stderr[-3000:]}")
    [whl] = out.glob("*.whl")
    return whl


def test_wheel_holds_every_package_the_kernel_source_and_the_workflows(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {p.relative_to(REPO).as_posix() for p in (REPO / "hyperlora").rglob("*.py")}
    missing = sorted(s for s in sources if s not in names)
    assert not missing, f"pyproject.toml's package list misses {missing}"
    assert "hyperlora/cpu_kernel.c" in names
    assert "hyperlora/tools/node_specs.json" in names                         # the workflow converter's input
    shipped = sorted(p.name for p in (REPO / "example_workflows" / "api").glob("*.json"))
    assert shipped and all(f"hyperlora/example_workflows/api/{n}" in names for n in shipped)
    assert all(f"hyperlora/example_workflows/{n}" in names for n in shipped)   # the UI twins


def test_installed_queue_client_finds_the_workflows(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    code = ("from hyperlora.tools.queue_graph import resolve_workflow, API_DIR; "
            "p = resolve_workflow('t2i_one_photo'); print(p); print(API_DIR)")
    env = {**os.environ, "PYTHONPATH": str(target)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    found, api_dir = proc.stdout.split()
    assert Path(found).is_file() and Path(found).parent == Path(api_dir)
    assert Path(api_dir).is_relative_to(target), "the workflows came from the checkout, not the installed package"


def test_wheel_holds_the_training_configs(wheel):
    """The SDXL part configs (offline loading), the fit JSONs and the accelerate YAMLs ship in the wheel."""
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "hyperlora" / "train" / "configs").iterdir()
                     if p.suffix in (".json", ".yaml"))
    assert "hyperlora/train/configs/fit_paper.json" in configs and "hyperlora/train/configs/accelerate_8gpu.yaml" in configs
    missing = [c for c in configs if c not in names]
    assert not missing, f"pyproject.toml's package-data misses {missing}"
