"""API-format prompts (``POST /prompt`` bodies) used by the HTTP tests and the benchmark."""

from __future__ import annotations

from typing import Any

from tests.comfy.models import ANTELOPE, CHECKPOINT, CLIP_FOLDER, SMALL_MODEL

FACE = dict(face_choice="largest", face_index=0, remove_background=True, grayscale=False, no_face="skip",
            det_size="640")
PROMPT = "fcsks fxhks fhyks, a photo of a person"


def loader(model: str = SMALL_MODEL, clip_vision: str = CLIP_FOLDER, dtype: str = "fp32") -> dict[str, Any]:
    return {"class_type": "HyperLoRAStudioLoader",
            "inputs": {"model": model, "clip_vision": clip_vision, "insightface": ANTELOPE, "dtype": dtype,
                       "provider": "CPU"}}


def load_image(name: str) -> dict[str, Any]:
    return {"class_type": "LoadImage", "inputs": {"image": name}}


def identity(hyper_lora: str, images: list, **face: Any) -> dict[str, Any]:
    return {"class_type": "HyperLoRAStudioIdentityFromImages",
            "inputs": {"hyper_lora": [hyper_lora, 0], "images": images, **{**FACE, **face}}}


def sampling(prompt: dict[str, Any], *, model: list, ckpt: str, prefix: str, seed: int = 1, size: int = 64,
             steps: int = 1, cfg: float = 1.0, tag: str = "") -> dict[str, Any]:
    """Add text encoding, an empty latent, KSampler, VAEDecode and SaveImage for ``model``.

    cfg 1.0 lets ComfyUI skip the negative pass: half the CPU time of a test step.
    """
    t = tag
    prompt.update({
        f"pos{t}": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": [ckpt, 1]}},
        f"neg{t}": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": [ckpt, 1]}},
        f"latent{t}": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        f"sampler{t}": {"class_type": "KSampler", "inputs": {
            "model": model, "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": "euler", "scheduler": "normal",
            "positive": [f"pos{t}", 0], "negative": [f"neg{t}", 0], "latent_image": [f"latent{t}", 0], "denoise": 1.0}},
        f"decode{t}": {"class_type": "VAEDecode", "inputs": {"samples": [f"sampler{t}", 0], "vae": [ckpt, 2]}},
        f"save{t}": {"class_type": "SaveImage", "inputs": {"images": [f"decode{t}", 0], "filename_prefix": prefix}},
    })
    return prompt


def checkpoint() -> dict[str, Any]:
    return {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}}


def ui_to_api(ui: dict[str, Any], object_info: dict[str, Any]) -> dict[str, Any]:
    """The API form of a UI workflow, as the front end's 'Export (API)' makes it: widget values by the
    names ``/object_info`` gives (front-end extras such as a seed's 'fixed' skipped), links as
    ``[node id, output]``; front-end-only nodes (Note, ...) left out; muted nodes left out."""
    from hyperlora.tools.graph_format import VIRTUAL_NODES, input_specs, is_widget, widget_extras

    links = {lk[0]: lk for lk in ui["links"]}
    api: dict[str, Any] = {}
    for node in ui["nodes"]:
        if node["type"] in VIRTUAL_NODES or node.get("mode", 0) == 2:
            continue
        values = list(node.get("widgets_values") or [])
        inputs: dict[str, Any] = {}
        for name, type_, opts, _ in input_specs(object_info[node["type"]]):
            if is_widget(type_, opts):
                inputs[name] = values.pop(0)
                del values[:len(widget_extras(name, opts))]
        for inp in node.get("inputs") or []:
            if inp.get("link") is not None:
                _, origin, slot, *_ = links[inp["link"]]
                inputs[inp["name"]] = [str(origin), slot]
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs,
                                "_meta": {"title": node.get("title") or object_info[node["type"]]["display_name"]}}
    return api
