"""ComfyUI-HyperLoRA: generate an SDXL identity LoRA from face photos with HyperLoRA.

ComfyUI imports this file from ``custom_nodes/``.  Outside ComfyUI (plain Python, pytest,
packaging tools) it exports empty mappings instead of failing, and nothing here imports
insightface: face analysis is imported on first use, so a broken insightface install
never removes the nodes.
"""

from __future__ import annotations

import importlib.util
import logging

log = logging.getLogger(__name__)

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}


def _inside_comfyui() -> bool:
    """True when ComfyUI's modules can be imported (``folder_paths`` and ``comfy``)."""
    try:
        return all(importlib.util.find_spec(m) is not None for m in ("folder_paths", "comfy"))
    except (ImportError, ValueError):
        return False


if __package__ and _inside_comfyui():
    # Inside ComfyUI: a failure here is a real bug and must show in ComfyUI's log.
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F811
else:
    log.debug("ComfyUI-HyperLoRA imported outside ComfyUI: no nodes registered.")

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
