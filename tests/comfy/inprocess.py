"""Load this pack into the current process through ComfyUI's own custom-node loader."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

from tests.comfy.models import PACK_DIR_NAME


def load_pack(comfy_root: Path, base: Path) -> SimpleNamespace:
    """Point ComfyUI's folders at ``base`` and load ``base/custom_nodes/ComfyUI-HyperLoRA-Studio``.

    ComfyUI's root must already be first on ``sys.path`` (``tests.fixtures.sdxl.import_comfy``),
    so ``import nodes`` finds ComfyUI's ``nodes.py``, not this repository's ``nodes/``.
    Returns ``nodes`` (our node classes as registered), ``module`` (the pack), ``comfy_nodes`` and
    ``errors`` (the pack's own ``hyperlora.errors`` module, to compare raised errors by class) and ``core(name)``
    (the pack's own ``hyperlora.<name>`` module).
    """
    import comfy.cli_args

    comfy.cli_args.args.base_directory = str(base)
    import folder_paths

    models = base / "models"
    folder_paths.models_dir = str(models)
    for key in ("checkpoints", "clip_vision", "loras"):
        folder_paths.add_model_folder_path(key, str(models / key), is_default=True)
    out = base / "output_inprocess"
    out.mkdir(exist_ok=True)
    folder_paths.set_output_directory(str(out))
    folder_paths.set_input_directory(str(base / "input"))
    comfy_nodes = sys.modules.get("nodes")
    if comfy_nodes is None:
        import nodes as comfy_nodes
    if Path(comfy_nodes.__file__).resolve().parent != Path(comfy_root).resolve():
        raise RuntimeError(f"'nodes' resolved to {comfy_nodes.__file__}, not ComfyUI's nodes.py")
    pack_path = base / "custom_nodes" / PACK_DIR_NAME
    module_name = str(pack_path).replace(".", "_x_")
    if module_name not in sys.modules:
        if not asyncio.run(comfy_nodes.load_custom_node(str(pack_path))):
            raise RuntimeError("ComfyUI's loader could not import the pack (see the log above)")
    module = sys.modules[module_name]
    registered = {k: comfy_nodes.NODE_CLASS_MAPPINGS[k] for k in module.NODE_CLASS_MAPPINGS}
    def core(name: str) -> ModuleType:
        """The pack's own copy of ``hyperlora.<name>`` (its classes differ from this process's ``hyperlora``)."""
        return sys.modules[f"{module_name}.hyperlora.{name}"]

    return SimpleNamespace(nodes=registered, module=module, comfy_nodes=comfy_nodes, base=base, errors=core("errors"),
                           core=core)
