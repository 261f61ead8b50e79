"""Glue shared by the node families: the HYPER_LORA handle, type names, image conversion."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

import comfy.model_management as mm
import comfy.model_patcher
import comfy.utils

from ..hyperlora.errors import DependencyError

log = logging.getLogger(__name__)

CATEGORY = "HyperLoRA"
HYPER_LORA = "HYPER_LORA"
HYPER_LORA_ID = "HYPER_LORA_ID"
LORA_MODEL = "LORA_MODEL"          # core type (comfy_extras/nodes_train.py): dict of kohya-keyed tensors

INSTALL_INSIGHTFACE = (
    "Face analysis needs the insightface and onnxruntime packages: run `python -m pip install insightface "
    "onnxruntime` (onnxruntime-gpu for CUDA) with ComfyUI's Python, then restart ComfyUI.")

FACE_CHOICES = ("largest", "left_to_right", "index", "highest_score")
DET_SIZES = (640, 512, 384, 256)


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
    """A loaded HyperLoRA model with its CLIP encoder and face analyser (the ``HYPER_LORA`` type).

    The torch parts are wrapped in ``ModelPatcher`` objects so ComfyUI moves them to the GPU
    for use (:meth:`load`) and can offload them when the diffusion model needs the memory.
    The insightface analyser is created on first use, so loading never needs insightface.
    """

    def __init__(self, *, model: torch.nn.Module, clip: torch.nn.Module, antelope_dir: Path, provider: str,
                 names: dict[str, str]) -> None:
        load_device = mm.get_torch_device()
        offload_device = mm.unet_offload_device()
        self.model_patcher = managed(model, load_device, offload_device)
        self.clip_patcher = managed(clip, load_device, offload_device)
        self.antelope_dir = antelope_dir
        self.provider = provider
        self.names = dict(names)
        self._analyzer: Any = None

    @property
    def model(self) -> Any:
        """The core ``HyperLoRAModel``."""
        return self.model_patcher.model.inner

    @property
    def clip(self) -> Any:
        """The core ``ClipVisionEncoder``."""
        return self.clip_patcher.model.inner

    def load(self, *, clip: bool = False) -> None:
        """Let ComfyUI put the model (and CLIP) on its compute device, offloading others if needed."""
        patchers = [self.model_patcher] + ([self.clip_patcher] if clip else [])
        mm.load_models_gpu(patchers, force_full_load=True)

    def analyzer(self) -> Any:
        """The insightface AntelopeV2 analyser; :class:`DependencyError` with install steps when missing."""
        if self._analyzer is None:
            try:
                from ..hyperlora.faces import FaceAnalyzer
            except ImportError as e:
                raise DependencyError(f"{INSTALL_INSIGHTFACE} ({e})") from e
            try:
                self._analyzer = FaceAnalyzer(self.antelope_dir, provider=self.provider)
            except DependencyError as e:
                if "pip install" in str(e):
                    raise
                raise DependencyError(f"{e} {INSTALL_INSIGHTFACE}") from e
            except ImportError as e:
                raise DependencyError(f"{INSTALL_INSIGHTFACE} ({e})") from e
        return self._analyzer

    def __repr__(self) -> str:
        return f"HyperLoRAHandle({self.names})"


def check_interrupt() -> None:
    mm.throw_exception_if_processing_interrupted()


def progress(total: int) -> comfy.utils.ProgressBar:
    return comfy.utils.ProgressBar(total)


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


def face_inputs() -> dict[str, tuple]:
    """The face options shared by the identity nodes (inputs of ``FaceOptions``)."""
    return {
        "face_choice": (list(FACE_CHOICES), {
            "default": "largest",
            "tooltip": "Which face to use when a photo shows several: the largest, or (with 'index') "
                       "the face_index-th largest; 'left_to_right' takes the face_index-th from the left; "
                       "'highest_score' takes the face the detector is surest of, as the authors' plugin does."}),
        "face_index": ("INT", {"default": 0, "min": 0, "max": 64, "step": 1,
                               "tooltip": "0-based face number for 'index' and 'left_to_right'."}),
        "remove_background": ("BOOLEAN", {
            "default": True,
            "tooltip": "Replace everything outside the face outline by gray before CLIP sees it, as the "
                       "released models were trained (recommended)."}),
        "grayscale": ("BOOLEAN", {
            "default": False,
            "tooltip": "Give CLIP a grayscale face, so the colours of the photo (lighting, make-up) carry "
                       "over less."}),
        "no_face": (["skip", "error"], {
            "default": "skip",
            "tooltip": "A photo without a detectable face: 'skip' drops it and uses the others, 'error' stops "
                       "the queue naming the photo."}),
        "det_size": ([str(s) for s in DET_SIZES], {
            "default": "640",
            "tooltip": "Face-detector input size. 640 as released; if nothing is found the smaller sizes "
                       "are tried too. Pick a smaller size first for tight close-ups."}),
    }


def face_options(kwargs: dict[str, Any]) -> Any:
    from ..hyperlora.bundle import FaceOptions

    return FaceOptions(
        face_choice=kwargs.get("face_choice", "largest"),
        face_index=int(kwargs.get("face_index", 0)),
        remove_background=bool(kwargs.get("remove_background", True)),
        grayscale=bool(kwargs.get("grayscale", False)),
        no_face=kwargs.get("no_face", "skip"),
        det_size=int(kwargs.get("det_size", 640)),
    )


def make_identity(hyper_lora: HyperLoRAHandle, images: torch.Tensor, kwargs: dict[str, Any]) -> tuple[Any, torch.Tensor]:
    """IMAGE batch -> (Identity, crops IMAGE); progress: analyser, CLIP + resampler, done."""
    from ..hyperlora.bundle import identity_from_images
    from ..hyperlora.pipeline import images_from_comfy

    bar = progress(3)
    check_interrupt()
    analyzer = hyper_lora.analyzer()
    arrays = images_from_comfy(images)
    bar.update(1)
    hyper_lora.load(clip=True)
    check_interrupt()
    identity, cond = identity_from_images(hyper_lora.model, arrays, analyzer=analyzer, clip=hyper_lora.clip,
                                          options=face_options(kwargs), check_interrupt=check_interrupt)
    bar.update(1)
    crops = images_to_comfy(list(cond.crops))
    bar.update(1)
    return identity, crops
