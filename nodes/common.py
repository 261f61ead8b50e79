"""Glue shared by the node families: the loaded-model handle, type names, shared inputs, image conversion."""

from __future__ import annotations

import gc
import logging
import os
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import comfy.model_management as mm
import comfy.model_patcher
import comfy.utils
import folder_paths
from comfy_execution.validation import validate_node_input

from ..hyperlora.bundle import identity_from_images
from ..hyperlora.errors import LoraError, SettingError, check_choice
from ..hyperlora.faces.analysis import FaceAnalyzer
from ..hyperlora.identity import Identity, check_photo_count
from ..hyperlora.memory import MEMORY_CHOICES, human_bytes, should_release, trim_freed_memory
from ..hyperlora.faces.options import DEFAULTS, NO_FACE_POLICIES, FaceOptions, OptionSpec, option_specs
from ..hyperlora.pipeline import images_from_comfy
from ..hyperlora.spec import CROP_TYPE, DIFFLORA_TYPE, IDENTITY_TYPE, MODEL_TYPE, NODE_PREFIX, PACK_NAME

log = logging.getLogger(__name__)

CATEGORY = PACK_NAME
STUDIO_MODEL = MODEL_TYPE          # the loaded generator (HyperLoRAHandle)
STUDIO_IDENTITY = IDENTITY_TYPE    # an identity (hyperlora.identity.Identity)
STUDIO_DIFFLORA = DIFFLORA_TYPE    # a loaded DiffLoRA model (nodes.difflora.DiffLoraHandle)
LORA_MODEL = "LORA_MODEL"          # core type (comfy_extras/nodes_train.py): dict of kohya-keyed tensors



def node_id(name: str) -> str:
    """``Loader`` -> ``HyperLoRAStudioLoader``: the id this pack registers a node under."""
    return NODE_PREFIX + name


def display_name(name: str) -> str:
    """``Loader`` -> ``HyperLoRA Studio Loader`` (found when searching for "HyperLoRA")."""
    return f"{PACK_NAME} {name}"


def mappings(*nodes: tuple[str, str, type]) -> tuple[dict[str, type], dict[str, str]]:
    """``(short id, display suffix, class)`` triples -> ``NODE_CLASS_MAPPINGS``, ``NODE_DISPLAY_NAME_MAPPINGS``."""
    return ({node_id(short): cls for short, _, cls in nodes},
            {node_id(short): display_name(title) for short, title, _ in nodes})


class ManagedModule(torch.nn.Module):
    """Holder given to ``ModelPatcher``: ComfyUI sets its bookkeeping attributes (``device``,
    ``model_loaded_weight_memory``, ...) on this holder, not on the core module inside."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of all parameters *and* buffers (the HyperLoRA basis lives in non-persistent buffers,
    which ComfyUI's state_dict-based size estimate would miss)."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def managed(module: torch.nn.Module, load_device: torch.device, offload_device: torch.device) -> Any:
    """``module`` in a ModelPatcher that knows its true size, so ComfyUI frees enough memory for it."""
    holder = ManagedModule(module)
    return comfy.model_patcher.ModelPatcher(holder, load_device=load_device, offload_device=offload_device,
                                            size=module_bytes(holder))


class HyperLoRAHandle:
    """A loaded HyperLoRA model with its CLIP encoder and face analyser (the ``STUDIO_MODEL`` type).

    The torch parts are wrapped in ``ModelPatcher`` objects so ComfyUI moves them to the GPU
    for use (:meth:`load`) and can offload them when the diffusion model needs the memory.
    The insightface analyser is created on first use, so loading never needs insightface.

    ``memory`` (the Loader's setting, :data:`hyperlora.memory.MEMORY_CHOICES`): as SDXL sampling starts
    (:func:`release_for_sampling`), the weights are dropped when the setting asks for it, and ``reload``
    (``() -> (model, clip)``, the Loader's own load without the integrity check) brings them back on the next
    use, so the nodes never see the difference.
    """

    def __init__(self, *, model: torch.nn.Module, clip: torch.nn.Module, antelope_dir: Path, provider: str,
                 names: dict[str, str], memory: str = "auto",
                 reload: Callable[[], tuple[torch.nn.Module, torch.nn.Module]] | None = None) -> None:
        self.antelope_dir = antelope_dir
        self.provider = provider
        self.names = dict(names)
        self.memory = check_choice(memory, MEMORY_CHOICES, "The Loader's memory setting")
        self._reload = reload
        self._analyzer: Any = None
        self._patchers: tuple[Any, Any] | None = None
        self._held = 0
        self._set(model, clip)
        LIVE_HANDLES.add(self)

    def _set(self, model: torch.nn.Module, clip: torch.nn.Module) -> None:
        load_device = mm.get_torch_device()
        offload_device = mm.unet_offload_device()
        self._patchers = (managed(model, load_device, offload_device), managed(clip, load_device, offload_device))
        self._held = sum(p.size for p in self._patchers)

    def _loaded(self) -> tuple[Any, Any]:
        if self._patchers is None:
            if self._reload is None:
                raise RuntimeError("this HyperLoRA model was released and cannot be read back; run its Loader again")
            log.info("HyperLoRA Studio: reading %s back from disk (released while the last image sampled)",
                     self.names.get("model", "the model"))
            self._set(*self._reload())
        assert self._patchers is not None
        return self._patchers

    @property
    def model_patcher(self) -> Any:
        return self._loaded()[0]

    @property
    def clip_patcher(self) -> Any:
        return self._loaded()[1]

    @property
    def model(self) -> Any:
        """The core ``HyperLoRAModel``."""
        return self.model_patcher.model.inner

    @property
    def clip(self) -> Any:
        """The core ``ClipVisionEncoder``."""
        return self.clip_patcher.model.inner

    @property
    def released(self) -> bool:
        """True while the weights are dropped (they come back on the next use)."""
        return self._patchers is None

    @property
    def held_bytes(self) -> int:
        """Bytes of the loaded weights (HyperLoRA model and CLIP; 0 while released)."""
        return 0 if self._patchers is None else self._held

    def load(self, *, clip: bool = False) -> None:
        """Let ComfyUI put the model (and CLIP) on its compute device, offloading others if needed."""
        patchers = [self.model_patcher] + ([self.clip_patcher] if clip else [])
        mm.load_models_gpu(patchers, force_full_load=True)

    def release(self) -> int:
        """Drop the weights and the face analyser (read back on the next use); returns the bytes dropped."""
        if self._patchers is None or self._reload is None:
            return 0
        held = self._held
        self._patchers = None      # ComfyUI's list of loaded models holds them only weakly
        self._analyzer = None
        return held

    def analyzer(self) -> FaceAnalyzer:
        """The insightface AntelopeV2 analyser, made on first use.  A missing or broken insightface /
        onnxruntime raises the core's DependencyError, whose message already holds the fix."""
        if self._analyzer is None:
            self._analyzer = FaceAnalyzer(self.antelope_dir, provider=self.provider)
        return self._analyzer

    def __repr__(self) -> str:
        return f"HyperLoRAHandle({self.names})"


LIVE_HANDLES: weakref.WeakSet[HyperLoRAHandle] = weakref.WeakSet()
"""Every HyperLoRA model the Loader made that is still referenced (ComfyUI's node cache holds them)."""


def release_for_sampling() -> int:
    """Called as an SDXL sampling starts (HyperLoRA Studio Apply's wrapper, Identity on Prompt's hook): every
    loaded HyperLoRA model whose ``memory`` setting asks for it is dropped (:func:`hyperlora.memory.should_release`
    with ComfyUI's measure of free RAM), and the freed memory handed back to the system.  Returns the bytes
    dropped; logs one line when it drops any."""
    handles = [h for h in list(LIVE_HANDLES) if h.held_bytes]
    if not handles:
        return 0
    free = mm.get_free_memory(torch.device("cpu"))
    dropped = sum(h.release() for h in handles
                  if should_release(h.memory, held_bytes=h.held_bytes, free_bytes=free))
    if dropped:
        gc.collect()
        mm.cleanup_models()
        trim_freed_memory()
        log.info("HyperLoRA Studio: released %s of HyperLoRA weights while SDXL samples (%s of RAM was free; the "
                 "Loader's memory setting); the next change of a photo or setting reads them again.",
                 human_bytes(dropped), human_bytes(free))
    return dropped


def release_before_sampling(executor: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """ComfyUI OUTER_SAMPLE wrapper (on the models HyperLoRA Studio Apply returns): :func:`release_for_sampling`
    before the sampler loads SDXL and merges the LoRA, then the sampling itself."""
    release_for_sampling()
    return executor(*args, **kwargs)


def _what_is(value: Any) -> str:
    """A reader's name for an object that arrived on one of our sockets."""
    cls = type(value)
    if cls.__name__ == "HyperLoRA" and hasattr(value, "hyper_lora_modules"):
        return "the authors' ComfyUI-HyperLoRA plugin's HYPER_LORA object (from its 'HyperLoRA Loader' node)"
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, torch.Tensor) for v in value):
        return "what looks like the authors' ComfyUI-HyperLoRA plugin's ID_COND (from its 'HyperLoRA ID Cond' node)"
    return f"a {cls.__module__}.{cls.__name__}"


# Socket types of the authors' plugin, and what to connect instead.  ComfyUI checks socket types before a
# node runs, so a foreign object wired in by hand (an API graph can do that) is named at validation.
FOREIGN_TYPES = {
    "HYPER_LORA": "the authors' ComfyUI-HyperLoRA plugin's HYPER_LORA object (from its 'HyperLoRA Loader' node)",
    "HYPER_LORA_CONFIG": "the authors' ComfyUI-HyperLoRA plugin's HYPER_LORA_CONFIG (from its 'HyperLoRA Config' node)",
    "ID_COND": "the authors' ComfyUI-HyperLoRA plugin's ID_COND (from its 'HyperLoRA ID Cond' node)",
    "BASE_COND": "the authors' ComfyUI-HyperLoRA plugin's BASE_COND (from its 'HyperLoRA Base Cond' node)",
    "FACE_ATTR": "the authors' ComfyUI-HyperLoRA plugin's FACE_ATTR (from its 'HyperLoRA Face Attr' node)",
    "LORA": "the authors' ComfyUI-HyperLoRA plugin's LORA (from its 'Generate ID LoRA' node)",
}
WHAT_TO_CONNECT = {
    MODEL_TYPE: f"the '{PACK_NAME} Loader' node ({NODE_PREFIX}Loader)",
    IDENTITY_TYPE: f"'{PACK_NAME} Identity from Images' or '{PACK_NAME} Load Identity'",
    LORA_MODEL: f"'{PACK_NAME} Build LoRA' (or Mix Identities / Concept Slider)",
    CROP_TYPE: f"the crop output of '{PACK_NAME} Crop by Mask'",
    DIFFLORA_TYPE: f"the '{PACK_NAME} DiffLoRA Loader' node ({NODE_PREFIX}DiffLoRALoader)",
}


def _sockets(cls: type) -> dict[str, str]:
    """``{input name: socket type}`` of the node's non-widget inputs."""
    spec = cls.INPUT_TYPES()
    out: dict[str, str] = {}
    for group in ("required", "optional"):
        for name, entry in spec.get(group, {}).items():
            kind = entry[0] if isinstance(entry, (tuple, list)) and entry else entry
            if isinstance(kind, str) and kind.isupper() and kind not in ("INT", "FLOAT", "STRING", "BOOLEAN"):
                out[name] = kind
    return out


def socket_check(received: dict[str, str], declared: dict[str, str]) -> bool | str:
    """True when every linked input carries a type its socket takes; else a message naming the input,
    what it got and which node to connect (ComfyUI's own check is off once ``input_types`` is asked for)."""
    for name, got in received.items():
        want = declared.get(name)
        if want is None or validate_node_input(got, want):
            continue
        instead = WHAT_TO_CONNECT.get(want, f"a node whose output is {want}")
        what = FOREIGN_TYPES.get(got, f"a {got} output")
        return f"The input '{name}' is connected to {what}, but it takes {want}. Connect {instead} to it instead."
    return True


def guard_sockets(cls: type) -> type:
    """Give a node with one of our socket types a ``VALIDATE_INPUTS(input_types)`` that names foreign objects
    at /prompt validation.  Nodes with their own VALIDATE_INPUTS are left alone (none has our sockets)."""
    declared = _sockets(cls)
    if not set(declared.values()) & set(WHAT_TO_CONNECT) or hasattr(cls, "VALIDATE_INPUTS"):
        return cls

    def VALIDATE_INPUTS(node_cls: type, input_types: dict[str, str]) -> bool | str:  # noqa: N802 (ComfyUI's name)
        return socket_check(input_types, declared)

    cls.VALIDATE_INPUTS = classmethod(VALIDATE_INPUTS)
    return cls


def expect_handle(value: Any) -> HyperLoRAHandle:
    """``value`` if it is this pack's loaded model; else LoraError naming what arrived and what to connect."""
    if isinstance(value, HyperLoRAHandle):
        return value
    raise LoraError(
        f"The input 'hyper_lora' got {_what_is(value)}, not a model of this pack. Connect the "
        f"'{display_name('Loader')}' node ({node_id('Loader')}) to it instead; the two HyperLoRA packs' objects "
        "do not mix.")


def expect_identity(value: Any, input_name: str = "identity") -> Identity:
    """``value`` if it is an identity of this pack; else LoraError naming what arrived and what to connect."""
    if isinstance(value, Identity):
        return value
    raise LoraError(
        f"The input '{input_name}' got {_what_is(value)}, not an identity of this pack. Connect "
        f"'{display_name('Identity from Images')}' or '{display_name('Load Identity')}' to it instead.")


def check_interrupt() -> None:
    """The core's ``check_interrupt`` callback: raises ComfyUI's interrupt exception after Cancel."""
    mm.throw_exception_if_processing_interrupted()


def progress(total: int) -> comfy.utils.ProgressBar:
    return comfy.utils.ProgressBar(total)


def progress_callback(bar: comfy.utils.ProgressBar, offset: int = 0) -> Callable[[int, int], None]:
    """The core's ``progress(done, total)`` callback drawn on ``bar`` (``offset`` steps already done)."""
    return lambda done, _total: bar.update_absolute(offset + done)


# ----------------------------------------------------------------------------- list inputs (INPUT_IS_LIST)


def _same(a: Any, b: Any) -> bool:
    return a is b or (isinstance(a, (str, int, float, bool)) and type(a) is type(b) and a == b)


def single(values: Any, name: str, node: str) -> Any:
    """One value of an input of an ``INPUT_IS_LIST`` node (every input then arrives as a list).

    A list of one value (the normal case) or of equal values gives that value; an empty list
    (an optional input left open) None; a value that is not a list (a direct call) itself.
    Different values raise :class:`SettingError`: such a node makes one result from all photos.
    """
    if not isinstance(values, list):
        return values
    if not values:
        return None
    first = values[0]
    if all(_same(v, first) for v in values[1:]):
        return first
    raise SettingError(
        f"{node}: the input '{name}' got {len(values)} different values from a list, but this node treats all "
        f"its photos as one set and takes one {name}. Give it a single value (or run the node once per value).")


def photos(images: Any, node: str) -> Any:
    """The ``images`` of an ``INPUT_IS_LIST`` node: a batch stays a batch; a list of batches (a list
    node, photos of different sizes) stays a list, which ``images_from_comfy`` takes as one set."""
    if isinstance(images, list) and len(images) == 1:
        return images[0]
    if isinstance(images, list):
        sizes = ", ".join(f"{t.shape[-2]}x{t.shape[-3]}" if getattr(t, "ndim", 0) >= 3 else "?" for t in images)
        log.info("%s: %d images arrived as a list (sizes %s); they are used together as photos of one person.",
                 node, len(images), sizes)
    return images


def count_images(images: Any) -> int:
    """How many images an IMAGE batch or a list of them (or of single ``[H, W, C]`` images) holds, without
    converting any."""
    items = images if isinstance(images, list) else [images]
    return sum(int(t.shape[0]) if getattr(t, "ndim", 0) == 4 else 1 for t in items)


def images_to_comfy(images: list[Any], *, size: int = 512) -> torch.Tensor:
    """uint8 RGB arrays ``[H, W, 3]`` -> ComfyUI IMAGE ``[B, H, W, 3]`` float 0..1.

    Arrays of different sizes are resized to ``size`` x ``size`` (a batch needs one size).
    """
    if not images:
        return torch.zeros((1, 64, 64, 3))
    tensors = [torch.from_numpy(a.copy()).float().div(255.0) for a in images]
    if len({tuple(t.shape) for t in tensors}) == 1:
        return torch.stack(tensors)
    out = []
    for t in tensors:
        chw = t.permute(2, 0, 1).unsqueeze(0)
        chw = torch.nn.functional.interpolate(chw, size=(size, size), mode="bilinear", antialias=True,
                                              align_corners=False)
        out.append(chw[0].permute(1, 2, 0).clamp(0, 1))
    return torch.stack(out)


def label_image(lines: list[str], size: int = 512) -> torch.Tensor:
    """A ``size`` x ``size`` IMAGE ``[1, H, W, 3]`` showing ``lines`` (word-wrapped) on dark gray."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (size, size), (48, 48, 48))
    draw = ImageDraw.Draw(image)
    try:
        font: Any = ImageFont.load_default(size=max(12, size // 20))
    except TypeError:                       # Pillow < 10.1: a fixed bitmap font
        font = ImageFont.load_default()
    margin, y = size // 16, size // 6
    for n, line in enumerate(lines):
        words, row = line.split(), ""
        for word in words + [""]:
            trial = f"{row} {word}".strip()
            if word and draw.textlength(trial, font=font) <= size - 2 * margin:
                row = trial
                continue
            draw.text((margin, y), row, fill=(255, 220, 120) if n == 0 else (210, 210, 210), font=font)
            y += int(font.size * 1.4) if hasattr(font, "size") else 14
            row = word
        y += size // 24
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None]


def preview_ui(image: torch.Tensor, prefix: str) -> list[dict[str, str]]:
    """Save IMAGE ``[B, H, W, 3]`` into ComfyUI's temp folder; the ``ui`` images entries that show it on the node."""
    from PIL import Image

    folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(
        prefix, folder_paths.get_temp_directory(), image.shape[2], image.shape[1])
    os.makedirs(folder, exist_ok=True)
    out = []
    for i, one in enumerate(image):
        file = f"{name}_{counter + i:05}_.png"
        Image.fromarray((one.clamp(0, 1).numpy() * 255).astype(np.uint8)).save(os.path.join(folder, file),
                                                                            compress_level=1)
        out.append({"filename": file, "subfolder": subfolder, "type": "temp"})
    return out


def face_input(spec: OptionSpec) -> tuple:
    """One face option (a field of ``FaceOptions``) as a ComfyUI input: a dropdown for options with choices
    (as strings, e.g. det_size "640"), BOOLEAN, INT (with its range) or STRING, its default and help."""
    extra: dict[str, Any] = {"tooltip": spec.help}
    if spec.choices is not None:
        return ([str(c) for c in spec.choices], {"default": str(spec.default), **extra})
    if spec.kind is bool:
        return ("BOOLEAN", {"default": spec.default, **extra})
    if spec.kind in (int, float):
        bounds = {k: v for k, v in (("min", spec.low), ("max", spec.high)) if v is not None}
        return ("INT" if spec.kind is int else "FLOAT", {"default": spec.default, **bounds,
                                                         "step": 1 if spec.kind is int else 0.01, **extra})
    return ("STRING", {"default": spec.default, **extra})


def face_inputs(options: type[FaceOptions] = FaceOptions) -> dict[str, tuple]:
    """The face options shared by the identity nodes: every field of ``FaceOptions``, in its order, with
    its default (made from the fields, so a new option needs no change here)."""
    return {spec.name: face_input(spec) for spec in option_specs(options)}


def no_face_input(skip_effect: str) -> tuple:
    """The ``no_face`` input of a node that handles each photo on its own: 'skip' does ``skip_effect``."""
    return (list(NO_FACE_POLICIES), {
        "default": DEFAULTS.no_face,
        "tooltip": f"A photo without a face: 'skip' {skip_effect}, 'error' stops the queue naming the photo."})


def face_options(kwargs: dict[str, Any], options: type[FaceOptions] = FaceOptions) -> FaceOptions:
    """The node's face inputs as ``FaceOptions`` (inputs a node does not have keep their defaults)."""
    return options.from_values(kwargs)


def make_identity(hyper_lora: HyperLoRAHandle, images: Any, kwargs: dict[str, Any]) -> tuple[Any, torch.Tensor]:
    """IMAGE batch (or a list of them) -> (Identity, crops IMAGE).

    Progress: one step per photo (face analysis), then one for CLIP + resampler; an interrupt
    is honoured between photos, CLIP forwards and resampler chunks.
    """
    hyper_lora = expect_handle(hyper_lora)
    check_photo_count(count_images(images))                  # before any photo is converted
    check_interrupt()
    analyzer = hyper_lora.analyzer()
    arrays = images_from_comfy(images)
    bar = progress(len(arrays) + 1)
    hyper_lora.load(clip=True)
    check_interrupt()
    identity, cond = identity_from_images(hyper_lora.model, arrays, analyzer=analyzer, clip=hyper_lora.clip,
                                          options=face_options(kwargs), check_interrupt=check_interrupt,
                                          progress=progress_callback(bar))
    crops = images_to_comfy(list(cond.crops))
    bar.update_absolute(len(arrays) + 1)
    return identity, crops
