"""Aesthetic scores for the A.5 filter (score > 5.5): pluggable, loaded from local files only.

``--aesthetic none``
    No scorer: every image passes (score +inf).  Use it when the data is already curated (or for toy data);
    the manifest records that the filter was off.

``--aesthetic PATH`` (a ``.safetensors`` file)
    The LAION aesthetics predictor: a head on the **L2-normalised CLIP ViT-L/14 image embedding** (the 768-d
    output of the vision tower's ``visual_projection``).  Two published layouts are read:

    * linear, LAION-Aesthetics v1 (``sa_0_4_vit_l_14_linear``): keys ``weight [1, 768]``, ``bias [1]``;
    * MLP, improved-aesthetic-predictor (``sac+logos+ava1-l14-linearMSE``): ``layers.{0,2,4,6,7}.weight/bias``,
      768 -> 1024 -> 128 -> 64 -> 16 -> 1, Linear layers with dropout between them and **no** activation
      (as published; dropout is inactive at inference).

    Any chain of Linear layers numbered ``N.weight`` / ``layers.N.weight`` (in index order, ending in 1 output)
    is accepted.  The heads are published as pickled ``.pth`` files, which this pack never opens: convert once
    with ``python -c "import torch, safetensors.torch as s; s.save_file(torch.load('h.pth', weights_only=True),
    'h.safetensors')"``.  The CLIP model (``aesthetic_clip``) is a Hugging Face folder holding a ViT-L/14 with
    its ``visual_projection`` (``openai/clip-vit-large-patch14``: a ``CLIPModel`` or
    ``CLIPVisionModelWithProjection`` folder) or ComfyUI's ``clip_vision_l.safetensors`` (HF or open_clip keys
    with the projection); a checkpoint without the projection is refused.  Preprocessing is this pack's CLIP
    preprocessing.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor, nn

from ..encoders import ClipProcessorConfig, clip_preprocess
from ..errors import ModelFileError, SettingError
from ..safetensors_io import open_safetensors


def _read_tensors(path: Path, name: str, fix: str) -> dict[str, Tensor]:
    """Every tensor of ``path`` through the pack's shared opener (clear errors, never a pickle)."""
    with open_safetensors(path, error=ModelFileError, name=name,
                          pickle_fix="Convert it once to .safetensors (see hyperlora/train/aesthetic.py) or "
                                     "use --aesthetic none.", fix=fix) as f:
        return {k: f.get_tensor(k) for k in f.keys()}

logger = logging.getLogger(__name__)

NONE = "none"
_KEY = re.compile(r"^(?:(?:layers|model|mlp)\.)?(\d+)\.(weight|bias)$")


class Scorer(Protocol):
    """Aesthetic score of each image (higher = nicer; LAION's scale is about 1..10)."""

    name: str

    def score(self, images: Sequence[np.ndarray]) -> list[float]: ...


class NoScorer:
    """``none``: keeps everything (score +inf)."""

    name = NONE

    def score(self, images: Sequence[np.ndarray]) -> list[float]:
        return [math.inf] * len(images)


def load_head(path: str | Path) -> nn.Sequential:
    """The predictor head of ``path`` (.safetensors) as ``nn.Sequential`` of Linear layers (eval, float32)."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() != ".safetensors":
        raise ModelFileError(
            f"{path.name} is not a .safetensors file; convert the published .pth head once (see "
            "hyperlora/train/aesthetic.py) or use --aesthetic none.")
    state = _read_tensors(path, "aesthetic predictor", "give its .safetensors file or use --aesthetic none.")
    if set(state) == {"weight", "bias"}:
        layers = {0: (state["weight"], state["bias"])}
    else:
        found: dict[int, dict[str, Tensor]] = {}
        for key, value in state.items():
            m = _KEY.match(key)
            if m is None:
                raise ModelFileError(
                    f"{path}: unexpected key {key!r}; expected the LAION aesthetic head layouts (weight/bias, or "
                    "layers.N.weight/bias of Linear layers).")
            found.setdefault(int(m.group(1)), {})[m.group(2)] = value
        layers = {}
        for i, d in found.items():
            if "weight" not in d or d["weight"].ndim != 2:
                raise ModelFileError(f"{path}: layer {i} has no 2-D weight; not a Linear head.")
            layers[i] = (d["weight"], d.get("bias", torch.zeros(d["weight"].shape[0])))
    modules: list[nn.Module] = []
    width: int | None = None
    for i in sorted(layers):
        w, b = layers[i]
        if width is not None and w.shape[1] != width:
            raise ModelFileError(f"{path}: layer {i} reads {w.shape[1]} features but the previous layer gives {width}.")
        lin = nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            lin.weight.copy_(w.float())
            lin.bias.copy_(b.float().reshape(-1))
        modules.append(lin)
        width = w.shape[0]
    if width != 1:
        raise ModelFileError(f"{path}: the head ends in {width} outputs, an aesthetic score is 1.")
    return nn.Sequential(*modules).eval().requires_grad_(False)


def _projection(state: dict[str, Tensor]) -> Tensor | None:
    """The image projection ``[proj, hidden]`` of a CLIP checkpoint (HF/ComfyUI ``visual_projection.weight``,
    open_clip ``visual.proj`` = its transpose), or None."""
    if "visual_projection.weight" in state:
        return state["visual_projection.weight"]
    if "visual.proj" in state:
        return state["visual.proj"].T.contiguous()
    return None


def load_projected_clip(source: str | Path, *, device: str | torch.device = "cpu") -> nn.Module:
    """``transformers.CLIPVisionModelWithProjection`` (eval, frozen) from a Hugging Face CLIP folder
    (``config.json`` + ``model.safetensors``, a CLIPModel or a vision model with projection) or a ComfyUI
    ``models/clip_vision`` file (HF or open_clip keys).  The pack's own key canonicalisation is used; a
    checkpoint without the image projection is refused (the LAION heads read the projected embedding)."""
    import json

    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from ..encoders import canonical_vision_state_dict, read_vision_shape

    source = Path(source)
    config: dict = {}
    if source.is_dir():
        weights = source / "model.safetensors"
        if (source / "config.json").is_file():
            try:
                raw = json.loads((source / "config.json").read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ModelFileError(f"{source / 'config.json'} is not readable JSON ({exc}).") from exc
            config = dict(raw.get("vision_config", raw))
    else:
        weights = source
    if not weights.is_file():
        raise ModelFileError(
            f"The aesthetic scorer's CLIP {source} has no {weights.name}; give a Hugging Face folder of "
            "openai/clip-vit-large-patch14 or ComfyUI's clip_vision_l.safetensors.")
    state = _read_tensors(weights, "CLIP vision file", "give openai/clip-vit-large-patch14 as a Hugging Face "
                          "folder or ComfyUI's clip_vision_l.safetensors.")
    proj = _projection(state)
    if proj is None:
        raise ModelFileError(
            f"{weights} has no image projection (visual_projection.weight): the LAION aesthetic heads read the "
            "projected CLIP embedding. Give --aesthetic-clip a full openai/clip-vit-large-patch14 folder or "
            "ComfyUI's clip_vision_l.safetensors.")
    vision = canonical_vision_state_dict(state, source=str(weights))
    shape = read_vision_shape(vision, source=str(weights), num_heads=config.get("num_attention_heads"))
    cfg = CLIPVisionConfig(hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
                           num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
                           image_size=shape.image_size, patch_size=shape.patch_size, projection_dim=int(proj.shape[0]),
                           hidden_act=config.get("hidden_act", "quick_gelu"),
                           layer_norm_eps=config.get("layer_norm_eps", 1e-5))
    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(cfg)
    expected = model.state_dict()
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in expected) else ""
    full = {prefix + k: v for k, v in vision.items()}
    full["visual_projection.weight"] = proj
    wanted = {k for k in expected if not k.endswith("position_ids")}
    if wanted != set(full) or any(tuple(full[k].shape) != tuple(expected[k].shape) for k in wanted):
        raise ModelFileError(f"{weights}: the CLIP tensors do not form a vision model with projection "
                             f"({shape.describe()}); the file may be damaged.")
    model.load_state_dict({k: v.float() for k, v in full.items()}, strict=False, assign=True)
    for name, buf in list(model.named_buffers()):
        if buf.is_meta and name.endswith("position_ids"):
            owner = model.get_submodule(name.rsplit(".", 1)[0])
            owner.register_buffer("position_ids", torch.arange(buf.shape[-1]).expand(1, -1), persistent=False)
    return model.to(device).eval().requires_grad_(False)


class LaionScorer:
    """CLIP ViT-L/14 image embedding (projected, L2-normalised) -> head -> score."""

    def __init__(self, head_path: str | Path, clip_source: str | Path, *, device: str | torch.device = "cpu",
                 processor: ClipProcessorConfig | None = None, batch: int = 8) -> None:
        self.clip = load_projected_clip(clip_source, device=device)
        self.head = load_head(head_path).to(device)
        dim = int(self.clip.config.projection_dim)
        if self.head[0].in_features != dim:
            raise ModelFileError(
                f"The aesthetic head {head_path} reads {self.head[0].in_features}-d embeddings but {clip_source} gives "
                f"{dim}-d ones; the LAION heads need CLIP ViT-L/14 (768).")
        self.processor = processor or ClipProcessorConfig()
        self.batch = int(batch)
        self.name = f"laion:{Path(head_path).name}"

    @torch.no_grad()
    def embed(self, images: Sequence[np.ndarray]) -> Tensor:
        """``[N, D]`` L2-normalised projected image embeddings (float32)."""
        outs = []
        device = next(self.clip.parameters()).device
        for start in range(0, len(images), self.batch):
            pixels = clip_preprocess(images[start:start + self.batch], self.processor).to(device)
            emb = self.clip(pixel_values=pixels).image_embeds.float()
            outs.append(emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        return torch.cat(outs) if outs else torch.zeros(0, self.head[0].in_features)

    @torch.no_grad()
    def score(self, images: Sequence[np.ndarray]) -> list[float]:
        if not len(images):
            return []
        return self.head(self.embed(images)).reshape(-1).cpu().tolist()


def load_scorer(spec: str | Path, *, clip_folder: str | Path | None, device: str | torch.device = "cpu") -> Scorer:
    """``none`` -> :class:`NoScorer`; a path -> :class:`LaionScorer` (needs ``clip_folder``)."""
    if str(spec).strip().lower() == NONE:
        return NoScorer()
    if clip_folder is None:
        raise SettingError(
            f"--aesthetic {spec} needs a CLIP ViT-L/14 folder with visual_projection (--aesthetic-clip); "
            "or use --aesthetic none.")
    return LaionScorer(spec, clip_folder, device=device)


__all__ = ["LaionScorer", "NONE", "NoScorer", "Scorer", "load_head", "load_projected_clip", "load_scorer"]
