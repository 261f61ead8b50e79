"""Graph description and ComfyUI workflow formats (workflows/build_workflows.py, tools/convert_workflow.py).

A tiny graph DSL (``Workflow.add`` returns a ``Node``; ``node[i]`` is its output ``i``) and the
builders of both ComfyUI formats from it plus ``/object_info``: the UI format (nodes with
``widgets_values`` in the front end's order, typed links, groups) and the API format.
A node may also be *kept*: a node of a loaded workflow (``Node.raw``, UI or API form) that is
written back as it was, with only its links renumbered - so graphs with nodes of other packs,
whose ``/object_info`` is unknown here, can be rewritten too.

:func:`node_specs` is the part of ``/object_info`` the builders read, saved for use without a
server (``NODE_SPECS_FILE``, written by build_workflows.py, read by the workflow converter).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

VIRTUAL_NODES = ("Note", "MarkdownNote", "Reroute", "PrimitiveNode")   # front-end only, not in /object_info
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
NOTE_COLOR = ("#432", "#653")
NOTE_WIDTH = 740.0
NODE_SPECS_FILE = Path(__file__).resolve().with_name("node_specs.json")
# core nodes whose specs are saved beside the pack's own: the workflow converter writes them
CORE_NODES_IN_SPECS = ("CLIPTextEncode", "ImageBatch")
SPEC_FIELDS = ("input", "input_order", "output", "output_name", "name", "display_name", "category", "output_node")


# --------------------------------------------------------------------------- graph description

@dataclass
class Out:
    node: "Node"
    index: int


@dataclass
class Node:
    id: int | str                          # int in UI workflows; an API workflow's own id strings are kept
    type: str
    title: str
    pos: tuple[float, float]
    values: dict[str, Any] = field(default_factory=dict)
    links: dict[str, Out] = field(default_factory=dict)
    width: float = 320.0
    mode: int = 0                          # 0 always, 2 muted, 4 bypassed (UI only)
    raw: dict[str, Any] | None = None      # a kept node (UI or API dict): written as it was, links renumbered

    def __getitem__(self, index: int) -> Out:
        return Out(self, index)


@dataclass
class Workflow:
    name: str
    title: str
    summary: str           # one line for workflows/README.md
    usage: str             # how to use it, goes into the Note
    nodes: list[Node] = field(default_factory=list)
    groups: list[tuple[str, list[Node], str]] = field(default_factory=list)
    kept_groups: list[dict[str, Any]] = field(default_factory=list)   # UI groups of a loaded workflow, as they were
    extra: dict[str, Any] = field(default_factory=dict)               # more UI "extra" entries (kept from a loaded one)

    def add(self, type_: str, title: str, pos: tuple[float, float], *, node_width: float = 320.0,
            **inputs: Any) -> Node:
        node = Node(len(self.nodes) + 1, type_, title, pos, width=node_width)
        for key, value in inputs.items():
            if isinstance(value, Node):
                value = value[0]
            (node.links if isinstance(value, Out) else node.values)[key] = value
        self.nodes.append(node)
        return node

    def group(self, title: str, nodes: list[Node], color: str = "#3f789e") -> None:
        self.groups.append((title, nodes, color))


def note_height(text: str) -> float:
    return 40 + 18 * sum(max(1, -(-len(line) // 95)) for line in text.split("\n"))


# --------------------------------------------------------------------------- object_info helpers

def input_specs(info: dict[str, Any]) -> list[tuple[str, Any, dict[str, Any], bool]]:
    """(name, type, options, optional) of a node's inputs in the order the front end shows them."""
    order = info.get("input_order") or {s: list(info["input"].get(s, {})) for s in ("required", "optional")}
    out = []
    for section in ("required", "optional"):
        defs = info["input"].get(section, {})
        for name in order.get(section, []):
            spec = defs[name]
            out.append((name, spec[0], spec[1] if len(spec) > 1 else {}, section == "optional"))
    return out


def is_widget(type_: Any, opts: dict[str, Any]) -> bool:
    return (isinstance(type_, list) or type_ in WIDGET_TYPES) and not opts.get("forceInput")


def widget_extras(name: str, opts: dict[str, Any]) -> list[Any]:
    """Extra serialised widget values the front end adds after a widget (seed control, upload button)."""
    if opts.get("control_after_generate") or name in ("seed", "noise_seed"):
        return ["fixed"]
    if opts.get("image_upload"):
        return ["image"]
    return []


def expected_widget_count(info: dict[str, Any]) -> int:
    return sum(1 + len(widget_extras(n, o)) for n, t, o, _ in input_specs(info) if is_widget(t, o))


def trailing_optional_defaults(info: dict[str, Any], saved: int) -> list[Any]:
    """The values a UI workflow saved with ``saved`` widget values lacks when the node has since gained optional
    widgets at the end (as the front end fills them on load: their defaults); [] when that does not explain it."""
    widgets = [(n, t, o, optional) for n, t, o, optional in input_specs(info) if is_widget(t, o)]
    count, fill = 0, []
    for name, type_, opts, optional in widgets:
        width = 1 + len(widget_extras(name, opts))
        if count >= saved:
            if not optional or width != 1:
                return []
            fill.append(_default(type_, opts))
        count += width
    return fill if count - len(fill) == saved else []


def _default(type_: Any, opts: dict[str, Any]) -> Any:
    if "default" in opts:
        return opts["default"]
    if isinstance(type_, list):
        return type_[0] if type_ else ""
    if type_ == "COMBO":
        return (opts.get("options") or [""])[0]
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(type_)


def _size(node: Node, n_sockets: int, n_outputs: int, n_widgets: int, multiline: int) -> list[float]:
    return [node.width, 30 + 22 * max(n_sockets, n_outputs) + 26 * n_widgets + 100 * multiline + 10]


# --------------------------------------------------------------------------- saved specs

def node_specs(object_info: dict[str, Any], types: list[str]) -> dict[str, Any]:
    """The fields of ``types``' ``/object_info`` entries the builders read, without tooltips.

    Dropdowns without a default list model files, which differ from server to server: saved empty.
    """
    out: dict[str, Any] = {}
    for type_ in sorted(types):
        info = object_info[type_]
        entry = {k: copy.deepcopy(info[k]) for k in SPEC_FIELDS if k in info}
        for section in entry["input"].values():
            for name, spec in section.items():
                opts = {k: v for k, v in (spec[1] if len(spec) > 1 else {}).items() if k != "tooltip"}
                type_spec = spec[0]
                if isinstance(type_spec, list) and "default" not in opts:
                    type_spec = []
                section[name] = [type_spec, opts] if opts else [type_spec]
        entry["output"] = list(entry["output"])
        entry["output_name"] = list(entry["output_name"])
        out[type_] = entry
    return out


def load_node_specs(path: Path = NODE_SPECS_FILE) -> dict[str, Any]:
    """The saved specs (``{node type: /object_info entry}``) written by build_workflows.py."""
    return json.loads(path.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- builders

def build(wf: Workflow, object_info: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(UI workflow, API workflow) of ``wf``; KeyError/ValueError on an input /object_info does not know."""
    return build_ui(wf, object_info), build_api(wf, object_info)


def _sockets(node: Node, object_info: dict[str, Any]) -> list[str]:
    """Names of ``node``'s socket inputs, in slot order."""
    if node.raw is not None:
        return [inp["name"] for inp in node.raw.get("inputs") or []]
    return [n for n, t, o, _ in input_specs(object_info[node.type]) if not is_widget(t, o)]


def _output_type(out: Out, object_info: dict[str, Any]) -> str:
    if out.node.raw is not None:
        return out.node.raw["outputs"][out.index]["type"]
    return object_info[out.node.type]["output"][out.index]


def _ui_links(wf: Workflow, object_info: dict[str, Any]) -> tuple[list[list[Any]], dict[tuple[int, int], int],
                                                                     dict[tuple[int, int], list[int]]]:
    """Links numbered 1.. in node then slot order: (links, {(node id, slot): link id}, {(node id, output): [ids]})."""
    links: list[list[Any]] = []
    into: dict[tuple[int, int], int] = {}
    out_links: dict[tuple[int, int], list[int]] = {}
    for node in wf.nodes:
        if node.type in VIRTUAL_NODES and node.raw is None:
            continue
        sockets = _sockets(node, object_info)
        unknown = set(node.links) - set(sockets)
        if unknown:
            raise ValueError(f"{wf.name}: {node.type} has no socket input {sorted(unknown)}")
        for slot, name in enumerate(sockets):
            src = node.links.get(name)
            if src is None:
                continue
            link_id = len(links) + 1
            links.append([link_id, src.node.id, src.index, node.id, slot, _output_type(src, object_info)])
            into[(node.id, slot)] = link_id
            out_links.setdefault((src.node.id, src.index), []).append(link_id)
    return links, into, out_links


def _kept_ui_node(node: Node, order: int, into: dict[tuple[int, int], int],
                  out_links: dict[tuple[int, int], list[int]]) -> dict[str, Any]:
    ui = copy.deepcopy(node.raw or {})
    ui["order"] = order
    for slot, inp in enumerate(ui.get("inputs") or []):
        inp["link"] = into.get((node.id, slot))
    for i, out in enumerate(ui.get("outputs") or []):
        out["links"] = out_links.get((node.id, i), [])
    return ui


def build_ui(wf: Workflow, object_info: dict[str, Any]) -> dict[str, Any]:
    """The UI workflow of ``wf`` (what the front end saves and loads)."""
    ui_nodes: list[dict[str, Any]] = []
    order = _topological(wf)
    links, into, out_links = _ui_links(wf, object_info)

    for node in wf.nodes:
        if node.raw is not None:
            ui_nodes.append(_kept_ui_node(node, order[node.id], into, out_links))
            continue
        base = {"id": node.id, "type": node.type, "pos": list(node.pos), "flags": {}, "order": order[node.id],
                "mode": node.mode, "title": node.title}
        if node.type == "Note":
            text = node.values["text"]
            ui_nodes.append({**base, "size": [node.width, note_height(text)],
                             "inputs": [], "outputs": [], "properties": {}, "widgets_values": [text],
                             "color": NOTE_COLOR[0], "bgcolor": NOTE_COLOR[1]})
            continue
        info = object_info[node.type]
        specs = input_specs(info)
        widgets: list[Any] = []
        inputs_ui = []
        multiline = 0
        unknown = set(node.values) - {n for n, *_ in specs}
        if unknown:
            raise ValueError(f"{wf.name}: {node.type} has no input {sorted(unknown)}")
        slot = 0
        for name, type_, opts, optional in specs:
            if is_widget(type_, opts):
                widgets += [node.values.get(name, _default(type_, opts)), *widget_extras(name, opts)]
                multiline += bool(opts.get("multiline"))
                continue
            if name not in node.links and not optional:
                raise ValueError(f"{wf.name}: required input '{name}' of {node.type} '{node.title}' is not linked")
            inputs_ui.append({"name": name, "type": type_, "link": into.get((node.id, slot))})
            slot += 1
        outputs_ui = [{"name": oname, "type": otype, "links": out_links.get((node.id, i), []), "slot_index": i}
                      for i, (otype, oname) in enumerate(zip(info["output"], info["output_name"]))]
        ui_nodes.append({**base, "size": _size(node, len(inputs_ui), len(outputs_ui), len(widgets), multiline),
                         "inputs": inputs_ui, "outputs": outputs_ui,
                         "properties": {"Node name for S&R": node.type}, "widgets_values": widgets})

    by_id = {n["id"]: n for n in ui_nodes}
    groups = []
    for title, members, color in wf.groups:
        xs = [by_id[m.id]["pos"][0] for m in members]
        ys = [by_id[m.id]["pos"][1] for m in members]
        x2 = [by_id[m.id]["pos"][0] + by_id[m.id]["size"][0] for m in members]
        y2 = [by_id[m.id]["pos"][1] + by_id[m.id]["size"][1] for m in members]
        groups.append({"title": title, "bounding": [min(xs) - 20, min(ys) - 60, max(x2) - min(xs) + 40,
                                                   max(y2) - min(ys) + 70],
                       "color": color, "font_size": 24, "flags": {}})
    groups += copy.deepcopy(wf.kept_groups)
    extra = {**copy.deepcopy(wf.extra), "ds": _fit_view(ui_nodes, groups), "hyperlora_workflow": wf.name}
    return {"last_node_id": max(n.id for n in wf.nodes), "last_link_id": len(links), "nodes": ui_nodes,
            "links": links, "groups": groups, "config": {}, "extra": extra, "version": 0.4}


def build_api(wf: Workflow, object_info: dict[str, Any]) -> dict[str, Any]:
    """The API workflow of ``wf`` (``POST /prompt``): front-end-only nodes are left out.

    Kept nodes must be API dicts (a kept UI node's widget names are unknown here: ValueError).
    """
    api: dict[str, Any] = {}
    for node in wf.nodes:
        if node.raw is not None:
            if "class_type" not in node.raw:
                raise ValueError(f"{wf.name}: node {node.id} ({node.type}) is a kept UI node; its API form "
                                 f"needs the node's /object_info")
            inputs = {k: [str(node.links[k].node.id), node.links[k].index] if k in node.links else copy.deepcopy(v)
                      for k, v in node.raw.get("inputs", {}).items() if k in node.links or not is_api_link(v)}
            inputs.update({k: [str(src.node.id), src.index] for k, src in node.links.items() if k not in inputs})
            api[str(node.id)] = {**copy.deepcopy(node.raw), "inputs": inputs}
            continue
        if node.type in VIRTUAL_NODES:
            continue
        info = object_info[node.type]
        api_inputs: dict[str, Any] = {}
        for name, type_, opts, optional in input_specs(info):
            if is_widget(type_, opts):
                api_inputs[name] = node.values.get(name, _default(type_, opts))
            elif name in node.links:
                src = node.links[name]
                api_inputs[name] = [str(src.node.id), src.index]
            elif not optional:
                raise ValueError(f"{wf.name}: required input '{name}' of {node.type} '{node.title}' is not linked")
        api[str(node.id)] = {"inputs": api_inputs, "class_type": node.type, "_meta": {"title": node.title}}
    return api


def is_api_link(value: Any) -> bool:
    """``[node id, output index]``: how the API format writes a link."""
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[0], (str, int))
            and not isinstance(value[0], bool) and isinstance(value[1], int) and not isinstance(value[1], bool))


def _fit_view(nodes: list[dict[str, Any]], groups: list[dict[str, Any]], *, view: tuple[int, int] = (1600, 950),
              margin: float = 40) -> dict[str, Any]:
    """Canvas scale/offset that shows the whole graph in a ``view``-sized canvas."""
    boxes = [(*n["pos"], n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1]) for n in nodes]
    boxes += [(g["bounding"][0], g["bounding"][1], g["bounding"][0] + g["bounding"][2],
               g["bounding"][1] + g["bounding"][3]) for g in groups]
    x0, y0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
    x1, y1 = max(b[2] for b in boxes), max(b[3] for b in boxes)
    scale = min(1.0, (view[0] - 2 * margin) / (x1 - x0), (view[1] - 2 * margin) / (y1 - y0))
    return {"scale": round(scale, 4),
            "offset": [round(margin / scale - x0, 1), round(margin / scale - y0, 1)]}


def _topological(wf: Workflow) -> dict[int, int]:
    order: dict[int, int] = {}

    def visit(node: Node) -> None:
        if node.id in order:
            return
        for link in node.links.values():
            visit(link.node)
        order[node.id] = len(order)

    for node in wf.nodes:
        visit(node)
    return order


# --------------------------------------------------------------------------- UI -> API (what 'Queue' sends)

MUTED, BYPASSED = 2, 4     # UI node modes: muted nodes are left out, bypassed ones pass their inputs on


def api_from_ui(ui: dict[str, Any], object_info: dict[str, Any]) -> dict[str, Any]:
    """The API form of a UI workflow, as the front end's queue button makes it.

    Widget values are named by ``object_info`` (the front end's extras, a seed's 'fixed' or an image's
    upload button, are skipped); links become ``[node id, output]``, followed through Reroutes and
    bypassed nodes (to their first input of the output's type); front-end-only nodes and muted nodes
    are left out, and a widget fed by a PrimitiveNode keeps the value saved with the workflow.
    ``ValueError`` naming the node for a node ``object_info`` lacks or whose widget count differs.
    """
    nodes = {n["id"]: n for n in ui.get("nodes") or [] if isinstance(n, dict) and "id" in n}
    links: dict[Any, tuple[Any, int]] = {}
    for link in ui.get("links") or []:
        if isinstance(link, list) and len(link) >= 3:
            links[link[0]] = (link[1], link[2])
        elif isinstance(link, dict) and {"id", "origin_id", "origin_slot"} <= set(link):
            links[link["id"]] = (link["origin_id"], link["origin_slot"])

    def label(node: dict[str, Any]) -> str:
        return f"node #{node['id']} '{node.get('title') or node['type']}' ({node['type']})"

    def source(link_id: Any, seen: frozenset = frozenset()) -> list[Any] | None:
        """``[node id, output]`` a link carries once Reroutes and bypassed nodes are passed, else None."""
        if link_id not in links or link_id in seen:
            return None
        origin_id, slot = links[link_id]
        origin = nodes.get(origin_id)
        if origin is None or origin.get("mode") == MUTED or origin["type"] == "PrimitiveNode":
            return None
        seen = seen | {link_id}
        inputs = origin.get("inputs") or []
        if origin["type"] == "Reroute":
            return source(inputs[0].get("link"), seen) if inputs else None
        if origin.get("mode") == BYPASSED:
            outputs = origin.get("outputs") or []
            type_ = outputs[slot].get("type") if slot < len(outputs) else None
            same_slot = [inputs[slot]] if slot < len(inputs) and inputs[slot].get("type") == type_ else []
            for inp in same_slot + [i for i in inputs if i.get("type") == type_]:
                if inp.get("link") is not None:
                    return source(inp["link"], seen)
            return None
        return [str(origin_id), slot]

    api: dict[str, Any] = {}
    for node in nodes.values():
        if node["type"] in VIRTUAL_NODES or node.get("mode") in (MUTED, BYPASSED):
            continue
        info = object_info.get(node["type"])
        if info is None:
            raise ValueError(f"{label(node)}: the server has no node type {node['type']}")
        specs = input_specs(info)
        saved = node.get("widgets_values")
        inputs: dict[str, Any] = {}
        if isinstance(saved, dict):
            inputs = {n: saved[n] for n, t, o, _ in specs if is_widget(t, o) and n in saved}
        else:
            values = list(saved or [])
            expected = expected_widget_count(info)
            values += trailing_optional_defaults(info, len(values))
            if len(values) != expected:
                raise ValueError(f"{label(node)} has {len(values)} widget values but the server's {node['type']} "
                                 f"takes {expected}: the workflow was saved with another version of that node; open "
                                 f"it in ComfyUI, save it again and queue that file")
            for name, type_, opts, _ in specs:
                if is_widget(type_, opts):
                    inputs[name] = values.pop(0)
                    del values[:len(widget_extras(name, opts))]
        for inp in node.get("inputs") or []:
            if inp.get("link") is None:
                continue
            linked = source(inp["link"])
            if linked is not None:
                inputs[inp["name"]] = linked
        api[str(node["id"])] = {"inputs": inputs, "class_type": node["type"],
                                "_meta": {"title": node.get("title") or info.get("display_name") or node["type"]}}
    return api


def ui_node_types(ui: dict[str, Any]) -> list[str]:
    """The node types a UI workflow queues (front-end-only, muted and bypassed nodes left out), in node order."""
    return [n["type"] for n in ui.get("nodes") or []
            if isinstance(n, dict) and n.get("type") not in VIRTUAL_NODES and n.get("mode") not in (MUTED, BYPASSED)]


def is_ui_workflow(doc: Any) -> bool:
    """A UI workflow (what Workflow > Save writes): an object with 'nodes' and 'links' lists."""
    return isinstance(doc, dict) and isinstance(doc.get("nodes"), list) and isinstance(doc.get("links"), list)
