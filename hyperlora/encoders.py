"""CLIP ViT-L/14 vision encoder and its image preprocessing (format §1, §5.1, §6).

Two sources of weights, one module:

* the released Hugging Face folder ``models/hyper_lora/clip_vit/<name>/``
  (``config.json`` + ``model.safetensors``) with its processor folder
  ``models/hyper_lora/clip_processor/<name>/preprocessor_config.json``;
* a single file from ComfyUI's ``models/clip_vision``: Hugging Face keys
  (``vision_model.*``, what ComfyUI's own ``clip_vision_l.safetensors`` and its
  "save CLIP vision" output use, also with ``visual_projection`` / a text model
  beside) or open_clip keys (``visual.transformer.resblocks.*``, which ComfyUI
  converts on load).

Both are loaded by this module into ``transformers.CLIPVisionModel`` (never via
the Hub, so nothing is ever downloaded) and must be ViT-L/14-shaped.  The output
is the penultimate hidden state: the output of layer 23 of 24, before the
post-layernorm, ``[N, 257, 1024]``.  The unused last layer is dropped after
loading, so ``last_hidden_state`` of the truncated model *is* that tensor.

Preprocessing is implemented here with PIL and numpy and matches transformers'
(PIL) ``CLIPImageProcessor`` for ViT-L/14: shortest side to 224 (bicubic), centre
crop 224, scale to 0..1, CLIP mean/std.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from .errors import DependencyError, ModelFileError

logger = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PROCESSOR_FILE = "preprocessor_config.json"
_PIL_RESAMPLE = {0: Image.Resampling.NEAREST, 1: Image.Resampling.LANCZOS, 2: Image.Resampling.BILINEAR,
                 3: Image.Resampling.BICUBIC, 4: Image.Resampling.BOX, 5: Image.Resampling.HAMMING}


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:  # also catches broken installs raising ImportError subclasses
        raise DependencyError(
            "The CLIP image encoder needs the 'transformers' package, which could not be imported "
            f"({exc}). Install it into ComfyUI's Python: pip install 'transformers>=4.37.2'."
        ) from exc
    return transformers


# ----------------------------------------------------------------------------- key layouts



def _read_json(path: Path, what: str) -> dict:
    """A JSON file of a CLIP folder; ModelFileError saying to download it again when unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"{what} {path} is not readable JSON ({exc}); download it again.") from exc

@dataclass(frozen=True)
class VisionShape:
    """Architecture numbers of a CLIP vision tower, read off tensor shapes."""

    hidden_size: int
    num_layers: int
    patch_size: int
    image_size: int
    intermediate_size: int
    num_heads: int | None = None            # not readable from shapes; hidden_size // 64 when None

    def __post_init__(self) -> None:
        if self.num_heads is None:
            object.__setattr__(self, "num_heads", max(1, self.hidden_size // 64))

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    def describe(self) -> str:
        known = {(1024, 24, 14): "ViT-L/14", (1280, 32, 14): "ViT-H/14", (1664, 48, 14): "ViT-bigG/14",
                 (768, 12, 16): "ViT-B/16", (768, 12, 32): "ViT-B/32"}
        name = known.get((self.hidden_size, self.num_layers, self.patch_size))
        text = (f"hidden size {self.hidden_size}, {self.num_layers} layers, patch {self.patch_size}, "
                f"{self.image_size} px")
        return f"{name} ({text})" if name else text


VIT_L14 = VisionShape(hidden_size=1024, num_layers=24, patch_size=14, image_size=224, intermediate_size=4096)


_OPEN_CLIP_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1",
                    "mlp.c_proj": "mlp.fc2", "attn.out_proj": "self_attn.out_proj"}
_OPEN_CLIP_TOP = {"class_embedding": "embeddings.class_embedding", "conv1.weight": "embeddings.patch_embedding.weight",
                  "positional_embedding": "embeddings.position_embedding.weight",
                  "ln_pre.weight": "pre_layrnorm.weight", "ln_pre.bias": "pre_layrnorm.bias",
                  "ln_post.weight": "post_layernorm.weight", "ln_post.bias": "post_layernorm.bias"}


def _from_open_clip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if name in _OPEN_CLIP_TOP:
            out[_OPEN_CLIP_TOP[name]] = value
        elif name.startswith("transformer.resblocks."):
            index, rest = name[len("transformer.resblocks."):].split(".", 1)
            base = f"encoder.layers.{index}."
            if rest.startswith("attn.in_proj_"):          # fused q, k, v -> three projections
                kind = rest.rsplit("_", 1)[1]             # weight | bias
                for part, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{base}self_attn.{part}.{kind}"] = chunk.contiguous()
            else:
                module, kind = rest.rsplit(".", 1)
                out[base + _OPEN_CLIP_LAYER.get(module, module) + "." + kind] = value
        # "proj" (the image projection) is not used for hidden states
    return out


def canonical_vision_state_dict(state: dict[str, torch.Tensor], *, source: str) -> dict[str, torch.Tensor]:
    """Any supported CLIP vision key layout -> transformers ``CLIPVisionModel`` names without the
    ``vision_model.`` prefix (``embeddings.*``, ``pre_layrnorm.*``, ``encoder.layers.{i}.*``,
    ``post_layernorm.*``).  Projection heads and text towers are dropped."""
    keys = state.keys()
    if "vision_model.embeddings.patch_embedding.weight" in keys:            # HF / ComfyUI
        out = {k[len("vision_model."):]: v for k, v in state.items() if k.startswith("vision_model.")}
    elif "embeddings.patch_embedding.weight" in keys:                       # bare CLIPVisionModel (transformers 5)
        out = dict(state)
    else:
        prefix = next((p for p in ("visual.", "") if f"{p}transformer.resblocks.0.attn.in_proj_weight" in keys), None)
        if prefix is None:
            sample = ", ".join(sorted(keys)[:3])
            raise ModelFileError(
                f"{source} is not a CLIP vision model (keys like {sample}); use a CLIP ViT-L/14 vision "
                "file such as clip_vision_l.safetensors."
            )
        out = _from_open_clip(state, prefix)
    out = {k: v for k, v in out.items() if not k.endswith("position_ids")}
    if "embeddings.class_embedding" not in out:
        raise ModelFileError(
            f"{source} has no class embedding: it is a SigLIP-style vision model, not CLIP; "
            "HyperLoRA needs OpenAI CLIP ViT-L/14."
        )
    return out


def read_vision_shape(state: dict[str, torch.Tensor], *, source: str, num_heads: int | None = None) -> VisionShape:
    """Architecture numbers from a canonical state dict."""
    try:
        patch = state["embeddings.patch_embedding.weight"]            # [hidden, 3, p, p]
        positions = state["embeddings.position_embedding.weight"]     # [tokens, hidden]
        fc1 = state["encoder.layers.0.mlp.fc1.weight"]                # [intermediate, hidden]
    except KeyError as exc:
        raise ModelFileError(f"{source} lacks the CLIP vision tensor {exc}; the file is incomplete.") from None
    layers = {int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")}
    grid = int(round((positions.shape[0] - 1) ** 0.5))
    return VisionShape(hidden_size=int(patch.shape[0]), num_layers=len(layers), patch_size=int(patch.shape[-1]),
                       image_size=grid * int(patch.shape[-1]), intermediate_size=int(fc1.shape[0]),
                       num_heads=int(num_heads) if num_heads else None)


# ----------------------------------------------------------------------------- preprocessing


@dataclass(frozen=True)
class ClipProcessorConfig:
    """What ``preprocessor_config.json`` says, reduced to what CLIP uses."""

    shortest_edge: int = 224
    crop_height: int = 224
    crop_width: int = 224
    do_resize: bool = True
    do_center_crop: bool = True
    resample: int = 3                      # PIL bicubic
    rescale_factor: float = 1.0 / 255.0
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    @classmethod
    def from_folder(cls, folder: str | os.PathLike | None) -> "ClipProcessorConfig":
        """Read ``<folder>/preprocessor_config.json``; standard ViT-L/14 values when ``folder`` is None."""
        if folder is None:
            return cls()
        path = Path(folder)
        if path.is_dir():
            path = path / PROCESSOR_FILE
        if not path.is_file():
            raise ModelFileError(
                f"CLIP processor config {path} does not exist; put preprocessor_config.json of "
                "openai/clip-vit-large-patch14 there, or leave the processor unset to use the standard ViT-L/14 values."
            )
        data = _read_json(path, "CLIP processor config")
        size = data.get("size", 224)
        shortest = size.get("shortest_edge", 224) if isinstance(size, dict) else int(size)
        crop = data.get("crop_size", 224)
        crop_h, crop_w = (crop.get("height", 224), crop.get("width", 224)) if isinstance(crop, dict) else (int(crop), int(crop))
        return cls(
            shortest_edge=int(shortest), crop_height=int(crop_h), crop_width=int(crop_w),
            do_resize=bool(data.get("do_resize", True)), do_center_crop=bool(data.get("do_center_crop", True)),
            resample=int(data.get("resample", 3)), rescale_factor=float(data.get("rescale_factor", 1.0 / 255.0)),
            mean=tuple(float(v) for v in data.get("image_mean", CLIP_MEAN)),  # type: ignore[arg-type]
            std=tuple(float(v) for v in data.get("image_std", CLIP_STD)),  # type: ignore[arg-type]
        )


def _resize_shortest(image: Image.Image, shortest: int, resample: int) -> Image.Image:
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = shortest, int(shortest * long / short)   # truncation, as transformers does
    size = (new_short, new_long) if width <= height else (new_long, new_short)
    return image.resize(size, resample=_PIL_RESAMPLE.get(resample, Image.Resampling.BICUBIC))


def _center_crop(arr: np.ndarray, height: int, width: int) -> np.ndarray:
    """Centre crop ``[H, W, C]``; zero-padded when the image is smaller (as transformers does)."""
    h, w = arr.shape[:2]
    if h < height or w < width:
        padded = np.zeros((max(h, height), max(w, width), arr.shape[2]), dtype=arr.dtype)
        top, left = (padded.shape[0] - h) // 2, (padded.shape[1] - w) // 2
        padded[top:top + h, left:left + w] = arr
        arr, h, w = padded, padded.shape[0], padded.shape[1]
    top, left = int((h - height) / 2.0), int((w - width) / 2.0)
    return arr[top:top + height, left:left + width]


def clip_preprocess(images: Sequence[np.ndarray], config: ClipProcessorConfig | None = None) -> torch.Tensor:
    """uint8 RGB images (any sizes) -> CLIP pixel values ``[N, 3, 224, 224]`` float32.

    Grayscale ``[H, W]`` / ``[H, W, 1]`` inputs are replicated to RGB, RGBA drops alpha.
    """
    cfg = config or ClipProcessorConfig()
    mean = np.asarray(cfg.mean, dtype=np.float32)
    std = np.asarray(cfg.std, dtype=np.float32)
    out = []
    for index, image in enumerate(images):
        arr = np.asarray(image)
        if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or min(arr.shape[:2]) < 1:
            raise ValueError(f"CLIP input {index} must be a uint8 image [H, W, 3], got {arr.dtype} {tuple(arr.shape)}")
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if arr.shape[2] == 1:
            arr = np.repeat(arr, 3, axis=2)
        pil = Image.fromarray(np.ascontiguousarray(arr[:, :, :3]), mode="RGB")
        if cfg.do_resize:
            pil = _resize_shortest(pil, cfg.shortest_edge, cfg.resample)
        arr = np.asarray(pil)
        if cfg.do_center_crop:
            arr = _center_crop(arr, cfg.crop_height, cfg.crop_width)
        pixels = (arr.astype(np.float32) * np.float32(cfg.rescale_factor) - mean) / std
        out.append(torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))))
    if not out:
        return torch.empty(0, 3, cfg.crop_height, cfg.crop_width)
    return torch.stack(out)


# ----------------------------------------------------------------------------- encoder


def _check_shape(shape: VisionShape, source: str, *, require_vit_l14: bool) -> None:
    if not require_vit_l14 or (
        shape.hidden_size == VIT_L14.hidden_size and shape.num_layers == VIT_L14.num_layers
        and shape.patch_size == VIT_L14.patch_size and shape.image_size == VIT_L14.image_size
    ):
        return
    raise ModelFileError(
        f"{source} is a {shape.describe()} vision model; HyperLoRA needs OpenAI CLIP ViT-L/14 "
        f"(hidden size 1024, 24 layers, patch 14, 224 px, {VIT_L14.num_tokens} tokens), the encoder its weights were trained with. "
        "Pick a ViT-L/14 file in models/clip_vision (often named clip_vision_l.safetensors or "
        "CLIP-ViT-L-14.safetensors; the ViT-H / ViT-bigG files of IP-Adapter do not fit) or put "
        "openai/clip-vit-large-patch14 into models/hyper_lora/clip_vit/clip_vit_large_14/."
    )


def _vision_keys(keys: list[str]) -> list[str]:
    """The keys of the vision tower only (a whole CLIP checkpoint also holds a text tower)."""
    if "vision_model.embeddings.patch_embedding.weight" in keys:
        return [k for k in keys if k.startswith("vision_model.")]
    if "visual.transformer.resblocks.0.attn.in_proj_weight" in keys:
        return [k for k in keys if k.startswith("visual.")]
    return keys


def _load_vision_file(path: Path, *, source: str, check_name: str, num_heads: int | None,
                      require_vit_l14: bool) -> tuple[dict[str, torch.Tensor], VisionShape]:
    """Read the header, check the architecture from shapes alone, then load the vision tensors only.

    A wrong file (e.g. a 2.5 GB ViT-bigG) is refused before any tensor data is read.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = _vision_keys(list(f.keys()))
            meta = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in keys}
            shape = read_vision_shape(canonical_vision_state_dict(meta, source=source), source=source,
                                      num_heads=num_heads)
            _check_shape(shape, check_name, require_vit_l14=require_vit_l14)
            state = {k: f.get_tensor(k) for k in keys}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"{path} is not a readable .safetensors file ({exc}); download it again.") from exc
    return canonical_vision_state_dict(state, source=source), shape


def _build_model(shape: VisionShape, config_overrides: dict[str, Any], state: dict[str, torch.Tensor],
                 source: str, dtype: torch.dtype | None) -> nn.Module:
    """Create a ``CLIPVisionModel`` on the meta device and load ``state`` (canonical keys) strictly."""
    transformers = _import_transformers()
    kwargs = dict(
        hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
        image_size=shape.image_size, patch_size=shape.patch_size, num_channels=3,
        hidden_act="quick_gelu", layer_norm_eps=1e-5,
    )
    kwargs.update(config_overrides)
    config = transformers.CLIPVisionConfig(**kwargs)
    with torch.device("meta"):
        model = transformers.CLIPVisionModel(config)
    expected = model.state_dict()
    # transformers 4 names the parameters "vision_model.<name>", transformers 5 "<name>": follow the model.
    prefix = "vision_model." if next(iter(expected)).startswith("vision_model.") else ""
    state = {prefix + k: v for k, v in state.items()}
    wanted = {k for k in expected if not k.endswith("position_ids")}
    missing, unexpected = sorted(wanted - state.keys()), sorted(state.keys() - wanted)
    if missing or unexpected:
        raise ModelFileError(
            f"{source} does not match a CLIP vision model of its own shape ({shape.describe()}): "
            f"missing {missing[:4]}{'...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}"
            f"{'...' if len(unexpected) > 4 else ''}. The file may be damaged or of another architecture."
        )
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ModelFileError(f"{source}: tensor {key} has shape {tuple(value.shape)}, expected {tuple(expected[key].shape)}.")
    target = dtype or next(iter(state.values())).dtype
    state = {k: v.to(target) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    for name, buf in list(model.named_buffers()):
        if name.endswith("position_ids"):   # non-persistent buffer, rebuilt off the meta device
            owner = model.get_submodule(name.rsplit(".", 1)[0])
            owner.register_buffer("position_ids", torch.arange(buf.shape[-1]).expand(1, -1), persistent=False)
    return model.eval()


class ClipVisionEncoder(nn.Module):
    """CLIP vision tower returning penultimate hidden states ``[N, 257, 1024]`` (format §5.1)."""

    def __init__(self, model: nn.Module, *, shape: VisionShape, processor: ClipProcessorConfig, model_id: str) -> None:
        super().__init__()
        layers = model.vision_model.encoder.layers if hasattr(model, "vision_model") else model.encoder.layers
        if len(layers) < 2:
            raise ModelFileError(f"{model_id}: a CLIP vision model needs at least 2 layers for penultimate features.")
        # Drop the last layer: last_hidden_state (taken before post_layernorm) is then hidden_states[-2].
        del layers[len(layers) - 1]
        self.model = model
        self.shape = shape
        self.processor = processor
        self.model_id = model_id

    # -- loading ---------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, processor_folder: str | os.PathLike | None = None, *,
                        dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
                        require_vit_l14: bool = True) -> "ClipVisionEncoder":
        """Load the released HF folder (``config.json`` + ``model.safetensors``); never downloads."""
        folder = Path(folder)
        config_file, weights = folder / "config.json", folder / "model.safetensors"
        for needed in (config_file, weights):
            if not needed.is_file():
                raise ModelFileError(
                    f"{needed} is missing; the CLIP folder needs config.json and model.safetensors of "
                    "openai/clip-vit-large-patch14 (models/hyper_lora/clip_vit/clip_vit_large_14/)."
                )
        config = _read_json(config_file, "CLIP config")
        config = config.get("vision_config", config)   # a full CLIPModel config holds the vision part
        state, shape = _load_vision_file(weights, source=str(weights), check_name=str(folder),
                                         num_heads=config.get("num_attention_heads"), require_vit_l14=require_vit_l14)
        overrides = {k: config[k] for k in ("hidden_act", "layer_norm_eps") if k in config}
        model = _build_model(shape, overrides, state, str(weights), dtype)
        processor = ClipProcessorConfig.from_folder(processor_folder)
        return cls(model, shape=shape, processor=processor, model_id=_file_id(weights)).to(device)

    @classmethod
    def from_single_file(cls, path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                         device: torch.device | str = "cpu", require_vit_l14: bool = True,
                         num_heads: int | None = None, processor_folder: str | os.PathLike | None = None) -> "ClipVisionEncoder":
        """Load a ComfyUI ``models/clip_vision`` single file (HF- or open_clip-keyed).

        Heads cannot be read off shapes: ``hidden_size // 64`` (16 for ViT-L/14) unless given.
        """
        path = Path(path)
        if not path.is_file():
            raise ModelFileError(f"CLIP vision file {path} does not exist; put a ViT-L/14 file into models/clip_vision.")
        if path.suffix.lower() not in (".safetensors", ".sft"):
            raise ModelFileError(f"{path.name} is not a .safetensors file; HyperLoRA reads CLIP vision models only from .safetensors.")
        state, shape = _load_vision_file(path, source=path.name, check_name=path.name, num_heads=num_heads,
                                         require_vit_l14=require_vit_l14)
        model = _build_model(shape, {}, state, path.name, dtype)
        return cls(model, shape=shape, processor=ClipProcessorConfig.from_folder(processor_folder),
                   model_id=_file_id(path)).to(device)

    # -- running ---------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """uint8 RGB images -> ``[N, 3, 224, 224]`` float32 on the CPU."""
        return clip_preprocess(images, self.processor)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[N, 3, 224, 224]`` -> penultimate hidden states ``[N, 257, 1024]`` on the model's device/dtype."""
        pixel_values = pixel_values.to(device=self.device, dtype=self.dtype)
        return self.model(pixel_values=pixel_values).last_hidden_state

    @torch.no_grad()   # not inference_mode: its tensors are slow to use (and to stack) outside it
    def encode(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Preprocess and run in one batch: ``[N, 257, 1024]``."""
        return self.forward(self.preprocess(images))


def _file_id(path: Path) -> str:
    stat = path.stat()
    return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
