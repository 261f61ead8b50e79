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
    ``CLIPVisionModelWithProjection`` folder); preprocessing is this pack's CLIP preprocessing.
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
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"Aesthetic predictor {path} does not exist; give its .safetensors file or 'none'.")
    if path.suffix.lower() != ".safetensors":
        raise ModelFileError(
            f"{path.name} is not a .safetensors file; convert the published .pth head once (see "
            "hyperlora/train/aesthetic.py) or use --aesthetic none.")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise ModelFileError(f"{path} is not a readable .safetensors file ({exc}).") from exc
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


class LaionScorer:
    """CLIP ViT-L/14 image embedding (projected, L2-normalised) -> head -> score."""

    def __init__(self, head_path: str | Path, clip_folder: str | Path, *, device: str | torch.device = "cpu",
                 processor: ClipProcessorConfig | None = None, batch: int = 8) -> None:
        import json

        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        folder = Path(clip_folder)
        if not (folder / "config.json").is_file():
            raise ModelFileError(
                f"The aesthetic scorer's CLIP folder {folder} has no config.json; give a Hugging Face folder of "
                "openai/clip-vit-large-patch14 (with visual_projection), e.g. the released clip_vit_large_14.")
        try:
            raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
            vision = dict(raw.get("vision_config", raw))
            # a full CLIPModel config keeps the projection width at the top level
            if "vision_config" in raw and "projection_dim" in raw:
                vision["projection_dim"] = raw["projection_dim"]
            vision = {k: v for k, v in vision.items() if k not in ("architectures", "model_type", "transformers_version")}
            self.clip = CLIPVisionModelWithProjection.from_pretrained(
                str(folder), config=CLIPVisionConfig(**vision), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ModelFileError(f"{folder}: cannot load a CLIP vision model with projection ({exc}).") from exc
        self.clip = self.clip.to(device).eval().requires_grad_(False)
        self.head = load_head(head_path).to(device)
        dim = int(self.clip.config.projection_dim)
        if self.head[0].in_features != dim:
            raise ModelFileError(
                f"The aesthetic head {head_path} reads {self.head[0].in_features}-d embeddings but {folder} gives "
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


__all__ = ["LaionScorer", "NONE", "NoScorer", "Scorer", "load_head", "load_scorer"]
