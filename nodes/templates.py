"""The order of this pack's workflows in ComfyUI's Templates menu.

ComfyUI 0.3.64 lists a pack's ``example_workflows/*.json`` (``GET /workflow_templates``) in the order
``glob`` finds them, which is the file system's directory order (on ext4, the order of name hashes),
and its front end (1.27) shows that list as it comes: no sorting and no ordering file for custom
nodes. So the pack puts its own entry of that answer into the README's order (``t2i_one_photo``
first) with an aiohttp middleware added before the server starts; the other packs' entries and
every other request pass untouched.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from ..hyperlora.tools.queue_graph import in_shipped_order, shipped_order

log = logging.getLogger(__name__)

PACK_DIR = Path(__file__).resolve().parents[1]
ROUTES = ("/workflow_templates", "/api/workflow_templates")


def _our_keys(listing: dict[str, Any]) -> list[str]:
    """The key(s) of this pack in the ``/workflow_templates`` answer: the custom_nodes folder name(s)
    that lead to this pack (a link may name it otherwise than the real folder)."""
    import folder_paths

    keys = []
    for root in folder_paths.get_folder_paths("custom_nodes"):
        for key in listing:
            if os.path.realpath(os.path.join(root, key)) == str(PACK_DIR):
                keys.append(key)
    return keys


def register_template_order() -> bool:
    """Add the middleware to ComfyUI's server; False (and a debug line) without a server (tests in-process)."""
    server_module = sys.modules.get("server")      # ComfyUI's server.py, imported before it loads custom nodes
    prompt_server = getattr(server_module, "PromptServer", None)
    app = getattr(getattr(prompt_server, "instance", None), "app", None)
    if app is None or app.frozen:
        log.debug("no ComfyUI server to order the Templates menu in")
        return False
    from aiohttp import web
    order = shipped_order(PACK_DIR / "example_workflows" / "README.md")

    @web.middleware
    async def hyperlora_template_order(request: Any, handler: Any) -> Any:
        response = await handler(request)
        if request.method != "GET" or request.path not in ROUTES or getattr(response, "status", 0) != 200:
            return response
        body = getattr(response, "body", None)
        if not isinstance(body, (bytes, bytearray)) or response.content_type != "application/json":
            return response
        listing = json.loads(body)
        keys = _our_keys(listing) if isinstance(listing, dict) else []
        if not keys:
            return response
        for key in keys:
            listing[key] = in_shipped_order(listing[key], order)
        return web.json_response(listing)

    app.middlewares.append(hyperlora_template_order)
    return True
