"""Face controls the nodes call: InstantID keypoint images, the analysis preview, one mask per face.

Faces are found exactly as for identities (:func:`hyperlora.pipeline.find_faces_scaled`: the
user's detector size, the released smaller sizes, padding) and numbered and chosen by the one
rule of :func:`hyperlora.faces.analysis.order_faces` / :func:`~hyperlora.faces.analysis.choose_face`.
Images are uint8 RGB ``[H, W, 3]``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from .errors import SettingError, check_choice
from .faces import preprocess as pp
from .faces.analysis import DetectedFace, FaceAnalyzer, choose_face, order_faces
from .faces.drawing import describe_faces, draw_analysis, draw_keypoints, place_keypoints
from .faces.options import DEFAULTS, FACE_ORDERS, NO_FACE_POLICIES, FaceOptions, retry_sizes
from .pipeline import find_faces_scaled, no_face_error

logger = logging.getLogger(__name__)

KEYPOINT_MODES = ("image", "canvas")
"""image: keypoints where the face is, at the photo's size; canvas: placed into a new canvas."""


@dataclass(frozen=True)
class Placement:
    """Where the reference face goes on a new canvas: centre (fractions of the canvas width and
    height, 0..1) and face box width (fraction of the canvas width)."""

    width: int = 1024
    height: int = 1024
    center_x: float = 0.5
    center_y: float = 0.4
    face_width: float = 0.3

    def __post_init__(self) -> None:
        for name in ("center_x", "center_y"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and -1.0 <= value <= 2.0):
                raise SettingError(f"{name} is {value!r}; use a fraction of the canvas (0 = left/top edge, 1 = right/"
                                   "bottom edge).")
        if not (isinstance(self.face_width, (int, float)) and 0.0 < self.face_width <= 4.0):
            raise SettingError(f"face_width is {self.face_width!r}; use a fraction of the canvas width above 0 "
                               "(0.3 = the face box is 30 % as wide as the canvas).")


def keypoint_image(
    image: np.ndarray,
    *,
    analyzer: FaceAnalyzer,
    face_choice: str = DEFAULTS.face_choice,
    face_index: int = DEFAULTS.face_index,
    det_size: int = DEFAULTS.det_size,
    no_face: str = DEFAULTS.no_face,
    placement: Placement | None = None,
    label: str = "the image",
) -> tuple[np.ndarray, DetectedFace | None]:
    """The InstantID keypoint image of ``image``'s chosen face and that face (None: no face, black image).

    ``placement`` None: at the photo's size where the face is; else on a ``placement.width`` x
    ``height`` canvas with the face moved and scaled as :class:`Placement` says.  ``no_face``
    'error' raises FaceNotFoundError naming ``label`` (e.g. "image 2 of 3") when nothing is found.
    """
    check_choice(no_face, NO_FACE_POLICIES, "no_face")
    h, w = image.shape[:2]
    size = (w, h) if placement is None else (placement.width, placement.height)
    faces = find_faces_scaled(analyzer, image, det_size=det_size)
    if not faces:
        if no_face == "error":
            raise no_face_error(label, det_size, "there are no keypoints to draw", "get a black image instead",
                                shape=image.shape)
        logger.warning("HyperLoRA: no face in %s; its keypoint image is black.", label)
        return np.zeros((size[1], size[0], 3), dtype=np.uint8), None
    face = choose_face(faces, face_choice, face_index)
    kps = np.asarray(face.kps, dtype=np.float64)
    if placement is not None:
        kps = place_keypoints(kps, face.bbox, center=(placement.center_x * size[0], placement.center_y * size[1]),
                              face_width=placement.face_width * size[0])
    return draw_keypoints(kps, *size), face


@dataclass
class FaceReport:
    """What analysis found in one photo, as the identity nodes would use it."""

    faces: list[DetectedFace]                     # in the face-choice order (face_index counts these)
    chosen: int | None                            # index in ``faces`` of the face taken, None: none
    reason: str = ""                              # why none was taken
    crops: list[tuple[str, np.ndarray]] = field(default_factory=list)   # (label, crop) the model saw
    text: str = ""


def face_report(image: np.ndarray, *, analyzer: FaceAnalyzer, options: FaceOptions = DEFAULTS,
                heading: str = "") -> FaceReport:
    """Faces of ``image`` in ``options.face_choice`` order, the one the identity nodes take
    (``choose_face``), the crops made from it (CLIP ID condition with the options' background
    and grayscale settings, ArcFace input) and a text summary."""
    faces = find_faces_scaled(analyzer, image, det_size=options.det_size)
    ordered = order_faces(faces, options.face_choice)
    chosen: int | None = None
    reason = ""
    crops: list[tuple[str, np.ndarray]] = []
    if not ordered:
        reason = f"no face found at detector sizes {', '.join(map(str, retry_sizes(options.det_size)))} (with padding)"
    else:
        try:
            face = choose_face(faces, options.face_choice, options.face_index)
        except SettingError as exc:          # face_index beyond the faces found
            reason = str(exc)
        else:
            chosen = next(i for i, f in enumerate(ordered) if f is face)
            lm = np.asarray(face.landmarks_106, dtype=np.float64)
            clip = pp.clip_crop(image, lm, remove_bg=options.remove_background, grayscale=options.grayscale)
            crops = [("CLIP input (ID condition)", pp.preview(clip)),
                     ("ArcFace input (4x face box)", pp.preview(pp.arcface_crop(image, lm)))]
    h, w = image.shape[:2]
    text = describe_faces(ordered, chosen, order=options.face_choice, image_size=(w, h), heading=heading)
    if reason:
        text += f"\nnone taken: {reason}"
    return FaceReport(faces=ordered, chosen=chosen, reason=reason, crops=crops, text=text)


def analysis_preview(image: np.ndarray, report: FaceReport) -> np.ndarray:
    """The preview image of :func:`face_report`'s result (boxes, numbers, landmarks, crops)."""
    if report.chosen is not None:
        title = f"{len(report.faces)} face(s); took #{report.chosen}"
    elif report.faces:
        title = f"{len(report.faces)} face(s); none taken"
    else:
        title = "no face found"
    return draw_analysis(image, report.faces, report.chosen, crops=report.crops, title=title)


def per_face_masks(image: np.ndarray, *, analyzer: FaceAnalyzer, order: str = FACE_ORDERS[0],
                   det_size: int = DEFAULTS.det_size, grow: float = 1.3,
                   feather: float = 8.0) -> tuple[np.ndarray, list[DetectedFace]]:
    """One soft mask per detected face of ``image``: float32 ``[N, H, W]`` in ``order`` (left to
    right, largest first or surest first) and the faces; ``[0, H, W]`` when there is none.
    Each mask is :func:`hyperlora.faces.preprocess.face_mask` of its face."""
    check_choice(order, FACE_ORDERS, "order")
    faces = order_faces(find_faces_scaled(analyzer, image, det_size=det_size), order)
    h, w = image.shape[:2]
    masks = np.zeros((len(faces), h, w), dtype=np.float32)
    for k, face in enumerate(faces):
        masks[k] = pp.face_mask((w, h), face.landmarks_106, grow=grow, feather=feather)
    return masks, faces


__all__ = ["FaceReport", "KEYPOINT_MODES", "Placement", "analysis_preview", "face_report", "keypoint_image",
           "per_face_masks"]
