"""Graph description and ComfyUI workflow formats for workflows/build_workflows.py.

A tiny graph DSL (``Workflow.add`` returns a ``Node``; ``node[i]`` is its output ``i``) and the
builders of both ComfyUI formats from it plus ``/object_info``: the UI format (nodes with
``widgets_values`` in the front end's order, typed links, groups) and the API format.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

VIRTUAL_NODES = ("Note", "MarkdownNote", "Reroute", "PrimitiveNode")   # front-end only, not in /object_info
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
NOTE_COLOR = ("#432", "#653")
NOTE_WIDTH = 740.0


# --------------------------------------------------------------------------- graph description

@dataclass
class Out:
    node: "Node"
    index: int


@dataclass
class Node:
    id: int
    type: str
    title: str
    pos: tuple[float, float]
    values: dict[str, Any] = field(default_factory=dict)
    links: dict[str, Out] = field(default_factory=dict)
    width: float = 320.0

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


def _note_height(text: str) -> float:
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


# --------------------------------------------------------------------------- builders

def build(wf: Workflow, object_info: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(UI workflow, API workflow) of ``wf``; KeyError/ValueError on an input /object_info does not know."""
    ui_nodes: list[dict[str, Any]] = []
    links: list[list[Any]] = []
    api: dict[str, Any] = {}
    out_links: dict[tuple[int, int], list[int]] = {}
    socket_index: dict[tuple[int, str], int] = {}
    order = _topological(wf)

    # pass 1: link ids
    for node in wf.nodes:
        if node.type in VIRTUAL_NODES:
            continue
        info = object_info[node.type]
        sockets = [n for n, t, o, _ in input_specs(info) if not is_widget(t, o)]
        for i, name in enumerate(sockets):
            socket_index[(node.id, name)] = i
        unknown = set(node.links) - set(sockets)
        if unknown:
            raise ValueError(f"{wf.name}: {node.type} has no socket input {sorted(unknown)}")
        for name in sockets:
            if name in node.links:
                src = node.links[name]
                src_type = object_info[src.node.type]["output"][src.index]
                link_id = len(links) + 1
                links.append([link_id, src.node.id, src.index, node.id, socket_index[(node.id, name)], src_type])
                out_links.setdefault((src.node.id, src.index), []).append(link_id)

    for node in wf.nodes:
        base = {"id": node.id, "type": node.type, "pos": list(node.pos), "flags": {}, "order": order[node.id],
                "mode": 0, "title": node.title}
        if node.type == "Note":
            text = node.values["text"]
            ui_nodes.append({**base, "size": [node.width, _note_height(text)],
                             "inputs": [], "outputs": [], "properties": {}, "widgets_values": [text],
                             "color": NOTE_COLOR[0], "bgcolor": NOTE_COLOR[1]})
            continue
        info = object_info[node.type]
        specs = input_specs(info)
        widgets: list[Any] = []
        api_inputs: dict[str, Any] = {}
        inputs_ui = []
        multiline = 0
        known = {n for n, *_ in specs}
        unknown = set(node.values) - known
        if unknown:
            raise ValueError(f"{wf.name}: {node.type} has no input {sorted(unknown)}")
        for name, type_, opts, optional in specs:
            if is_widget(type_, opts):
                value = node.values.get(name, _default(type_, opts))
                widgets += [value, *widget_extras(name, opts)]
                api_inputs[name] = value
                multiline += bool(opts.get("multiline"))
            else:
                link = node.links.get(name)
                link_id = None
                if link is not None:
                    link_id = next(lk[0] for lk in links if lk[3] == node.id and lk[4] == socket_index[(node.id, name)])
                    api_inputs[name] = [str(link.node.id), link.index]
                elif not optional:
                    raise ValueError(f"{wf.name}: required input '{name}' of {node.type} '{node.title}' is not linked")
                inputs_ui.append({"name": name, "type": type_, "link": link_id})
        outputs_ui = [{"name": oname, "type": otype, "links": out_links.get((node.id, i), []), "slot_index": i}
                      for i, (otype, oname) in enumerate(zip(info["output"], info["output_name"]))]
        n_widgets = len(widgets)
        ui_nodes.append({**base, "size": _size(node, len(inputs_ui), len(outputs_ui), n_widgets, multiline),
                         "inputs": inputs_ui, "outputs": outputs_ui,
                         "properties": {"Node name for S&R": node.type}, "widgets_values": widgets})
        api[str(node.id)] = {"inputs": api_inputs, "class_type": node.type, "_meta": {"title": node.title}}

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
    ui = {"last_node_id": max(n.id for n in wf.nodes), "last_link_id": len(links), "nodes": ui_nodes,
          "links": links, "groups": groups, "config": {},
          "extra": {"ds": _fit_view(ui_nodes, groups), "hyperlora_workflow": wf.name}, "version": 0.4}
    return ui, api


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
