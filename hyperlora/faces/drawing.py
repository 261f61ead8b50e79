"""Pictures of what face analysis found: InstantID keypoint images and the analysis preview.

**Keypoint image** (what InstantID's ControlNet was trained to see, as its authors describe and
draw it): the five AntelopeV2 keypoints in insightface's order (right eye, left eye, nose, right
mouth corner, left mouth corner, as seen in the image: the first eye is the one on the left of
the picture) on a black image of the photo's size.  Four limbs join the eyes and mouth corners to
the nose, each a filled ellipse (half-length = half the distance, half-width 4 px, rotated along
the limb, centre and axes truncated to whole pixels, polygon of 1-degree steps) in the colour of
its outer point; the limbs are then dimmed to 60 % (truncated to uint8).  Over them each
keypoint is a filled disc of radius 10 px in full colour.  Colours by point: red, green, blue,
yellow, magenta.

**Analysis preview**: the photo with every detected face's box, number (in the face-choice
order) and detector score, the chosen face highlighted with its 106 landmarks, and a panel with
the crops the model saw.  Drawn with PIL; text with PIL's built-in font.

Images are uint8 RGB ``[H, W, 3]``; keypoints ``[5, 2]`` in pixels (x, y).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..errors import ImageInputError, SettingError
from .analysis import DetectedFace

logger = logging.getLogger(__name__)

KPS_COLORS: tuple[tuple[int, int, int], ...] = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255))
"""RGB colour of keypoint i (right eye, left eye, nose, right mouth corner, left mouth corner)."""
KPS_LIMBS: tuple[tuple[int, int], ...] = ((0, 2), (1, 2), (3, 2), (4, 2))
"""(outer point, nose): each limb takes its outer point's colour."""
LIMB_HALF_WIDTH = 4
LIMB_DIM = 0.6
POINT_RADIUS = 10
MAX_CANVAS_SIDE = 8192

CHOSEN_RGB = (40, 230, 90)
OTHER_RGB = (255, 190, 40)
LANDMARK_RGB = (255, 60, 60)
NO_FACE_RGB = (230, 40, 40)
PANEL_RGB = (24, 24, 24)
TEXT_RGB = (255, 255, 255)


def _as_kps(kps: np.ndarray) -> np.ndarray:
    pts = np.asarray(kps, dtype=np.float64)
    if pts.shape != (5, 2) or not np.isfinite(pts).all():
        raise ValueError(f"expected 5 finite face keypoints [5, 2], got {pts.shape}")
    return pts


def _check_canvas(width: int, height: int) -> tuple[int, int]:
    w, h = int(width), int(height)
    if not (1 <= w <= MAX_CANVAS_SIDE and 1 <= h <= MAX_CANVAS_SIDE):
        raise SettingError(f"The keypoint canvas is {width}x{height} px; use 1 to {MAX_CANVAS_SIDE} px per side.")
    return w, h


def draw_keypoints(kps: np.ndarray, width: int, height: int) -> np.ndarray:
    """InstantID keypoint image ``[height, width, 3]`` uint8 of five keypoints ``[5, 2]`` (module docstring)."""
    import cv2

    pts = _as_kps(kps)
    w, h = _check_canvas(width, height)
    limbs = np.zeros((h, w, 3), dtype=np.uint8)
    for outer, nose in KPS_LIMBS:
        (xa, ya), (xb, yb) = pts[outer], pts[nose]
        centre = (int((xa + xb) / 2), int((ya + yb) / 2))
        half_length = int(math.hypot(xa - xb, ya - yb) / 2)
        angle = int(math.degrees(math.atan2(ya - yb, xa - xb)))
        outline = cv2.ellipse2Poly(centre, (half_length, LIMB_HALF_WIDTH), angle, 0, 360, 1)
        dimmed = tuple(int(c * LIMB_DIM) for c in KPS_COLORS[outer])
        cv2.fillConvexPoly(limbs, outline, dimmed)
    for (x, y), colour in zip(pts, KPS_COLORS):
        cv2.circle(limbs, (int(x), int(y)), POINT_RADIUS, colour, -1)
    return limbs


def place_keypoints(kps: np.ndarray, bbox: np.ndarray, *, center: tuple[float, float], face_width: float) -> np.ndarray:
    """Keypoints ``[5, 2]`` moved and scaled so that the face box ``bbox`` (x1 y1 x2 y2) of the
    same face gets its centre at ``center`` and its width ``face_width`` (pixels); the shape of
    the face (pose, proportions) is kept."""
    pts = _as_kps(kps)
    box = np.asarray(bbox, dtype=np.float64).reshape(4)
    box_width = float(box[2] - box[0])
    if not (np.isfinite(box).all() and box_width > 0):
        raise ImageInputError(f"The face box {box.tolist()} has no width; the face cannot be placed.")
    if not (math.isfinite(face_width) and face_width > 0):
        raise SettingError(f"face_width is {face_width!r}; use a size above 0.")
    middle = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])
    return (pts - middle) * (float(face_width) / box_width) + np.asarray(center, dtype=np.float64)


# ----------------------------------------------------------------------------- analysis preview


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size only
        return ImageFont.load_default()


MIN_FONT_SIZE = 8
"""Smallest font a label is shrunk to before its text is shortened (``...``) to fit its region."""


def fit_label(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, font: object,
              bounds: tuple[float, float, float, float]) -> tuple[tuple[float, float], str, object,
                                                                   tuple[float, float, float, float]]:
    """Where and how a label goes so that its dark box lies inside ``bounds`` ``(x0, y0, x1, y1)`` (the image,
    or its panel): moved left / up as far as needed, then drawn with a smaller font, then shortened.

    Returns ``((x, y) to draw at, text, font, box)``; ``box`` ``(left, top, right, bottom)`` is the dark box,
    inside ``bounds`` whenever the region can hold a label at all."""
    x0, y0, x1, y1 = bounds

    def measure(t: str, f: object) -> tuple[float, float, float, float, int]:
        left, top, right, bottom = draw.textbbox((0, 0), t, font=f)
        return left, top, right, bottom, max(2, (bottom - top) // 5)

    room = x1 - x0
    left, top, right, bottom, pad = measure(text, font)
    size = getattr(font, "size", None)
    while right - left + 2 * pad > room and isinstance(size, (int, float)) and size > MIN_FONT_SIZE \
            and hasattr(font, "font_variant"):
        size = max(MIN_FONT_SIZE, int(size * 0.85))
        font = font.font_variant(size=size)                  # type: ignore[attr-defined]
        left, top, right, bottom, pad = measure(text, font)
    while right - left + 2 * pad > room and len(text) > 1:
        text = text[:-4].rstrip() + "..." if len(text) > 4 else text[:-1]
        left, top, right, bottom, pad = measure(text, font)
    x, y = xy
    x = max(x0 + pad - left, min(x, x1 - pad - right))       # the box's right edge inside, then its left edge
    y = max(y0 + pad - top, min(y, y1 - pad - bottom))
    return (x, y), text, font, (x + left - pad, y + top - pad, x + right + pad, y + bottom + pad)


def _label(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, font: object, fill: tuple[int, int, int],
           bounds: tuple[float, float, float, float]) -> None:
    """Text on a dark box so it reads on any photo, kept inside ``bounds`` (see :func:`fit_label`)."""
    (x, y), text, font, box = fit_label(draw, xy, text, font, bounds)
    draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=(0, 0, 0))
    draw.text((x, y), text, fill=fill, font=font)


def face_label(number: int, face: DetectedFace, chosen: bool) -> str:
    """``#1  0.97  (chosen)``: the face's number in the face-choice order and its detector score."""
    return f"#{number}  {face.score:.2f}" + ("  (chosen)" if chosen else "")


def draw_analysis(image_rgb: np.ndarray, faces: Sequence[DetectedFace], chosen: int | None, *,
                  crops: Sequence[tuple[str, np.ndarray]] = (), title: str = "") -> np.ndarray:
    """Analysis preview ``[H, W + panel, 3]`` uint8.

    ``faces`` in the face-choice order (labelled #0, #1, ... = the face_index that takes them),
    ``chosen`` the index in ``faces`` of the face used (None: none).  Every box is drawn (the
    chosen one green and thicker, with its 106 landmarks and five keypoints), ``title`` goes
    top-left, ``crops`` (label, image) are stacked in a panel on the right (none: no panel).
    """
    image = np.asarray(image_rgb)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ImageInputError(f"The preview needs a uint8 RGB image [H, W, 3], got {image.dtype} {image.shape}.")
    h, w = image.shape[:2]
    unit = max(1, round(max(h, w) / 400))
    font = _font(max(10, 7 * unit + 5))
    photo = Image.fromarray(np.ascontiguousarray(image), mode="RGB")
    draw = ImageDraw.Draw(photo)
    for i, face in enumerate(faces):
        is_chosen = i == chosen
        colour = CHOSEN_RGB if is_chosen else OTHER_RGB
        x1, y1, x2, y2 = (float(v) for v in face.bbox)
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=(2 if is_chosen else 1) * unit)
        _label(draw, (x1 + 2 * unit, max(0.0, y1) + 2 * unit), face_label(i, face, is_chosen), font, colour,
               (0, 0, w, h))
    if chosen is not None:
        face = faces[chosen]
        r = max(1, unit)
        for x, y in np.asarray(face.landmarks_106, dtype=np.float64):
            draw.ellipse((x - r, y - r, x + r, y + r), fill=LANDMARK_RGB)
        for (x, y), colour in zip(np.asarray(face.kps, dtype=np.float64), KPS_COLORS):
            draw.ellipse((x - 2 * r, y - 2 * r, x + 2 * r, y + 2 * r), outline=colour, width=r)
    if title:
        _label(draw, (3 * unit, 3 * unit), title, font, TEXT_RGB if faces else NO_FACE_RGB, (0, 0, w, h))
    if not crops:
        return np.asarray(photo)
    panel_w = max(64, min(h // max(1, len(crops)), w // 2, 512))
    canvas = Image.new("RGB", (w + panel_w, h), PANEL_RGB)
    canvas.paste(photo, (0, 0))
    cdraw = ImageDraw.Draw(canvas)
    y = 0
    for label, crop in crops:
        arr = np.asarray(crop)
        side = min(panel_w, h - y)
        if side < 16:
            logger.debug("analysis preview: no room for the crop %r", label)
            break
        tile = Image.fromarray(np.ascontiguousarray(arr), mode="RGB").resize((side, side))
        canvas.paste(tile, (w, y))
        _label(cdraw, (w + 2 * unit, y + 2 * unit), label, font, TEXT_RGB, (w, y, w + panel_w, y + side))
        y += side
    return np.asarray(canvas)


def describe_faces(faces: Sequence[DetectedFace], chosen: int | None, *, order: str, image_size: tuple[int, int],
                   heading: str = "") -> str:
    """Text of the detections: count, how they were found, and per face its number, box, size and score.

    ``image_size`` is ``(W, H)``."""
    lines = [heading] if heading else []
    w, h = image_size
    if not faces:
        lines.append(f"no face found in the {w}x{h} image")
        return "\n".join(lines)
    found = faces[0]
    how = f"detector size {found.det_size}" + (", after padding" if found.padded else "")
    lines.append(f"{len(faces)} face(s) in the {w}x{h} image ({how}), numbered {order.replace('_', ' ')}; "
                 f"chosen: {'none' if chosen is None else f'#{chosen}'}")
    for i, face in enumerate(faces):
        x1, y1, x2, y2 = (int(round(float(v))) for v in face.bbox)
        mark = "  <- chosen" if i == chosen else ""
        lines.append(f"  #{i}: box ({x1}, {y1})-({x2}, {y2}), {x2 - x1}x{y2 - y1} px, score {face.score:.3f}{mark}")
    return "\n".join(lines)


__all__ = ["KPS_COLORS", "KPS_LIMBS", "LIMB_DIM", "LIMB_HALF_WIDTH", "POINT_RADIUS", "describe_faces",
           "draw_analysis", "draw_keypoints", "face_label", "fit_label", "place_keypoints"]
