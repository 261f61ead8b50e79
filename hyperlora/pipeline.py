"""IMAGE batch -> encoder conditions of one identity (format §6), with skip/error policy and a cache.

:func:`images_from_comfy` turns what ComfyUI hands over into uint8 RGB arrays;
:func:`extract_conditions` finds the face of every photo, builds the crops of
:mod:`hyperlora.faces.preprocess`, runs ArcFace on the 4l crop and CLIP (one batched
forward for all photos and both conditions) and returns a :class:`FaceConditions`.

Results are cached per (image bytes, settings, model objects) in a small LRU, so
re-queuing the same photos with the same settings runs no model at all.
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .cache import LRU, digest
from .encoders import ClipVisionEncoder
from .errors import FaceNotFoundError, ImageInputError, SettingError, check_choice
from .faces import preprocess as pp
from .faces.analysis import DetectedFace, FaceAnalyzer, choose_face
from .faces.options import DEFAULTS, NO_FACE_POLICIES, FaceOptions, retry_sizes

logger = logging.getLogger(__name__)

MAX_DETECT_SIDE: int | None = None   # None = released: detect on the full photo; an int downscales larger
                                     # photos for detection only (faster, NOT bit-exact with the release)
CACHE_SIZE = 64             # images kept in the result cache
CLIP_CHUNK = 8              # crops per CLIP forward: one forward for the usual few photos, an interrupt
                            # check between forwards for a large batch (~0.5 s per crop for ViT-L on a CPU)
FIX_HINTS = ("a smaller detection size (e.g. 384 or 256) for close-ups, a photo with more room around the face "
             "(a less tight crop), or a frontal, well-lit photo of one person")
TINY_SIDE = 128             # photos with a shorter side than this are too small to find a face in reliably
MIN_FACE_AT_DETECTOR = 20   # about the smallest face (px) the detector finds at its own input size
LARGE_FACTOR = 3            # photos longer than this many detector sizes: small faces vanish when shrunk
MAX_REASONS = 4             # photos listed one by one in a no-face message


@dataclass
class FaceConditions:
    """Encoder inputs of one identity, from the images that had a usable face."""

    id_embeds: Tensor | None            # [N, 512] float32, L2-normalised ArcFace embeddings
    clip_features: Tensor | None        # [N, 257, E] CLIP of the ID-condition crops (encoder device/dtype)
    base_clip_features: Tensor | None   # [N, 257, E] CLIP of the base-condition crops
    crops: list[np.ndarray]             # what the model saw, one [512, 512, 3] preview per used image
    used: list[int]                     # 0-based input indices that gave a face
    skipped: list[int]                  # 0-based input indices without a usable face
    base_crops: list[np.ndarray] = field(default_factory=list)   # base-condition crops (native size)
    notes: list[str] = field(default_factory=list)               # per used image: which face was taken


# ----------------------------------------------------------------------------- ComfyUI images


def _describe(x: Any) -> str:
    shape = getattr(x, "shape", None)
    return f"{type(x).__name__} of shape {tuple(shape)}" if shape is not None else type(x).__name__


def _one_image(arr: np.ndarray, label: str) -> np.ndarray:
    """``[H, W, C]`` float 0..1 (or uint8) -> uint8 RGB ``[H, W, 3]``."""
    if arr.ndim != 3:
        raise ImageInputError(f"{label} has shape {tuple(arr.shape)}; expected [height, width, channels].")
    h, w, c = arr.shape
    if h < 1 or w < 1:
        raise ImageInputError(f"{label} is empty (shape {tuple(arr.shape)}); connect a real image.")
    if c not in (1, 3, 4):
        hint = " It looks channels-first ([C, H, W]); ComfyUI images are [H, W, C]." if h in (1, 3, 4) else ""
        raise ImageInputError(
            f"{label} has {c} channels (shape {tuple(arr.shape)}); expected 1 (grayscale), 3 (RGB) or 4 (RGBA).{hint}")
    if arr.dtype == np.uint8:
        out = arr
    elif np.issubdtype(arr.dtype, np.floating):
        values = arr.astype(np.float32, copy=False)
        if not np.isfinite(values).all():
            raise ImageInputError(f"{label} contains NaN or infinite values; check the node that made it.")
        # clip, *255, truncate: what ComfyUI and the released pipeline do when they make a PIL image
        out = (np.clip(values, 0.0, 1.0) * np.float32(255.0)).astype(np.uint8)
    else:
        raise ImageInputError(f"{label} has dtype {arr.dtype}; expected float values in 0..1 (a ComfyUI IMAGE).")
    if c == 1:
        out = np.repeat(out, 3, axis=2)
    elif c == 4:
        # RGBA: alpha is dropped (the colour under it is kept), as PIL's RGBA->RGB conversion
        # in the released pipeline does; ComfyUI's own loaders hand alpha over as a separate MASK.
        out = out[:, :, :3]
    return np.ascontiguousarray(out)


def _as_array(x: Any, label: str) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().cpu().float().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        return x
    raise ImageInputError(f"{label} is a {_describe(x)}, not an image tensor; connect an IMAGE output.")


def images_from_comfy(images: Tensor | np.ndarray | Sequence[Tensor | np.ndarray]) -> list[np.ndarray]:
    """ComfyUI IMAGE -> list of uint8 RGB ``[H, W, 3]``.

    Accepts a batch ``[B, H, W, C]`` (float 0..1, C = 1, 3 or 4) or a list of such batches /
    single ``[H, W, C]`` images of different sizes.  Raises :class:`ImageInputError` naming the
    image and its shape for anything else (empty batch, wrong dims, NaN, channels-first).
    """
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ImageInputError("The image list is empty; connect at least one photo of the person.")
        out: list[np.ndarray] = []
        for i, item in enumerate(images):
            arr = _as_array(item, f"Image {i + 1} of the list")
            if arr.ndim == 4:
                if arr.shape[0] == 0:
                    raise ImageInputError(f"Image {i + 1} of the list is an empty batch (shape {tuple(arr.shape)}).")
                out.extend(_one_image(a, f"Image {i + 1} of the list (batch item {j + 1})") for j, a in enumerate(arr))
            else:
                out.append(_one_image(arr, f"Image {i + 1} of the list"))
        return out
    arr = _as_array(images, "The image input")
    if arr.ndim != 4:
        raise ImageInputError(
            f"The image input has shape {tuple(arr.shape)}; expected a ComfyUI IMAGE batch [batch, height, width, channels].")
    if arr.shape[0] == 0:
        raise ImageInputError(f"The image batch is empty (shape {tuple(arr.shape)}); connect at least one photo.")
    return [_one_image(a, f"Image {i + 1} of {arr.shape[0]}") for i, a in enumerate(arr)]


# ----------------------------------------------------------------------------- face finding


def find_faces_scaled(analyzer: FaceAnalyzer, image: np.ndarray, *, det_size: int) -> list[DetectedFace]:
    """Faces of ``image`` in its own pixel coordinates.  Photos larger than MAX_DETECT_SIDE are
    downscaled (area interpolation) for detection and landmarks only; coordinates are mapped back.
    The default (None) detects on the full photo, as the release does: insightface resizes to the
    detector size itself and the landmark / ArcFace steps are affine warps of the full image."""
    h, w = image.shape[:2]
    if MAX_DETECT_SIDE is None or max(h, w) <= MAX_DETECT_SIDE:
        return list(analyzer.find_faces(image, det_sizes=retry_sizes(det_size)))
    scale = MAX_DETECT_SIDE / max(h, w)
    import cv2

    small = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    sx, sy = w / small.shape[1], h / small.shape[0]
    faces = analyzer.find_faces(small, det_sizes=retry_sizes(det_size))
    factor = np.array([sx, sy], dtype=np.float64)
    return [dataclasses.replace(
        f, bbox=(np.asarray(f.bbox, np.float64).reshape(2, 2) * factor).reshape(4).astype(np.float32),
        kps=(np.asarray(f.kps, np.float64) * factor).astype(np.float32),
        landmarks_106=(np.asarray(f.landmarks_106, np.float64) * factor).astype(np.float32)) for f in faces]


# ----------------------------------------------------------------------------- cache


@dataclass
class _Result:
    """Everything extracted from one image (cached)."""

    reason: str | None = None                 # why the image has no usable face; None when it has one
    index_miss: bool = False                  # faces were found, but fewer than face_index + 1
    faces_found: int = 0
    note: str = ""
    id_embed: np.ndarray | None = None        # [512]
    clip_crop: np.ndarray | None = None
    base_crop: np.ndarray | None = None
    preview: np.ndarray | None = None
    clip_feature: Tensor | None = None        # [257, E] CPU
    base_feature: Tensor | None = None


class _Cache:
    """The result LRU; entries remember (weakly) the model objects they were made with."""

    def __init__(self, size: int) -> None:
        self._lru: LRU[tuple[tuple[weakref.ref, ...], _Result]] = LRU(size)

    def get(self, key: tuple, models: tuple[Any, ...]) -> _Result | None:
        entry = self._lru.get(key)
        if entry is None:
            return None
        refs, result = entry
        if any(r() is not m for r, m in zip(refs, models)):
            self._lru.pop(key)   # an id() was reused by another object
            return None
        return result

    def put(self, key: tuple, models: tuple[Any, ...], result: _Result) -> None:
        refs = tuple(weakref.ref(m) if m is not None else (lambda: None) for m in models)
        self._lru.put(key, (refs, result))

    def clear(self) -> None:
        self._lru.clear()

    def __len__(self) -> int:
        return len(self._lru)


RESULT_CACHE = _Cache(CACHE_SIZE)


def clear_cache() -> None:
    """Forget every cached result (e.g. after the models were reloaded in place)."""
    RESULT_CACHE.clear()


# ----------------------------------------------------------------------------- extraction


def _check_images(images: Sequence[np.ndarray]) -> None:
    if not isinstance(images, (list, tuple)) or len(images) == 0:
        raise ImageInputError("No images were given; connect at least one photo of the person.")
    for i, img in enumerate(images):
        if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3 \
                or min(img.shape[:2]) < 1:
            raise ImageInputError(
                f"Image {i + 1} of {len(images)} is a {_describe(img)}"
                f"{'' if not isinstance(img, np.ndarray) else f' ({img.dtype})'}; expected uint8 RGB [H, W, 3] "
                "(use images_from_comfy for ComfyUI IMAGE tensors).")


def _analyse(image: np.ndarray, *, analyzer: FaceAnalyzer, need_id: bool, need_clip: bool,
             need_base: bool, options: FaceOptions, base_scales: tuple[float, float, float, float]) -> _Result:
    face_choice, face_index = options.face_choice, options.face_index
    faces = find_faces_scaled(analyzer, image, det_size=options.det_size)
    if not faces:
        return _Result(reason=f"no face found{no_face_hint(image.shape, options.det_size)}")
    try:
        face = choose_face(faces, face_choice, face_index)
    except SettingError as exc:               # face_index beyond the faces of this photo
        return _Result(reason=str(exc), index_miss=True, faces_found=len(faces))
    note = f"took 1 of {len(faces)} face(s) ({face_choice}{f' {face_index}' if face_choice in ('index', 'left_to_right') else ''}): {face.describe()}"
    lm = np.asarray(face.landmarks_106, dtype=np.float64)
    res = _Result(note=note)
    if need_id:
        arc = pp.arcface_crop(image, lm)
        emb = analyzer.embedding(arc, choice="highest_score" if face_choice == "highest_score" else "largest")
        if emb is None:
            return _Result(reason="the face was not found again in its ArcFace crop (4x the face box, detector 640)")
        emb = np.asarray(emb, dtype=np.float32).reshape(-1)
        res.id_embed = emb / max(float(np.linalg.norm(emb)), 1e-12)
        res.preview = pp.preview(arc)
    if need_clip:
        res.clip_crop = pp.clip_crop(image, lm, remove_bg=options.remove_background, grayscale=options.grayscale)
        res.preview = pp.preview(res.clip_crop)   # what CLIP saw, before its own 224 px resize
    if need_base:
        res.base_crop = pp.base_crop(image, lm, base_scales)
    for arr in (res.id_embed, res.clip_crop, res.base_crop, res.preview):
        if arr is not None:
            arr.flags.writeable = False    # shared with the cache: callers get read-only views
    return res


def extract_conditions(
    images: Sequence[np.ndarray],
    *,
    analyzer: FaceAnalyzer,
    clip: ClipVisionEncoder | None,
    need_id: bool,
    need_clip: bool,
    need_base: bool,
    options: FaceOptions = DEFAULTS,
    base_scales: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    use_cache: bool = True,
    check_interrupt: Callable[[], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> FaceConditions:
    """Face photos (uint8 RGB ``[H, W, 3]``, any sizes) -> :class:`FaceConditions` of one person.

    ``options``: how faces are found, chosen and prepared (:class:`FaceOptions`); its ``no_face``:
    "skip" drops faceless photos with a warning naming them, "error" raises :class:`FaceNotFoundError`
    naming them.  No face in any photo always raises.  Results are cached per photo, keyed by the
    photo's bytes, :meth:`FaceOptions.cache_key`, the conditions asked for and the model objects.
    ``check_interrupt`` is called before each photo's face analysis and before each CLIP forward
    (it raises to stop); ``progress(done, total)`` after each photo.
    """
    _check_images(images)
    if not isinstance(options, FaceOptions):
        raise SettingError(f"options must be a FaceOptions, got {type(options).__name__}; build it with "
                           "FaceOptions(face_choice=..., ...).")
    if not (need_id or need_clip or need_base):
        raise ValueError("extract_conditions needs at least one of need_id, need_clip, need_base")
    if (need_clip or need_base) and clip is None:
        raise ValueError("a CLIP encoder is needed for the CLIP / base conditions")
    scales = pp.check_base_scales(base_scales)
    total = len(images)
    models = (analyzer, clip if (need_clip or need_base) else None)
    # dtype changes the features, the device (ComfyUI moves models on and off the GPU) does not
    clip_key = str(clip.dtype) if models[1] is not None else None
    settings = (need_id, need_clip, need_base, type(options).__name__, options.cache_key(),
                scales if need_base else None, id(models[0]), id(models[1]), clip_key)

    results: list[_Result | None] = [None] * total
    keys: list[tuple] = []
    for i, img in enumerate(images):
        keys.append((digest(img),) + settings)
        if use_cache:
            results[i] = RESULT_CACHE.get(keys[i], models)
    fresh = [i for i in range(total) if results[i] is None]
    for done_count, i in enumerate(range(total), 1):
        if results[i] is None:
            _interrupt(check_interrupt)
            results[i] = _analyse(images[i], analyzer=analyzer, need_id=need_id, need_clip=need_clip,
                                  need_base=need_base, options=options, base_scales=scales)
        if progress is not None:
            progress(done_count, total)
    done: list[_Result] = [r for r in results if r is not None]   # every entry is filled by now
    skipped = [i for i, r in enumerate(done) if r.reason is not None]
    used = [i for i, r in enumerate(done) if r.reason is None]
    if use_cache:   # faceless results are final already
        for i in fresh:
            if done[i].reason is not None:
                RESULT_CACHE.put(keys[i], models, done[i])
    _apply_policy(done, skipped, used, total, options=options)

    todo = [i for i in fresh if done[i].reason is None]
    if todo and (need_clip or need_base):
        batch = [done[i].clip_crop for i in todo if need_clip] + [done[i].base_crop for i in todo if need_base]
        feats = _encode_chunked(clip, batch, check_interrupt)  # type: ignore[arg-type]
        n_clip = len(todo) if need_clip else 0
        for k, i in enumerate(todo):
            if need_clip:
                done[i].clip_feature = feats[k].cpu().clone()   # own storage: the batch is freed
            if need_base:
                done[i].base_feature = feats[n_clip + k].cpu().clone()
    if use_cache:
        for i in todo:
            RESULT_CACHE.put(keys[i], models, done[i])

    for i in used:
        logger.info("HyperLoRA: image %d of %d: %s", i + 1, total, done[i].note)
    device = clip.device if clip is not None else torch.device("cpu")

    def stack(name: str) -> Tensor | None:
        items = [getattr(done[i], name) for i in used]
        return torch.stack(items).to(device) if items and items[0] is not None else None

    return FaceConditions(
        id_embeds=torch.from_numpy(np.stack([done[i].id_embed for i in used])) if need_id else None,
        clip_features=stack("clip_feature") if need_clip else None,
        base_clip_features=stack("base_feature") if need_base else None,
        crops=[done[i].preview for i in used],
        used=used, skipped=skipped,
        base_crops=[done[i].base_crop for i in used] if need_base else [],
        notes=[f"image {i + 1} of {total}: {done[i].note}" for i in used],
    )


def _interrupt(check_interrupt: Callable[[], None] | None) -> None:
    if check_interrupt is not None:
        check_interrupt()


def _encode_chunked(clip: ClipVisionEncoder, crops: list[np.ndarray],
                    check_interrupt: Callable[[], None] | None) -> Tensor:
    """CLIP features ``[N, 257, E]`` of the crops, ``CLIP_CHUNK`` per forward (one forward for up to 8)."""
    parts = []
    for start in range(0, len(crops), CLIP_CHUNK):
        _interrupt(check_interrupt)
        parts.append(clip.encode(crops[start:start + CLIP_CHUNK]).detach())
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def no_face_hint(shape: tuple[int, ...], det_size: int) -> str:
    """What to do about a photo without a face, from its size: '' for an ordinary photo; advice for a
    tiny photo, or for a very large one in which a small face vanishes when shrunk for the detector."""
    h, w = int(shape[0]), int(shape[1])
    if min(h, w) < TINY_SIDE:
        return (f" (the photo is only {w}x{h} pixels, too small to find a face reliably: use one at least 256 "
                f"pixels on its short side, with the face filling a good part of it)")
    if max(h, w) > LARGE_FACTOR * det_size:
        smallest = round(MIN_FACE_AT_DETECTOR * max(h, w) / det_size)
        return (f" (the photo is {w}x{h} pixels; the detector sees it shrunk to {det_size} pixels, so a face "
                f"narrower than about {smallest} pixels is missed: crop the photo around the person first, e.g. "
                f"with the core 'ImageCrop' node)")
    return ""


def _listed(items: list[str]) -> str:
    more = len(items) - MAX_REASONS
    return "; ".join(items[:MAX_REASONS]) + (f"; and {more} more" if more > 0 else "")


def _index_error(done: list[_Result], index_missed: list[int], no_face_ones: list[int], total: int, *,
                 face_choice: str, face_index: int) -> SettingError:
    counted = "largest first" if face_choice == "index" else "from the left"
    found = _listed([f"image {i + 1} shows {done[i].faces_found} face(s), valid 0 to {done[i].faces_found - 1}"
                     for i in index_missed])
    also = f" Image(s) {', '.join(str(i + 1) for i in no_face_ones)} had no face at all." if no_face_ones else ""
    return SettingError(
        f"face_index {face_index} (face_choice '{face_choice}', counted {counted}) is beyond the faces found in "
        f"image(s) {', '.join(str(i + 1) for i in index_missed)} ({found}). Lower face_index (it counts from 0) or "
        f"set face_choice to 'largest'.{also}")


def _apply_policy(done: list[_Result], skipped: list[int], used: list[int], total: int, *,
                  options: FaceOptions) -> None:
    """Raise or warn for the photos without a usable face.  A face_index beyond the faces of a photo is
    reported on its own, as the setting it is (SettingError), apart from photos without any face."""
    no_face, det_size, face_choice, face_index = options.no_face, options.det_size, options.face_choice, options.face_index
    index_missed = [i for i in skipped if done[i].index_miss]
    no_face_ones = [i for i in skipped if not done[i].index_miss]
    sizes = ", ".join(map(str, retry_sizes(det_size)))
    if not used and index_missed:
        raise _index_error(done, index_missed, no_face_ones, total, face_choice=face_choice, face_index=face_index)
    if not used:
        reasons = _listed([f"image {i + 1}: {done[i].reason}" for i in no_face_ones])
        raise FaceNotFoundError(
            f"No usable face was found in any of the {total} image(s) checked ({reasons}; detector sizes {sizes}, "
            f"with padding). Try {FIX_HINTS}.")
    if not skipped:
        return
    if no_face == "error" and index_missed:
        raise _index_error(done, index_missed, no_face_ones, total, face_choice=face_choice, face_index=face_index)
    if no_face == "error":
        names = ", ".join(str(i + 1) for i in no_face_ones)
        reasons = _listed([f"image {i + 1}: {done[i].reason}" for i in no_face_ones])
        raise FaceNotFoundError(
            f"No usable face in image(s) {names} of {total} ({reasons}; detector sizes {sizes}). Remove them, set "
            f"no_face to 'skip', or try {FIX_HINTS}.")
    if no_face_ones:
        logger.warning("HyperLoRA: skipped image(s) %s of %s without a usable face (%s); using %d image(s).",
                       ", ".join(str(i + 1) for i in no_face_ones), total,
                       _listed([f"image {i + 1}: {done[i].reason}" for i in no_face_ones]), len(used))
    if index_missed:
        logger.warning("HyperLoRA: skipped image(s) %s of %s with fewer faces than face_index %d + 1 (%s); "
                       "using %d image(s).", ", ".join(str(i + 1) for i in index_missed), total, face_index,
                       _listed([f"image {i + 1}: {done[i].reason}" for i in index_missed]), len(used))


# ----------------------------------------------------------------------------- inpainting masks


def no_face_error(label: str, det_size: int, consequence: str, skip_effect: str,
                  shape: tuple[int, ...] | None = None) -> FaceNotFoundError:
    """The error of a per-photo node with ``no_face='error'`` when ``label`` (e.g. "image 2 of 3") has no face;
    with the photo's ``shape`` the advice fits it (:func:`no_face_hint`: tiny photo, small face in a huge one)."""
    hint = no_face_hint(shape, det_size) if shape is not None else ""
    return FaceNotFoundError(
        f"No face was found in {label}{hint} (detector sizes {', '.join(map(str, retry_sizes(det_size)))}, with "
        f"padding), so {consequence}. Set no_face to 'skip' to {skip_effect}, or try {FIX_HINTS}.")


def face_masks(
    images: Sequence[np.ndarray],
    *,
    analyzer: FaceAnalyzer,
    face_choice: str = DEFAULTS.face_choice,
    face_index: int = DEFAULTS.face_index,
    det_size: int = DEFAULTS.det_size,
    grow: float = 1.3,
    feather: float = 8.0,
    no_face: str = DEFAULTS.no_face,
    check_interrupt: Callable[[], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, list[DetectedFace | None]]:
    """One inpainting mask per photo: float32 ``[N, H, W]`` (photos of one size) and the face used
    in each (None where a photo has none; its mask is all zeros with ``no_face='skip'``).

    Faces are found and chosen exactly as for identities (sizes, padding, face_choice); the mask
    is :func:`hyperlora.faces.preprocess.face_mask` of the chosen face.  ``check_interrupt`` is
    called before each photo, ``progress(done, total)`` after each.
    """
    check_choice(no_face, NO_FACE_POLICIES, "no_face")
    _check_images(images)
    shapes = {im.shape[:2] for im in images}
    if len(shapes) != 1:
        raise ImageInputError(f"The photos have different sizes {sorted(shapes)}; a MASK batch needs one size. "
                              "Mask them one at a time or resize them first.")
    (h, w), = shapes
    masks = np.zeros((len(images), h, w), dtype=np.float32)
    chosen: list[DetectedFace | None] = []
    for i, image in enumerate(images):
        _interrupt(check_interrupt)
        if progress is not None and i:
            progress(i, len(images))
        faces = find_faces_scaled(analyzer, image, det_size=det_size)
        if not faces:
            if no_face == "error":
                raise no_face_error(f"image {i + 1} of {len(images)}", det_size, "it cannot be masked",
                                    "pass it on with an empty mask", shape=image.shape)
            logger.warning("HyperLoRA: no face in image %d of %d; its mask is empty.", i + 1, len(images))
            chosen.append(None)
            continue
        try:
            face = choose_face(faces, face_choice, face_index)
        except SettingError as exc:
            raise SettingError(f"Image {i + 1} of {len(images)}: {exc}") from None
        masks[i] = pp.face_mask((w, h), face.landmarks_106, grow=grow, feather=feather)
        chosen.append(face)
    if progress is not None:
        progress(len(images), len(images))
    return masks, chosen
