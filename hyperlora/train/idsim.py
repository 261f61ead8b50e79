"""Identity in generated pictures, measured as the paper measures it: ID-sim and top-1 retrieval.

For a trained (exported) model folder and held-out reference photos of several identities:

1. every identity's ID-LoRA is made from its reference photos through the pack's inference path
   (:func:`hyperlora.train.evaluate.reference_features_from_photos` -> ``id_tokens`` -> ``build_lora``);
2. images are sampled (:func:`hyperlora.train.sampler.ddim_sample`, DDIM eta 0, the functional LoRA at
   strength 1) for every (seed, prompt) pair with no LoRA and with each identity's own LoRA.  The noise
   depends on the seed only, so every condition and every identity sees the same noise: the "other" image
   of identity ``i`` for a pair is the "own" image of another identity ``j`` for that pair (no extra sampling);
3. every image is scored the way the Face Similarity node scores (:mod:`hyperlora.similarity`): the face
   found by the pack's detector, its ArcFace crop and embedding, the cosine to the identity's reference
   embedding (the mean over its reference photos, the identity recipe): **ID-sim**.  An image whose face
   the detector does not find has no score (its pairs are left out; the face rate is reported);
4. **retrieval**: an image retrieves the identity whose reference embedding is nearest (top-1 among all
   evaluated identities; chance = 1 / identities).

Per identity and per group (e.g. training / unseen identities), with ``n`` (seed, prompt) pairs:

* ``own``: ID-sim of the identity's own-LoRA images to its reference;
* ``other``: ID-sim of the other identities' own-LoRA images to this reference (mean over them);
* ``none``: ID-sim of the no-LoRA images to this reference;
* ``own_minus_other``, ``own_minus_none``: the paired differences with a **paired bootstrap 95 % interval**
  (:func:`paired_bootstrap`: the pairs are resampled with replacement within each identity, 2,000 times;
  the identities themselves are kept, so the interval is about these identities' pictures);
* ``retrieval``: ``own`` = the share of own-LoRA images that retrieve the identity; ``none`` = the share of
  no-LoRA images that retrieve it; ``other`` = the share of other identities' images that retrieve it.

:func:`write_report` writes ``eval.json`` and ``eval.png`` (one row per identity: reference | no LoRA |
own | other, the first (seed, prompt) pair, ID-sim written on each sample).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import SettingError
from ..lora_functional import LoraTerm, diffusers_lora_targets
from ..spec import TRIGGER_PREFIX
from .sampler import DEFAULT_STEPS, Conditioning, ddim_sample, decode, seeded_noise

log = logging.getLogger(__name__)

DEFAULT_PROMPTS = (
    "a close-up portrait of a person, plain blue background",
    "a photo of a person in front of a green wall",
    "a portrait of a person, soft light, gray tones",
)
"""Prompts that vary the background (the trigger words are put in front, as in training)."""
DEFAULT_SEEDS = (0, 1, 2)
BOOTSTRAP = 2000
"""Bootstrap resamples of :func:`paired_bootstrap`."""
EVAL_JSON = "eval.json"
EVAL_PNG = "eval.png"


# --------------------------------------------------------------------------------- statistics


def paired_bootstrap(diffs: Sequence[np.ndarray], *, resamples: int = BOOTSTRAP, seed: int = 0) -> tuple[float, float]:
    """95 % interval of the mean over identities of each identity's mean paired difference.

    ``diffs``: one 1-D array of paired differences per identity (empty arrays are skipped).  Each resample
    draws every identity's pairs with replacement (stratified by identity).  ``(nan, nan)`` without data.
    """
    parts = [np.asarray(d, dtype=np.float64) for d in diffs if len(d)]
    if not parts:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = np.zeros(resamples)
    for d in parts:
        idx = rng.integers(0, len(d), size=(resamples, len(d)))
        means += d[idx].mean(axis=1)
    means /= len(parts)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


# --------------------------------------------------------------------------------- results


@dataclass
class IdentityScores:
    """Figures of one identity (see the module docstring); ``None`` where no face was scored."""

    own: float | None
    other: float | None
    none: float | None
    own_minus_other: float | None
    own_minus_none: float | None
    retrieval_own: float
    retrieval_other: float
    retrieval_none: float
    faces_own: float             # share of own-LoRA images in which a face was scored
    pairs: int


@dataclass
class GroupScores:
    """Means over a group's identities, the paired bootstrap intervals and the retrieval shares."""

    identities: list[str]
    own: float
    other: float
    none: float
    own_minus_other: float
    own_minus_other_ci: tuple[float, float]
    own_minus_none: float
    own_minus_none_ci: tuple[float, float]
    retrieval_own: float
    retrieval_other: float
    retrieval_none: float
    chance: float
    faces: float                 # share of all sampled images (own, none) with a scored face
    per_identity: dict[str, IdentityScores] = field(default_factory=dict)

    def line(self, label: str = "id-sim") -> str:
        return f"{label} own {self.own:.3f}, other {self.other:.3f}, none {self.none:.3f}"

    def passes(self, *, retrieval_margin: float) -> bool:
        """own > other with the 95 % interval above 0, and own retrieval above chance by ``retrieval_margin``."""
        lo = self.own_minus_other_ci[0]
        return bool(np.isfinite(lo) and lo > 0 and self.retrieval_own > self.chance + retrieval_margin)


@dataclass
class PictureEval:
    """Everything :func:`evaluate_pictures` measured (``images`` kept for the picture, not in the JSON)."""

    groups: dict[str, GroupScores]
    identities: list[str]
    seeds: list[int]
    prompts: list[str]
    steps: int
    scorer: str
    sims: np.ndarray             # [C, N, S]: condition c (0 = none, 1 + j = identity j's LoRA), reference n, pair s
    images: dict[str, np.ndarray] = field(default_factory=dict, repr=False)   # "none" / name -> [S, H, W, 3]
    references: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # name -> first reference photo

    def to_json(self) -> dict[str, Any]:
        def clean(x: Any) -> Any:
            if isinstance(x, float) and not np.isfinite(x):
                return None
            if isinstance(x, dict):
                return {k: clean(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return [clean(v) for v in x]
            return x

        return clean({
            "format": "hyperlora.train.eval", "version": 1, "identities": self.identities, "seeds": self.seeds,
            "prompts": self.prompts, "steps": self.steps, "scorer": self.scorer, "bootstrap_resamples": BOOTSTRAP,
            "groups": {k: asdict(g) for k, g in self.groups.items()},
        })


# --------------------------------------------------------------------------------- scoring


def image_embedding(image: np.ndarray, *, analyzer: Any) -> np.ndarray | None:
    """The unit ArcFace embedding ``[512]`` of the largest face of ``image`` that ArcFace reads, the Face
    Similarity node's recipe (:func:`hyperlora.similarity.image_faces`); None without one."""
    from ..similarity import image_faces

    for _face, emb in image_faces(image, analyzer=analyzer):
        if emb is not None:
            e = np.asarray(emb, dtype=np.float64)
            return e / max(float(np.linalg.norm(e)), 1e-12)
    return None


def similarity_table(embeddings: Sequence[Sequence[np.ndarray | None]], references: np.ndarray) -> np.ndarray:
    """``embeddings[c][s]`` (unit ``[512]`` or None) x ``references [N, 512]`` (unit) -> cosines ``[C, N, S]``
    (NaN where an image has no face)."""
    c_count, s_count = len(embeddings), len(embeddings[0])
    out = np.full((c_count, references.shape[0], s_count), np.nan)
    for c, row in enumerate(embeddings):
        for s, e in enumerate(row):
            if e is not None:
                out[c, :, s] = references @ e
    return out


def group_scores(sims: np.ndarray, identities: Sequence[str], group: Sequence[str], *, seed: int = 0) -> GroupScores:
    """Figures of ``group`` (names among ``identities``) from ``sims [1 + N, N, S]`` (see :class:`PictureEval`)."""
    n = len(identities)
    if n < 2:
        raise SettingError(f"the picture evaluation needs at least two identities, got {list(identities)}.")
    # retrieval: the nearest reference of every image (NaN rows = no face = retrieves nobody)
    nearest = np.where(np.isnan(sims).all(axis=1), -1, np.nanargmax(np.nan_to_num(sims, nan=-np.inf), axis=1))  # [C, S]
    per: dict[str, IdentityScores] = {}
    d_other, d_none = [], []
    for name in group:
        i = list(identities).index(name)
        own, none = sims[1 + i, i], sims[0, i]                                  # [S]
        others = np.stack([sims[1 + j, i] for j in range(n) if j != i])          # [N-1, S]
        counts = np.isfinite(others).sum(axis=0)
        other = np.where(counts > 0, np.nansum(others, axis=0) / np.maximum(counts, 1), np.nan)   # [S]
        ok_o = np.isfinite(own) & np.isfinite(other)
        ok_n = np.isfinite(own) & np.isfinite(none)
        # own - other as the mean of the differences (exactly 0 when every picture is the same picture)
        gaps = own[None] - others
        d_other.append((np.nansum(gaps, axis=0) / np.maximum(np.isfinite(gaps).sum(axis=0), 1))[ok_o])
        d_none.append(own[ok_n] - none[ok_n])

        def mean(x: np.ndarray) -> float | None:
            return float(np.nanmean(x)) if np.isfinite(x).any() else None

        per[name] = IdentityScores(
            own=mean(own), other=mean(other), none=mean(none),
            own_minus_other=float(d_other[-1].mean()) if ok_o.any() else None,
            own_minus_none=float(d_none[-1].mean()) if ok_n.any() else None,
            retrieval_own=float((nearest[1 + i] == i).mean()),
            retrieval_other=float(np.mean([(nearest[1 + j] == i).mean() for j in range(n) if j != i])),
            retrieval_none=float((nearest[0] == i).mean()),
            faces_own=float(np.isfinite(own).mean()), pairs=int(own.shape[0]))

    def avg(key: str) -> float:
        vals = [getattr(s, key) for s in per.values() if getattr(s, key) is not None]
        return float(np.mean(vals)) if vals else float("nan")

    idx = [list(identities).index(g) for g in group]
    faces = float(np.mean([np.isfinite(sims[0, 0]).mean()] + [np.isfinite(sims[1 + i, i]).mean() for i in idx]))
    return GroupScores(
        identities=list(group), own=avg("own"), other=avg("other"), none=avg("none"),
        own_minus_other=avg("own_minus_other"), own_minus_other_ci=paired_bootstrap(d_other, seed=seed),
        own_minus_none=avg("own_minus_none"), own_minus_none_ci=paired_bootstrap(d_none, seed=seed + 1),
        retrieval_own=avg("retrieval_own"), retrieval_other=avg("retrieval_other"),
        retrieval_none=avg("retrieval_none"), chance=1.0 / n, faces=faces, per_identity=per)


# --------------------------------------------------------------------------------- sampling


def prompt_conditioning(text_encoders: Any, prompts: Sequence[str], seeds: Sequence[int], *, size: int) -> Conditioning:
    """Conditioning of every (seed, prompt) pair, seeds outer: ``B = len(seeds) * len(prompts)``; the trigger
    words in front of each prompt; SDXL time ids of an uncropped ``size`` x ``size`` picture."""
    text, pooled = text_encoders.encode([TRIGGER_PREFIX + p for p in prompts])
    reps = len(seeds)
    b = reps * len(prompts)
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32).expand(b, 6).clone()
    return Conditioning(text.repeat(reps, 1, 1), pooled.repeat(reps, 1), time_ids)


def pair_noise(seeds: Sequence[int], prompts: int, shape: Sequence[int]) -> Tensor:
    """``[len(seeds) * prompts, *shape]``: the noise of pair (seed k, prompt p) is seed k's, for every prompt
    (seeds outer, as :func:`prompt_conditioning`)."""
    return seeded_noise(shape, seeds).repeat_interleave(prompts, dim=0)


def sample_conditions(unet: nn.Module, vae: nn.Module, alphas_cumprod: Tensor, cond: Conditioning, noise: Tensor,
                      loras: Mapping[str, Any], *, steps: int = DEFAULT_STEPS) -> dict[str, np.ndarray]:
    """``{"none": images, name: images with that LoRA}``, each uint8 ``[B, H, W, 3]``, the same noise for all."""
    targets = diffusers_lora_targets(unet)
    out = {"none": decode(vae, ddim_sample(unet, alphas_cumprod, noise, cond, steps=steps, targets=targets))}
    for name, factors in loras.items():
        lat = ddim_sample(unet, alphas_cumprod, noise, cond, terms=[LoraTerm(factors, 1.0)], steps=steps, targets=targets)
        out[name] = decode(vae, lat)
        log.info("sampled %s", name)
    return out


def evaluate_pictures(model: Path, *, base: Path, antelope: Path, clip: Path, clip_processor: Path | None,
                      references: Path, groups: Mapping[str, Sequence[str]], seeds: Sequence[int] = DEFAULT_SEEDS,
                      prompts: Sequence[str] = DEFAULT_PROMPTS, steps: int = DEFAULT_STEPS,
                      tokenizer: Path | None = None, unet: nn.Module | None = None, size: int | None = None,
                      features: Mapping[str, Any] | None = None) -> PictureEval:
    """The whole evaluation (module docstring).  ``groups``: ``{group name: identity names}``; every name needs
    a ``references/<name>/`` folder of photos.  ``unet``: an already loaded base UNet (else loaded from ``base``);
    ``features``: :func:`reference_features_from_photos` results when already computed."""
    from ..checkpoint import load_hyper_lora
    from .evaluate import identity_loras, reference_features_from_photos

    names = _check_groups(groups, references, seeds, prompts)
    feats = dict(features) if features is not None else reference_features_from_photos(
        references, names, antelope=antelope, clip_folder=clip, clip_processor=clip_processor)
    gen = load_hyper_lora(Path(model), dtype=torch.float32)
    loras = identity_loras(gen, {n: feats[n] for n in names})
    return evaluate_lora_pictures(loras, base=base, antelope=antelope, references=references, groups=groups,
                                  seeds=seeds, prompts=prompts, steps=steps, tokenizer=tokenizer, unet=unet, size=size)


def _check_groups(groups: Mapping[str, Sequence[str]], references: Path, seeds: Sequence[int],
                  prompts: Sequence[str]) -> list[str]:
    """Every identity of ``groups`` once, in order; refuses fewer than two, no seed or no prompt."""
    names = list(dict.fromkeys(n for g in groups.values() for n in g))
    if len(names) < 2:
        raise SettingError(f"evaluate needs reference photos of at least two identities, got {names}; add folders "
                           f"'{references}/<identity>/' with photos.")
    if not seeds or not prompts:
        raise SettingError("evaluate needs at least one seed and one prompt.")
    return names


def evaluate_lora_pictures(loras: Mapping[str, Any], *, base: Path, antelope: Path, references: Path,
                           groups: Mapping[str, Sequence[str]], seeds: Sequence[int] = DEFAULT_SEEDS,
                           prompts: Sequence[str] = DEFAULT_PROMPTS, steps: int = DEFAULT_STEPS,
                           tokenizer: Path | None = None, unet: nn.Module | None = None,
                           size: int | None = None) -> PictureEval:
    """:func:`evaluate_pictures` for LoRAs made by any generator: ``loras`` ``{identity: factors}``
    (:func:`hyperlora.lora_functional.factors_from_lora` of each identity's LoRA, e.g. a DiffLoRA sample), one
    per identity of ``groups``; the rest as :func:`evaluate_pictures`."""
    from ..faces.analysis import FaceAnalyzer
    from ..similarity import reference_from_photos
    from .frozen import load_noise_scheduler, load_text_encoders, load_unet, load_vae

    names = _check_groups(groups, references, seeds, prompts)
    missing = [n for n in names if n not in loras]
    if missing:
        raise SettingError(f"evaluate: no LoRA for identities {missing}; make one per identity of the groups.")
    loras = {n: loras[n] for n in names}
    unet = unet if unet is not None else load_unet(base)
    unet.eval()
    vae = load_vae(base)
    text = load_text_encoders(base, tokenizer=tokenizer)
    ac = load_noise_scheduler(base).alphas_cumprod
    px = int(size if size is not None else vae.config.sample_size)
    cond = prompt_conditioning(text, prompts, seeds, size=px)
    shape = (int(unet.config.in_channels), px // 8, px // 8)
    noise = pair_noise(seeds, len(prompts), shape)
    images = sample_conditions(unet, vae, ac, cond, noise, loras, steps=steps)

    analyzer = FaceAnalyzer(antelope)
    from PIL import Image

    refs, first = [], {}
    for n in names:
        photos = sorted(p for p in (Path(references) / n).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        arrays = [np.asarray(Image.open(p).convert("RGB")) for p in photos]
        emb, _ = reference_from_photos(arrays, analyzer=analyzer)
        e = emb.double().numpy()
        refs.append(e / np.linalg.norm(e))
        first[n] = arrays[0]
    ref = np.stack(refs)
    embs = [[image_embedding(img, analyzer=analyzer) for img in images[key]] for key in ["none", *names]]
    sims = similarity_table(embs, ref)
    result = PictureEval(groups={g: group_scores(sims, names, list(members)) for g, members in groups.items()},
                         identities=names, seeds=[int(s) for s in seeds], prompts=list(prompts), steps=steps,
                         scorer=f"pack face pipeline (hyperlora.similarity) with the AntelopeV2 models in {antelope}",
                         sims=sims, images=images, references=first)
    for g, s in result.groups.items():
        log.info("%s (%s): own-other %.4f [%.4f, %.4f], retrieval own %.2f (chance %.2f), faces %.2f", s.line(), g,
                 s.own_minus_other, *s.own_minus_other_ci, s.retrieval_own, s.chance, s.faces)
    return result


# --------------------------------------------------------------------------------- report


def eval_picture(result: PictureEval, *, pair: int = 0, scale: int = 1) -> Any:
    """PIL image, one row per identity: reference | no LoRA | own | other (identity ``i+1``'s LoRA), the
    samples of (seed, prompt) pair ``pair``, with the identity's name and each sample's ID-sim written on it."""
    from PIL import Image, ImageDraw

    names = result.identities
    h, w = result.images["none"].shape[1:3]
    h, w = h * scale, w * scale
    head = 14
    label_w = 96
    canvas = Image.new("RGB", (label_w + 4 * w, head + len(names) * h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for k, title in enumerate(("reference", "no LoRA", "own LoRA", "other LoRA")):
        draw.text((label_w + k * w + 3, 1), title, fill=(0, 0, 0))
    for r, name in enumerate(names):
        j = (r + 1) % len(names)
        ref = Image.fromarray(np.ascontiguousarray(result.references[name])).convert("RGB").resize((w, h))
        cells = [(ref, None), (result.images["none"][pair], result.sims[0, r, pair]),
                 (result.images[name][pair], result.sims[1 + r, r, pair]),
                 (result.images[names[j]][pair], result.sims[1 + j, r, pair])]
        y = head + r * h
        draw.text((2, y + 2), name, fill=(0, 0, 0))
        draw.text((2, y + 16), f"other: {names[j]}", fill=(90, 90, 90))
        for k, (img, sim) in enumerate(cells):
            pil = img if isinstance(img, Image.Image) else Image.fromarray(np.ascontiguousarray(img)).resize((w, h), Image.Resampling.NEAREST)
            canvas.paste(pil, (label_w + k * w, y))
            if k:
                text = "no face" if sim is None or not np.isfinite(sim) else f"{sim:.3f}"
                draw.rectangle([label_w + k * w, y, label_w + k * w + 6 * len(text) + 3, y + 11], fill=(0, 0, 0))
                draw.text((label_w + k * w + 2, y), text, fill=(255, 255, 255))
    return canvas


def write_report(result: PictureEval, out: Path) -> tuple[Path, Path]:
    """``out/eval.json`` and ``out/eval.png`` (created); returns both paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    js, png = out / EVAL_JSON, out / EVAL_PNG
    js.write_text(json.dumps(result.to_json(), indent=2), encoding="utf-8")
    eval_picture(result, scale=2).save(png)
    return js, png


__all__ = [
    "BOOTSTRAP",
    "DEFAULT_PROMPTS",
    "DEFAULT_SEEDS",
    "EVAL_JSON",
    "EVAL_PNG",
    "GroupScores",
    "IdentityScores",
    "PictureEval",
    "eval_picture",
    "evaluate_lora_pictures",
    "evaluate_pictures",
    "group_scores",
    "image_embedding",
    "pair_noise",
    "paired_bootstrap",
    "prompt_conditioning",
    "sample_conditions",
    "similarity_table",
    "write_report",
]
