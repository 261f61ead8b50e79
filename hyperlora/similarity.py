"""Identity similarity: how much each image looks like the person, as ArcFace sees it.

The reference is a person's ArcFace embedding ``[512]``: the ``face_embedding`` an identity
records (refused when the identity records other face models than the scoring analyzer's:
:func:`check_face_models`), or the same thing made from reference photos by the identity's own recipe
(:func:`reference_from_photos`: the chosen face of each photo, its 4l ArcFace crop, detection
again at 640, the L2-normalised mean over the photos; format §6).

An image is scored by every face found in it (the detector sizes and padding used for
identities), each through the same ArcFace recipe; its score is the best cosine similarity,
and :class:`ImageScore` says which face that was (its index largest-first, the order of
``face_choice='index'``, and its box).  An image without a face that ArcFace can read gets
``score=None`` and the reason, never a number.

:func:`rank` orders images by score for "best of N"; :func:`annotate` draws the face box and
the score on an image.  Everything here is numpy / torch; the face models come from the caller.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from .errors import FaceNotFoundError, IdentityFileError, SettingError
from .faces import preprocess as pp
from .faces.analysis import DetectedFace, FaceAnalyzer, order_faces
from .faces.options import DEFAULTS, FaceOptions
from .identity import Identity, mean_face_embedding
from .pipeline import extract_conditions, find_faces_scaled
from .spec import FACE_EMBEDDING_DIM

logger = logging.getLogger(__name__)

NO_FACE = "no face"
"""How an image without a scorable face is marked in texts and on the annotated image."""
FACE_ORDER = "largest"
"""Faces of a scored image are numbered largest first (``face_choice='index'`` counts the same way)."""
OLD_IDENTITY = ("this identity was saved before HyperLoRA Studio recorded face embeddings; connect reference "
                "photos or make the identity again")
UNKNOWN_FACE_MODELS = ("this identity does not record which face models made its face embedding (it was saved "
                       "before HyperLoRA Studio recorded them); its scores mean something only if the Loader's "
                       "insightface folder holds the same AntelopeV2 files. Make the identity again to have it checked")


@dataclass(frozen=True)
class ImageScore:
    """The similarity of one image to the reference.

    ``score``: the best cosine similarity of its faces (-1..1), None when no face could be scored.
    ``face``: index of that face among the image's faces, largest first; ``faces``: how many were found.
    ``box``: that face's box ``(x1, y1, x2, y2)`` in image pixels.  ``reason``: why there is no score.
    ``landmarks``: that face's 106 landmarks ``[106, 2]`` (for its crops), None without a score.
    """

    score: float | None
    face: int | None
    faces: int
    box: tuple[float, float, float, float] | None
    reason: str = ""
    landmarks: np.ndarray | None = field(default=None, compare=False, repr=False)   # [106, 2] of that face

    def label(self) -> str:
        """``0.731 (face 0 of 2, largest first)`` or ``no face (...)``."""
        if self.score is None:
            return f"{NO_FACE} ({self.reason})" if self.reason else NO_FACE
        return f"{self.score:.3f} (face {self.face} of {self.faces}, {FACE_ORDER} first)"


def _unit(embedding: Tensor | np.ndarray, what: str) -> np.ndarray:
    e = np.asarray(embedding.detach().cpu() if isinstance(embedding, Tensor) else embedding, dtype=np.float64).reshape(-1)
    norm = float(np.linalg.norm(e))
    if e.shape != (FACE_EMBEDDING_DIM,) or not np.isfinite(norm) or norm == 0.0:
        raise SettingError(f"{what} must be a non-zero finite ArcFace embedding [{FACE_EMBEDDING_DIM}], got shape "
                           f"{tuple(e.shape)}; make it from photos with reference_from_photos.")
    return e / norm


def check_face_models(identity: Identity, analyzer: FaceAnalyzer) -> None:
    """Refuse to score against an identity whose face embedding was made by other face models.

    ArcFace embeddings of two different recognition models live in unrelated spaces: the same photo
    scores near 0 instead of 1, a number that looks like a real score.  So a known fingerprint
    (:attr:`Identity.face_models`) that differs from ``analyzer.fingerprint`` raises
    :class:`IdentityFileError` naming both and the fixes; an unknown one (older identities) is
    logged as a warning and scored.
    """
    if not identity.face_models:
        logger.warning("HyperLoRA: %s.", UNKNOWN_FACE_MODELS[0].upper() + UNKNOWN_FACE_MODELS[1:])
        return
    if identity.face_models != analyzer.fingerprint:
        raise IdentityFileError(
            f"This identity's face embedding was made with other face models (AntelopeV2 files with fingerprint "
            f"{identity.face_models}) than the Loader's ({analyzer.fingerprint}, in {analyzer.model_dir}); "
            "embeddings of different face models cannot be compared, so every score would be meaningless. "
            "Pick the insightface folder the identity was made with in the Loader, connect reference photos "
            "(reference_images) instead of the identity, or make the identity again with this Loader.")


def reference_from_identity(identity: Identity, *, analyzer: FaceAnalyzer) -> Tensor:
    """The identity's face embedding ``[512]``, to be scored with ``analyzer``'s face models.

    :class:`IdentityFileError` for identities without one and for identities made with other face
    models (:func:`check_face_models`)."""
    if identity.face_embedding is None:
        raise IdentityFileError(OLD_IDENTITY[0].upper() + OLD_IDENTITY[1:] + ".")
    check_face_models(identity, analyzer)
    return identity.face_embedding.detach().to(device="cpu", dtype=torch.float32)


def reference_from_photos(photos: Sequence[np.ndarray], *, analyzer: FaceAnalyzer,
                          options: FaceOptions = DEFAULTS) -> tuple[Tensor, list[str]]:
    """Reference photos (uint8 RGB ``[H, W, 3]``) -> ``([512] embedding, notes per used photo)``.

    Exactly the identity's recipe (:func:`hyperlora.pipeline.extract_conditions` with ArcFace only,
    then :func:`hyperlora.identity.mean_face_embedding`), so a reference made from an identity's
    photos equals that identity's ``face_embedding``.  :class:`FaceNotFoundError` when no photo has
    a face (and, with ``options.no_face='error'``, when any photo lacks one).
    """
    cond = extract_conditions(photos, analyzer=analyzer, clip=None, need_id=True, need_clip=False, need_base=False,
                              options=options)
    if cond.id_embeds is None or not cond.used:   # extract_conditions raises first; kept for type checkers
        raise FaceNotFoundError("No face was found in the reference photos; connect a clear photo of the person.")
    return mean_face_embedding(cond.id_embeds), list(cond.notes)


def image_faces(image: np.ndarray, *, analyzer: FaceAnalyzer,
                det_size: int = DEFAULTS.det_size) -> list[tuple[DetectedFace, np.ndarray | None]]:
    """Every face of ``image``, largest first, with its ArcFace embedding ``[512]`` (the identity's
    recipe: 4l crop, detection again at 640) or None where ArcFace does not find it in its crop."""
    faces = order_faces(find_faces_scaled(analyzer, image, det_size=det_size), FACE_ORDER)
    out: list[tuple[DetectedFace, np.ndarray | None]] = []
    for face in faces:
        crop = pp.arcface_crop(image, np.asarray(face.landmarks_106, dtype=np.float64))
        emb = analyzer.embedding(crop)
        out.append((face, None if emb is None else np.asarray(emb, dtype=np.float32).reshape(-1)))
    return out


def score_image(image: np.ndarray, reference: Tensor | np.ndarray, *, analyzer: FaceAnalyzer,
                det_size: int = DEFAULTS.det_size) -> ImageScore:
    """Cosine similarity of the best-matching face of ``image`` to ``reference`` ``[512]``.

    Ties go to the larger face.  No face (or none that ArcFace reads): ``score=None`` and the reason.
    """
    ref = _unit(reference, "The reference")
    found = image_faces(image, analyzer=analyzer, det_size=det_size)
    if not found:
        return ImageScore(None, None, 0, None, "the detector found no face")
    best: tuple[float, int] | None = None
    for i, (_face, emb) in enumerate(found):
        if emb is None:
            continue
        cos = float(np.dot(_unit(emb, "A face embedding"), ref))
        if best is None or cos > best[0]:
            best = (cos, i)
    if best is None:
        return ImageScore(None, None, len(found), None,
                          f"ArcFace did not find the face again in its crop ({len(found)} face(s) detected)")
    cos, i = best
    face = found[i][0]
    box = tuple(float(v) for v in np.asarray(face.bbox, dtype=np.float64)[:4])
    return ImageScore(max(-1.0, min(1.0, cos)), i, len(found), box,  # type: ignore[arg-type]
                      landmarks=np.asarray(face.landmarks_106, dtype=np.float32))


def score_images(images: Sequence[np.ndarray], reference: Tensor | np.ndarray, *, analyzer: FaceAnalyzer,
                 det_size: int = DEFAULTS.det_size, check_interrupt: Callable[[], None] | None = None,
                 on_image: Callable[[int], None] | None = None) -> list[ImageScore]:
    """:func:`score_image` for every image (uint8 RGB ``[H, W, 3]``); ``check_interrupt`` runs before
    each image, ``on_image(i)`` after it (progress)."""
    _unit(reference, "The reference")
    scores = []
    for i, image in enumerate(images):
        if check_interrupt is not None:
            check_interrupt()
        scores.append(score_image(image, reference, analyzer=analyzer, det_size=det_size))
        if on_image is not None:
            on_image(i)
    return scores


def rank(scores: Sequence[ImageScore], k: int | None = None) -> list[int]:
    """Indices of the ``k`` best images (all with None), highest score first.

    Equal scores keep their input order; images without a score come last, in input order.
    """
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise SettingError(f"keep is {k!r}; keep at least 1 image.")
    order = sorted(range(len(scores)), key=lambda i: (scores[i].score is None,
                                                      -(scores[i].score or 0.0), i))
    return order if k is None else order[:k]


def describe(scores: Sequence[ImageScore], indices: Sequence[int] | None = None) -> str:
    """One line per image: ``image 3: 0.731 (face 0 of 2, largest first)`` (``indices``: which, in that order)."""
    chosen = range(len(scores)) if indices is None else indices
    return "\n".join(f"image {i + 1}: {scores[i].label()}" for i in chosen)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:       # Pillow < 10.1 has one bitmap size only
        return ImageFont.load_default()


def annotate(image: np.ndarray, score: ImageScore) -> np.ndarray:
    """A copy of ``image`` (uint8 RGB ``[H, W, 3]``) with the scored face's box and the score written
    at the top left (green box; ``no face`` in red when there is no score)."""
    pil = Image.fromarray(np.ascontiguousarray(image), mode="RGB")
    draw = ImageDraw.Draw(pil)
    h, w = image.shape[:2]
    size = max(10, min(h, w) // 16)
    font = _font(size)
    if score.box is not None:
        x1, y1, x2, y2 = score.box
        draw.rectangle([x1, y1, x2, y2], outline=(40, 220, 40), width=max(1, size // 6))
    text = NO_FACE if score.score is None else f"{score.score:.3f}"
    colour = (230, 40, 40) if score.score is None else (40, 220, 40)
    left, top, right, bottom = draw.textbbox((2, 2), text, font=font)
    draw.rectangle([0, 0, right + 2, bottom + 2], fill=(0, 0, 0))
    draw.text((2, 2), text, fill=colour, font=font)
    return np.asarray(pil, dtype=np.uint8).copy()


__all__ = ["FACE_ORDER", "ImageScore", "NO_FACE", "OLD_IDENTITY", "UNKNOWN_FACE_MODELS", "annotate", "check_face_models",
           "describe", "image_faces", "rank",
           "reference_from_identity", "reference_from_photos", "score_image", "score_images"]
