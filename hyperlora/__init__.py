"""HyperLoRA core: plain PyTorch, no ComfyUI imports.

Turns face photos into a LoRA for SDXL with the released HyperLoRA weights.
Sub-modules are imported on demand so that importing this package stays cheap
and never pulls in insightface or transformers.
"""

from __future__ import annotations

__version__ = "0.1.0"
