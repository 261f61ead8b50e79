"""``python -m hyperlora.train prepare``: raw photos + captions -> training shards (:mod:`hyperlora.train.shards`).

Inputs (``--input``, repeatable, in the order given):

* a **kohya folder**: every image (``.jpg .jpeg .png .webp .bmp``) under it, with the same-name ``.txt``
  caption beside it.  Identity = the image's parent folder relative to the input root (the root's own
  name for images directly in it), unless a same-name ``.json`` beside the image has ``"identity"``;
* a **webdataset ``.tar``** (LAION convention, read with the standard ``tarfile`` module): members grouped by
  key (the path up to the first dot of the file name); image = ``jpg/jpeg/png/webp``, caption = ``txt`` or
  ``json["caption"]`` (or ``"text"``); identity = ``json["identity"]``, else the key.

Each sample goes through the A.5 filters (:mod:`hyperlora.train.filters`, counted per reason), then every
frozen encoder runs once: ArcFace + CLIP ID + CLIP Base through the pack's released preprocessing
(:func:`hyperlora.pipeline.extract_conditions`; the Base crop with ``--base-scales``, format §6), the SDXL VAE
on the training crop (shorter side resized to ``--size`` with PIL bicubic, centre crop, moved along the long
side only as far as needed to keep the detected face box in it, :func:`crop_plan`; latent mean *
scaling_factor; SDXL time ids ``(orig h, orig w, crop top, crop left, size, size)``) and both text encoders
with and without ``hyperlora.spec.TRIGGER_PREFIX``.  Tensors are stored in the dtypes of
``--feature-dtype`` (:func:`hyperlora.train.shards.stored_dtypes`).

Work is cut into shards of ``--shard-size`` *input* samples (before filtering), numbered in input order, so
every process computes the same plan; process ``k`` of ``n`` does the shards ``i % n == k``
(``--shard-index/--num-shards``, by default accelerate's process index / count when launched by accelerate).
A finished shard is never redone (resume = run the same command again); Ctrl-C leaves no half-written shard;
``manifest.json`` is rebuilt from the finished shards at the end of every run.  Face detection runs twice on
a kept image (once for the face filter, once inside the released preprocessing): the price of reusing it
unchanged.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import socket
import sys
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import FaceNotFoundError, HyperLoRAError, ImageInputError, SettingError, check_folder_option, os_error_line
from ..faces.options import DEFAULTS
from ..image_files import read_image
from ..spec import TRIGGER_PREFIX
from . import filters as flt
from .filters import FilterReport
from .shards import (FEATURE_DTYPES, finished_shards, folder_size, human_bytes, read_manifest, read_shard_info,
                     rebuild_manifest, shard_name, stored_dtypes, write_shard)

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
TAR_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
zlib_error = zlib.error
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_BASE_SCALES = (1.0, 1.0, 1.0, 1.0)
"""The Base crop's per-side scales (left, right, top, bottom) of the released preprocessing (format §6)."""
PAPER_SAMPLES = 4_400_000
"""The paper's training set size (images), the default of ``--project-to``."""


# ----------------------------------------------------------------------------- settings


@dataclass
class PrepareConfig:
    """Encoders, filter thresholds and sizes of a prepare run (paper values as defaults)."""

    sdxl: Path | None = None            # diffusers SDXL folder or single-file .safetensors
    clip: Path | None = None            # CLIP ViT-L/14 HF folder (released clip_vit/<name>) or clip_vision file
    clip_processor: Path | None = None  # folder with preprocessor_config.json (None: standard ViT-L/14 values)
    antelope: Path | None = None        # insightface antelopev2 folder
    aesthetic: str = "none"             # "none" or a LAION aesthetic head .safetensors
    aesthetic_clip: Path | None = None  # CLIP ViT-L/14 with visual_projection, folder or file (default: clip)
    tokenizer: Path | None = None       # CLIP BPE folder for a single-file SDXL
    min_side: int = 768
    min_aesthetic: float = 5.5
    min_face_area: float = 0.03
    size: int = 1024
    shard_size: int = 256
    det_size: int = DEFAULTS.det_size
    batch_size: int = 8
    device: str = "cpu"
    dtype: str = "float32"              # encoders' dtype (the VAE always runs in float32)
    require_vit_l14: bool = True        # False only for the toy's tiny CLIP
    feature_dtype: str = "mixed"        # stored dtypes (hyperlora.train.shards.FEATURE_DTYPES)
    base_scales: tuple[float, float, float, float] = DEFAULT_BASE_SCALES   # Base crop (left, right, top, bottom)

    def check(self) -> None:
        if not (isinstance(self.min_side, int) and self.min_side >= 1):
            raise SettingError(f"min_side is {self.min_side!r}; use a whole number of pixels (paper: 768).")
        if not (isinstance(self.size, int) and self.size >= 8 and self.size % 8 == 0):
            raise SettingError(f"size is {self.size!r}; use a multiple of 8 (SDXL: 1024).")
        if not (isinstance(self.shard_size, int) and self.shard_size >= 1):
            raise SettingError(f"shard_size is {self.shard_size!r}; use a whole number >= 1.")
        if not (0.0 <= float(self.min_face_area) < 1.0):
            raise SettingError(f"min_face_area is {self.min_face_area!r}; use a fraction in 0..1 (paper: 0.03).")
        if self.dtype not in DTYPES:
            raise SettingError(f"dtype is {self.dtype!r}; choose one of {', '.join(DTYPES)}.")
        if int(self.batch_size) < 1:
            raise SettingError(f"batch_size is {self.batch_size!r}; use a whole number >= 1.")
        if self.feature_dtype not in FEATURE_DTYPES:
            raise SettingError(f"feature_dtype (--feature-dtype) is {self.feature_dtype!r}; choose one of "
                               f"{', '.join(FEATURE_DTYPES)}.")
        self.base_scales = parse_base_scales(self.base_scales)

    def settings(self) -> dict[str, Any]:
        """What decides the shards' content (a resumed run must use the same).  ``feature_dtype`` and
        ``base_scales`` appear only when not the default, so default shards keep exactly the settings they had."""
        keys = ("aesthetic", "min_side", "min_aesthetic", "min_face_area", "size", "shard_size", "det_size")
        out: dict[str, Any] = {k: getattr(self, k) for k in keys}
        if self.feature_dtype != "mixed":
            out["feature_dtype"] = self.feature_dtype
        if tuple(self.base_scales) != DEFAULT_BASE_SCALES:
            out["base_scales"] = [float(v) for v in self.base_scales]
        return out


def parse_base_scales(value: str | Sequence[float]) -> tuple[float, float, float, float]:
    """``"L,R,T,B"`` or four numbers -> the Base crop's per-side scales; :class:`SettingError` naming
    ``--base-scales`` otherwise."""
    from ..faces.preprocess import check_base_scales

    try:
        parts = [float(v) for v in value.split(",")] if isinstance(value, str) else list(value)
        return check_base_scales(parts)
    except (ImageInputError, ValueError, TypeError):
        raise SettingError(f"--base-scales (base_scales) is {value!r}; give four non-negative numbers "
                           f"left,right,top,bottom in face half-sizes, e.g. 1,1,1,1 (the release's) or 2,2,1,3 "
                           f"(more of the hair, shoulders and background).") from None


@dataclass
class Encoders:
    """The frozen models prepare runs (load once with :meth:`load`, or hand in your own)."""

    analyzer: Any       # hyperlora.faces.analysis.FaceAnalyzer
    clip: Any           # hyperlora.encoders.ClipVisionEncoder
    vae: Any            # diffusers AutoencoderKL
    text: Any           # hyperlora.train.frozen.TextEncoders
    scorer: Any         # hyperlora.train.aesthetic.Scorer

    @classmethod
    def load(cls, cfg: PrepareConfig) -> Encoders:
        from ..encoders import ClipVisionEncoder
        from ..faces.analysis import FaceAnalyzer
        from .aesthetic import load_scorer
        from .frozen import load_text_encoders, load_vae

        for name in ("sdxl", "clip", "antelope"):
            if getattr(cfg, name) is None:
                raise SettingError(f"prepare needs --{name} (see `python -m hyperlora.train prepare --help`).")
        dtype = DTYPES[cfg.dtype]
        clip_path = Path(cfg.clip)  # type: ignore[arg-type]
        if clip_path.is_dir():
            clip = ClipVisionEncoder.from_pretrained(clip_path, cfg.clip_processor, dtype=dtype, device=cfg.device,
                                                     require_vit_l14=cfg.require_vit_l14)
        else:
            clip = ClipVisionEncoder.from_single_file(clip_path, dtype=dtype, device=cfg.device,
                                                      require_vit_l14=cfg.require_vit_l14,
                                                      processor_folder=cfg.clip_processor)
        return cls(
            analyzer=FaceAnalyzer(cfg.antelope),  # type: ignore[arg-type]
            clip=clip,
            vae=load_vae(cfg.sdxl, dtype=torch.float32, device=cfg.device),  # type: ignore[arg-type]
            text=load_text_encoders(cfg.sdxl, dtype=dtype, device=cfg.device, tokenizer=cfg.tokenizer),  # type: ignore[arg-type]
            scorer=load_scorer(cfg.aesthetic, clip_folder=cfg.aesthetic_clip or clip_path,
                               device=cfg.device),
        )


# ----------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Item:
    """One input sample: where its image and caption are."""

    key: str                      # unique name: "<input name>/<relative path or tar key>"
    source: Path                  # kohya: the image file; webdataset: the .tar
    identity: str | None          # known from the layout (kohya folder); None: read from json / key
    members: tuple[tuple[str, str], ...] = ()   # webdataset: (ext, member name) of the key


def _kohya_items(root: Path) -> list[Item]:
    items = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
        rel = path.relative_to(root)
        parent = rel.parent.as_posix()
        identity = root.name if parent == "." else parent
        items.append(Item(key=f"{root.name}/{rel.with_suffix('').as_posix()}", source=path, identity=identity))
    return items


def _tar_key(name: str) -> tuple[str, str] | None:
    """webdataset key and extension of a member name (``dir/k.ext`` -> ``("dir/k", "ext")``)."""
    head, _, base = name.rpartition("/")
    if "." not in base or base.startswith("."):
        return None
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


def _tar_items(path: Path) -> list[Item]:
    """Samples of a webdataset tar; a damaged tar (e.g. a partial download) gives the samples before the damage."""
    groups: dict[str, dict[str, str]] = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                ke = _tar_key(m.name)
                if ke is not None:
                    groups.setdefault(ke[0], {})[ke[1]] = m.name
    except (tarfile.TarError, OSError, EOFError, zlib_error) as exc:
        logger.warning("prepare: %s is damaged after %d sample(s) (%s); using those.", path, len(groups), exc)
    items = []
    for key, members in groups.items():
        if any(e in members for e in TAR_IMAGE_EXTS):
            items.append(Item(key=f"{path.stem}/{key}", source=path, identity=None,
                              members=tuple(sorted(members.items()))))
    return items


def list_items(inputs: Sequence[str | os.PathLike[str]]) -> list[Item]:
    """Every input sample in a fixed order (the order of ``inputs``, then sorted paths / tar order)."""
    items: list[Item] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            items += _kohya_items(path)
        elif path.is_file() and path.name.lower().endswith((".tar", ".tar.gz", ".tgz")):
            items += _tar_items(path)
        else:
            raise SettingError(f"--input {path} is neither a folder of images nor a webdataset .tar; fix the path.")
    keys = [i.key for i in items]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise SettingError(f"Two inputs give the sample key {dup!r}; give inputs with different folder/tar names.")
    return items


@dataclass
class Raw:
    """What was read for one item (image bytes may be corrupt; decoded later)."""

    data: bytes | None
    caption: str | None
    identity: str


def _caption_from_json(meta: dict[str, Any]) -> str | None:
    for k in ("caption", "text", "prompt"):
        if isinstance(meta.get(k), str):
            return meta[k]
    return None


def read_item(item: Item, tar: tarfile.TarFile | None = None) -> Raw:
    """Image bytes, caption and identity of ``item`` (``data`` None when the image cannot be read)."""
    if not item.members:   # kohya
        try:
            data: bytes | None = item.source.read_bytes()
        except OSError:
            data = None
        txt = item.source.with_suffix(".txt")
        caption = txt.read_text(encoding="utf-8", errors="replace").strip() if txt.is_file() else None
        identity = item.identity or item.source.parent.name
        side = item.source.with_suffix(".json")
        if side.is_file():
            try:
                meta = json.loads(side.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                meta = {}
            if isinstance(meta, dict) and isinstance(meta.get("identity"), (str, int)):
                identity = str(meta["identity"])
            if caption is None and isinstance(meta, dict):
                caption = _caption_from_json(meta)
        return Raw(data, caption, identity)
    members = dict(item.members)
    if tar is None:
        raise ValueError("a webdataset item needs its open tar")

    def member(ext: str) -> bytes | None:
        try:
            f = tar.extractfile(members[ext])
            return f.read() if f is not None else None
        except (KeyError, tarfile.TarError, OSError, EOFError):
            return None

    image_ext = next(e for e in TAR_IMAGE_EXTS if e in members)
    data = member(image_ext)
    meta: dict[str, Any] = {}
    if "json" in members:
        raw = member("json")
        try:
            loaded = json.loads(raw.decode("utf-8")) if raw else {}
            meta = loaded if isinstance(loaded, dict) else {}
        except (ValueError, UnicodeDecodeError):
            meta = {}
    caption = None
    if "txt" in members:
        raw = member("txt")
        caption = raw.decode("utf-8", errors="replace").strip() if raw is not None else None
    if caption is None:
        caption = _caption_from_json(meta)
    identity = str(meta["identity"]) if isinstance(meta.get("identity"), (str, int)) else item.key.split("/", 1)[1]
    return Raw(data, caption, identity)


def decode_image(data: bytes | None) -> np.ndarray | None:
    """uint8 RGB ``[H, W, 3]`` (EXIF orientation applied) or None for anything PIL cannot decode fully or
    that is larger than :data:`hyperlora.image_files.MAX_IMAGE_PIXELS` (checked before decoding)."""
    if not data:
        return None
    try:
        return read_image(data)
    except ImageInputError as exc:
        logger.debug("skipped an image: %s", exc)
        return None


# ----------------------------------------------------------------------------- encoding


@dataclass(frozen=True)
class CropPlan:
    """Where the training crop lies: the resized image's size and the crop's corner (resized pixels)."""

    height: int      # resized height
    width: int       # resized width
    top: int
    left: int
    moved: bool      # True when the corner is not the centre crop's (moved to keep the face box)


def _axis_offset(n: int, orig: int, size: int, lo_px: float, hi_px: float) -> tuple[int, bool] | None:
    """Crop start along one axis of resized length ``n``: the centre, moved as little as needed so that the face
    span ``[lo_px, hi_px]`` (original pixels) lies inside; None when the span is longer than ``size``."""
    centre = (n - size) // 2
    a = max(0.0, lo_px) * n / orig
    b = min(float(orig), hi_px) * n / orig
    first, last = math.ceil(b - 1e-6) - size, math.floor(a + 1e-6)   # allowed starts: [first, last]
    if first > last:
        return None
    start = min(max(centre, first), last)
    start = min(max(start, 0), n - size)
    return start, start != centre


def crop_plan(height: int, width: int, size: int, face_box: Sequence[float] | np.ndarray | None = None
              ) -> CropPlan | None:
    """The training crop of a ``height`` x ``width`` photo: shorter side resized to ``size``, the centre
    ``size`` x ``size`` square, except that with ``face_box`` (``[x1, y1, x2, y2]``, original pixels, the face
    the filter accepted) the square is moved along the long side just far enough to hold the whole box (clipped
    to the photo).  None when the box is longer than the square along the long side: no square crop keeps it.
    """
    scale = size / min(height, width)
    nh, nw = max(size, round(height * scale)), max(size, round(width * scale))
    top, left = (nh - size) // 2, (nw - size) // 2
    moved = False
    if face_box is not None:
        x1, y1, x2, y2 = (float(v) for v in np.asarray(face_box, dtype=np.float64).reshape(4))
        rows = _axis_offset(nh, height, size, y1, y2)
        cols = _axis_offset(nw, width, size, x1, x2)
        if rows is None or cols is None:
            return None
        (top, moved_r), (left, moved_c) = rows, cols
        moved = moved_r or moved_c
    return CropPlan(nh, nw, top, left, moved)


def training_crop(image: np.ndarray, size: int, face_box: Sequence[float] | np.ndarray | None = None
                  ) -> tuple[np.ndarray, list[float]]:
    """Resize the shorter side to ``size`` (PIL bicubic), crop ``size`` x ``size``: the centre, or with
    ``face_box`` the square of :func:`crop_plan` that holds the face box.

    Returns the crop ``[size, size, 3]`` uint8 and SDXL's time ids ``[orig h, orig w, crop top, crop left,
    size, size]`` (crop corner in resized pixels, as SDXL's training did).  A face box no square crop holds is
    :class:`ImageInputError` (prepare drops such photos before, counted as ``face_cut``).
    """
    from PIL import Image

    h, w = image.shape[:2]
    plan = crop_plan(h, w, size, face_box)
    if plan is None:
        raise ImageInputError(f"the face box {list(np.asarray(face_box).reshape(4))} of a {w}x{h} photo is longer "
                              f"than a {size} px square crop of it; use a photo where the face is smaller.")
    resized = Image.fromarray(image).resize((plan.width, plan.height), Image.Resampling.BICUBIC)
    top, left = plan.top, plan.left
    crop = np.asarray(resized.crop((left, top, left + size, top + size)))
    return crop, [float(h), float(w), float(top), float(left), float(size), float(size)]


@torch.no_grad()
def encode_latents(vae: Any, crops: Sequence[np.ndarray]) -> Tensor:
    """Training crops -> ``[N, 4, size/8, size/8]`` latent means * scaling_factor (float32, CPU)."""
    device = next(vae.parameters()).device
    x = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    dist = vae.encode(x.to(device=device, dtype=next(vae.parameters()).dtype)).latent_dist
    return (dist.mean.float() * float(vae.config.scaling_factor)).cpu()


def _chunks(seq: Sequence[Any], n: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(seq), n):
        yield seq[start:start + n]


@dataclass
class _Candidate:
    item: Item
    image: np.ndarray
    caption: str
    identity: str
    face_box: np.ndarray | None = None     # the detected face the filter accepted, [x1, y1, x2, y2]


def _filter(item: Item, raw: Raw, cfg: PrepareConfig, enc: Encoders, report: FilterReport) -> _Candidate | None:
    from ..pipeline import find_faces_scaled

    image = decode_image(raw.data)
    if image is None:
        logger.warning("prepare: %s is unreadable or corrupt; skipped.", item.key)
        report.drop("corrupt")
        return None
    if not raw.caption:
        report.drop("no_caption")
        return None
    h, w = image.shape[:2]
    if not flt.big_enough(h, w, cfg.min_side):
        report.drop("small")
        return None
    if flt.has_plural_pronoun(raw.caption):
        report.drop("plural_caption")
        return None
    try:
        faces = find_faces_scaled(enc.analyzer, image, det_size=cfg.det_size)
    except HyperLoRAError as exc:
        logger.warning("prepare: face detection failed on %s (%s); skipped.", item.key, exc)
        report.drop("no_face")
        return None
    reason = flt.face_reason([f.bbox for f in faces], h, w, cfg.min_face_area)
    if reason is not None:
        report.drop(reason)
        return None
    box = np.asarray(faces[0].bbox, dtype=np.float64).reshape(4)
    if crop_plan(h, w, cfg.size, box) is None:
        report.drop("face_cut")
        return None
    return _Candidate(item, image, raw.caption, raw.identity, box)


def _encode(cands: list[_Candidate], cfg: PrepareConfig, enc: Encoders,
            report: FilterReport) -> tuple[list[dict[str, Tensor]], list[dict[str, str]]]:
    """Aesthetic filter, then every encoder, on a batch of candidates that passed the cheap filters."""
    from ..faces.options import FaceOptions
    from ..pipeline import extract_conditions

    scores = enc.scorer.score([c.image for c in cands])
    kept = []
    for c, s in zip(cands, scores):
        if not s > cfg.min_aesthetic:
            report.drop("aesthetic")
        else:
            kept.append(c)
    if not kept:
        return [], []
    def run(images: list[np.ndarray]) -> Any:
        return extract_conditions(images, analyzer=enc.analyzer, clip=enc.clip, need_id=True, need_clip=True,
                                  need_base=True, options=FaceOptions(no_face="skip", det_size=cfg.det_size),
                                  base_scales=cfg.base_scales, use_cache=False)

    try:
        conds = run([c.image for c in kept])
        used = list(conds.used)
    except FaceNotFoundError:
        conds, used = None, []
    except HyperLoRAError as exc:    # one photo's crop failed: find it, keep the others
        logger.warning("prepare: the released preprocessing failed on a batch (%s); retrying photo by photo.", exc)
        parts = []
        for i, c in enumerate(kept):
            try:
                one = run([c.image])
            except HyperLoRAError as err:
                logger.warning("prepare: %s skipped (%s).", c.item.key, err)
                continue
            parts.append((i, one))
        used = [i for i, _ in parts]
        conds = None
        if parts:
            from ..pipeline import FaceConditions

            conds = FaceConditions(
                id_embeds=torch.cat([o.id_embeds for _, o in parts]), clip_features=torch.cat([o.clip_features for _, o in parts]),
                base_clip_features=torch.cat([o.base_clip_features for _, o in parts]), crops=[], used=used, skipped=[])
    for _ in range(len(kept) - len(used)):
        report.drop("arcface")
    if not used:
        return [], []
    kept = [kept[i] for i in used]
    assert conds is not None and conds.id_embeds is not None and conds.clip_features is not None \
        and conds.base_clip_features is not None
    crops, time_ids = zip(*(training_crop(c.image, cfg.size, c.face_box) for c in kept))
    plans = [crop_plan(*c.image.shape[:2], cfg.size, c.face_box) for c in kept]
    report.crop_moved += sum(1 for p in plans if p is not None and p.moved)
    latents = encode_latents(enc.vae, crops)
    captions = [c.caption for c in kept]
    text, pooled = enc.text.encode([TRIGGER_PREFIX + c for c in captions])
    text_plain, pooled_plain = enc.text.encode(captions)
    samples, meta = [], []
    dtypes = stored_dtypes(cfg.feature_dtype)
    for k, c in enumerate(kept):
        samples.append(_stored(dtypes, {
            "arcface": conds.id_embeds[k], "clip_id": conds.clip_features[k].cpu(),
            "clip_base": conds.base_clip_features[k].cpu(), "latents": latents[k],
            "time_ids": torch.tensor(time_ids[k]), "text": text[k].cpu(), "pooled": pooled[k].cpu(),
            "text_plain": text_plain[k].cpu(), "pooled_plain": pooled_plain[k].cpu()}))
        meta.append({"key": c.item.key, "identity": c.identity, "caption": c.caption})
        report.kept += 1
    return samples, meta


def _stored(dtypes: dict[str, torch.dtype], sample: dict[str, Tensor]) -> dict[str, Tensor]:
    """Each tensor in its stored dtype at once (own storage): a shard's samples wait in memory at half size."""
    return {k: v.detach().to("cpu", dtypes[k]).clone() for k, v in sample.items()}


def process_shard(items: Sequence[Item], path: Path, cfg: PrepareConfig, enc: Encoders,
                  progress: Any = None, settings: dict[str, Any] | None = None) -> FilterReport:
    """Filter and encode ``items`` into the shard ``path`` (written atomically); returns its report."""
    report = FilterReport()
    samples: list[dict[str, Tensor]] = []
    meta: list[dict[str, str]] = []
    pending: list[_Candidate] = []
    tars: dict[Path, tarfile.TarFile] = {}
    try:
        for item in items:
            report.seen += 1
            tar = None
            if item.members:
                tar = tars.get(item.source)
                if tar is None:
                    try:
                        tar = tars[item.source] = tarfile.open(item.source, "r:*")
                    except (tarfile.TarError, OSError, EOFError):
                        tar = None
            raw = read_item(item, tar) if (tar is not None or not item.members) else Raw(None, None, "")
            cand = _filter(item, raw, cfg, enc, report)
            if cand is not None:
                pending.append(cand)
            if len(pending) >= cfg.batch_size:
                s, m = _encode(pending, cfg, enc, report)
                samples += s
                meta += m
                pending = []
            if progress is not None:
                progress.update(1)
        if pending:
            s, m = _encode(pending, cfg, enc, report)
            samples += s
            meta += m
    finally:
        for tar in tars.values():
            tar.close()
    write_shard(path, samples, meta, report=report, settings=settings if settings is not None else cfg.settings(),
                dtypes=stored_dtypes(cfg.feature_dtype))
    return report


# ----------------------------------------------------------------------------- the run


@dataclass
class PrepareReport:
    """What one prepare call did: shards written now / found finished, the filter counts of the shards it
    wrote, and the manifest rebuilt at the end (all finished shards of the folder, every process)."""

    written: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    report: FilterReport = field(default_factory=FilterReport)
    manifest: Any = None
    interrupted: bool = False


def _default_split() -> tuple[int, int, str | None]:
    """accelerate's (process index, process count, this process's device) when launched by accelerate /
    torchrun (``WORLD_SIZE`` set), else (0, 1, None)."""
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, None
    try:
        from accelerate import PartialState
    except ImportError:
        return 0, 1, None
    state = PartialState()
    return int(state.process_index), int(state.num_processes), str(state.device)


def _check_resume(out: Path, settings: dict[str, Any]) -> None:
    """A resumed run must use the settings the finished shards were made with."""
    previous: dict[str, Any] | None = None
    if (out / "manifest.json").is_file():
        try:
            m = read_manifest(out)
            previous = (m.settings or None) if m.shards else None    # nothing finished yet: nothing to match
        except HyperLoRAError:
            previous = None
    if previous is None:
        done = finished_shards(out)
        if done:
            previous = read_shard_info(next(iter(done.values()))).settings
    if previous is not None and json.loads(json.dumps(previous)) != json.loads(json.dumps(settings, default=str)):
        diff = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
        raise SettingError(
            f"{out} holds shards prepared with other settings ({', '.join(diff)}: "
            f"{ {k: previous.get(k) for k in diff} } vs now { {k: settings.get(k) for k in diff} }); "
            "use the same settings and inputs to resume (plan = the list of input samples), or a new --out folder.")


def prepare(inputs: list[Path], out: Path, cfg: PrepareConfig, *, shard_index: int = 0, num_shards: int = 1,
            encoders: Encoders | None = None, show_progress: bool = True) -> PrepareReport:
    """Write this process's shards of ``inputs`` into ``out`` (resumable) and rebuild the manifest."""
    from tqdm.auto import tqdm

    cfg.check()
    if not (isinstance(num_shards, int) and num_shards >= 1 and isinstance(shard_index, int)
            and 0 <= shard_index < num_shards):
        raise SettingError(f"--shard-index {shard_index} / --num-shards {num_shards}: the index must be in "
                           "0..num_shards-1 and num_shards >= 1.")
    out = Path(out)
    items = list_items(inputs)
    if not items:
        raise SettingError(f"No images were found in {', '.join(map(str, inputs))}; check --input.")
    # the plan (which input sample goes to which shard) must not change under a resumed run
    keys = hashlib.sha1("\n".join(i.key for i in items).encode("utf-8")).hexdigest()
    settings = {**cfg.settings(), "plan": {"items": len(items), "keys_sha1": keys}}
    out.mkdir(parents=True, exist_ok=True)
    _check_resume(out, settings)
    planned = math.ceil(len(items) / cfg.shard_size)
    mine = [i for i in range(planned) if i % num_shards == shard_index]
    done = finished_shards(out)
    result = PrepareReport(skipped=[i for i in mine if i in done])
    todo = [i for i in mine if i not in done]
    enc = encoders or Encoders.load(cfg)
    total = sum(len(items[i * cfg.shard_size:(i + 1) * cfg.shard_size]) for i in todo)
    bar = tqdm(total=total, desc=f"prepare {shard_index + 1}/{num_shards}", unit="img", disable=not show_progress)
    try:
        for i in todo:
            chunk = items[i * cfg.shard_size:(i + 1) * cfg.shard_size]
            result.report.add(process_shard(chunk, out / shard_name(i), cfg, enc, progress=bar, settings=settings))
            result.written.append(i)
    except KeyboardInterrupt:
        result.interrupted = True
        logger.warning("prepare: interrupted; %d shard(s) finished, none half-written. Run the same command "
                       "again to resume.", len(result.written))
    finally:
        bar.close()
        C, P = enc.text.dims
        encoders_info = {
            "sdxl": str(cfg.sdxl), "clip": str(cfg.clip), "antelope": str(cfg.antelope),
            "aesthetic": getattr(enc.scorer, "name", str(cfg.aesthetic)), "clip_dim": int(enc.clip.shape.hidden_size),
            "text_dim": int(C), "pooled_dim": int(P), "vae_scaling_factor": float(enc.vae.config.scaling_factor),
            "trigger_prefix": TRIGGER_PREFIX, "host": socket.gethostname(),
        }
        sizes = {"size": cfg.size, "latent": [int(enc.vae.config.latent_channels), cfg.size // 8, cfg.size // 8],
                 "tokens": 77}
        result.manifest = rebuild_manifest(out, planned=planned, encoders=encoders_info, sizes=sizes,
                                           settings=settings)
    if result.interrupted:
        raise KeyboardInterrupt
    return result


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hyperlora.train prepare", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", action="append", required=True, type=Path,
                   help="kohya image folder or webdataset .tar (repeat for several)")
    p.add_argument("--out", required=True, type=Path, help="shard folder (created; resumed when it exists)")
    p.add_argument("--sdxl", required=True, type=Path, help="SDXL single-file .safetensors or diffusers folder")
    p.add_argument("--clip", required=True, type=Path, help="CLIP ViT-L/14 folder (released clip_vit/<name>) or file")
    p.add_argument("--clip-processor", type=Path, default=None, help="folder with preprocessor_config.json")
    p.add_argument("--antelope", required=True, type=Path, help="insightface antelopev2 folder")
    p.add_argument("--aesthetic", default="none",
                   help="the aesthetic filter: 'none' (the default: the filter is OFF and every score passes) or a "
                        "LAION aesthetic head .safetensors (linear 768->1 or MLP), which keeps photos scoring above "
                        "--min-aesthetic (the paper filtered its data this way at 5.5)")
    p.add_argument("--aesthetic-clip", type=Path, default=None,
                   help="CLIP ViT-L/14 with its image projection for the aesthetic scorer: HF folder or ComfyUI "
                        "clip_vision file (default: --clip)")
    p.add_argument("--tokenizer", type=Path, default=None, help="CLIP tokenizer folder (single-file SDXL only)")
    p.add_argument("--min-side", type=int, default=768, help="drop photos whose shorter side is below this (px)")
    p.add_argument("--min-aesthetic", type=float, default=5.5,
                   help="keep photos scoring above this; used only with an --aesthetic head (off with 'none')")
    p.add_argument("--min-face-area", type=float, default=0.03,
                   help="drop photos whose face box covers no more than this fraction of the image")
    p.add_argument("--size", type=int, default=1024,
                   help="training crop side (px): shorter side resized to it, the square moved off the centre "
                        "only to keep the face box (photos whose face box is longer than it are dropped)")
    p.add_argument("--feature-dtype", default="mixed", choices=list(FEATURE_DTYPES),
                   help="stored dtypes: 'mixed' (ArcFace, latents and time ids float32, CLIP and text features "
                        "float16) or 'float16' (everything but the time ids float16: smaller shards; fit reads "
                        "both)")
    p.add_argument("--base-scales", default="1,1,1,1",
                   help="the Base-LoRA branch's crop around the face box: left,right,top,bottom in face "
                        "half-sizes, clipped to the photo (1,1,1,1 = the released preprocessing, format §6)")
    p.add_argument("--project-to", type=int, default=PAPER_SAMPLES,
                   help="the final line projects the shards' size per sample to this many samples (the "
                        "paper's 4.4 M images)")
    p.add_argument("--shard-size", type=int, default=256, help="input samples per shard (before filtering)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--det-size", type=int, default=640)
    p.add_argument("--device", default=None,
                   help="encoders' device (default: this process's accelerate device, else cuda when present, else cpu)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--shard-index", type=int, default=None, help="this process's index (default: accelerate's)")
    p.add_argument("--num-shards", type=int, default=None, help="process count (default: accelerate's)")
    p.add_argument("--no-vit-l14-check", action="store_true", help="allow a non-ViT-L/14 CLIP (toy models)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    index, count, accel_device = _default_split()
    device = args.device or accel_device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = PrepareConfig(
        sdxl=args.sdxl, clip=args.clip, clip_processor=args.clip_processor, antelope=args.antelope,
        aesthetic=args.aesthetic, aesthetic_clip=args.aesthetic_clip, tokenizer=args.tokenizer,
        min_side=args.min_side, min_aesthetic=args.min_aesthetic, min_face_area=args.min_face_area, size=args.size,
        shard_size=args.shard_size, det_size=args.det_size, batch_size=args.batch_size, device=device,
        dtype=args.dtype, require_vit_l14=not args.no_vit_l14_check, feature_dtype=args.feature_dtype,
        base_scales=args.base_scales)
    if args.shard_index is not None or args.num_shards is not None:
        index = args.shard_index if args.shard_index is not None else 0
        count = args.num_shards if args.num_shards is not None else 1
    try:
        if args.project_to < 1:
            raise SettingError(f"--project-to is {args.project_to}; give a positive number of samples (e.g. 4400000).")
        cfg.base_scales = parse_base_scales(args.base_scales)
        check_folder_option(args.out, "--out")
        result = prepare(list(args.input), args.out, cfg, shard_index=index, num_shards=count)
    except KeyboardInterrupt:
        sys.stderr.write("prepare: interrupted; finished shards are kept. Run the same command to resume.\n")
        return 130
    except HyperLoRAError as exc:
        sys.stderr.write(f"prepare: {exc}\n")
        return 2
    except OSError as exc:                       # a path the checks above could not foresee (permissions, disk)
        sys.stderr.write(f"prepare: {os_error_line(exc)}\n")
        return 2
    rep = FilterReport.from_dict(result.manifest.report)
    for line in ["this run: shards written " + str(len(result.written)) + ", already done " + str(len(result.skipped)),
                 "whole folder (manifest): " + rep.lines()[0], *rep.lines()[1:]]:
        logger.info("%s", line)
    sys.stdout.write(f"prepare: {result.manifest.count} samples in {len(result.manifest.shards)} of "
                     f"{result.manifest.planned} shards{'' if result.manifest.complete else ' (incomplete)'} -> "
                     f"{args.out}{size_note(args.out, args.project_to)}\n")
    return 0


def size_note(folder: Path, project_to: int) -> str:
    """``"; 1952996 bytes per sample, 8.59 TB for 4,400,000 samples"`` for the finished shards of ``folder`` (the
    per-key breakdown is logged), or ``""`` when they hold no sample."""
    size = folder_size(folder)
    if not size.samples:
        return ""
    parts = ", ".join(f"{k} {v}" for k, v in sorted(size.tensor_bytes.items(), key=lambda kv: -kv[1]))
    logger.info("shards: %d bytes on disk for %d samples; tensor bytes per sample: %s (%d in all; the rest is the "
                "shards' headers)", size.file_bytes, size.samples, parts, sum(size.tensor_bytes.values()))
    return (f"; {size.per_sample:.0f} bytes per sample, {human_bytes(size.projected(project_to))} for "
            f"{project_to:,} samples")


__all__ = ["CropPlan", "DEFAULT_BASE_SCALES", "Encoders", "Item", "PAPER_SAMPLES", "PrepareConfig", "PrepareReport",
           "crop_plan", "list_items", "main", "parse_base_scales", "prepare", "process_shard", "read_item",
           "size_note", "training_crop"]
