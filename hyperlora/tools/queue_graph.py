"""API workflows of the queue client: shipped-file lookup and filling by node type and title.

Nodes are found by ``class_type`` and ``_meta.title`` (never by fixed ids), so a user's own
API export with the same titles works too. Pure data handling, no network.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from ..checks import check_finite, is_finite_number
from ..errors import QueueError
from ..spec import NODE_PREFIX, TRIGGER_PREFIX
from .graph_format import api_from_ui, is_api_link, is_ui_workflow

logger = logging.getLogger(__name__)

WORKFLOW_FOLDER = "example_workflows"   # the folder ComfyUI's Templates menu scans (UI format); api/ holds the API twins


def _workflow_dir() -> Path:
    """The shipped workflows: the pack's ``example_workflows/`` (a checkout, or ComfyUI's custom_nodes/),
    else the copy a wheel installs as ``hyperlora/example_workflows`` (see pyproject.toml)."""
    checkout = Path(__file__).resolve().parents[2] / WORKFLOW_FOLDER
    if (checkout / "api").is_dir():
        return checkout
    return Path(str(resources.files("hyperlora") / WORKFLOW_FOLDER))


WORKFLOW_DIR = _workflow_dir()
API_DIR = WORKFLOW_DIR / "api"
WORKFLOW_README = WORKFLOW_DIR / "README.md"   # its table: the shipped workflows in the README's order


def shipped_order(readme: Path = WORKFLOW_README) -> list[str]:
    """Names of the shipped workflows in the order of ``example_workflows/README.md``'s table, which
    build_workflows.py writes from its list of workflows (the order of the README's Workflows section:
    the first one a newcomer needs first). Empty when the file is absent."""
    try:
        text = readme.read_text(encoding="utf-8")
    except OSError:
        return []
    return re.findall(r"^\| `([A-Za-z0-9_]+)` \|", text, flags=re.MULTILINE)


def in_shipped_order(names: Sequence[str], order: Sequence[str]) -> list[str]:
    """``names`` with those of ``order`` first, in that order, then any others alphabetically."""
    rank = {name: i for i, name in enumerate(order)}
    return sorted(names, key=lambda n: (0, rank[n], "") if n in rank else (1, 0, n))

# Nodes whose widget input receives --strength (except nodes titled '... slider ...').
STRENGTH_INPUTS: dict[str, tuple[str, ...]] = {
    "HyperLoRAStudioApply": ("strength",),
    "HyperLoRAStudioApplyFromImages": ("strength",),
    "HyperLoRAStudioConditioning": ("strength",),
    "HyperLoRAStudioRefineIdentity": ("strength",),
    "LoraLoader": ("strength_model",),
    "LoraLoaderModelOnly": ("strength_model",),
}
SAMPLERS = ("KSampler", "KSamplerAdvanced")
LATENTS = ("EmptyLatentImage", "EmptySD3LatentImage")

ApiGraph = dict[str, dict[str, Any]]


# --------------------------------------------------------------------------- workflow files

def resolve_workflow(name_or_path: str | Path) -> Path:
    """Path of an API workflow: an existing file, or the name of a shipped one (``t2i_one_photo``)."""
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p
    cand = API_DIR / f"{Path(str(name_or_path)).name.removesuffix('.json')}.json"
    if cand.is_file():
        return cand
    shipped = sorted(f.stem for f in API_DIR.glob("*.json"))
    raise QueueError(f"No workflow file '{name_or_path}' and no shipped API workflow of that name; "
                     f"shipped ones: {', '.join(shipped) or '(none found in ' + str(API_DIR) + ')'}.")


def read_workflow(path: str | Path) -> dict[str, Any]:
    """Read a workflow file: an API graph (``{node_id: {class_type, inputs, _meta}}``, also inside a
    ``{"prompt": ...}`` body) or a UI workflow (``{"nodes": [...], "links": [...]}``) as it is."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise QueueError(f"Cannot read the workflow {path}: {e}. Give a workflow .json saved from ComfyUI "
                         f"(Workflow > Save, or Export (API)).") from e
    except RecursionError as e:
        raise QueueError(f"Cannot read the workflow {path}: its JSON is nested too deeply to be a ComfyUI "
                         f"workflow. Give a workflow .json saved from ComfyUI (Workflow > Save, or Export (API)).") from e
    if is_ui_workflow(data):
        return data
    if isinstance(data, dict) and isinstance(data.get("prompt"), dict):
        data = data["prompt"]
    if not isinstance(data, dict) or not data or not all(isinstance(v, dict) and "class_type" in v
                                                         for v in data.values()):
        raise QueueError(f"{path} is not a ComfyUI workflow: expected an API workflow (an object of nodes with "
                         f"'class_type', what Export (API) writes) or a UI workflow (an object with 'nodes' and "
                         f"'links', what Workflow > Save writes).")
    return data


def load_api_workflow(path: str | Path) -> ApiGraph:
    """Read an API-format workflow (``{node_id: {class_type, inputs, _meta}}``).

    A UI workflow needs a server's node definitions to become API format: :class:`QueueError`
    (``queue_workflow`` and the CLI take UI workflows and convert them with the server's ``/object_info``).
    """
    path = Path(path)
    data = read_workflow(path)
    if is_ui_workflow(data):
        raise QueueError(f"{path} is a UI workflow (for dragging onto the canvas); its API form needs the node "
                         f"definitions of a running ComfyUI: queue it with python -m hyperlora.tools.queue "
                         f"--workflow {path}, or load its API twin ({WORKFLOW_FOLDER}/api/{path.name} for a shipped "
                         f"one).")
    return data


def ui_to_api_graph(ui: dict[str, Any], object_info: dict[str, Any], source: str = "the workflow") -> ApiGraph:
    """The API form of a UI workflow with the server's ``object_info``; :class:`QueueError` names the node."""
    definitions = ui.get("definitions") if isinstance(ui.get("definitions"), dict) else {}
    subgraphs = {str(sg.get("id")): sg.get("name") or sg.get("id") for sg in definitions.get("subgraphs") or []
                 if isinstance(sg, dict)}
    inside = [f"#{n['id']} '{subgraphs[str(n['type'])]}'" for n in ui["nodes"]
              if isinstance(n, dict) and str(n.get("type")) in subgraphs]
    if inside:
        raise QueueError(f"{source} has subgraph node(s) {', '.join(inside)}, which this client does not open. In "
                         f"ComfyUI, unpack them (right-click > Unpack Subgraph), save the workflow and queue that "
                         f"file, or export it with Workflow > Export (API).")
    try:
        return api_from_ui(ui, object_info)
    except ValueError as e:
        raise QueueError(f"{source}: {e}.") from e


def node_title(node: dict[str, Any]) -> str:
    return str(node.get("_meta", {}).get("title", ""))


def find_nodes(graph: ApiGraph, class_type: str | Sequence[str] | None = None,
               title: str | None = None) -> list[str]:
    """Node ids matching a class type (or several) and/or a title (case-insensitive substring), in id order."""
    types = (class_type,) if isinstance(class_type, str) else class_type
    out = [nid for nid, n in graph.items()
           if (types is None or n["class_type"] in types)
           and (title is None or title.lower() in node_title(n).lower())]
    return sorted(out, key=lambda nid: (0, int(nid), "") if nid.isdigit() else (1, 0, nid))


# Our nodes whose 'images' input takes the face photos (an identity is made of them).
IDENTITY_PHOTO_INPUTS = {NODE_PREFIX + "IdentityFromImages": "images", NODE_PREFIX + "ApplyFromImages": "images"}


def photo_slots(graph: ApiGraph) -> list[str]:
    """LoadImage nodes that take a face photo: their title contains 'photo'; in a graph without such
    titles (a converted workflow of the authors' plugin), the LoadImage nodes whose image reaches an
    identity node's 'images' input (through batch nodes, reroutes and the like)."""
    titled = find_nodes(graph, "LoadImage", "photo")
    if titled:
        return titled
    found: set[str] = set()
    todo = [node["inputs"][name] for node in graph.values()
            if (name := IDENTITY_PHOTO_INPUTS.get(node["class_type"])) and is_api_link(node.get("inputs", {}).get(name))]
    seen: set[str] = set()
    while todo:
        nid = str(todo.pop()[0])
        if nid in seen or nid not in graph:
            continue
        seen.add(nid)
        if graph[nid]["class_type"] == "LoadImage":
            found.add(nid)
            continue
        todo += [v for v in graph[nid].get("inputs", {}).values() if is_api_link(v)]
    return [nid for nid in find_nodes(graph, "LoadImage") if nid in found]


def _set_widget(graph: ApiGraph, nid: str, key: str, value: Any) -> None:
    inputs = graph[nid].setdefault("inputs", {})
    if isinstance(inputs.get(key), list):
        raise QueueError(f"Node {nid} ('{node_title(graph[nid])}') gets '{key}' from a link; it cannot be set.")
    inputs[key] = value


def fill_workflow(graph: ApiGraph, *, images: Sequence[str] = (), pose_image: str | None = None,
                  prompt: str | None = None, negative: str | None = None, seed: int | None = None,
                  strength: float | None = None, model: str | None = None, checkpoint: str | None = None,
                  steps: int | None = None, width: int | None = None, height: int | None = None,
                  overrides: Sequence[str] = (), add_trigger: bool = True) -> ApiGraph:
    """A filled copy of ``graph``. ``images`` are server-side names (already uploaded), one per photo slot."""
    g = copy.deepcopy(graph)
    if images:
        slots = photo_slots(g)
        if not slots:
            raise QueueError(f"This workflow has no face photo slot: no LoadImage node titled '... photo ...' and "
                             f"none whose image reaches a HyperLoRA Studio identity node, so --image cannot tell "
                             f"where {len(images)} photo(s) go. Put the photo into ComfyUI's input folder and set it "
                             f"with --set 'Load Image.image=me.png' (the LoadImage node's title or id).")
        if len(images) != len(slots):
            names = ", ".join(f"'{node_title(g[s])}'" for s in slots) or "none"
            raise QueueError(f"This workflow takes {len(slots)} face photo(s) ({names}) but {len(images)} "
                             f"were given; pass --image once per slot or pick another workflow "
                             f"(t2i_one_photo takes 1, t2i_several_photos takes 3).")
        for nid, name in zip(slots, images):
            _set_widget(g, nid, "image", name)
    if pose_image is not None:
        pose = find_nodes(g, "LoadImage", "pose")
        if not pose:
            raise QueueError("--pose was given but this workflow has no 'Pose image' LoadImage node; "
                             "use the controlnet_pose workflow.")
        for nid in pose:
            _set_widget(g, nid, "image", pose_image)
    if prompt is not None:
        if add_trigger and not prompt.startswith(TRIGGER_PREFIX.strip()):
            logger.info("prompt does not start with the trigger words; prepending %r", TRIGGER_PREFIX)
            prompt = TRIGGER_PREFIX + prompt
        targets = find_nodes(g, "CLIPTextEncode", "positive")
        if not targets:
            raise QueueError("No CLIPTextEncode node titled 'Positive prompt' in this workflow; use --set.")
        for nid in targets:
            _set_widget(g, nid, "text", prompt)
    if negative is not None:
        for nid in find_nodes(g, "CLIPTextEncode", "negative"):
            _set_widget(g, nid, "text", negative)
    for nid in find_nodes(g, SAMPLERS):
        key = "noise_seed" if g[nid]["class_type"] == "KSamplerAdvanced" else "seed"
        if seed is not None:
            _set_widget(g, nid, key, int(seed))
        if steps is not None:
            _set_widget(g, nid, "steps", int(steps))
    if width is not None or height is not None:
        for nid in find_nodes(g, LATENTS):
            if width is not None:
                _set_widget(g, nid, "width", int(width))
            if height is not None:
                _set_widget(g, nid, "height", int(height))
    if strength is not None:
        strength = check_finite(strength, "strength (--strength)")
        for nid, node in g.items():
            if "slider" in node_title(node).lower():
                continue
            for key in STRENGTH_INPUTS.get(node["class_type"], ()):
                _set_widget(g, nid, key, float(strength))
    if model is not None:
        for nid in find_nodes(g, "HyperLoRAStudioLoader"):
            _set_widget(g, nid, "model", model)
    if checkpoint is not None:
        for nid in find_nodes(g, "CheckpointLoaderSimple"):
            _set_widget(g, nid, "ckpt_name", checkpoint)
    for item in overrides:
        apply_override(g, item)
    return g


def apply_override(graph: ApiGraph, item: str) -> None:
    """``"Title or id.input=value"``; value parsed as JSON when it parses, else kept as a string."""
    target, sep, raw = item.partition("=")
    node_ref, dot, key = target.rpartition(".")
    if not sep or not dot or not node_ref or not key:
        raise QueueError(f"--set '{item}' is not of the form 'Node title.input=value' (or 'node_id.input=value').")
    try:
        value: Any = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    if isinstance(value, float) and not is_finite_number(value):
        raise QueueError(f"--set '{item}': {raw} is not a finite number; NaN and infinity are refused because "
                         f"they would silently spoil the result. Give a number such as 0.85.")
    ids = [node_ref] if node_ref in graph else [n for n in graph if node_title(graph[n]).lower() == node_ref.lower()]
    if not ids:
        titles = ", ".join(sorted({repr(node_title(n)) for n in graph.values()}))
        raise QueueError(f"--set '{item}': no node with id or title '{node_ref}'; titles are {titles}.")
    for nid in ids:
        _set_widget(graph, nid, key, value)
