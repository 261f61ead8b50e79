"""The pack's root ``__init__.py`` outside ComfyUI: imports cleanly, registers nothing, pulls in
neither ComfyUI nor insightface (checked in a fresh interpreter)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SCRIPT = f"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("ComfyUI_HyperLoRA", {str(REPO / "__init__.py")!r},
                                              submodule_search_locations=[{str(REPO)!r}])
mod = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = mod
spec.loader.exec_module(mod)
print(json.dumps({{"nodes": len(mod.NODE_CLASS_MAPPINGS), "names": len(mod.NODE_DISPLAY_NAME_MAPPINGS),
                  "loaded": sorted(m for m in ("insightface", "onnxruntime", "comfy", "folder_paths", "transformers")
                                   if m in sys.modules)}}))
"""


def test_import_outside_comfyui_registers_nothing_and_stays_light():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, cwd="/")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"nodes": 0, "names": 0, "loaded": []}
