"""The released HyperLoRA format as data: file names, the models-folder layout, fixed numbers, the released
sizes and the architecture types.

This module is the leaf of the package: it imports nothing from the pack, so every other
module can take its constants from here and no two modules need each other for them.  The
numbers are facts of the released models; ``docs/released-format.md`` states them in prose
(section numbers there are cited as "format §N" in the code).
"""

from __future__ import annotations

from dataclasses import dataclass

# ---------------------------------------------------------------------------- files (format §1)

MARKER_FILE = "hyper_lora_modules.json"
"""The file that makes a folder a HyperLoRA model folder (ordered module list, format §3)."""
BASIS_FILE = "hyper_lora_modules.safetensors"
RESAMPLER_FILE = "resampler.safetensors"
ID_PROJECTOR_FILE = "id_projector.safetensors"
BASE_RESAMPLER_FILE = "base_resampler.safetensors"
MODEL_FILES = (MARKER_FILE, BASIS_FILE, RESAMPLER_FILE, ID_PROJECTOR_FILE, BASE_RESAMPLER_FILE)
"""Every file a model folder can hold, in the fixed order used for fingerprints and hashes."""
CHECKSUM_FILE = "hyperlora_checksums.json"
"""Written beside a model by the downloader: the SHA-256 of every file it verified (not a released file)."""

ANTELOPE_DETECTOR_FILE = "scrfd_10g_bnkps.onnx"
ANTELOPE_LANDMARK_FILE = "2d106det.onnx"
ANTELOPE_RECOGNITION_FILE = "glintr100.onnx"
ANTELOPE_FILES = (ANTELOPE_DETECTOR_FILE, ANTELOPE_LANDMARK_FILE, ANTELOPE_RECOGNITION_FILE,
                  "1k3d68.onnx", "genderage.onnx")
"""The five files of the released AntelopeV2 pack."""
ANTELOPE_REQUIRED_FILES = (ANTELOPE_DETECTOR_FILE, ANTELOPE_LANDMARK_FILE, ANTELOPE_RECOGNITION_FILE)
"""The three this pack loads (detection, 106-point landmarks, recognition): a folder is usable iff it has them."""

# ---------------------------------------------------------------------------- the models folder (format §1)
# Paths below ComfyUI's models/ folder, "/"-separated (pathlib joins them on every system).

HYPER_LORA_DIR = "hyper_lora"
"""``models/hyper_lora``: the released tree below it (also the ComfyUI folder key of the pack)."""
MODELS_SUBDIR = "hyper_lora"
"""``models/hyper_lora/hyper_lora/<model>/``: the HyperLoRA model folders."""
CLIP_VIT_SUBDIR = "clip_vit"
"""``models/hyper_lora/clip_vit/<name>/``: Hugging Face CLIP vision folders."""
CLIP_PROCESSOR_SUBDIR = "clip_processor"
"""``models/hyper_lora/clip_processor/<name>_processor/``: their preprocessor configs."""
PROCESSOR_SUFFIX = "_processor"
IDENTITIES_SUBDIR = "identities"
"""``models/hyper_lora/identities``: identity files (this pack's, not a released folder)."""
RELEASED_CLIP_NAME = "clip_vit_large_14"
"""The released CLIP vision folder's name."""
INSIGHTFACE_DIR = "insightface"
"""``models/insightface``: insightface's root (also the ComfyUI folder key)."""
ANTELOPE_NAME = "antelopev2"
ANTELOPE_SUBDIR = f"models/{ANTELOPE_NAME}"
"""The AntelopeV2 pack below insightface's root."""
ANTELOPE_DIR = f"{INSIGHTFACE_DIR}/{ANTELOPE_SUBDIR}"
"""``models/insightface/models/antelopev2``: the AntelopeV2 pack's five files."""


def model_dir(name: str) -> str:
    """``hyper_lora/hyper_lora/<name>``: a HyperLoRA model folder, below models/."""
    return f"{HYPER_LORA_DIR}/{MODELS_SUBDIR}/{name}"


def clip_dir(name: str = RELEASED_CLIP_NAME) -> str:
    """``hyper_lora/clip_vit/<name>``: a CLIP vision folder, below models/."""
    return f"{HYPER_LORA_DIR}/{CLIP_VIT_SUBDIR}/{name}"


def clip_processor_name(clip_name: str = RELEASED_CLIP_NAME) -> str:
    """``<clip name>_processor``: the preprocessor folder's name that belongs to a CLIP folder."""
    return clip_name + PROCESSOR_SUFFIX


def clip_processor_dir(clip_name: str = RELEASED_CLIP_NAME) -> str:
    """``hyper_lora/clip_processor/<clip name>_processor``: its preprocessor folder, below models/."""
    return f"{HYPER_LORA_DIR}/{CLIP_PROCESSOR_SUBDIR}/{clip_processor_name(clip_name)}"


IDENTITY_FORMAT = "hyperlora.identity"
"""``format`` metadata of this pack's identity files (not a released file type)."""
IDENTITY_FORMAT_VERSION = 2
"""Version written.  1: tokens (+ base_tokens).  2: adds the optional ``face_embedding`` tensor; version 1
files are still read (they have no embedding)."""
FACE_MODELS_META = "face_models"
"""Metadata key of identity files holding the fingerprint of the face models that made the face embedding
(optional: files written before it was recorded lack it and still load)."""
FACE_EMBEDDING_DIM = 512
"""Width of an ArcFace (AntelopeV2 glintr100) embedding."""

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
"""File endings of pickled PyTorch files, which this pack never opens."""

# ---------------------------------------------------------------------------- numbers (format §2, §5)

LORA_LAYERS = ("to_q", "to_k", "to_v", "to_out")
"""The four projections of every attention module, in the order their tokens follow (format §5.5)."""
KOHYA_LAYER = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out_0"}
"""Layer name inside a kohya LoRA key (format §5.6)."""
TOKENS_PER_MODULE = 8
"""Two tokens (down, up coefficients) for each of the four layers."""
DEFAULT_HEADS = 12
"""Resampler heads of the released models (12 x 64); shapes only show the product."""
RESAMPLER_HEADS_META = "hyperlora_resampler_heads"
"""safetensors metadata key in which models trained by this pack record their resampler heads."""
NORM_EPS = 1e-8
"""Token normalisation ``t / sqrt(sum(t^2) + NORM_EPS)`` (format §5.4)."""
LN_EPS = 1e-5
"""Epsilon of every LayerNorm of the resampler and the ID projector."""
VIT_L14_WIDTH = 1024
"""Hidden size of OpenAI CLIP ViT-L/14, the image encoder the released models read."""
RELEASED_HYPER_DIM = 128
"""K: coefficients per token of the released models (the width of every basis and resampler output)."""
RELEASED_RANK = 8
"""Rank of the released ID-LoRA."""
RELEASED_BASE_RANK = 4
"""Rank of the released Base-LoRA."""
RELEASED_RESAMPLER_DIM = 1024
"""Width of the released resamplers (their latent queries), not to be confused with the CLIP width."""
RELEASED_RESAMPLER_DEPTH = 4
"""Perceiver layers of the released resamplers."""
RELEASED_DIM_HEAD = 64
"""Attention head width of the released resamplers (``DEFAULT_HEADS`` x 64 = 768)."""
RELEASED_FF_MULT = 4
"""Feed-forward expansion of the released resamplers."""
RELEASED_ID_TOKENS = 16
"""Tokens the released ID projector makes from one ArcFace embedding."""
TRIGGER_WORDS = "fcsks fxhks fhyks"
"""The trigger words the released models were trained with; prompts start with ``TRIGGER_PREFIX``."""
TRIGGER_PREFIX = TRIGGER_WORDS + ", "


# ---------------------------------------------------------------------------- this pack's own names
# Distinct from the authors' plugin (node ids HyperLoRA*, socket type HYPER_LORA), so both packs can be
# installed in one ComfyUI and each keeps all its nodes.

PACK_NAME = "HyperLoRA Studio"
PACK_FOLDER = "ComfyUI-HyperLoRA-Studio"
NODE_PREFIX = "HyperLoRAStudio"
MODEL_TYPE = "HYPERLORA_STUDIO_MODEL"
"""ComfyUI socket type of the loaded generator."""
IDENTITY_TYPE = "HYPERLORA_STUDIO_IDENTITY"
"""ComfyUI socket type of an identity."""
CROP_TYPE = "HYPERLORA_STUDIO_CROP"
"""ComfyUI socket type of a mask crop (Crop by Mask -> Paste by Mask)."""
DIFFLORA_TYPE = "HYPERLORA_STUDIO_DIFFLORA"
"""ComfyUI socket type of a loaded DiffLoRA model (DiffLoRA Loader -> LoRA from Images / New Person)."""
DIFFLORA_DIR = "difflora"
"""``models/difflora``: DiffLoRA model folders (each holding ``difflora.json``), one per dropdown entry."""


# ---------------------------------------------------------------------------- architecture


@dataclass(frozen=True)
class LoraModuleSpec:
    """One attention module of the UNet that gets a LoRA (kohya prefix, sizes from the JSON)."""

    name: str
    hidden_size: int
    cross_attention_dim: int | None

    def in_features(self, layer: str) -> int:
        """to_k / to_v read the context (cross_attention_dim or hidden_size); to_q / to_out hidden_size."""
        if layer in ("to_k", "to_v"):
            return self.cross_attention_dim or self.hidden_size
        return self.hidden_size

    def out_features(self, layer: str) -> int:
        return self.hidden_size


@dataclass(frozen=True)
class ResamplerConfig:
    """Sizes of one perceiver resampler (format §4, §5.3)."""

    dim: int
    depth: int
    heads: int
    dim_head: int
    ff_mult: int
    num_queries: int  # Q = 8 * number of modules
    output_dim: int  # K
    embed_dims: tuple[int, ...]  # (E,) one condition, (E_x, E_y) two conditions


@dataclass(frozen=True)
class HyperLoRAArchitecture:
    """Everything about a model folder that its JSON and tensor shapes tell."""

    modules: tuple[LoraModuleSpec, ...]  # JSON order, never sorted
    hyper_dim: int  # K
    rank: int  # ID-LoRA rank
    base_rank: int | None  # None when no base basis
    resampler: ResamplerConfig
    base_resampler: ResamplerConfig | None
    id_embed_dim: int | None  # 512, None without id_projector
    num_id_tokens: int | None  # 16

    @property
    def num_tokens(self) -> int:
        return TOKENS_PER_MODULE * len(self.modules)


def token_index(module: int, layer: str) -> int:
    """Index of the down-coefficient token of ``layer`` of module ``module`` (up is the next one)."""
    return TOKENS_PER_MODULE * module + 2 * LORA_LAYERS.index(layer)


def kohya_prefix(module: LoraModuleSpec, layer: str) -> str:
    """``lora_unet_..._attn1_to_q``: the key prefix of one LoRA matrix pair (format §5.6)."""
    return f"{module.name}_{KOHYA_LAYER[layer]}"


__all__ = [
    "ANTELOPE_DETECTOR_FILE", "ANTELOPE_DIR", "ANTELOPE_NAME", "ANTELOPE_SUBDIR", "CLIP_PROCESSOR_SUBDIR",
    "CLIP_VIT_SUBDIR", "HYPER_LORA_DIR", "IDENTITIES_SUBDIR", "INSIGHTFACE_DIR", "MODELS_SUBDIR", "PROCESSOR_SUFFIX",
    "RELEASED_CLIP_NAME", "clip_dir", "clip_processor_dir", "clip_processor_name", "model_dir", "ANTELOPE_FILES", "ANTELOPE_LANDMARK_FILE", "ANTELOPE_RECOGNITION_FILE",
    "ANTELOPE_REQUIRED_FILES", "BASE_RESAMPLER_FILE", "BASIS_FILE", "CHECKSUM_FILE", "DEFAULT_HEADS", "FACE_EMBEDDING_DIM", "FACE_MODELS_META",
    "HyperLoRAArchitecture", "ID_PROJECTOR_FILE", "IDENTITY_FORMAT", "IDENTITY_FORMAT_VERSION", "KOHYA_LAYER", "LN_EPS", "LORA_LAYERS", "LoraModuleSpec",
    "MARKER_FILE", "MODEL_FILES", "MODEL_TYPE", "IDENTITY_TYPE", "DIFFLORA_DIR", "DIFFLORA_TYPE", "NODE_PREFIX", "PACK_FOLDER", "PACK_NAME", "NORM_EPS", "PICKLE_SUFFIXES", "RESAMPLER_FILE", "RESAMPLER_HEADS_META",
    "RELEASED_BASE_RANK", "RELEASED_DIM_HEAD", "RELEASED_FF_MULT", "RELEASED_HYPER_DIM", "RELEASED_ID_TOKENS",
    "RELEASED_RANK", "RELEASED_RESAMPLER_DEPTH", "RELEASED_RESAMPLER_DIM", "ResamplerConfig", "TOKENS_PER_MODULE", "TRIGGER_PREFIX", "TRIGGER_WORDS", "VIT_L14_WIDTH", "kohya_prefix",
    "token_index",
]
