"""HyperLoRA Studio core: plain PyTorch, no ComfyUI imports.

Turns face photos into a LoRA for SDXL with the released HyperLoRA weights (the format is
specified in ``docs/released-format.md``).  Importing this package is cheap: sub-modules are
imported by who needs them, and nothing here imports insightface or transformers.
"""

from __future__ import annotations

__version__ = "0.2.0"
