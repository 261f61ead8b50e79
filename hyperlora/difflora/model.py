"""DiffLoRA inference: a model folder -> LoRAs sampled for a person (or for nobody in particular).

:class:`DiffLoraModel` holds the two trained parts of a DiffLoRA model, the LoRA weights autoencoder
(:class:`~.lae.LoraAutoencoder`) and the latent diffusion transformer (:class:`~.dit.LatentDiT`, which owns
the MIF condition encoder), plus the **latent scale** ``s`` they were trained with:

* the DiT works on ``x = z / s`` (LAE latents of about unit std, matching the unit-variance noise of the
  rectified flow, :mod:`.diffusion`);
* sampling gives ``x0 [B, T, C]``; the LAE decodes ``z = x0 * s`` into ``B`` kohya LoRAs of its layout
  (``alpha = rank``).

:meth:`DiffLoraModel.loras_from_mif` samples for one person's mixed image features (:class:`~.condition.RawMif`
from :func:`~.condition.mixed_image_features`), one LoRA per seed; :meth:`DiffLoraModel.new_person` samples
unconditionally (the learned null condition): people who do not exist.  Each result is a
:class:`hyperlora.lora.GeneratedLora` whose provenance names the model, its fingerprint, the seed, steps and
guidance and ``generator = "difflora"``.

:meth:`DiffLoraModel.from_folder` reads a model folder through :mod:`.format` (``difflora.json`` +
``lae.safetensors`` + ``dit.safetensors``) and loads both parts strictly (every tensor present, none extra,
same shapes); the parts run in eval mode.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from ..errors import ImageInputError, ModelFileError, SettingError
from ..lora import GeneratedLora
from .condition import RawMif, stack_mifs
from .diffusion import sample
from .dit import LatentDiT
from .lae import LoraAutoencoder

GENERATOR_NAME = "difflora"
"""The ``generator`` field of a DiffLoRA LoRA's provenance."""
MAX_SEEDS = 64
"""Most LoRAs one call samples (each is a whole LoRA in memory)."""
_EXPORT_AGAIN = "Export the model folder again from its training run (python -m hyperlora.train difflora-export)."


def folder_fingerprint(folder: str | os.PathLike[str]) -> str:
    """16 hex digits of SHA-256 over the names, sizes and bytes of the folder's ``.json`` and ``.safetensors``
    files (sorted by name).  A DiffLoRA model is small (megabytes), so every byte is read."""
    folder = Path(folder)
    h = hashlib.sha256(b"hyperlora-difflora-fingerprint-v1")
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors")):
        h.update(f"{path.name}:{path.stat().st_size}\n".encode())
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def _check_seeds(seeds: Sequence[int]) -> list[int]:
    if isinstance(seeds, (int, str)) or not isinstance(seeds, Sequence):
        raise SettingError(f"seeds is {seeds!r}; give a list of whole numbers, one per LoRA (e.g. [0, 1, 2]).")
    out = []
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= 2 ** 63 - 1:
            raise SettingError(f"seed {s!r} is not a whole number from 0 to 2**63 - 1; fix the seeds list.")
        out.append(int(s))
    if not 1 <= len(out) <= MAX_SEEDS:
        raise SettingError(f"got {len(out)} seeds; give 1 to {MAX_SEEDS} (one LoRA is sampled per seed).")
    return out


class DiffLoraModel:
    """A loaded DiffLoRA model (module docstring): LAE + DiT + latent scale, in eval mode, on one device.

    ``lae`` and ``dit`` must belong together (the DiT's ``[T, C]`` is the LAE's latent); ``latent_scale`` is the
    std the DiT's training latents were divided by (positive, finite).  ``name`` and ``fingerprint`` go into
    every LoRA's provenance.
    """

    def __init__(self, lae: LoraAutoencoder, dit: LatentDiT, latent_scale: float, *, name: str = "",
                 fingerprint: str = "") -> None:
        t, c = lae.num_tokens, lae.config.latent_channels
        if (dit.config.tokens, dit.config.channels) != (t, c):
            raise SettingError(f"DiffLoRA model '{name}': the DiT samples latents [{dit.config.tokens}, "
                               f"{dit.config.channels}] but the LAE decodes [{t}, {c}]; use the DiT trained on "
                               "this LAE's latents (one model folder).")
        if isinstance(latent_scale, bool) or not isinstance(latent_scale, (int, float)) \
                or not math.isfinite(latent_scale) or latent_scale <= 0:
            raise SettingError(f"DiffLoRA model '{name}': latent_scale is {latent_scale!r}; it must be a positive "
                               "number (the std of the LAE latents the DiT was trained on); export the model again.")
        self.lae = lae.eval().requires_grad_(False)
        self.dit = dit.eval().requires_grad_(False)
        self.latent_scale = float(latent_scale)
        self.name = name
        self.fingerprint = fingerprint

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_folder(cls, folder: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", name: str | None = None) -> DiffLoraModel:
        """Load a model folder written by :func:`.format.save_difflora_folder` (strict; see the module docstring).

        ``dtype``: the parts' floating-point type (float32 default; bfloat16/float16 halve the memory, sampling
        still accumulates the latents in float32).  Raises :class:`~hyperlora.errors.ModelFileError` naming the
        folder, the file and the fix for a missing, damaged or mismatched file.
        """
        from .condition import MifSpec
        from .dit import DitConfig
        from .format import DIT_FILE, LAE_FILE, read_difflora_folder

        folder = Path(folder)
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise SettingError(f"dtype {dtype} is not one of float32, float16, bfloat16; choose one of those.")
        parts = read_difflora_folder(folder)
        try:
            dit_config = DitConfig.from_dict(parts.dit_config)
            mif_spec = MifSpec.from_dict(parts.condition)
            lae = LoraAutoencoder(parts.lae_config, parts.layout)
            dit = LatentDiT(dit_config, mif_spec)
        except SettingError as exc:
            raise ModelFileError(f"'{folder / 'difflora.json'}': {exc} {_EXPORT_AGAIN}") from exc
        load_state_strict(lae, parts.lae_state, folder / LAE_FILE, "LAE")
        load_state_strict(dit, parts.dit_state, folder / DIT_FILE, "DiT")
        lae.to(device=device, dtype=dtype)
        dit.to(device=device, dtype=dtype)
        try:
            return cls(lae, dit, parts.latent_scale, name=name if name is not None else folder.name,
                       fingerprint=folder_fingerprint(folder))
        except SettingError as exc:
            raise ModelFileError(f"'{folder / 'difflora.json'}': {exc}") from exc

    # ------------------------------------------------------------------ sampling

    @property
    def device(self) -> torch.device:
        return self.lae.module_scale.device

    def _provenance(self, seed: int, steps: int, guidance: float | None, how: str) -> dict[str, str]:
        info = {"model_name": self.name, "model_fingerprint": self.fingerprint, "generator": GENERATOR_NAME,
                "how": how, "seed": str(seed), "steps": str(steps)}
        if guidance is not None:
            info["guidance"] = f"{guidance:g}"
        return info

    def _decode(self, x0: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        z = x0.float() * self.latent_scale                    # undo the DiT's latent scaling
        with torch.no_grad():
            loras = self.lae.decode_loras(z.to(self.lae.from_latent.weight.dtype), dtype=torch.float32)
        return [{k: v.detach().cpu().contiguous() for k, v in lora.items()} for lora in loras]

    def loras_from_mif(self, raw_mif: RawMif, *, seeds: Sequence[int], steps: int, guidance: float = 1.0,
                       callback: Callable[[int, int], None] | None = None,
                       check_interrupt: Callable[[], None] | None = None) -> list[GeneratedLora]:
        """One person's MIF (``face [A]``, ``clip [Mc, E]`` or None, unbatched) -> one LoRA per seed.

        Seed ``s`` always gives the same LoRA for the same MIF and model (its own noise generator);
        ``guidance`` is the classifier-free guidance scale (1 = conditional pass only); ``callback(done,
        total)`` after each step, ``check_interrupt()`` before each (raise to stop).
        """
        seeds = _check_seeds(seeds)
        if not isinstance(raw_mif, RawMif):
            raise ImageInputError(f"DiffLoRA '{self.name}': the condition must be a RawMif from mixed_image_features, "
                                  f"got {type(raw_mif).__name__}.")
        if raw_mif.face.dim() != 1:
            raise ImageInputError(f"DiffLoRA '{self.name}': give one person's MIF (face [A]), got face "
                                  f"{list(raw_mif.face.shape)}; sample each person on their own.")
        mif = stack_mifs([raw_mif] * len(seeds))
        with torch.no_grad():
            cond = self.dit.encode(mif.face, mif.clip)
            x0 = sample(self.dit, cond, steps=steps, guidance=guidance, seed=seeds, callback=callback,
                        check_interrupt=check_interrupt)
        return [GeneratedLora(lora, self._provenance(s, steps, guidance, "DiffLoRA sample for the reference photos"))
                for s, lora in zip(seeds, self._decode(x0))]

    def new_person(self, seeds: Sequence[int], steps: int, *,
                   callback: Callable[[int, int], None] | None = None,
                   check_interrupt: Callable[[], None] | None = None) -> list[GeneratedLora]:
        """Unconditional samples (the null condition): one LoRA of a person who does not exist per seed."""
        seeds = _check_seeds(seeds)
        with torch.no_grad():
            x0 = sample(self.dit, None, steps=steps, seed=seeds, callback=callback, check_interrupt=check_interrupt)
        return [GeneratedLora(lora, self._provenance(s, steps, None, "DiffLoRA unconditional sample (new person)"))
                for s, lora in zip(seeds, self._decode(x0))]


def load_state_strict(module: nn.Module, state: dict[str, torch.Tensor], path: Path, what: str, *,
                      described_in: str = "difflora.json", fix: str = _EXPORT_AGAIN) -> None:
    """``module.load_state_dict(state, strict=True)`` with shape checks first; :class:`ModelFileError` naming
    ``path``, the first missing / extra / wrongly shaped tensor, the file that describes the module
    (``described_in``) and ``fix``."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    if missing or extra:
        first = f"lacks '{missing[0]}'" if missing else f"has '{extra[0]}', which the {what} does not know"
        raise ModelFileError(f"'{path}' {first} ({len(missing)} missing, {len(extra)} extra tensors): it does not "
                             f"match the {what} described in {described_in}. {fix}")
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise ModelFileError(f"'{path}': tensor '{k}' is {list(state[k].shape)} but the {what} described in "
                                 f"{described_in} needs {list(v.shape)}. {fix}")
    module.load_state_dict(state, strict=True)


__all__ = ["GENERATOR_NAME", "MAX_SEEDS", "DiffLoraModel", "folder_fingerprint", "load_state_strict"]
