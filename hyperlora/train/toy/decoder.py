"""A toy VAE that draws: its decoder trained on toy portraits, its (random) encoder kept frozen.

The tiny SDXL's VAE (:func:`hyperlora.train.toy.sdxl.tiny_sdxl_folder`) is random, so its latents decode
into noise and a toy generator's samples could not be looked at or scored.  :func:`train_decoder` trains the
decoder only, on toy photos drawn by :func:`hyperlora.train.toy.faces.draw_image` (identities of their own,
not the demo's), to reconstruct each photo from the frozen encoder's latent mean: the encoder, and with it
every latent in existing shards, stays exactly as it was.

The result is cached (:func:`cached_decoder`) in ``~/.cache/hyperlora/toy-vae-decoder/<key>.safetensors``
(``$HYPERLORA_CACHE`` overrides the root), ``key`` being a SHA-256 of every input: the source of this module,
of ``toy/sdxl.py`` and ``toy/faces.py``, the VAE config, the seed and the training settings.  Built once
under a file lock (:data:`STEPS` steps: about 5 CPU-minutes, one thread), then loaded in milliseconds.
:func:`install_decoder` writes it into a tiny SDXL folder's ``vae/``.

Loss: L1 + MSE on the image in [-1, 1] (no perceptual or adversarial term: the toy's portraits are flat
colour shapes).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

CACHE_NAME = "toy-vae-decoder"
"""Sub-folder of the cache root holding the trained decoders."""
DECODER_PREFIX = "decoder."
"""State-dict prefix of the decoder inside ``AutoencoderKL`` (``post_quant_conv`` is trained too)."""


@dataclass(frozen=True)
class DecoderTraining:
    """Settings of :func:`train_decoder` (all part of the cache key)."""

    steps: int = 1000
    batch_size: int = 8
    crop: int = 8               # latent pixels per side of a training crop (8 -> 64 x 64 image pixels); 0 = whole
    lr: float = 3e-3
    photos: int = 384           # toy photos drawn once (latents encoded once), sampled with replacement
    identities: int = 48        # identities those photos show (none of them the demo's: other seed)
    seed: int = 7
    whole: bool = False         # train the encoder too (changes every latent: shards must be prepared again)
    latent_l2: float = 0.0      # weight of mean(z^2) on the encoder's latent mean (``whole`` only: keeps it bounded)


STEPS = DecoderTraining().steps
WHOLE = DecoderTraining(steps=2400, whole=True, latent_l2=1e-4)
"""The whole toy VAE trained (encoder too): its reconstructions keep what tells toy identities apart
(docs/training.md, "Tried since: the whole VAE trained")."""
SCALING_KEY = "scaling_factor"
"""Metadata key of a whole-VAE cache file: the recalibrated ``scaling_factor`` (1 / std of the latent means)."""


def _trainable(vae: Any, whole: bool = False) -> list[torch.nn.Parameter]:
    if whole:
        return list(vae.parameters())
    return list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())


def latent_means(vae: Any, images: torch.Tensor) -> torch.Tensor:
    """``vae``'s latent means ``[N, 4, H/8, W/8]`` of ``images`` ``[N, 3, H, W]`` (in chunks of 64, no gradient)."""
    with torch.no_grad():
        return torch.cat([vae.encode(images[i:i + 64]).latent_dist.mean for i in range(0, len(images), 64)])


def latent_scale(vae: Any, images: torch.Tensor) -> float:
    """``1 / std`` of ``vae``'s latent means of ``images`` ``[N, 3, H, W]``: the ``scaling_factor`` that gives the
    diffusion model unit-variance latents (SDXL's 0.13025 was found the same way for its VAE)."""
    return float(1.0 / latent_means(vae, images).float().std())


def draw_photos(settings: DecoderTraining, *, size: int) -> torch.Tensor:
    """``settings.photos`` toy photos as ``[N, 3, size, size]`` float in [-1, 1]."""
    from .faces import draw_image, make_identities

    people = make_identities(settings.identities, seed=settings.seed + 100)
    rng = np.random.default_rng(settings.seed)
    imgs = [draw_image(people[i % len(people)], rng, size=size)[0] for i in range(settings.photos)]
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train_decoder(vae: Any, settings: DecoderTraining = DecoderTraining(), *, progress: bool = True) -> list[float]:
    """Train ``vae``'s decoder (and ``post_quant_conv``) in place; the encoder is frozen unless ``settings.whole``.
    Returns the loss per step.

    Input of the decoder: the encoder's latent MEAN (what ``prepare`` stores, divided back by the scaling factor).
    With ``settings.whole`` the encoder is trained too, on the same crops (encode -> mean -> decode), with
    ``settings.latent_l2 * mean(z^2)`` added so the latents stay bounded.
    """
    from tqdm.auto import tqdm

    size = int(vae.config.sample_size)
    images = draw_photos(settings, size=size)
    vae.requires_grad_(False).eval()
    latents = None if settings.whole else latent_means(vae, images)
    f = 2 ** (len(vae.config.block_out_channels) - 1)          # image pixels per latent pixel
    params = _trainable(vae, settings.whole)
    for p in params:
        p.requires_grad_(True)
    (vae if settings.whole else vae.decoder).train()
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(settings.seed)
    losses: list[float] = []
    for step in tqdm(range(settings.steps), desc="train toy VAE decoder", unit="step", disable=not progress):
        idx = torch.randint(0, len(images), (settings.batch_size,), generator=gen)
        for g in opt.param_groups:      # cosine decay to 5 %
            g["lr"] = settings.lr * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * step / max(1, settings.steps))))
        target = images[idx]
        side = target.shape[-1] // f
        top = left = 0
        crop = side
        if 0 < settings.crop < side:     # one random crop per step (the VAE is convolutional)
            top, left = (int(v) for v in torch.randint(0, side - settings.crop + 1, (2,), generator=gen))
            crop = settings.crop
        target = target[..., top * f:(top + crop) * f, left * f:(left + crop) * f]
        if latents is None:
            z = vae.encode(target).latent_dist.mean
        else:
            z = latents[idx][..., top:top + crop, left:left + crop]
        out = vae.decode(z).sample
        loss = (out - target).abs().mean() + (out - target).pow(2).mean()
        if settings.whole and settings.latent_l2 > 0:
            loss = loss + settings.latent_l2 * z.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    vae.requires_grad_(False).eval()
    return losses


TOY_CACHE_ENV = "HYPERLORA_TOY_CACHE"
"""Moves the root of the trained toy decoders alone (the test suite keeps them across runs, keyed by hash, while
it gives the integrity cache of ``$HYPERLORA_CACHE`` a fresh temporary folder per session)."""


def cache_root() -> Path:
    """``$HYPERLORA_TOY_CACHE``, else ``$HYPERLORA_CACHE``, else ``~/.cache/hyperlora``."""
    return Path(os.environ.get(TOY_CACHE_ENV) or os.environ.get("HYPERLORA_CACHE")
                or Path.home() / ".cache" / "hyperlora")


def cache_key(vae_config: dict[str, Any], settings: DecoderTraining, *, seed: int) -> str:
    """SHA-256 (first 16 hex digits) of every input of the trained decoder, code included."""
    here = Path(__file__).parent
    h = hashlib.sha256()
    for name in ("decoder.py", "sdxl.py", "faces.py"):
        h.update((here / name).read_bytes())
    h.update(json.dumps({k: v for k, v in sorted(vae_config.items()) if not k.startswith("_")}, default=str,
                        sort_keys=True).encode())
    h.update(json.dumps(asdict(settings), sort_keys=True).encode())
    h.update(f"seed={seed};torch={torch.__version__.split('+')[0]}".encode())
    return h.hexdigest()[:16]


def cached_decoder(vae: Any, *, seed: int, settings: DecoderTraining = DecoderTraining(),
                   root: Path | None = None, progress: bool = True) -> Path:
    """The trained decoder weights of ``vae`` (the toy VAE made with ``seed``): from the cache, or trained
    into it under a file lock.  Loads them into ``vae`` and returns the cache file."""
    from safetensors.torch import load_file, save_file

    folder = Path(root) if root is not None else cache_root() / CACHE_NAME
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{cache_key(dict(vae.config), settings, seed=seed)}.safetensors"
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.is_file():
            log.info("training the toy VAE decoder (%d steps, once; cached in %s)", settings.steps, path)
            losses = train_decoder(vae, settings, progress=progress)
            k = max(1, len(losses) // 10)
            state = {n: p.detach().clone().contiguous() for n, p in vae.state_dict().items()
                     if settings.whole or n.startswith((DECODER_PREFIX, "post_quant_conv."))}
            meta = {"first_loss": f"{sum(losses[:k]) / k:.5f}", "last_loss": f"{sum(losses[-k:]) / k:.5f}"}
            if settings.whole:
                meta[SCALING_KEY] = repr(latent_scale(vae, draw_photos(settings, size=int(vae.config.sample_size))))
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            save_file(state, str(tmp), metadata=meta)
            tmp.replace(path)
    from safetensors import safe_open

    state = load_file(str(path))
    missing = [n for n in state if n not in vae.state_dict()]
    if missing:
        raise RuntimeError(f"cached toy decoder {path} does not fit this VAE ({missing[:3]}); delete the file.")
    vae.load_state_dict(state, strict=False)
    with safe_open(str(path), framework="pt") as fh:
        scale = (fh.metadata() or {}).get(SCALING_KEY)
    if scale is not None:
        vae.register_to_config(scaling_factor=float(scale))
    return path


def install_decoder(sdxl_folder: Path, *, seed: int, settings: DecoderTraining = DecoderTraining(),
                    progress: bool = True) -> Path:
    """Put the trained decoder into the tiny SDXL folder ``sdxl_folder/vae`` (its encoder unchanged), or with
    ``settings.whole`` the whole trained VAE and its recalibrated ``scaling_factor``."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(sdxl_folder), subfolder="vae", local_files_only=True)
    path = cached_decoder(vae, seed=seed, settings=settings, progress=progress)
    vae.save_pretrained(Path(sdxl_folder) / "vae")
    return path


__all__ = ["CACHE_NAME", "DecoderTraining", "SCALING_KEY", "STEPS", "WHOLE", "latent_means", "latent_scale", "TOY_CACHE_ENV", "cache_key", "cache_root", "cached_decoder", "draw_photos",
           "install_decoder", "train_decoder"]
