"""ComfyUI nodes of the pack: thin glue over ``hyperlora/`` (one module per node family).

Imported only inside ComfyUI (it imports ``comfy`` and ``folder_paths``); the pack's
root ``__init__.py`` guards that.
"""

from __future__ import annotations

from . import paths
from .common import guard_sockets

paths.register_folders()

from . import difflora, faces, hooks, identity, io, loader, lora, masks, mix, quality, regions  # noqa: E402  (folders first)
from .guard import guard_nodes  # noqa: E402
from .templates import register_template_order  # noqa: E402

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
for _family in (loader, identity, masks, faces, regions, lora, hooks, mix, io, quality, difflora):
    NODE_CLASS_MAPPINGS.update({k: guard_sockets(v) for k, v in _family.NODE_CLASS_MAPPINGS.items()})
    NODE_DISPLAY_NAME_MAPPINGS.update(_family.NODE_DISPLAY_NAME_MAPPINGS)
# every node, also one added later: finite FLOAT inputs and safe filename prefixes, checked before it runs
guard_nodes(NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS)
register_template_order()   # the Templates menu lists our workflows in the README's order

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
