"""Queue a shipped HyperLoRA API workflow on a running ComfyUI server.

``python -m hyperlora.tools.queue --workflow t2i_one_photo --image face.jpg --prompt "..."``
uploads the photo(s), fills the workflow (found by node ``class_type`` and
``_meta.title``, never by fixed node ids), queues it with ``POST /prompt``,
follows the run on the ``/ws`` websocket (falls back to polling ``/history``
when no websocket client is available) and downloads the produced images.
A UI workflow (what Workflow > Save writes, e.g. one made by ``convert_workflow``) is turned into
the API format with the server's own ``/object_info``, as the front end's queue button does.

A run that ComfyUI accepted but started without some nodes (``node_errors`` in its answer to
``POST /prompt``: a missing model file, say) is never reported as a success: after downloading what
did run, :class:`PartialRunError` names each failing node, its missing file and the outputs never made.

Only the standard library is needed for HTTP; the websocket uses ``aiohttp``,
which every ComfyUI install already has.
"""

from __future__ import annotations

import argparse
import json
import logging
import mimetypes
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from ..checks import finite_float
from ..errors import HyperLoRAError, QueueError
from ..spec import NODE_PREFIX, PACK_FOLDER
from .core_nodes import CORE_NODE_TYPES, CORE_VERSION
from .graph_format import is_ui_workflow, ui_node_types
from .queue_graph import (  # noqa: F401  (re-exported: hyperlora.tools.queue is the public module)
    API_DIR, LATENTS, SAMPLERS, STRENGTH_INPUTS, WORKFLOW_DIR, ApiGraph, node_title, apply_override,
    fill_workflow, find_nodes, in_shipped_order, load_api_workflow, photo_slots, read_workflow, resolve_workflow,
    shipped_order, ui_to_api_graph,
)

logger = logging.getLogger(__name__)

DEFAULT_SERVER = "http://127.0.0.1:8188"
PARTIAL_EXIT = 3       # exit code of a run ComfyUI started without some of its outputs (1: nothing ran)
HISTORY_ATTEMPTS = 5   # reads of /history/<id> before a busy server's time-outs count as an error
AUTHORS_PREFIX = "HyperLoRA"     # the authors' plugin's node ids (ours add "Studio": NODE_PREFIX)
AUTHORS_PACK = "ComfyUI-HyperLoRA (github.com/bytedance/ComfyUI-HyperLoRA)"


def node_origin(class_type: str) -> str:
    """Where a node type comes from: ``ours``, ``authors`` (the authors' HyperLoRA plugin), ``core``
    (ComfyUI 0.3.64's own nodes) or ``other`` (another custom-node pack, or a newer ComfyUI)."""
    if class_type.startswith(NODE_PREFIX):
        return "ours"
    if class_type.startswith(AUTHORS_PREFIX):
        return "authors"
    return "core" if class_type in CORE_NODE_TYPES else "other"


# --------------------------------------------------------------------------- server client

class ComfyClient:
    """Minimal blocking client of ComfyUI's HTTP API (urllib only)."""

    def __init__(self, server: str = DEFAULT_SERVER, *, timeout: float = 30.0) -> None:
        self.server = server.rstrip("/")
        if "://" not in self.server:
            self.server = "http://" + self.server
        self.timeout = timeout

    def _down(self, reason: object) -> QueueError:
        return QueueError(f"Cannot reach ComfyUI at {self.server} ({reason}). Start ComfyUI first "
                          f"(python main.py --listen 127.0.0.1 --port 8188 in your ComfyUI folder) "
                          f"or pass --server with the address it prints.")

    def request(self, method: str, path: str, *, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        """Status and body; HTTP error statuses are returned, connection failures raise QueueError."""
        req = urllib.request.Request(self.server + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except TimeoutError as e:
            raise QueueError(f"ComfyUI at {self.server} did not answer {method} {path} within {self.timeout:.0f} s; "
                             f"it may be busy loading a model. Try again.") from e
        except (urllib.error.URLError, ConnectionError, OSError) as e:
            raise self._down(getattr(e, "reason", e)) from e

    def get_json(self, path: str) -> Any:
        status, data = self.request("GET", path)
        if status != 200:
            raise QueueError(f"ComfyUI at {self.server} answered {status} to GET {path}: {data[:300]!r}.")
        return json.loads(data)

    def object_info(self) -> dict[str, Any]:
        return self.get_json("/object_info")

    def check_nodes(self, graph: ApiGraph | list[str], info: dict[str, Any] | None = None) -> None:
        """Raise QueueError naming every node type of ``graph`` (an API graph, or a list of node types)
        the server does not have, grouped by where it comes from (this pack, the authors' plugin,
        ComfyUI's core, another pack) with the fix. ``info``: the server's ``/object_info``, if fetched."""
        info = self.object_info() if info is None else info
        types = graph if isinstance(graph, list) else [n["class_type"] for n in graph.values()]
        missing = sorted({t for t in types if t not in info})
        if not missing:
            return
        groups: dict[str, list[str]] = {}
        for m in missing:
            groups.setdefault(node_origin(m), []).append(m)
        fixes = {
            "ours": f"from {PACK_FOLDER} (this workflow needs version {__version__} or newer): put the pack in "
                    f"ComfyUI/custom_nodes/{PACK_FOLDER}, install its requirements.txt and restart ComfyUI; if it "
                    f"is installed, the console shows why it failed to import",
            "authors": f"from the authors' plugin {AUTHORS_PACK}: install it (it works beside this pack), or convert "
                       f"the workflow to {PACK_FOLDER}'s nodes with python -m hyperlora.tools.convert_workflow",
            "core": f"ComfyUI core node(s) (in ComfyUI {CORE_VERSION}): update ComfyUI to {CORE_VERSION} or newer; "
                    f"if it is that new, its console shows which core module failed to import",
            "other": f"neither ComfyUI {CORE_VERSION} core nor {PACK_FOLDER} nodes, so they come from another "
                     f"custom-node pack: install that pack (ComfyUI-Manager's 'Install Missing Custom Nodes' finds "
                     f"most) and restart ComfyUI; if they are core nodes of a newer ComfyUI, update ComfyUI",
        }
        parts = [f"{', '.join(names)}: {fixes[origin]}" for origin in ("ours", "authors", "core", "other")
                 if (names := groups.get(origin))]
        raise QueueError(f"The ComfyUI server at {self.server} lacks node type(s) used by this workflow: "
                         + "; ".join(parts) + ".")

    def upload_image(self, path: str | Path) -> str:
        """Upload a photo into ComfyUI's input folder; returns the name LoadImage takes."""
        path = Path(path)
        try:
            content = path.read_bytes()
        except OSError as e:
            raise QueueError(f"Cannot read the image {path}: {e}.") from e
        boundary = uuid.uuid4().hex
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"type\"\r\n\r\ninput\r\n"
                f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{path.name}\"\r\n"
                f"Content-Type: {ctype}\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
        status, data = self.request("POST", "/upload/image", body=body,
                                    headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        if status != 200:
            raise QueueError(f"ComfyUI at {self.server} refused the upload of {path} (HTTP {status}).")
        info = json.loads(data)
        name = info["name"]
        return f"{info['subfolder']}/{name}" if info.get("subfolder") else name

    def submit(self, graph: ApiGraph, *, client_id: str) -> str:
        """POST /prompt; returns the prompt id or raises QueueError with ComfyUI's validation messages."""
        return self.submit_prompt(graph, client_id=client_id)[0]

    def submit_prompt(self, graph: ApiGraph, *, client_id: str) -> tuple[str, dict[str, Any]]:
        """POST /prompt; (prompt id, node errors) or QueueError with ComfyUI's validation messages.

        The node errors are those of a prompt ComfyUI accepted with some outputs dropped (their nodes
        failed validation: ``{node id: {"errors": [...], "dependent_outputs": [...], "class_type": ...}}``);
        empty when the whole prompt runs."""
        body = json.dumps({"prompt": graph, "client_id": client_id}).encode()
        status, data = self.request("POST", "/prompt", body=body, headers={"Content-Type": "application/json"})
        try:
            answer = json.loads(data)
        except json.JSONDecodeError:
            answer = {}
        if status == 200 and "prompt_id" in answer:
            node_errors = answer.get("node_errors") or {}
            return str(answer["prompt_id"]), node_errors if isinstance(node_errors, dict) else {}
        raise QueueError(format_rejection(graph, answer, status))

    def history(self, prompt_id: str) -> dict[str, Any] | None:
        """The finished prompt's history entry, or None while it runs.

        A busy server (loading a checkpoint) can miss a read timeout: asked up to ``HISTORY_ATTEMPTS`` times.
        """
        attempts = HISTORY_ATTEMPTS
        for attempt in range(attempts):
            try:
                entry = self.get_json(f"/history/{urllib.parse.quote(prompt_id)}")
                return entry.get(prompt_id)
            except QueueError as e:
                if attempt == attempts - 1 or not isinstance(e.__cause__, (TimeoutError, urllib.error.URLError)):
                    raise
                logger.info("ComfyUI at %s is busy (%s); asking again", self.server, e.__cause__)
        return None

    def download(self, image: dict[str, str], out_dir: Path) -> Path:
        query = urllib.parse.urlencode({"filename": image["filename"], "subfolder": image.get("subfolder", ""),
                                        "type": image.get("type", "output")})
        status, data = self.request("GET", f"/view?{query}")
        if status != 200:
            raise QueueError(f"ComfyUI at {self.server} could not send the image {image['filename']} (HTTP {status}).")
        out_dir.mkdir(parents=True, exist_ok=True)
        target = out_dir / Path(image["filename"]).name
        target.write_bytes(data)
        return target


def format_rejection(graph: ApiGraph, answer: dict[str, Any], status: int) -> str:
    """One readable message from ComfyUI's ``{"error": ..., "node_errors": ...}`` answer."""
    err = answer.get("error") or {}
    if isinstance(err, str):
        err = {"message": err}
    lines = [f"ComfyUI rejected the workflow (HTTP {status}): {err.get('message', 'no message')}"
             + (f" - {err['details']}" if err.get("details") else "")]
    for nid, ne in (answer.get("node_errors") or {}).items():
        node = graph.get(nid, {})
        label = f"node {nid} ({ne.get('class_type', node.get('class_type', '?'))} '{node_title(node)}')"
        for e in ne.get("errors", []):
            lines.append(f"  {label}: {e.get('message', '')}: {e.get('details', '')}".rstrip(": "))
    return "\n".join(lines)


# Where ComfyUI looks for the files of common loader inputs (a value the server lacks names its folder).
FILE_FOLDERS = {"ckpt_name": "models/checkpoints", "control_net_name": "models/controlnet", "lora_name": "models/loras",
                "vae_name": "models/vae", "clip_name": "models/clip_vision or models/text_encoders",
                "unet_name": "models/diffusion_models", "model_name": "models/upscale_models",
                "image": "the input folder (pass a local photo with --image or --pose)"}


def _node_label(graph: ApiGraph, nid: str) -> str:
    node = graph.get(nid, {})
    return f"node {nid} '{node_title(node) or node.get('class_type', '?')}' ({node.get('class_type', '?')})"


def _node_error_text(error: dict[str, Any]) -> str:
    """One ComfyUI validation error, the missing file named first when it is one."""
    extra = error.get("extra_info") or {}
    if error.get("type") == "value_not_in_list" and "received_value" in extra:
        name = extra.get("input_name", "?")
        where = FILE_FOLDERS.get(name)
        fix = f": put it into ComfyUI's {where}" if where else ""
        return f"{name} '{extra['received_value']}' is not on the server{fix}"
    details = str(error.get("details", "")).strip()
    return f"{error.get('message', 'invalid')}" + (f": {details}" if details else "")


def never_made(graph: ApiGraph, node_errors: dict[str, Any]) -> list[str]:
    """Ids of the output nodes ComfyUI dropped (they depend on a node that failed validation), in id order."""
    ids = {str(o) for ne in node_errors.values() for o in ne.get("dependent_outputs", [])}
    return [nid for nid in find_nodes(graph) if nid in ids] + sorted(ids - set(graph))


def format_partial(graph: ApiGraph, node_errors: dict[str, Any]) -> str:
    """One line: the nodes ComfyUI dropped before running (with the missing file) and the outputs never made."""
    failures = []
    for nid, ne in node_errors.items():
        texts = "; ".join(_node_error_text(e) for e in ne.get("errors", [])) or "failed validation"
        failures.append(f"{_node_label(graph, str(nid))}: {texts}")
    outputs = ", ".join(_node_label(graph, nid) for nid in never_made(graph, node_errors)) or "(none named)"
    return (f"ComfyUI ran only part of the workflow: {' | '.join(failures)}. Outputs never made: {outputs}. "
            f"Fix the node(s) above and queue again.")


class PartialRunError(QueueError):
    """ComfyUI accepted the prompt but ran it without some outputs (``node_errors``); ``paths`` are the
    images that did run and were downloaded, ``never_made`` the ids of the output nodes dropped."""

    def __init__(self, message: str, *, prompt_id: str, entry: dict[str, Any], node_errors: dict[str, Any],
                 never_made: list[str], paths: Sequence[Path] = ()) -> None:
        super().__init__(message)
        self.prompt_id = prompt_id
        self.entry = entry
        self.node_errors = node_errors
        self.never_made = never_made
        self.paths = list(paths)


# --------------------------------------------------------------------------- waiting

def _name(graph: ApiGraph, nid: Any) -> str:
    """A node as the progress lines name it: its title, else its type (the id only for unknown nodes)."""
    node = graph.get(str(nid))
    if node is None:
        return f"node {nid}"
    return node_title(node) or str(node.get("class_type", f"node {nid}"))


def _log_progress(event: dict[str, Any], graph: ApiGraph) -> None:
    kind = event["type"]
    data = event.get("data", {})
    if kind == "progress":
        logger.info("%s: step %s/%s", _name(graph, data.get("node")), data.get("value"), data.get("max"))
    elif kind == "executing" and data.get("node") is not None:
        logger.info("running %s", _name(graph, data.get("node")))
    elif kind == "execution_cached" and data.get("nodes"):
        logger.info("cached: %s", ", ".join(_name(graph, n) for n in data["nodes"]))


def _wait_ws(client: ComfyClient, graph: ApiGraph, client_id: str,
             timeout: float) -> tuple[str, dict[str, Any], bool]:
    """Connect the websocket first, then submit, then follow events until our prompt ends.

    Returns (prompt id, node errors of the submission, finished); finished is False when the socket
    closed early (then poll).
    """
    import asyncio

    import aiohttp

    ws_url = client.server.replace("http", "ws", 1) + f"/ws?clientId={client_id}"

    async def run() -> tuple[str, dict[str, Any], bool]:
        async with aiohttp.ClientSession() as session:
            # no heartbeat: a server busy loading a checkpoint may answer pings late
            async with session.ws_connect(ws_url, heartbeat=None, max_msg_size=0) as ws:
                prompt_id, node_errors = await asyncio.get_running_loop().run_in_executor(
                    None, lambda: client.submit_prompt(graph, client_id=client_id))
                _log_queued(client, graph, prompt_id, node_errors)
                deadline = time.monotonic() + timeout
                while True:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise QueueError(f"Prompt {prompt_id} did not finish within {timeout:.0f} s on "
                                         f"{client.server}; it may still be running (see the ComfyUI console).")
                    try:
                        msg = await ws.receive(timeout=min(remaining, 5.0))
                    except asyncio.TimeoutError:
                        continue
                    if msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR, aiohttp.WSMsgType.CLOSING):
                        logger.info("the websocket closed while prompt %s ran; polling /history", prompt_id)
                        return prompt_id, node_errors, False
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        continue  # binary previews
                    event = json.loads(msg.data)
                    data = event.get("data") or {}
                    if data.get("prompt_id") not in (None, prompt_id):
                        continue
                    _log_progress(event, graph)
                    kind = event.get("type")
                    if kind in ("execution_error", "execution_interrupted", "execution_success"):
                        return prompt_id, node_errors, True
                    if kind == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
                        return prompt_id, node_errors, True

    return asyncio.run(run())


def _log_queued(client: ComfyClient, graph: ApiGraph, prompt_id: str, node_errors: dict[str, Any]) -> None:
    logger.info("queued prompt %s on %s", prompt_id, client.server)
    if node_errors:
        logger.warning("ComfyUI dropped %s before running the rest (failed validation; the error at the end "
                       "says why)", ", ".join(_node_label(graph, str(n)) for n in node_errors))


def _wait_poll(client: ComfyClient, prompt_id: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = -1.0
    while time.monotonic() < deadline:
        if client.history(prompt_id) is not None:
            return
        if time.monotonic() - last > 10:
            logger.info("waiting for prompt %s ...", prompt_id)
            last = time.monotonic()
        time.sleep(0.5)
    raise QueueError(f"Prompt {prompt_id} did not finish within {timeout:.0f} s on {client.server}.")


def _history_when_ready(client: ComfyClient, prompt_id: str, timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        entry = client.history(prompt_id)
        if entry is not None:
            return entry
        if time.monotonic() > deadline:
            raise QueueError(f"Prompt {prompt_id} ended but ComfyUI at {client.server} has no history for it.")
        time.sleep(0.2)


def raise_for_failure(graph: ApiGraph, entry: dict[str, Any]) -> None:
    """QueueError with ComfyUI's exception message and the failing node, if the run failed."""
    status = entry.get("status") or {}
    if status.get("status_str", "success") == "success":
        return
    for kind, data in status.get("messages", []):
        if kind == "execution_error":
            nid = str(data.get("node_id"))
            raise QueueError(f"ComfyUI failed in node {nid} ({data.get('node_type')} '{node_title(graph.get(nid, {}))}'): "
                             f"{data.get('exception_type', 'Error')}: {data.get('exception_message', '').strip()}")
        if kind == "execution_interrupted":
            raise QueueError("The run was interrupted on the ComfyUI server (someone pressed Cancel or the queue was cleared).")
    raise QueueError(f"The run ended with status '{status.get('status_str')}' and no error message.")


# --------------------------------------------------------------------------- public API

def run_prompt(client: ComfyClient, graph: ApiGraph, *, timeout: float = 3600.0, client_id: str | None = None,
               use_websocket: bool = True) -> tuple[str, dict[str, Any]]:
    """Queue a filled API graph and wait for it; returns (prompt id, history entry). QueueError on failure,
    :class:`PartialRunError` (after the run) when ComfyUI ran it without some of its outputs.

    Progress (websocket events) is logged at INFO, nodes named by their titles."""
    cid = client_id or uuid.uuid4().hex
    prompt_id: str | None = None
    node_errors: dict[str, Any] = {}
    finished = False
    if use_websocket:
        try:
            import aiohttp
        except ImportError:
            logger.info("aiohttp not installed: polling /history instead of following the websocket")
        else:
            try:
                prompt_id, node_errors, finished = _wait_ws(client, graph, cid, timeout)
            except (OSError, aiohttp.ClientError) as e:
                if isinstance(e, aiohttp.ClientConnectorError):
                    raise client._down(e) from e
                logger.info("websocket unavailable (%s): polling /history", e)
    if prompt_id is None:
        prompt_id, node_errors = client.submit_prompt(graph, client_id=cid)
        _log_queued(client, graph, prompt_id, node_errors)
    if not finished:
        _wait_poll(client, prompt_id, timeout)
    entry = _history_when_ready(client, prompt_id)
    raise_for_failure(graph, entry)
    if node_errors:
        raise PartialRunError(format_partial(graph, node_errors), prompt_id=prompt_id, entry=entry,
                              node_errors=node_errors, never_made=never_made(graph, node_errors))
    return prompt_id, entry


def _load(workflow: str | Path | dict[str, Any], client: ComfyClient) -> ApiGraph:
    """The API graph of a workflow name, file or loaded dict (a UI workflow converted with the server's
    ``/object_info``); QueueError when the server lacks one of its node types."""
    source = "the workflow"
    if isinstance(workflow, (str, Path)):
        path = resolve_workflow(workflow)
        source = str(path)
        workflow = read_workflow(path)
    if not is_ui_workflow(workflow):
        client.check_nodes(workflow)
        return workflow
    info = client.object_info()
    client.check_nodes(ui_node_types(workflow), info)
    graph = ui_to_api_graph(workflow, info, source)
    logger.info("turned the UI workflow %s into API format with the server's node definitions", source)
    return graph


def _images(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """The images a run gave: those of output nodes such as SaveImage, previews only when none was saved."""
    images_out = [img for out in entry.get("outputs", {}).values() for img in out.get("images", [])]
    return [img for img in images_out if img.get("type") == "output"] or images_out


def queue_workflow(workflow: str | Path | dict[str, Any], *, server: str = DEFAULT_SERVER, images: Sequence[str | Path] = (),
                   pose_image: str | Path | None = None, prompt: str | None = None, negative: str | None = None,
                   seed: int | None = None, strength: float | None = None, model: str | None = None,
                   checkpoint: str | None = None, steps: int | None = None, width: int | None = None,
                   height: int | None = None, overrides: Sequence[str] = (), out_dir: str | Path = ".",
                   timeout: float = 3600.0, client_id: str | None = None, add_trigger: bool = True,
                   use_websocket: bool = True) -> list[Path]:
    """Upload photos, fill and queue an API workflow, wait, and download its output images.

    ``workflow``: a shipped workflow name (``t2i_one_photo``), a path (API or UI format), or a loaded
    API graph or UI workflow dict (a UI one is turned into API format with the server's ``/object_info``).
    ``images``: local photo files, one per photo slot (LoadImage nodes titled '... photo ...', in node-id
    order; in a workflow without such titles, those feeding an identity node's images).
    Returns the paths of the downloaded images (those of output nodes such as SaveImage;
    preview images only when the workflow saves none). :class:`PartialRunError` when ComfyUI ran the
    workflow without some of its outputs (its ``paths``: the images that did run, downloaded).
    """
    client = ComfyClient(server)
    graph = _load(workflow, client)
    uploaded = [client.upload_image(p) for p in images]
    pose = client.upload_image(pose_image) if pose_image is not None else None
    filled = fill_workflow(graph, images=uploaded, pose_image=pose, prompt=prompt, negative=negative, seed=seed,
                           strength=strength, model=model, checkpoint=checkpoint, steps=steps, width=width,
                           height=height, overrides=overrides, add_trigger=add_trigger)
    try:
        _, entry = run_prompt(client, filled, timeout=timeout, client_id=client_id, use_websocket=use_websocket)
    except PartialRunError as e:          # keep what did run, then report the half run
        e.paths = [client.download(img, Path(out_dir)) for img in _images(e.entry)]
        if e.paths:
            e.args = (f"{e.args[0]} The {len(e.paths)} image(s) that did run were downloaded into {out_dir}: "
                      + ", ".join(p.name for p in e.paths) + ".",)
        raise
    paths = [client.download(img, Path(out_dir)) for img in _images(entry)]
    logger.info("downloaded %d image(s) into %s", len(paths), out_dir)
    return paths


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hyperlora.tools.queue", description=__doc__.split("\n\n")[0],
                                epilog=f"Exit codes: 0 every output was made (their paths are printed, one a line); "
                                       f"1 the workflow did not run; {PARTIAL_EXIT} ComfyUI ran only part of it (a node "
                                       f"failed validation, e.g. a missing model file): the error names the node, "
                                       f"the file and the outputs never made.")
    p.add_argument("--server", default=DEFAULT_SERVER, help="ComfyUI address (default %(default)s)")
    p.add_argument("--workflow", required=True,
                   help="name of a shipped workflow (see example_workflows/README.md) or the path of a workflow "
                        "file: API format, or UI format (Workflow > Save, or what convert_workflow writes)")
    p.add_argument("--image", action="append", default=[], help="face photo; once per photo slot of the workflow")
    p.add_argument("--pose", help="pose image for the ControlNet workflow")
    p.add_argument("--prompt", help="positive prompt; the trigger words are prepended when missing")
    p.add_argument("--negative", help="negative prompt")
    p.add_argument("--seed", type=int)
    p.add_argument("--strength", type=finite_float, help="LoRA strength (0.75-0.85 typical)")
    p.add_argument("--model", help="HyperLoRA model folder name, e.g. sdxl_hyper_id_lora_v1_fidelity")
    p.add_argument("--checkpoint", help="SDXL checkpoint file name as ComfyUI lists it")
    p.add_argument("--steps", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="TITLE.INPUT=VALUE",
                   help="set any widget, e.g. --set 'Sampler.cfg=4.5'")
    p.add_argument("--no-trigger", action="store_true", help="do not prepend the trigger words")
    p.add_argument("--out", default=".", help="folder for the downloaded images")
    p.add_argument("--timeout", type=finite_float, default=3600.0, help="seconds to wait for the run")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        paths = queue_workflow(args.workflow, server=args.server, images=args.image, pose_image=args.pose,
                               prompt=args.prompt, negative=args.negative, seed=args.seed, strength=args.strength,
                               model=args.model, checkpoint=args.checkpoint, steps=args.steps, width=args.width,
                               height=args.height, overrides=args.overrides, out_dir=args.out,
                               timeout=args.timeout, add_trigger=not args.no_trigger)
    except PartialRunError as e:
        sys.stderr.write(f"error: {e}\n")   # a half run is not a success: what ran is named in the message
        return PARTIAL_EXIT
    except HyperLoRAError as e:
        sys.stderr.write(f"error: {e}\n")   # the CLI's own report (the library raises QueueError / SettingError)
        return 1
    sys.stdout.write("".join(f"{path}\n" for path in paths))   # the result: one image path a line
    return 0


if __name__ == "__main__":
    sys.exit(main())
