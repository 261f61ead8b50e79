"""Pick the onnxruntime build for this machine (face analysis), keeping one that is already installed.

``python -m hyperlora.tools.face_runtime [--dry-run]`` (also run by ``install.py``, which ComfyUI-Manager
runs after ``requirements.txt``).

Why a command and not a line in ``requirements.txt``: the CPU package ``onnxruntime`` and the CUDA
package ``onnxruntime-gpu`` install the same ``onnxruntime`` module, so with both the one written last
wins (a GPU machine silently runs face analysis on the CPU, a machine without CUDA gets a module that
looks for CUDA libraries).  Environment markers cannot see a GPU, so ``requirements.txt`` names no
runtime; this command decides:

* a runtime that imports and suits the machine is kept (nothing is installed or removed);
* none installed: ``onnxruntime-gpu`` when PyTorch sees an NVIDIA (CUDA) GPU, else ``onnxruntime``
  (CPU; on macOS it includes CoreML; AMD GPUs use the CPU build unless an AMD ROCm build is installed);
* both packages installed, or the wrong one for the machine: nothing is changed, the one command that
  fixes it is printed (removing packages from ComfyUI's Python is left to the user).

Only ``--dry-run`` never runs pip.  One line per finding goes to stdout.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

CPU_PACKAGE = "onnxruntime"
CUDA_PACKAGE = "onnxruntime-gpu"
MIN_VERSION = "1.17"
OTHER_BUILDS = ("onnxruntime-rocm", "onnxruntime-migraphx", "onnxruntime-directml", "onnxruntime-openvino",
                "onnxruntime-silicon", "onnxruntime-qnn", "onnxruntime-training")
"""Other distributions that also install the ``onnxruntime`` module (kept as they are)."""


@dataclass(frozen=True)
class Plan:
    """What to do: ``install`` (a requirement string for pip, or None) and the lines to tell the user."""

    install: str | None
    lines: tuple[str, ...]


def pip_command(*args: str) -> str:
    """``<this Python> -m pip ...`` as one shell line."""
    return " ".join([f'"{sys.executable}"' if " " in sys.executable else sys.executable, "-m", "pip", *args])


def quoted(requirement: str) -> str:
    """``"name>=1.17"`` in double quotes, so a shell does not read ``>`` as a redirection."""
    return f'"{requirement}"'


def fix_command(cuda: bool) -> str:
    """The one command that leaves exactly the right build installed (CUDA: the GPU package, else the CPU one)."""
    if cuda:
        return (f"{pip_command('uninstall', '-y', CPU_PACKAGE, CUDA_PACKAGE)} && "
                f"{pip_command('install', quoted(CUDA_PACKAGE + '>=' + MIN_VERSION))}")
    return (f"{pip_command('uninstall', '-y', CPU_PACKAGE, CUDA_PACKAGE)} && "
            f"{pip_command('install', quoted(CPU_PACKAGE + '>=' + MIN_VERSION))}")


def choose(installed: dict[str, str], cuda: bool, cuda_provider: bool | None) -> Plan:
    """The plan for a machine.

    ``installed``: ``{distribution name: version}`` of the onnxruntime builds present; ``cuda``: PyTorch sees an
    NVIDIA GPU; ``cuda_provider``: the importable ``onnxruntime`` offers ``CUDAExecutionProvider`` (None: it does
    not import)."""
    cpu, gpu = CPU_PACKAGE in installed, CUDA_PACKAGE in installed
    others = [n for n in installed if n in OTHER_BUILDS]
    if cuda_provider is None:
        package = CUDA_PACKAGE if cuda else CPU_PACKAGE
        why = "an NVIDIA GPU is visible to PyTorch" if cuda else "no CUDA GPU is visible to PyTorch"
        if installed:
            return Plan(None, (f"onnxruntime is installed ({', '.join(installed)}) but does not import; repair it "
                               f"with: {fix_command(cuda)}",))
        return Plan(f"{package}>={MIN_VERSION}", (f"installing {package} ({why})",))
    if not installed:
        return Plan(None, ("keeping the onnxruntime that imports here (not installed by pip, e.g. conda's)",))
    if cpu and gpu:
        return Plan(None, (f"both {CPU_PACKAGE} {installed[CPU_PACKAGE]} and {CUDA_PACKAGE} {installed[CUDA_PACKAGE]} "
                           f"are installed and overwrite each other's files (the CUDA provider is "
                           f"{'available' if cuda_provider else 'missing'}); keep one with: {fix_command(cuda)}",))
    if cuda and not cuda_provider and not others:
        return Plan(None, (f"this machine has an NVIDIA GPU but {', '.join(installed)} has no CUDA provider, so face "
                           f"analysis runs on the CPU; for the GPU build: {fix_command(True)}",))
    if not cuda and gpu:
        return Plan(None, (f"{CUDA_PACKAGE} is installed but PyTorch sees no CUDA GPU (face analysis uses its CPU "
                           f"provider); if it fails to load CUDA libraries, use the CPU build: {fix_command(False)}",))
    names = ", ".join(f"{n} {v}" for n, v in installed.items())
    return Plan(None, (f"keeping {names} (CUDA provider {'available' if cuda_provider else 'not used'})",))


def installed_builds() -> dict[str, str]:
    """``{distribution: version}`` of the onnxruntime builds in this Python."""
    found = {}
    for name in (CPU_PACKAGE, CUDA_PACKAGE, *OTHER_BUILDS):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def cuda_visible() -> bool:
    """PyTorch (ComfyUI's) sees an NVIDIA CUDA GPU (a ROCm build of PyTorch does not count)."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available() and getattr(torch.version, "cuda", None)
                and not getattr(torch.version, "hip", None))


def cuda_provider() -> bool | None:
    """The importable onnxruntime offers CUDAExecutionProvider; None when onnxruntime does not import."""
    try:
        import onnxruntime
        return "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    except Exception:  # noqa: BLE001 - a broken install raises anything (ImportError, OSError, RuntimeError)
        return None


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hyperlora.tools.face_runtime", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="only print what would be installed")
    args = ap.parse_args(argv)
    plan = choose(installed_builds(), cuda_visible(), cuda_provider())
    sys.stdout.write("".join(f"face_runtime: {line}\n" for line in plan.lines))
    if plan.install is None:
        return 0
    command = [sys.executable, "-m", "pip", "install", plan.install]
    if args.dry_run:
        sys.stdout.write(f"face_runtime: would run {pip_command('install', quoted(plan.install))}\n")
        return 0
    try:
        code = subprocess.call(command)
    except OSError as exc:
        sys.stderr.write(f"face_runtime: cannot run pip ({exc}); run {pip_command('install', quoted(plan.install))}\n")
        return 1
    if code != 0:
        sys.stderr.write(f"face_runtime: pip failed (exit {code}); run {pip_command('install', quoted(plan.install))} "
                         f"and read its message.\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["CPU_PACKAGE", "CUDA_PACKAGE", "Plan", "choose", "cuda_provider", "cuda_visible", "fix_command",
           "installed_builds", "main"]
