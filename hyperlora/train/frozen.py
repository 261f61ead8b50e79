"""The frozen SDXL parts training reads: UNet, VAE, both text encoders and the noise schedule, offline.

Two sources, one API:

* a diffusers folder (``unet/ vae/ text_encoder/ text_encoder_2/ tokenizer/ tokenizer_2/ scheduler/``),
  loaded with ``from_pretrained(folder, subfolder=..., local_files_only=True)``;
* the single-file SDXL checkpoint a ComfyUI user has in ``models/checkpoints`` (SAI layout:
  ``model.diffusion_model.*``, ``first_stage_model.*``, ``conditioner.embedders.0.transformer.*`` (CLIP-L,
  transformers keys) and ``conditioner.embedders.1.model.*`` (CLIP-G, open_clip keys)).  Only the tensors
  of the part asked for are read (``safe_open``), converted with diffusers' own LDM -> diffusers key
  converters (:mod:`diffusers.loaders.single_file_utils`) and loaded strictly into a model built on the
  ``meta`` device from the SDXL configs shipped in ``hyperlora/train/configs/`` (public values of
  stabilityai/stable-diffusion-xl-base-1.0), so nothing is fetched from a hub and the model is never
  held twice in memory.  A single file has no tokenizer: give ``tokenizer=`` a CLIP BPE folder
  (``vocab.json`` + ``merges.txt``; ComfyUI ships one as ``comfy/sd1_tokenizer``), otherwise the one of an
  importable / vendored ComfyUI is used when found.

Text encoding is SDXL's: the penultimate hidden states of both encoders concatenated on the channel axis
(``[B, 77, 768 + 1280]``) and the projected pooled output of encoder 2 (``[B, 1280]``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ModelFileError, SettingError
from ..spec import PICKLE_SUFFIXES

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
UNET_CONFIG = CONFIG_DIR / "sdxl_unet_config.json"
VAE_CONFIG = CONFIG_DIR / "sdxl_vae_config.json"
TEXT_ENCODER_CONFIG = CONFIG_DIR / "sdxl_text_encoder_config.json"
TEXT_ENCODER_2_CONFIG = CONFIG_DIR / "sdxl_text_encoder_2_config.json"
SCHEDULER_CONFIG = CONFIG_DIR / "sdxl_scheduler_config.json"

SAI_UNET_PREFIX = "model.diffusion_model."
SAI_VAE_PREFIX = "first_stage_model."
SAI_CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
SAI_CLIP_G_PREFIX = "conditioner.embedders.1.model."
SINGLE_FILE_SUFFIXES = (".safetensors", ".sft")
TOKENIZER_FILES = ("vocab.json", "merges.txt")
TOKENIZER_ENV = "HYPERLORA_CLIP_TOKENIZER"
"""Environment variable naming a CLIP BPE tokenizer folder for single-file checkpoints."""
MAX_TOKENS = 77


# ----------------------------------------------------------------------------- sources


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"{path} is not readable JSON ({exc}); reinstall the package or fix the file.") from exc


def _is_single_file(source: Path) -> bool:
    return source.is_file() and source.suffix.lower() in SINGLE_FILE_SUFFIXES


def _check_source(source: str | os.PathLike[str], part: str) -> Path:
    """``source`` as a Path that is a diffusers folder holding ``part/`` or a single .safetensors file."""
    path = Path(source)
    if _is_single_file(path):
        return path
    if path.is_file():
        raise ModelFileError(
            f"{path} is not a .safetensors file; give an SDXL checkpoint in .safetensors (ComfyUI's "
            "models/checkpoints) or a diffusers folder (with unet/, vae/, text_encoder/ ...).")
    if not path.is_dir():
        raise ModelFileError(f"SDXL source {path} does not exist; give the SDXL .safetensors checkpoint or a diffusers folder.")
    if not (path / part).is_dir():
        raise ModelFileError(
            f"{path} has no {part}/ folder: it is not a diffusers SDXL folder. Give a folder with {part}/ "
            "(and unet/, vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/) or the single-file checkpoint.")
    return path


def _read_prefixed(path: Path, prefixes: Sequence[str], dtype: torch.dtype | None) -> dict[str, Tensor]:
    """Tensors of ``path`` whose key starts with one of ``prefixes`` (keys kept whole), cast to ``dtype``."""
    from safetensors import SafetensorError, safe_open

    out: dict[str, Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if key.startswith(tuple(prefixes)):
                    t = f.get_tensor(key)
                    out[key] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    except (SafetensorError, OSError) as exc:
        raise ModelFileError(f"{path} is not a readable .safetensors file ({exc}); download it again.") from exc
    if not out:
        raise ModelFileError(
            f"{path} holds no tensors under {' / '.join(prefixes)}: it is not an SDXL checkpoint in the SAI/ComfyUI "
            "layout (model.diffusion_model.*, first_stage_model.*, conditioner.embedders.0/1.*). Use the full SDXL "
            "checkpoint (with VAE and text encoders) or a diffusers folder.")
    return out


def check_state(model: nn.Module, state: dict[str, Tensor], source: str, what: str) -> dict[str, Tensor]:
    """``state`` checked against ``model``'s keys and shapes (works on meta tensors: full-size key maps cost no
    memory); LDM's 1x1-conv attention weights are squeezed to linear.  ModelFileError naming the keys otherwise."""
    expected = model.state_dict()
    # buffers that are rebuilt (not persistent in the checkpoint): position_ids of transformers' CLIP
    wanted = {k for k in expected if not k.endswith("position_ids")}
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    missing, unexpected = sorted(wanted - state.keys()), sorted(state.keys() - wanted)
    if missing or unexpected:
        raise ModelFileError(
            f"{source}: the {what} does not match SDXL's ({len(missing)} missing, e.g. {missing[:3]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:3]}). Is it an SDXL checkpoint? SD 1.5 / SD3 / "
            "Flux checkpoints cannot be used.")
    for key, value in list(state.items()):
        want = tuple(expected[key].shape)
        if value.ndim == len(want) + 2 and tuple(value.shape[2:]) == (1, 1) and tuple(value.shape[:2]) == want:
            state[key] = value = value[:, :, 0, 0]     # LDM's 1x1-conv attention projections (VAE mid block)
        if tuple(value.shape) != want:
            raise ModelFileError(
                f"{source}: {what} tensor {key} has shape {tuple(value.shape)}, SDXL's is {want}; "
                "the checkpoint is not an SDXL base model.")
    return state


def _load_strict(model: nn.Module, state: dict[str, Tensor], source: str, what: str) -> None:
    """Load ``state`` into ``model`` (built on meta) with assign=True after :func:`check_state`."""
    state = check_state(model, state, source, what)
    model.load_state_dict(state, strict=False, assign=True)
    for name, buf in list(model.named_buffers()):
        if buf.is_meta and name.endswith("position_ids"):
            owner = model.get_submodule(name.rsplit(".", 1)[0])
            owner.register_buffer("position_ids", torch.arange(buf.shape[-1]).expand(1, -1), persistent=False)
    leftover = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if leftover:
        raise ModelFileError(f"{source}: the {what} left {leftover[:3]} unset; the checkpoint is incomplete.")


def _freeze(model: nn.Module, dtype: torch.dtype, device: torch.device | str) -> Any:
    """requires_grad False, eval, on ``device``; cast to ``dtype`` only where a parameter is not in it yet
    (diffusers keeps some modules in float32 on purpose when loaded with torch_dtype)."""
    model.requires_grad_(False)
    if any(p.dtype != dtype for p in model.parameters()) and not getattr(model, "_keep_in_fp32_modules", None):
        model = model.to(dtype=dtype)
    return model.to(device=device).eval()


# ----------------------------------------------------------------------------- UNet / VAE


def refuse_pickled_weights(folder: Path) -> None:
    """Raise :class:`ModelFileError` when ``folder`` (a part of a diffusers folder) holds pickled PyTorch weights
    (``.bin``, ``.pt``, ...) and no ``.safetensors``: unpickling can run code hidden in the file, so this pack
    never hands one to diffusers or transformers (whatever their own ``weights_only`` defaults are)."""
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickled = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise ModelFileError(
            f"'{pickled[0]}' is a pickled PyTorch file and '{folder}' has no .safetensors weights; HyperLoRA Studio "
            f"never opens pickles (loading one can run code hidden in it). Use the .safetensors weights of this "
            f"model (Hugging Face's SDXL repositories ship them, e.g. {folder.name}/"
            f"diffusion_pytorch_model.safetensors or model.safetensors), or give the single-file SDXL .safetensors "
            f"checkpoint from ComfyUI's models/checkpoints as 'base_model'.")


def _from_folder(cls: Any, path: Path, sub: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained(path, subfolder=sub)`` offline and from ``.safetensors`` only (pickled weights are
    refused first, see :func:`refuse_pickled_weights`); a folder holding only the ``fp16`` variant
    (``*.fp16.safetensors``, as stabilityai's repo has for some parts) is read too."""
    refuse_pickled_weights(path / sub)
    kwargs = {**kwargs, "use_safetensors": True}
    try:
        return cls.from_pretrained(str(path), subfolder=sub, local_files_only=True, **kwargs)
    except (OSError, ValueError) as first:
        if any((path / sub).glob("*.fp16.safetensors")):
            try:
                return cls.from_pretrained(str(path), subfolder=sub, local_files_only=True, variant="fp16", **kwargs)
            except (OSError, ValueError):
                pass
        raise ModelFileError(f"{path / sub} cannot be loaded as {cls.__name__} ({first}); it must hold config.json and "
                             ".safetensors weights of a diffusers SDXL folder.") from first


def unet_config(source: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The diffusers UNet config of ``source`` (its ``unet/config.json``) or SDXL's shipped one."""
    if source is not None and Path(source).is_dir():
        return _read_json(Path(source) / "unet" / "config.json")
    return _read_json(UNET_CONFIG)


def sai_unet_to_diffusers(state: dict[str, Tensor], config: dict[str, Any]) -> dict[str, Tensor]:
    """SAI/LDM UNet tensors (keys with or without ``model.diffusion_model.``) -> diffusers UNet keys
    (diffusers' own converter; works on meta tensors, so key maps can be checked without memory)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    full = {k if k.startswith(SAI_UNET_PREFIX) else SAI_UNET_PREFIX + k: v for k, v in state.items()}
    return convert_ldm_unet_checkpoint(full, dict(config))


PART_NAMES = {"unet": "UNet", "vae": "VAE", "text_encoder": "text encoder 1 (CLIP-L)",
              "text_encoder_2": "text encoder 2 (CLIP-G)"}
PART_CONFIGS = {"unet": UNET_CONFIG, "vae": VAE_CONFIG, "text_encoder": TEXT_ENCODER_CONFIG,
                "text_encoder_2": TEXT_ENCODER_2_CONFIG}


def convert_sai(part: str, raw: dict[str, Tensor], config: dict[str, Any] | None = None) -> tuple[nn.Module, dict[str, Tensor]]:
    """SAI single-file tensors (full keys; other parts' keys are ignored) of one ``part`` (unet, vae,
    text_encoder, text_encoder_2) -> (the diffusers / transformers model built on ``meta`` from ``config`` or
    the shipped SDXL config, its state dict in that model's names).  Works on meta tensors, so full-size key
    maps are checked without memory (:func:`check_state`)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if part not in PART_CONFIGS:
        raise ValueError(f"unknown SDXL part {part!r}")
    cfg = dict(config) if config is not None else _read_json(PART_CONFIGS[part])
    if part == "unet":
        state = sai_unet_to_diffusers({k: v for k, v in raw.items() if k.startswith(SAI_UNET_PREFIX)}, cfg)
        with torch.device("meta"):
            return UNet2DConditionModel.from_config(cfg), state
    if part == "vae":
        state = sfu.convert_ldm_vae_checkpoint({k: v for k, v in raw.items() if k.startswith(SAI_VAE_PREFIX)}, cfg)
        with torch.device("meta"):
            return AutoencoderKL.from_config(cfg), state
    text_cfg = CLIPTextConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "_class_name")})
    if part == "text_encoder":
        state = sfu.convert_ldm_clip_checkpoint({k: v for k, v in raw.items() if k.startswith(SAI_CLIP_L_PREFIX)})
        cls: Any = CLIPTextModel
    else:
        class _Hidden:   # convert_open_clip_checkpoint reads config.hidden_size only when text_projection is absent
            config = type("C", (), {"hidden_size": cfg["hidden_size"]})()

        g = {k: v for k, v in raw.items() if k.startswith(SAI_CLIP_G_PREFIX)}
        state = sfu.convert_open_clip_checkpoint(_Hidden(), g, prefix=SAI_CLIP_G_PREFIX)
        cls = CLIPTextModelWithProjection
    with torch.device("meta"):
        model = cls(text_cfg)
    # transformers 4 names the parameters "text_model.<name>", transformers 5 "<name>": follow the model
    if not any(k.startswith("text_model.") for k in model.state_dict()):
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    return model, state


def _load_part(cls: Any, source: str | os.PathLike[str], part: str, sai_prefix: str, what: str,
               dtype: torch.dtype, device: torch.device | str, config: dict[str, Any] | None) -> Any:
    """One frozen part (``unet`` / ``vae``) from a diffusers folder's subfolder or a single-file checkpoint."""
    path = _check_source(source, part)
    if not _is_single_file(path):
        return _freeze(_from_folder(cls, path, part, torch_dtype=dtype), dtype, device)
    model, state = convert_sai(part, _read_prefixed(path, [sai_prefix], dtype), config)
    _load_strict(model, state, path.name, what)
    return _freeze(model, dtype, device)


def load_unet(source: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu", config: dict[str, Any] | None = None) -> Any:
    """Frozen SDXL ``UNet2DConditionModel`` (eval, requires_grad False) from a diffusers folder (``unet/``)
    or a single-file SAI checkpoint (config: ``config`` or the shipped SDXL one)."""
    from diffusers import UNet2DConditionModel

    return _load_part(UNet2DConditionModel, source, "unet", SAI_UNET_PREFIX, "UNet", dtype, device, config)


def load_vae(source: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32,
             device: torch.device | str = "cpu", config: dict[str, Any] | None = None) -> Any:
    """Frozen SDXL ``AutoencoderKL`` from a diffusers folder (``vae/``) or a single-file checkpoint
    (``first_stage_model.*``; config: ``config`` or the shipped SDXL one, scaling factor 0.13025)."""
    from diffusers import AutoencoderKL

    return _load_part(AutoencoderKL, source, "vae", SAI_VAE_PREFIX, "VAE", dtype, device, config)


def load_noise_scheduler(source: str | os.PathLike[str] | None = None) -> Any:
    """SDXL's training noise schedule as a ``DDPMScheduler`` (scaled_linear 0.00085..0.012, 1000 steps,
    epsilon): from ``scheduler/`` of a diffusers folder when it has one (its values, DDPM class), else built in."""
    from diffusers import DDPMScheduler

    if source is not None and (Path(source) / "scheduler" / "scheduler_config.json").is_file():
        return DDPMScheduler.from_pretrained(str(source), subfolder="scheduler", local_files_only=True)
    cfg = _read_json(SCHEDULER_CONFIG)
    return DDPMScheduler.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})


# ----------------------------------------------------------------------------- text encoders


@dataclass
class TextEncoders:
    """SDXL's two CLIP text encoders and their tokenizers (frozen)."""

    tokenizer: Any
    tokenizer_2: Any
    text_encoder: Any      # CLIPTextModel (CLIP-L)
    text_encoder_2: Any    # CLIPTextModelWithProjection (CLIP-G)

    @property
    def device(self) -> torch.device:
        return next(self.text_encoder.parameters()).device

    @property
    def dims(self) -> tuple[int, int]:
        """(C = C1 + C2, P): channels of the concatenated hidden states and of the pooled embedding."""
        c1 = self.text_encoder.config.hidden_size
        c2 = self.text_encoder_2.config.hidden_size
        return c1 + c2, int(self.text_encoder_2.config.projection_dim)

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """Captions -> (``[B, 77, C1 + C2]`` penultimate hidden states of both encoders, concatenated;
        ``[B, P]`` pooled projection of encoder 2), as SDXL's pipeline does (float32 on the encoders' device)."""
        if not isinstance(captions, (list, tuple)) or not all(isinstance(c, str) for c in captions):
            raise SettingError("TextEncoders.encode needs a list of caption strings.")
        hidden: list[Tensor] = []
        pooled: Tensor | None = None
        for tok, enc in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            ids = tok(list(captions), padding="max_length", max_length=MAX_TOKENS, truncation=True,
                      return_tensors="pt").input_ids.to(next(enc.parameters()).device)
            out = enc(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2].float())
            if enc is self.text_encoder_2:
                pooled = out.text_embeds.float()
        assert pooled is not None
        return torch.cat(hidden, dim=-1), pooled


def _tokenizer_dir(tokenizer: str | os.PathLike[str] | None) -> Path:
    """A CLIP BPE folder: the argument, $HYPERLORA_CLIP_TOKENIZER, or ComfyUI's comfy/sd1_tokenizer when found."""
    candidates: list[Path] = []
    if tokenizer is not None:
        candidates.append(Path(tokenizer))
    elif os.environ.get(TOKENIZER_ENV):
        candidates.append(Path(os.environ[TOKENIZER_ENV]))
    else:
        try:
            import importlib.util

            spec = importlib.util.find_spec("comfy")
            if spec is not None and spec.submodule_search_locations:
                candidates += [Path(p) / "sd1_tokenizer" for p in spec.submodule_search_locations]
        except (ImportError, ValueError):
            pass
    for cand in candidates:
        if all((cand / f).is_file() for f in TOKENIZER_FILES):
            return cand
    named = f" {candidates[0]} has no {' / '.join(TOKENIZER_FILES)};" if tokenizer is not None else ""
    raise ModelFileError(
        f"A single-file SDXL checkpoint has no tokenizer;{named} give a CLIP tokenizer folder with vocab.json and "
        f"merges.txt (--tokenizer, or ${TOKENIZER_ENV}); ComfyUI ships one as ComfyUI/comfy/sd1_tokenizer.")


def _load_tokenizers(folder: Path) -> tuple[Any, Any]:
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=MAX_TOKENS)
    # SDXL's second tokenizer (open_clip) pads with "!" (id 0) instead of <|endoftext|>
    tok2 = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=MAX_TOKENS,
                         pad_token="!")
    return tok, tok2


def load_text_encoders(source: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32,
                       device: torch.device | str = "cpu", tokenizer: str | os.PathLike[str] | None = None,
                       configs: tuple[dict[str, Any], dict[str, Any]] | None = None) -> TextEncoders:
    """Frozen CLIP-L + CLIP-G with their tokenizers, from a diffusers folder or a single-file checkpoint
    (``tokenizer``: CLIP BPE folder for the single file; see the module docstring)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    path = _check_source(source, "text_encoder")
    if not _is_single_file(path):
        for sub in ("text_encoder_2", "tokenizer", "tokenizer_2"):
            if not (path / sub).is_dir():
                raise ModelFileError(f"{path} has no {sub}/ folder; a diffusers SDXL folder needs it.")
        tok = CLIPTokenizer.from_pretrained(str(path), subfolder="tokenizer", local_files_only=True)
        tok2 = CLIPTokenizer.from_pretrained(str(path), subfolder="tokenizer_2", local_files_only=True)
        te = _from_folder(CLIPTextModel, path, "text_encoder", dtype=dtype)
        te2 = _from_folder(CLIPTextModelWithProjection, path, "text_encoder_2", dtype=dtype)
        return TextEncoders(tok, tok2, _freeze(te, dtype, device), _freeze(te2, dtype, device))
    tok, tok2 = _load_tokenizers(_tokenizer_dir(tokenizer))
    cfg1, cfg2 = configs if configs is not None else (None, None)
    raw = _read_prefixed(path, [SAI_CLIP_L_PREFIX, SAI_CLIP_G_PREFIX], dtype)
    te, state1 = convert_sai("text_encoder", raw, cfg1)
    _load_strict(te, state1, path.name, PART_NAMES["text_encoder"])
    te2, state2 = convert_sai("text_encoder_2", raw, cfg2)
    _load_strict(te2, state2, path.name, PART_NAMES["text_encoder_2"])
    return TextEncoders(tok, tok2, _freeze(te, dtype, device), _freeze(te2, dtype, device))


__all__ = ["CONFIG_DIR", "TextEncoders", "check_state", "convert_sai", "refuse_pickled_weights", "load_noise_scheduler", "load_text_encoders", "load_unet", "load_vae",
           "sai_unet_to_diffusers", "unet_config"]
