"""Open the authors' ComfyUI-HyperLoRA workflows with this pack's nodes.

    python -m hyperlora.tools.convert_workflow THEIRS.json OURS.json [--keep-other-packs]

rewrites a workflow built from the authors' plugin (UI format: what ComfyUI saves; or API format:
what 'Export (API)' writes) into HyperLoRA Studio's nodes:

* Config + Loader, or Uni Loader -> Loader (the model, CLIP and face-analysis folder names carry
  over: both packs read the same ``models/hyper_lora/...`` and ``models/insightface/models/...``
  layout; the architecture numbers are dropped, this pack reads them from the weights);
* Face Attr + ID Cond (or Base Cond) -> Identity from Images; Generate ID / Base LoRA -> Build LoRA
  (kind id / base); Apply LoRA -> Apply; Uni Generate ID LoRA -> Identity from Images + Build LoRA,
  or, when it feeds a single Apply LoRA, both -> Apply from Images; Save LoRA -> Export LoRA.
  Their ``LORA`` becomes the core ``LORA_MODEL`` this pack's Build LoRA gives.
* Nodes of other packs that have a core equivalent are replaced by core nodes (the advanced CLIP
  text encoder -> CLIP Text Encode, Impact's Make Image Batch -> Batch Images), so the result opens
  with nothing missing in ComfyUI with only this pack; ``--keep-other-packs`` keeps them as they are.
  A node no core node replaces (InstantID, FaceDetailer, ...) is kept, and the command names each one
  in a line of its own, with the pack it needs and the core-only way this pack ships instead.
* Workflows of this pack saved before its node ids were renamed (``HyperLoRALoader`` ... ->
  ``HyperLoRAStudioLoader`` ...) are updated too.

A UI result gets a Note node that lists what changed; for both formats the same text is returned
(the CLI writes it to stdout).  Node widget order, socket types and defaults come from the saved
``/object_info`` of this pack's nodes (``graph_format.NODE_SPECS_FILE``); no ComfyUI is needed.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import HyperLoRAError, WorkflowError
from ..spec import NODE_PREFIX
from .core_nodes import CORE_NODE_TYPES, CORE_VERSION
from .graph_format import (NOTE_WIDTH, VIRTUAL_NODES, Node, Out, Workflow, note_height, build_api, build_ui,
                           input_specs, is_api_link, is_widget, load_node_specs)

log = logging.getLogger(__name__)

AUTHORS = "the authors' ComfyUI-HyperLoRA plugin"
AUTHORS_VERSION = "1.0.0"
TOOL = "python -m hyperlora.tools.convert_workflow"

# This pack's nodes the converter writes (their specs: graph_format.NODE_SPECS_FILE).
OLD_PREFIX = "HyperLoRA"              # this pack's node ids before the rename (issue 14)
LOADER = NODE_PREFIX + "Loader"
IDENTITY = NODE_PREFIX + "IdentityFromImages"
BUILD = NODE_PREFIX + "BuildLoRA"
APPLY = NODE_PREFIX + "Apply"
APPLY_IMAGES = NODE_PREFIX + "ApplyFromImages"
EXPORT = NODE_PREFIX + "ExportLoRA"
TEXT_ENCODE = "CLIPTextEncode"        # core replacements of other packs' nodes (unless --keep-other-packs)
IMAGE_BATCH = "ImageBatch"
CORE_REPLACED = {"BNK_CLIPTextEncodeAdvanced": "core CLIP Text Encode (Prompt)",   # other packs' node -> core
                 "ImpactMakeImageBatch": "core Batch Images"}

AUTHORS_FACE_CHOICE = "highest_score"   # their plugin takes the first face insightface returns: the surest one
AUTHORS_DTYPE_DEFAULT = "fp16"          # the first entry of their dtype list


@dataclass(frozen=True)
class AuthorsNode:
    """One node of the authors' plugin (version 1.0.0): its sockets, widgets in order, outputs."""

    title: str
    sockets: tuple[str, ...]
    widgets: tuple[str, ...]
    outputs: tuple[str, ...]


AUTHORS_NODES: dict[str, AuthorsNode] = {
    "HyperLoRAConfig": AuthorsNode(
        "HyperLoRA Config", (),
        ("image_processor", "image_encoder", "resampler.dim", "resampler.dim_head", "resampler.heads",
         "resampler.depth", "resampler.ff_mult", "encoder_types", "face_analyzer", "id_embed_dim", "num_id_tokens",
         "hyper_dim", "lora_rank", "has_base_lora"),
        ("HYPER_LORA_CONFIG",)),
    "HyperLoRALoader": AuthorsNode("HyperLoRA Loader", ("config",), ("model", "dtype"), ("HYPER_LORA",)),
    "HyperLoRAUniLoader": AuthorsNode(
        "HyperLoRA Uni Loader", (),
        ("image_processor", "image_encoder", "encoder_types", "face_analyzer", "model", "dtype"), ("HYPER_LORA",)),
    "HyperLoRAFaceAttr": AuthorsNode("HyperLoRA Face Attr", ("hyper_lora", "images"), (), ("FACE_ATTR",)),
    "HyperLoRAIDCond": AuthorsNode("HyperLoRA ID Cond", ("hyper_lora", "images", "face_attr"),
                                   ("grayscale", "remove_background"), ("ID_COND", "IMAGE")),
    "HyperLoRABaseCond": AuthorsNode("HyperLoRA Base Cond", ("hyper_lora", "images", "face_attr"),
                                     ("crop", "crop_scale_LRTB", "safe_crop"), ("BASE_COND", "IMAGE")),
    "HyperLoRAGenerateIDLoRA": AuthorsNode("HyperLoRA Generate ID LoRA", ("hyper_lora", "id_cond"), (), ("LORA",)),
    "HyperLoRAGenerateBaseLoRA": AuthorsNode("HyperLoRA Generate Base LoRA", ("hyper_lora", "base_cond"), (),
                                             ("LORA",)),
    "HyperLoRAApplyLoRA": AuthorsNode("HyperLoRA Apply LoRA", ("model", "lora"), ("weight",), ("MODEL",)),
    "HyperLoRASaveLoRA": AuthorsNode("HyperLoRA Save LoRA", ("lora",), ("filename_prefix",), ()),
    "HyperLoRAUniGenerateIDLoRA": AuthorsNode("HyperLoRA Uni Generate ID LoRA", ("hyper_lora", "images"),
                                              ("grayscale", "remove_background"), ("LORA",)),
}
# Config widgets that describe the architecture: this pack reads it from the weights.
ARCHITECTURE_WIDGETS = ("resampler.dim", "resampler.dim_head", "resampler.heads", "resampler.depth",
                        "resampler.ff_mult", "encoder_types", "id_embed_dim", "num_id_tokens", "hyper_dim",
                        "lora_rank", "has_base_lora")
BASE_COND_DEFAULTS = {"crop": True, "crop_scale_LRTB": "1,1,1,1", "safe_crop": True}   # this pack's base crop


@dataclass(frozen=True)
class OtherPackNode:
    pack: str
    instead: str        # the core-only way this pack ships


OTHER_PACK_NODES: dict[str, OtherPackNode] = {
    "BNK_CLIPTextEncodeAdvanced": OtherPackNode(
        "ComfyUI_ADV_CLIP_emb", "the core 'CLIP Text Encode (Prompt)' node (put in without --keep-other-packs; the "
        "text carries over, token_normalization and weight_interpretation do not: core reads (word:1.2) its own way)"),
    "ImpactMakeImageBatch": OtherPackNode(
        "ComfyUI-Impact-Pack", "the core 'Batch Images' node, as in workflow t2i_several_photos (put in without "
        "--keep-other-packs; it resizes later photos to the first one's size)"),
    "FaceDetailer": OtherPackNode(
        "ComfyUI-Impact-Pack", "workflow face_detailer: the face cropped, re-rendered with the identity and pasted "
        "back by core nodes and HyperLoRA Studio's Face Mask, Crop by Mask and Paste by Mask (or face_inpaint)"),
    "UltralyticsDetectorProvider": OtherPackNode(
        "ComfyUI-Impact-Subpack", "HyperLoRA Studio Face Mask, which finds the face with the Loader's face "
        "analyser (workflow face_inpaint)"),
    "InstantIDModelLoader": OtherPackNode(
        "ComfyUI_InstantID", "workflow instantid_controlnet: InstantID's keypoint ControlNet through the core "
        "ControlNet nodes and HyperLoRA Studio Face Keypoints (no core node gives InstantID's face embedding)"),
    "InstantIDFaceAnalysis": OtherPackNode("ComfyUI_InstantID", "as for InstantIDModelLoader"),
    "ApplyInstantID": OtherPackNode("ComfyUI_InstantID", "as for InstantIDModelLoader"),
    "ApplyInstantIDAdvanced": OtherPackNode("ComfyUI_InstantID", "as for InstantIDModelLoader"),
}
FRONTEND_PASSTHROUGH = ("Reroute",)


# --------------------------------------------------------------------------- the loaded graph

@dataclass
class Source:
    """A parsed node of the input workflow."""

    id: int | str
    type: str
    title: str | None                        # a title the user gave, else None
    pos: tuple[float, float]
    size: tuple[float, float]
    mode: int
    values: dict[str, Any]                   # widget values by name (authors' nodes), else {}
    links: dict[str, tuple[int | str, int]]  # socket name -> (source node id, output index)
    raw: dict[str, Any]
    widget_links: list[str] = field(default_factory=list)   # UI: widgets fed by a link (e.g. a primitive)


@dataclass
class Parsed:
    fmt: str                                  # "ui" or "api"
    nodes: dict[int | str, Source]
    order: list[int | str]


Ref = tuple[Any, int]   # an output of the input workflow: (node id, output index)


@dataclass
class Conversion:
    """The converted workflow (same format as the input) and the note that explains the changes."""

    workflow: dict[str, Any]
    fmt: str
    note: str
    replaced: list[str]
    kept_other_packs: list[str]
    needs_packs: list[str] = field(default_factory=list)   # one line per kept node that core ComfyUI lacks


def _xy(value: Any, default: tuple[float, float]) -> tuple[float, float]:
    if isinstance(value, (list, tuple)) and len(value) >= 2:
        return float(value[0]), float(value[1])
    if isinstance(value, dict) and "0" in value and "1" in value:
        return float(value["0"]), float(value["1"])
    return default


def detect_format(doc: Any, source: str) -> str:
    """``"ui"`` or ``"api"``; :class:`WorkflowError` naming ``source`` for anything else."""
    if isinstance(doc, dict) and isinstance(doc.get("nodes"), list) and isinstance(doc.get("links"), list):
        return "ui"
    if isinstance(doc, dict) and doc and all(isinstance(v, dict) and "class_type" in v for v in doc.values()):
        return "api"
    raise WorkflowError(
        f"{source} is not a ComfyUI workflow: expected the UI format (an object with 'nodes' and 'links', what "
        f"ComfyUI's Workflow > Save writes) or the API format (an object of nodes with 'class_type', what "
        f"Workflow > Export (API) writes). Save the workflow from ComfyUI again and convert that file.")


def _parse_ui(doc: dict[str, Any], source: str) -> Parsed:
    link_table: dict[int, tuple[int, int]] = {}
    for link in doc["links"]:
        if isinstance(link, list) and len(link) >= 5:
            link_table[link[0]] = (link[1], link[2])
        elif isinstance(link, dict) and {"id", "origin_id", "origin_slot"} <= set(link):
            link_table[link["id"]] = (link["origin_id"], link["origin_slot"])
        else:
            raise WorkflowError(f"{source}: the link {link!r} is not a ComfyUI link ([id, from node, from slot, to "
                                f"node, to slot, type]). Open the workflow in ComfyUI, save it again and convert "
                                f"that file.")
    nodes: dict[int | str, Source] = {}
    order: list[int | str] = []
    for raw in doc["nodes"]:
        if not isinstance(raw, dict) or "id" not in raw or "type" not in raw:
            raise WorkflowError(f"{source}: a node without 'id' and 'type' ({str(raw)[:80]}); this is not a ComfyUI "
                                f"workflow. Save the workflow from ComfyUI again and convert that file.")
        links: dict[str, tuple[int | str, int]] = {}
        widget_links: list[str] = []
        for inp in raw.get("inputs") or []:
            link_id = inp.get("link")
            if link_id is None:
                continue
            if link_id not in link_table:
                log.warning("%s: node %s input '%s' names link %s, which the workflow does not have; left unlinked",
                            source, raw["id"], inp.get("name"), link_id)
                continue
            links[inp["name"]] = link_table[link_id]
            if "widget" in inp:
                widget_links.append(inp["name"])
        title = raw.get("title")
        authors = AUTHORS_NODES.get(raw["type"])
        if authors is not None and title == authors.title:
            title = None
        nodes[raw["id"]] = Source(id=raw["id"], type=raw["type"], title=title, pos=_xy(raw.get("pos"), (0.0, 0.0)),
                                  size=_xy(raw.get("size"), (320.0, 100.0)), mode=int(raw.get("mode", 0) or 0),
                                  values={}, links=links, raw=raw, widget_links=widget_links)
        order.append(raw["id"])
    return Parsed("ui", nodes, order)


def _parse_api(doc: dict[str, Any]) -> Parsed:
    nodes: dict[int | str, Source] = {}
    for nid, raw in doc.items():
        links = {k: (str(v[0]), int(v[1])) for k, v in raw.get("inputs", {}).items() if is_api_link(v)}
        title = raw.get("_meta", {}).get("title")
        authors = AUTHORS_NODES.get(raw["class_type"])
        if authors is not None and title == authors.title:
            title = None
        nodes[nid] = Source(id=nid, type=raw["class_type"], title=title, pos=(0.0, 0.0), size=(320.0, 100.0),
                            mode=0, values={}, links=links, raw=raw)
    return Parsed("api", nodes, list(doc))


def _version_error(source: str, node: Source, found: str, spec: AuthorsNode) -> WorkflowError:
    return WorkflowError(
        f"{source}: node #{node.id} {node.type} has {found}, but {AUTHORS}'s {node.type} (version {AUTHORS_VERSION}, "
        f"the one this converter knows) has the sockets {list(spec.sockets)} and the widgets {list(spec.widgets)}. "
        f"The workflow was saved with another version of their plugin: replace that node by hand with the "
        f"HyperLoRA Studio node the README's 'Opening the authors' workflows' table names, or open the workflow "
        f"with their version {AUTHORS_VERSION}, save it and convert that file.")


def _read_authors_values(parsed: Parsed, node: Source, spec: AuthorsNode, source: str) -> None:
    """Fill ``node.values`` by widget name; :class:`WorkflowError` when the node is of another version."""
    if parsed.fmt == "ui":
        values = node.raw.get("widgets_values") or []
        names = [i.get("name") for i in node.raw.get("inputs") or []]
        if not isinstance(values, list) or len(values) != len(spec.widgets):
            raise _version_error(source, node, f"the widget values {values!r}", spec)
        if not set(names) <= set(spec.sockets) | set(spec.widgets):
            raise _version_error(source, node, f"the inputs {names}", spec)
        node.values = dict(zip(spec.widgets, values))
        return
    inputs = node.raw.get("inputs", {})
    if not set(inputs) <= set(spec.sockets) | set(spec.widgets) or not set(spec.widgets) <= set(inputs):
        raise _version_error(source, node, f"the inputs {sorted(inputs)}", spec)
    node.values = {k: inputs[k] for k in spec.widgets}


# --------------------------------------------------------------------------- conversion

class _Converter:
    def __init__(self, parsed: Parsed, specs: dict[str, Any], source: str, core_nodes: bool) -> None:
        self.p = parsed
        self.specs = specs
        self.source = source
        self.core_nodes = core_nodes
        self.out_nodes: list[Node] = []
        self.pending: list[tuple[Node, str, Ref]] = []     # (our node, input name, old source)
        self.outputs: dict[Ref, Out | Ref | None] = {}     # old output -> new output, forward to old, or dropped
        self.replaced: list[str] = []
        self.carried: dict[str, None] = {}
        self.changed: dict[str, None] = {}
        self.dropped: dict[str, None] = {}                 # ordered sets: one line however many nodes say it
        self.other: dict[str, list[int | str]] = {}
        self.warnings: list[str] = []
        self.merged: dict[int | str, int | str] = {}      # Uni Generate id <-> Apply LoRA id, both ways
        numeric = [int(i) for i in parsed.nodes if str(i).isdigit()]
        self.next_id = max(numeric, default=0) + 1
        self.consumers: dict[Ref, list[tuple[int | str, str]]] = {}
        for n in parsed.nodes.values():
            for name, ref in n.links.items():
                self.consumers.setdefault(ref, []).append((n.id, name))
        model_type = specs[LOADER]["output"][0]
        identity_type = specs[IDENTITY]["output"][0]
        lora_type = specs[BUILD]["output"][0]
        # socket types of both older worlds -> this pack's (kept Reroutes, renamed old nodes)
        self.type_map = {"HYPER_LORA": model_type, "HYPER_LORA_ID": identity_type, "ID_COND": identity_type,
                         "BASE_COND": identity_type, "LORA": lora_type}

    # ---------------------------------------------------------------- helpers

    def new_id(self) -> int | str:
        nid = self.next_id
        self.next_id += 1
        return nid if self.p.fmt == "ui" else str(nid)

    def title(self, type_: str) -> str:
        return str(self.specs[type_]["display_name"])

    def add(self, type_: str, old: Source, *, nid: int | str | None = None, pos: tuple[float, float] | None = None,
            title: str | None = None, **values: Any) -> Node:
        node = Node(old.id if nid is None else nid, type_, title or old.title or self.title(type_), pos or old.pos,
                    values=values, width=max(320.0, old.size[0]), mode=old.mode)
        self.out_nodes.append(node)
        return node

    def link(self, node: Node, name: str, ref: Ref | None) -> None:
        if ref is not None:
            self.pending.append((node, name, ref))

    def label(self, node: Source) -> str:
        spec = AUTHORS_NODES.get(node.type)
        return f"#{node.id} {spec.title if spec else node.type}"

    def ours(self, node: Node) -> str:
        return f"#{node.id} {self.title(node.type)}"

    def source_of(self, node: Source, name: str) -> Source | None:
        ref = node.links.get(name)
        return self.p.nodes.get(ref[0]) if ref else None

    # ---------------------------------------------------------------- rules

    def loader(self, node: Source, config: Source | None) -> None:
        v = node.values
        cfg = config.values if config else v if node.type == "HyperLoRAUniLoader" else {}
        dtype = v.get("dtype", AUTHORS_DTYPE_DEFAULT)
        ours_dtype = "auto" if dtype == AUTHORS_DTYPE_DEFAULT else dtype
        values = {"model": v.get("model", ""), "dtype": ours_dtype, "provider": "auto"}
        if "image_encoder" in cfg:
            values["clip_vision"] = cfg["image_encoder"]
        if "face_analyzer" in cfg:
            values["insightface"] = cfg["face_analyzer"]
        new = self.add(LOADER, node, **values)
        self.outputs[(node.id, 0)] = new[0]
        parts = f"{self.label(config)} + {self.label(node)}" if config else self.label(node)
        self.replaced.append(f"{parts} -> {self.ours(new)}")
        self.carried.update(dict.fromkeys(["model", "CLIP (their image_encoder -> clip_vision)",
                                           "face analyser (their face_analyzer -> insightface)"]))
        if dtype == AUTHORS_DTYPE_DEFAULT:
            self.changed[f"dtype {dtype} -> auto (fp16 on GPUs that run it well, fp32 on the CPU; pick fp16 to "
                         f"force it)"] = None
        else:
            self.carried["dtype"] = None
        if not cfg:
            self.warnings.append(f"#{new.id}: {self.label(node)} had no Config connected: pick clip_vision and "
                                 f"insightface in the Loader")
        for name in ("model", "image_encoder", "face_analyzer"):
            if cfg.get(name, v.get(name)) == "Not found!":
                self.warnings.append(f"#{new.id}: their '{name}' list showed 'Not found!' when the workflow was "
                                     f"saved: pick the folder in the Loader")
        arch = [f"{k} {cfg[k]!r}" for k in ARCHITECTURE_WIDGETS if k in cfg]
        if "image_processor" in cfg:
            arch.append(f"image_processor {cfg['image_processor']!r} (found from the CLIP folder's name)")
        if arch:
            self.dropped[f"{self.label(config or node)}: " + ", ".join(arch)
                         + "; this pack reads the architecture from the model's weights"] = None

    def face_values(self, node: Source) -> dict[str, Any]:
        """Face settings of our identity nodes from their ID Cond / Uni Generate (others: our defaults)."""
        values: dict[str, Any] = {"face_choice": AUTHORS_FACE_CHOICE}
        for name in ("grayscale", "remove_background"):
            if name in node.values:
                values[name] = bool(node.values[name])
                self.carried[name] = None
        self.changed[f"face_choice {AUTHORS_FACE_CHOICE}: the face the detector is surest of, as their plugin "
                     f"took; 'largest' is this pack's default"] = None
        return values

    def identity(self, node: Source) -> Node:
        new = self.add(IDENTITY, node, **self.face_values(node))
        self.link(new, "hyper_lora", node.links.get("hyper_lora"))
        self.link(new, "images", node.links.get("images"))
        return new

    def cond(self, node: Source) -> None:
        new = self.identity(node)
        self.outputs[(node.id, 0)] = new[0]
        self.outputs[(node.id, 1)] = new[1]
        face_attr = self.source_of(node, "face_attr")
        parts = f"{self.label(face_attr)} + {self.label(node)}" if face_attr else self.label(node)
        self.replaced.append(f"{parts} -> {self.ours(new)}")
        if face_attr is not None and face_attr.links.get("images") != node.links.get("images"):
            self.warnings.append(f"#{new.id}: {self.label(face_attr)} looked at other images than "
                                 f"{self.label(node)}; the identity now finds the faces in the images of "
                                 f"{self.label(node)}")
        if node.type == "HyperLoRABaseCond":
            changed = {k: node.values[k] for k, d in BASE_COND_DEFAULTS.items() if node.values.get(k) != d}
            if changed:
                self.dropped[f"{self.label(node)}: " + ", ".join(f"{k} {v!r}" for k, v in changed.items())
                             + " (this pack crops the base image as their defaults do)"] = None

    def generate(self, node: Source, kind: str, cond_input: str) -> None:
        new = self.add(BUILD, node, kind=kind)
        self.link(new, "hyper_lora", node.links.get("hyper_lora"))
        self.link(new, "identity", node.links.get(cond_input))
        self.outputs[(node.id, 0)] = new[0]
        self.replaced.append(f"{self.label(node)} -> {self.ours(new)} (kind {kind})")

    def uni_generate(self, node: Source) -> None:
        if node.id in self.merged:
            return                                  # became part of an Apply from Images
        ident = self.identity(node)
        build = self.add(BUILD, node, nid=self.new_id(), pos=(node.pos[0], node.pos[1] + node.size[1] + 60),
                         title=self.title(BUILD), kind="id")
        self.link(build, "hyper_lora", node.links.get("hyper_lora"))
        build.links["identity"] = ident[0]
        self.outputs[(node.id, 0)] = build[0]
        self.replaced.append(f"{self.label(node)} -> {self.ours(ident)} + {self.ours(build)}")

    def mergeable_uni(self, apply: Source) -> Source | None:
        """The Uni Generate feeding only this Apply LoRA (both become one Apply from Images), else None."""
        ref = apply.links.get("lora")
        uni = self.p.nodes.get(ref[0]) if ref else None
        if uni is None or uni.type != "HyperLoRAUniGenerateIDLoRA" or uni.mode != apply.mode:
            return None
        if self.consumers.get((uni.id, 0), []) != [(apply.id, "lora")]:
            return None
        return uni

    def apply(self, node: Source) -> None:
        strength = node.values.get("weight")
        self.carried["strength (their weight)"] = None
        uni = self.p.nodes[self.merged[node.id]] if node.id in self.merged else None
        if uni is not None:
            new = self.add(APPLY_IMAGES, node, strength=strength, **self.face_values(uni))
            self.link(new, "model", node.links.get("model"))
            self.link(new, "hyper_lora", uni.links.get("hyper_lora"))
            self.link(new, "images", uni.links.get("images"))
            self.replaced.append(f"{self.label(uni)} + {self.label(node)} -> {self.ours(new)}")
        else:
            new = self.add(APPLY, node, strength=strength)
            self.link(new, "model", node.links.get("model"))
            self.link(new, "lora", node.links.get("lora"))
            self.replaced.append(f"{self.label(node)} -> {self.ours(new)}")
        self.outputs[(node.id, 0)] = new[0]

    def save_lora(self, node: Source) -> None:
        new = self.add(EXPORT, node, filename_prefix=node.values.get("filename_prefix"))
        self.link(new, "lora", node.links.get("lora"))
        self.replaced.append(f"{self.label(node)} -> {self.ours(new)}")
        self.changed["Export LoRA writes into models/loras/ (their Save LoRA wrote into output/), so the core "
                     "Load LoRA node lists the file"] = None

    def absorbed(self, node: Source, consumers_ok: tuple[str, ...]) -> None:
        """Config / Face Attr: folded into the nodes they fed; a link to anything else is dropped."""
        self.outputs[(node.id, 0)] = None
        for target, name in self.consumers.get((node.id, 0), []):
            if self.p.nodes[target].type not in consumers_ok:
                self.warnings.append(f"the link from {self.label(node)} to #{target} '{name}' was dropped "
                                     f"(nothing of this pack gives that object)")

    def keep(self, node: Source) -> Node:
        raw = copy.deepcopy(node.raw)
        if self.p.fmt == "ui" and node.type in FRONTEND_PASSTHROUGH:
            for item in (raw.get("inputs") or []) + (raw.get("outputs") or []):
                item["type"] = self.type_map.get(item.get("type"), item.get("type"))
        new = Node(node.id, node.type, node.title or node.type, node.pos, raw=raw, mode=node.mode)
        self.out_nodes.append(new)
        for name, ref in node.links.items():
            self.link(new, name, ref)
        for i in range(self._n_outputs(node)):
            self.outputs[(node.id, i)] = new[i]
        other = OTHER_PACK_NODES.get(node.type)
        if other is not None:
            self.other.setdefault(node.type, []).append(node.id)
        return new

    def _n_outputs(self, node: Source) -> int:
        if self.p.fmt == "ui":
            return len(node.raw.get("outputs") or [])
        return 1 + max((slot for nid, slot in self.consumers if nid == node.id), default=-1)

    def renamed_old(self, node: Source, new_type: str) -> None:
        raw = copy.deepcopy(node.raw)
        if self.p.fmt == "ui":
            raw["type"] = new_type
            raw.setdefault("properties", {})["Node name for S&R"] = new_type
            for item in (raw.get("inputs") or []) + (raw.get("outputs") or []):
                item["type"] = self.type_map.get(item.get("type"), item.get("type"))
        else:
            raw["class_type"] = new_type
        old_title = str(self.specs[new_type]["display_name"]).replace("HyperLoRA Studio", "HyperLoRA", 1)
        title = node.title if node.title and node.title != old_title else self.title(new_type)
        if self.p.fmt == "ui":
            raw["title"] = title
        else:
            raw.setdefault("_meta", {})["title"] = title
        new = Node(node.id, new_type, title, node.pos, raw=raw, mode=node.mode)
        self.out_nodes.append(new)
        for name, ref in node.links.items():
            self.link(new, name, ref)
        for i in range(len(self.specs[new_type]["output"])):
            self.outputs[(node.id, i)] = new[i]
        self.replaced.append(f"#{node.id} {node.type} (this pack, before the rename) -> "
                             f"#{node.id} {self.title(new_type)}")

    def text_encode(self, node: Source) -> None:
        text = (node.raw.get("widgets_values") or [""])[0] if self.p.fmt == "ui" else node.raw["inputs"].get("text", "")
        if not isinstance(text, str):
            self.keep(node)
            return
        new = self.add(TEXT_ENCODE, node, title=node.title or self.title(TEXT_ENCODE), text=text)
        self.link(new, "clip", node.links.get("clip"))
        self.outputs[(node.id, 0)] = new[0]
        self.replaced.append(f"#{node.id} {node.type} -> {self.ours(new)} (core)")
        self.changed[f"{node.type} -> core {self.title(TEXT_ENCODE)}: the text carries over; its token_normalization "
                     f"and weight_interpretation do not (core reads (word:1.2) weights its own way)"] = None

    def image_batch(self, node: Source) -> None:
        def number(name: str) -> int:
            m = re.fullmatch(r"image(\d+)", name)
            return int(m.group(1)) if m else 1 << 30

        images = [node.links[n] for n in sorted(node.links, key=number) if number(n) < 1 << 30]
        if not images:
            self.keep(node)
            return
        if len(images) == 1:
            self.outputs[(node.id, 0)] = images[0]        # a batch of one is its image
            self.replaced.append(f"#{node.id} {node.type} (one image) -> removed, its image goes straight on")
            return
        batch = self.add(IMAGE_BATCH, node)
        self.link(batch, "image1", images[0])
        self.link(batch, "image2", images[1])
        for i, ref in enumerate(images[2:], start=1):          # more photos: a chain of Batch Images
            more = self.add(IMAGE_BATCH, node, nid=self.new_id(), pos=(node.pos[0], node.pos[1] + 120 * i),
                            title=self.title(IMAGE_BATCH))
            more.links["image1"] = batch[0]
            self.link(more, "image2", ref)
            batch = more
        self.outputs[(node.id, 0)] = batch[0]
        self.replaced.append(f"#{node.id} {node.type} -> {len(images) - 1} core {self.title(IMAGE_BATCH)} node(s)")
        self.changed[f"{node.type} -> core {self.title(IMAGE_BATCH)}: it resizes later photos to the first one's "
                     f"size"] = None

    # ---------------------------------------------------------------- driver

    def classify(self, node: Source) -> str:
        """'authors', 'old' (this pack before the rename), 'ours' or 'other'."""
        t = node.type
        if t == "HyperLoRALoader":              # the one id both packs used
            return self.classify_loader(node)
        if t in AUTHORS_NODES:
            return "authors"
        if t.startswith(NODE_PREFIX):
            return "ours"
        if t.startswith(OLD_PREFIX) and NODE_PREFIX + t[len(OLD_PREFIX):] in self.specs:
            return "old"
        if t.startswith(OLD_PREFIX):
            raise WorkflowError(
                f"{self.source}: node #{node.id} has the type {t}, which is neither a node of {AUTHORS} "
                f"(version {AUTHORS_VERSION}: {', '.join(AUTHORS_NODES)}) nor of this pack. It is probably a node "
                f"of a newer version of their plugin: replace it by hand with the HyperLoRA Studio node the README's "
                f"'Opening the authors' workflows' table names, or remove it, then convert again.")
        return "other"

    def classify_loader(self, node: Source) -> str:
        """Their Loader (a 'config' socket, widgets model + dtype) or this pack's from before the rename."""
        ours_widgets = [n for n, t, o, _ in input_specs(self.specs[LOADER]) if is_widget(t, o)]
        theirs = AUTHORS_NODES["HyperLoRALoader"]
        if self.p.fmt == "ui":
            names = {i.get("name") for i in node.raw.get("inputs") or []}
            count = len(node.raw.get("widgets_values") or [])
            if "config" in names or count == len(theirs.widgets):
                return "authors"
            if count == len(ours_widgets):
                return "old"
        else:
            keys = set(node.raw.get("inputs", {}))
            if "config" in keys or keys <= set(theirs.sockets) | set(theirs.widgets):
                return "authors"
            if keys == set(ours_widgets):
                return "old"
        raise _version_error(self.source, node, "neither the inputs of their Loader nor of this pack's old one",
                             theirs)

    def run(self) -> None:
        kinds = {nid: self.classify(n) for nid, n in self.p.nodes.items()}
        if not any(k in ("authors", "old") for k in kinds.values()):
            raise WorkflowError(
                f"{self.source} has no node of {AUTHORS} ({', '.join(AUTHORS_NODES)}) and no node of this pack "
                f"from before its rename: there is nothing to convert. Open it in ComfyUI as it is.")
        for nid, n in self.p.nodes.items():
            if kinds[nid] == "authors":
                _read_authors_values(self.p, n, AUTHORS_NODES[n.type], self.source)
                for name in n.widget_links:
                    self.warnings.append(f"{self.label(n)}: the link into its widget '{name}' was replaced by "
                                         f"the value saved with the workflow")
                    del n.links[name]
        for nid, n in self.p.nodes.items():      # a Uni Generate feeding only one Apply LoRA: one node
            if n.type == "HyperLoRAApplyLoRA" and kinds[nid] == "authors":
                uni = self.mergeable_uni(n)
                if uni is not None:
                    self.merged[uni.id], self.merged[nid] = nid, uni.id
        for nid in self.p.order:
            n = self.p.nodes[nid]
            kind = kinds[nid]
            if kind == "old":
                self.renamed_old(n, NODE_PREFIX + n.type[len(OLD_PREFIX):])
            elif kind == "authors":
                self.convert_authors(n)
            elif self.core_nodes and n.type == "BNK_CLIPTextEncodeAdvanced":
                self.text_encode(n)
            elif self.core_nodes and n.type == "ImpactMakeImageBatch":
                self.image_batch(n)
            else:
                self.keep(n)
        self.resolve_links()

    def convert_authors(self, n: Source) -> None:
        t = n.type
        if t == "HyperLoRAConfig":
            self.absorbed(n, ("HyperLoRALoader",))
        elif t == "HyperLoRAFaceAttr":
            self.absorbed(n, ("HyperLoRAIDCond", "HyperLoRABaseCond"))
        elif t in ("HyperLoRALoader", "HyperLoRAUniLoader"):
            config = self.source_of(n, "config")
            self.loader(n, config if config is not None and config.type == "HyperLoRAConfig" else None)
        elif t in ("HyperLoRAIDCond", "HyperLoRABaseCond"):
            self.cond(n)
        elif t == "HyperLoRAGenerateIDLoRA":
            self.generate(n, "id", "id_cond")
        elif t == "HyperLoRAGenerateBaseLoRA":
            self.generate(n, "base", "base_cond")
        elif t == "HyperLoRAApplyLoRA":
            self.apply(n)
        elif t == "HyperLoRAUniGenerateIDLoRA":
            self.uni_generate(n)
        elif t == "HyperLoRASaveLoRA":
            self.save_lora(n)

    def resolve(self, ref: Ref) -> Out | None:
        seen = set()
        target: Any = ref
        while isinstance(target, tuple):
            if target in seen or target not in self.outputs:
                return None
            seen.add(target)
            target = self.outputs[target]
        return target

    def resolve_links(self) -> None:
        for node, name, ref in self.pending:
            if ref[0] not in self.p.nodes:
                continue
            out = self.resolve(ref)
            if out is None:
                continue
            node.links[name] = out


def _first_number(line: str) -> int:
    m = re.search(r"#(\d+)", line)
    return int(m.group(1)) if m else 0


def _note_text(conv: _Converter, source: str) -> str:
    lines = [f"Converted from {AUTHORS} ({source}) to HyperLoRA Studio by {TOOL}.", "", "Nodes replaced:"]
    lines += [f"- {r}" for r in sorted(conv.replaced, key=_first_number)]
    if conv.carried:
        lines += ["", "Carried over: " + ", ".join(conv.carried) + "."]
    if conv.changed:
        lines += ["", "Changed:"] + [f"- {c}" for c in conv.changed]
    if conv.dropped:
        lines += ["", "Dropped:"]
        lines += [f"- {d}" for d in conv.dropped]
    if conv.other:
        lines += ["", "Nodes of other packs, kept as they were (install those packs, or use the core-only way "
                      "this pack ships):"]
        for type_, ids in conv.other.items():
            other = OTHER_PACK_NODES[type_]
            numbers = ", ".join(f"#{i}" for i in sorted(ids, key=lambda i: (len(str(i)), str(i))))
            lines.append(f"- {numbers} {type_} ({other.pack}): instead, {other.instead}")
    if conv.warnings:
        lines += ["", "Check:"] + [f"- {w}" for w in conv.warnings]
    return "\n".join(lines)


def needs_packs_lines(conv: "_Converter") -> list[str]:
    """One line per node of the result that neither ComfyUI's core (version ``CORE_VERSION``) nor this
    pack registers: the pack it needs and what to do instead, in node-id order."""
    lines = []
    for node in sorted(conv.out_nodes, key=lambda n: _first_number(f"#{n.id}")):
        t = node.type
        if t in CORE_NODE_TYPES or t in VIRTUAL_NODES or t.startswith(NODE_PREFIX) or t in conv.specs:
            continue
        other = OTHER_PACK_NODES.get(t)
        if other is None:
            lines.append(f"#{node.id} {t} needs a custom-node pack (it is not a node of ComfyUI {CORE_VERSION} nor "
                         f"of this pack): install that pack, or replace the node by hand")
        elif t in CORE_REPLACED:
            lines.append(f"#{node.id} {t} needs {other.pack} (kept by --keep-other-packs): without that option "
                         f"{CORE_REPLACED[t]} replaces it")
        else:
            instead = other.instead
            if instead.startswith("as for ") and instead[7:] in OTHER_PACK_NODES:
                instead = OTHER_PACK_NODES[instead[7:]].instead
            lines.append(f"#{node.id} {t} needs {other.pack}, which no core node replaces: install that pack, or "
                         f"instead use {instead}")
    return lines


def convert(doc: Any, *, source: str = "the workflow", core_nodes: bool = True,
            specs: dict[str, Any] | None = None) -> Conversion:
    """Convert a loaded workflow (UI or API format) of the authors' plugin; ``source`` names it in messages.

    ``core_nodes`` (the default): other packs' nodes with a core equivalent become core nodes;
    False keeps them (``--keep-other-packs``)."""
    specs = load_node_specs() if specs is None else specs
    if isinstance(doc, dict) and isinstance(doc.get("prompt"), dict) and "nodes" not in doc:
        doc = doc["prompt"]
    fmt = detect_format(doc, source)
    _check_subgraphs(doc, source)
    parsed = _parse_ui(doc, source) if fmt == "ui" else _parse_api(doc)
    conv = _Converter(parsed, specs, source, core_nodes)
    conv.run()
    note = _note_text(conv, source)
    wf = Workflow(Path(source).stem, "converted", "", "")
    wf.nodes = conv.out_nodes
    if fmt == "ui":
        top = min([n.pos[1] for n in wf.nodes] + [g["bounding"][1] for g in doc.get("groups") or []
                                                  if isinstance(g, dict) and "bounding" in g])
        left = min(n.pos[0] for n in wf.nodes)
        wf.nodes.insert(0, Node(conv.new_id(), "Note", "Converted from the authors' HyperLoRA plugin",
                                (left, top - note_height(note) - 60), values={"text": note}, width=NOTE_WIDTH))
        wf.kept_groups = [g for g in doc.get("groups") or [] if isinstance(g, dict)]
        wf.extra = {k: v for k, v in (doc.get("extra") or {}).items() if k != "ds"}
        wf.extra["hyperlora_converted_from"] = Path(source).name
        result = build_ui(wf, specs)
    else:
        result = build_api(wf, specs)
    return Conversion(result, fmt, note, conv.replaced, sorted(conv.other), needs_packs_lines(conv))


def _check_subgraphs(doc: dict[str, Any], source: str) -> None:
    definitions = doc.get("definitions") if isinstance(doc.get("definitions"), dict) else {}
    for sub in definitions.get("subgraphs") or []:
        inner = [n.get("type") for n in (sub.get("nodes") or []) if isinstance(n, dict)]
        found = sorted({t for t in inner if t in AUTHORS_NODES})
        if found:
            raise WorkflowError(
                f"{source}: the subgraph '{sub.get('name', sub.get('id'))}' holds nodes of {AUTHORS} "
                f"({', '.join(found)}), "
                f"which this converter does not reach inside subgraphs. In ComfyUI, unpack the subgraph (right-click > "
                f"Unpack Subgraph), save the workflow and convert that file.")


def convert_file(src: str | Path, dst: str | Path, *, core_nodes: bool = True) -> Conversion:
    """Read ``src``, convert it, write ``dst`` (same format).  :class:`WorkflowError` names the file and the fix."""
    src, dst = Path(src), Path(dst)
    try:
        text = src.read_text(encoding="utf-8")
    except OSError as e:
        raise WorkflowError(f"Cannot read the workflow {src}: {e.strerror or e}. Give the path of a workflow .json "
                            f"saved from ComfyUI.") from e
    except UnicodeDecodeError as e:
        raise WorkflowError(f"{src} is not a text file ({e.reason}); give the workflow .json saved from ComfyUI "
                            f"(Workflow > Save), not an image or another file.") from e
    if src.resolve() == dst.resolve():
        raise WorkflowError(f"The output {dst} is the input file; give another name so the original stays as it is.")
    try:
        doc = json.loads(text)
        conv = convert(doc, source=src.name, core_nodes=core_nodes)
        out = json.dumps(conv.workflow, indent=2, ensure_ascii=False) + "\n"
    except json.JSONDecodeError as e:
        raise WorkflowError(f"{src} is not JSON (line {e.lineno}, column {e.colno}: {e.msg}); give the workflow .json "
                            f"saved from ComfyUI (Workflow > Save or Export (API)).") from e
    except RecursionError as e:
        raise WorkflowError(f"{src} is JSON nested too deeply to be a ComfyUI workflow; give the workflow .json "
                            f"saved from ComfyUI (Workflow > Save or Export (API)).") from e
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(out, encoding="utf-8")
    except OSError as e:
        raise WorkflowError(f"Cannot write {dst}: {e.strerror or e}. Choose a folder you can write to.") from e
    return conv


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=TOOL, description="Rewrite a workflow of the authors' ComfyUI-HyperLoRA plugin (UI or API format) "
                               "into HyperLoRA Studio's nodes and core ComfyUI nodes.")
    parser.add_argument("theirs", type=Path, help="the authors' workflow .json")
    parser.add_argument("ours", type=Path, help="where to write the converted workflow (same format)")
    parser.add_argument("--keep-other-packs", action="store_true",
                        help="keep other packs' nodes that have a core equivalent (advanced CLIP text encoder, "
                             "Impact's Make Image Batch) instead of replacing them by core nodes")
    parser.add_argument("--core-nodes", action="store_true",
                        help="replace other packs' nodes by core ones where one exists (now the default; the "
                             "option is kept for old scripts)")
    args = parser.parse_args(argv)
    if args.keep_other_packs and args.core_nodes:
        parser.error("--keep-other-packs and --core-nodes contradict each other; give one")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        conv = convert_file(args.theirs, args.ours, core_nodes=not args.keep_other_packs)
    except HyperLoRAError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    needs = "".join(f"needs a pack: {line}\n" for line in conv.needs_packs)
    sys.stdout.write(f"wrote {args.ours} ({conv.fmt.upper()} format)\n{needs}\n{conv.note}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
