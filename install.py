"""Installs the onnxruntime build for this machine unless one is installed (hyperlora/tools/face_runtime.py).

ComfyUI-Manager runs this file after ``requirements.txt``; by hand: ``python install.py`` with ComfyUI's Python,
from this folder (``--dry-run`` only prints).  ComfyUI itself never imports it.
"""

import subprocess
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.exit(subprocess.call([sys.executable, "-m", "hyperlora.tools.face_runtime", *sys.argv[1:]],
                             cwd=Path(__file__).resolve().parent))
