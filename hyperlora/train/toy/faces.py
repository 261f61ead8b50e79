"""Synthetic identities drawn by code, written in the kohya folder layout.

An identity (:class:`ToyIdentity`) is a fixed set of facial traits; every image of it varies what a
photo varies: position, size, pose (a yaw turn shifts the features sideways and narrows the face,
a small tilt moves them up or down), hair, clothing, background (colour, gradient, shapes) and caption.
The traits: skin tone, eye and mouth colours and shapes, a face paint (colour and place) and face
stripes (direction and period, fixed to the face and scaled with it, in a skin-rule colour): the
stripes are the finest trait, gone from the blurred-face crop the Base branch sees, like the fine
facial detail that tells real people apart.

Photos are close-up portraits: the face is :data:`FACE_HEIGHT` (70-100 px of a 128 px image, about a
third of the image area), so that who the person is decides a good part of what a denoiser must
predict (latents of the same photo with another identity's traits differ by about a third of the
latents' variance).

The stand-in face analysis of :mod:`.encoders` sees these faces:

* the detector finds the skin-coloured ellipse (every identity's skin colour, and the stripe colour,
  are inside its skin rule with margin; hair, clothes and backgrounds never are), so every image has
  exactly one face (found at a smaller detector size than 640 when it is large: the pack's retry),
  and its box area is far above 3 % of the image;
* the fake ArcFace projects the 8x8-pooled aligned face crop: skin tone, eye and mouth colours and
  shapes, the paint and the stripes change it; pose and background change it too, less;
* the fake CLIP sees the gray-background face crop: the same traits inside the face outline.

So identities are told apart by features the stand-in encoders see, as real ones are by real encoders.

:func:`make_toy_dataset` writes ``train/<identity>/<n>.png`` (+ ``.txt``) for the training
identities, and ``heldout/reference/<identity>/<n>.png`` and ``heldout/evaluate/<identity>/<n>.png``
for every identity (training and unseen): held-out images never enter training; the reference
images make an identity's LoRA (as a user's photos do) and the evaluation images are denoised.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from .sdxl import TOY_SIZE

logger = logging.getLogger(__name__)

FACE_HEIGHT = (70.0, 100.0)
"""Range of the face height in px of a :data:`TOY_SIZE` image (scaled with the image size): close-ups."""
DATASET_FILE = "toy_dataset.json"
"""Written at the dataset root: identities, splits and folders (see :class:`ToyDataset`)."""

# Skin colours: R in 205..245, R-G in 30..60, G-B in 14..34 (the fake detector's rule is R > 185,
# 15 < R-G < 75, 6 < G-B < 45 with soft edges).
_SKIN = ((235, 195, 170), (225, 180, 150), (214, 170, 140), (245, 200, 172), (220, 170, 150), (232, 176, 148),
         (210, 175, 150), (240, 188, 160))
_EYES = ((30, 40, 140), (20, 110, 40), (90, 50, 20), (10, 10, 10), (120, 40, 150), (0, 120, 140), (140, 20, 20),
         (60, 60, 60))
_MOUTHS = ((170, 40, 50), (200, 90, 120), (110, 20, 40), (150, 70, 160), (190, 60, 30), (90, 40, 30))
_HAIR = ((20, 15, 10), (240, 220, 110), (170, 60, 20), (200, 200, 205), (40, 60, 170), (30, 130, 60),
         (110, 70, 40), (140, 30, 110))
_HAIR_NAMES = ("black", "blond", "red", "white", "blue", "green", "brown", "purple")
HAIR_STYLES = ("short", "long", "bald", "bun", "spiky")
MARKINGS = ("band", "chin", "cheeks", "forehead", "vertical", "freckles")
_PAINT = ((40, 90, 220), (30, 170, 60), (150, 40, 190), (20, 20, 20), (250, 250, 250), (0, 160, 170), (230, 200, 20),
          (190, 20, 30))
"""Face-paint colours: saturated, none of them inside the stand-in detector's skin rule."""
STRIPE_ANGLES = (0.0, 30.0, 60.0, 90.0, 120.0, 150.0)
STRIPE_PERIODS = (0.2, 0.32)
STRIPE_COLOR = (198, 140, 104)
"""Stripes: the identity's finest trait (direction x period, fixed to the face), a colour outside the skin rule."""
STRIPE_DUTY = 0.4
"""Fraction of each stripe period that is painted."""
_BACKGROUNDS = (((70, 90, 120), "blue"), ((60, 120, 70), "green"), ((130, 130, 130), "gray"),
                ((40, 40, 50), "dark"), ((150, 110, 60), "brown"), ((100, 60, 120), "purple"),
                ((30, 100, 110), "teal"), ((170, 170, 120), "beige"))
_CLOTHES = ((40, 40, 160), (160, 30, 30), (30, 120, 30), (20, 20, 20), (200, 200, 200), (120, 80, 20))
_PEOPLE = ("man", "woman", "person")
_TEMPLATES = (
    "a photo of a {who} in front of a {bg} wall",
    "a close-up portrait of a {who} with {hair} hair, {bg} background",
    "a {who} looking at the camera, studio photo, {bg} backdrop",
    "a snapshot of a {who} indoors, {bg} room",
    "a {who} with {hair} hair, plain {bg} background",
    "portrait of a {who}, soft light, {bg} tones",
)


@dataclass(frozen=True)
class ToyIdentity:
    """The traits of one synthetic person (all colours RGB 0..255)."""

    name: str
    who: str                              # caption word: man / woman / person
    skin: tuple[int, int, int]
    eyes: tuple[int, int, int]
    eye_shape: tuple[float, float]        # eye half-axes as fractions of the face half-axes (x, y)
    mouth: tuple[int, int, int]
    mouth_width: float                    # fraction of the face half-width
    hair: tuple[int, int, int]
    hair_name: str
    hair_style: str
    marking: str
    marking_color: tuple[int, int, int]
    seed: int                             # places the markings
    stripe_angle: float = 0.0             # face stripes: direction in degrees (0 = horizontal bands)
    stripe_period: float = 0.0            # stripe period as a fraction of the face height; 0 = no stripes


def make_identities(count: int, *, seed: int = 0, prefix: str = "person") -> list[ToyIdentity]:
    """``count`` identities with distinct trait combinations (names ``{prefix}{i:02d}``).

    Neighbouring identities differ in several traits at once: skin, eyes, mouth and hair colours
    are taken from shuffled palettes at different strides, style, marking and stripes likewise (12
    stripe patterns: 6 directions x 2 periods).
    """
    rng = np.random.default_rng(seed)
    perm = {k: rng.permutation(n) for k, n in (("skin", len(_SKIN)), ("eyes", len(_EYES)), ("mouth", len(_MOUTHS)),
                                                  ("hair", len(_HAIR)), ("style", len(HAIR_STYLES)),
                                                  ("mark", len(MARKINGS)), ("who", len(_PEOPLE)),
                                                  ("paint", len(_PAINT)),
                                                  ("stripes", len(STRIPE_ANGLES) * len(STRIPE_PERIODS)))}
    out = []
    for i in range(count):
        def pick(key: str, stride: int) -> int:
            p = perm[key]
            return int(p[(i * stride + i // len(p)) % len(p)])

        hair = pick("hair", 1)
        stripes = pick("stripes", 1)
        out.append(ToyIdentity(
            name=f"{prefix}{i:02d}", who=_PEOPLE[pick("who", 1)], skin=_SKIN[pick("skin", 3)],
            eyes=_EYES[pick("eyes", 5)],
            eye_shape=(float(rng.uniform(0.09, 0.2)), float(rng.uniform(0.05, 0.12))),
            mouth=_MOUTHS[pick("mouth", 1)], mouth_width=float(rng.uniform(0.2, 0.45)),
            hair=_HAIR[hair], hair_name=_HAIR_NAMES[hair], hair_style=HAIR_STYLES[pick("style", 2)],
            marking=MARKINGS[pick("mark", 1)],
            marking_color=_PAINT[pick("paint", 3)],
            seed=int(rng.integers(0, 2 ** 31 - 1)),
            stripe_angle=STRIPE_ANGLES[stripes % len(STRIPE_ANGLES)],
            stripe_period=STRIPE_PERIODS[stripes // len(STRIPE_ANGLES)],
        ))
    return out


def _ellipse(xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, rx: float, ry: float,
             angle: float = 0.0) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    dx, dy = xx - cx, yy - cy
    u, v = c * dx + s * dy, -s * dx + c * dy
    return (u / max(rx, 0.5)) ** 2 + (v / max(ry, 0.5)) ** 2 <= 1.0


def draw_image(identity: ToyIdentity, rng: np.random.Generator, *, size: int = TOY_SIZE,
               face_height: tuple[float, float] = FACE_HEIGHT) -> tuple[np.ndarray, str]:
    """One photo of ``identity``: uint8 RGB ``[size, size, 3]`` and its caption.

    Face height drawn from ``face_height`` (px of a 128 px image, scaled with ``size`` / 128), centre kept
    so the face and its hair stay inside the frame; yaw in [-0.35, 0.35] (features shift by ``yaw`` face half-widths), tilt in [-0.1, 0.1].
    """
    k = size / TOY_SIZE
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    bg, bg_name = _BACKGROUNDS[int(rng.integers(len(_BACKGROUNDS)))]
    # background: colour with a gradient and two random shapes
    gx, gy = rng.uniform(-0.25, 0.25, size=2)
    shade = 1.0 + gx * (xx / size - 0.5) * 2 + gy * (yy / size - 0.5) * 2
    img = np.clip(np.asarray(bg, np.float32)[None, None, :] * shade[..., None], 0, 255)
    for _ in range(2):
        col = np.asarray(_BACKGROUNDS[int(rng.integers(len(_BACKGROUNDS)))][0], np.float32) * rng.uniform(0.7, 1.1)
        x0, y0 = rng.uniform(0, size, size=2)
        w, h = rng.uniform(0.1, 0.35, size=2) * size
        if rng.random() < 0.5:
            m = (np.abs(xx - x0) < w / 2) & (np.abs(yy - y0) < h / 2)
        else:
            m = _ellipse(xx, yy, x0, y0, w / 2, h / 2)
        img[m] = np.clip(col, 0, 255)
    img = img.astype(np.uint8)

    height = rng.uniform(*face_height) * k
    a, b = 0.4 * height, 0.5 * height
    yaw = float(rng.uniform(-0.35, 0.35))
    tilt = float(rng.uniform(-0.1, 0.1))
    a_face = a * (1.0 - 0.25 * abs(yaw))
    margin_x, margin_top, margin_bottom = a + 10 * k, b + 14 * k, b + 6 * k
    cx = float(rng.uniform(margin_x, size - margin_x))
    cy = float(rng.uniform(margin_top, size - margin_bottom))

    # clothes (shoulders) below the face, not touching it
    clothes = np.asarray(_CLOTHES[int(rng.integers(len(_CLOTHES)))], np.uint8)
    img[_ellipse(xx, yy, cx, cy + b + 1.25 * b, 2.0 * a, 1.1 * b) & (yy > cy + b + 3 * k)] = clothes

    # hair behind and around the face (drawn first; the face ellipse covers its middle)
    # hair varies per photo, not per identity: what tells identities apart lives inside the face (skin,
    # eyes, mouth, face paint), where the ID branch looks (the Base branch's blurred crop sees the hair)
    hair_i = int(rng.integers(len(_HAIR)))
    hair = np.asarray(_HAIR[hair_i], np.uint8)
    style = HAIR_STYLES[int(rng.integers(len(HAIR_STYLES)))]
    if style == "short":
        img[_ellipse(xx, yy, cx, cy - 0.25 * b, a_face * 1.25, b * 0.95) & (yy < cy - 0.1 * b)] = hair
    elif style == "long":
        img[_ellipse(xx, yy, cx, cy + 0.1 * b, a_face * 1.45, b * 1.25) & (yy < cy + 1.0 * b)] = hair
    elif style == "bun":
        img[_ellipse(xx, yy, cx, cy - 0.2 * b, a_face * 1.2, b * 0.95) & (yy < cy - 0.3 * b)] = hair
        img[_ellipse(xx, yy, cx, cy - 1.2 * b, 0.45 * a, 0.3 * b)] = hair
    elif style == "spiky":
        for j in range(5):
            px = cx + (j - 2) * 0.45 * a_face
            img[_ellipse(xx, yy, px, cy - 0.95 * b, 0.2 * a, 0.35 * b)] = hair
        img[_ellipse(xx, yy, cx, cy - 0.3 * b, a_face * 1.15, b * 0.9) & (yy < cy - 0.2 * b)] = hair

    face = _ellipse(xx, yy, cx, cy, a_face, b)
    img[face] = np.asarray(identity.skin, np.uint8)
    shift = yaw * a
    fy = cy + tilt * b

    def spot(px: float, py: float, rx: float, ry: float, col: Sequence[int]) -> None:
        img[_ellipse(xx, yy, px, py, rx, ry) & face] = np.asarray(col, np.uint8)

    if identity.stripe_period > 0:
        th = np.deg2rad(identity.stripe_angle)
        u = ((xx - cx - shift) * np.cos(th) + (yy - fy) * np.sin(th)) / (identity.stripe_period * 2 * b)
        img[face & ((u - np.floor(u)) < STRIPE_DUTY)] = np.asarray(STRIPE_COLOR, np.uint8)
    # face paint: the identity's largest trait (a fifth to a quarter of the face), drawn under the eyes and mouth
    mark = identity.marking_color
    if identity.marking == "band":
        spot(cx + shift, fy - 0.02 * b, 0.95 * a_face, 0.14 * b, mark)
    elif identity.marking == "chin":
        spot(cx + shift, fy + 0.75 * b, 0.6 * a_face, 0.2 * b, mark)
    elif identity.marking == "cheeks":
        for side in (-1, 1):
            spot(cx + shift + side * 0.52 * a_face, fy + 0.15 * b, 0.24 * a, 0.2 * b, mark)
    elif identity.marking == "forehead":
        spot(cx + shift, fy - 0.62 * b, 0.6 * a_face, 0.17 * b, mark)
    elif identity.marking == "vertical":
        spot(cx + shift, fy + 0.05 * b, 0.14 * a_face, 0.75 * b, mark)
    elif identity.marking == "freckles":
        frng = np.random.default_rng(identity.seed)
        for _ in range(9):
            spot(cx + shift + frng.uniform(-0.6, 0.6) * a_face, fy + frng.uniform(-0.05, 0.3) * b,
                 0.09 * a, 0.08 * b, mark)

    ex, ey = identity.eye_shape
    for side in (-1, 1):
        spot(cx + shift + side * 0.36 * a_face, fy - 0.25 * b, ex * a * 1.3, ey * b * 1.3, (250, 250, 250))
        spot(cx + shift + side * 0.36 * a_face, fy - 0.25 * b, ex * a, ey * b, identity.eyes)
    spot(cx + shift, fy + 0.45 * b, identity.mouth_width * a_face, 0.07 * b, identity.mouth)
    template = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
    caption = template.format(who=identity.who, hair="no" if style == "bald" else _HAIR_NAMES[hair_i], bg=bg_name)
    return img, caption


@dataclass
class ToyDataset:
    """Where :func:`make_toy_dataset` put what (also saved as ``root/toy_dataset.json``)."""

    root: Path
    train: Path                     # kohya folder: train/<identity>/<n>.png + .txt (training identities only)
    reference: Path                 # heldout/reference/<identity>/<n>.png: photos a LoRA is made from
    evaluate: Path                  # heldout/evaluate/<identity>/<n>.png: photos whose denoising loss is measured
    train_identities: list[str]
    unseen_identities: list[str]
    identities: list[ToyIdentity] = field(default_factory=list)

    def save(self) -> Path:
        path = self.root / DATASET_FILE
        data = {"train": str(self.train.relative_to(self.root)), "reference": str(self.reference.relative_to(self.root)),
                "evaluate": str(self.evaluate.relative_to(self.root)), "train_identities": self.train_identities,
                "unseen_identities": self.unseen_identities, "identities": [asdict(i) for i in self.identities]}
        path.write_text(json.dumps(data, indent=2), encoding="utf-8")
        return path

    @classmethod
    def load(cls, root: Path) -> ToyDataset:
        data = json.loads((Path(root) / DATASET_FILE).read_text(encoding="utf-8"))
        ids = [ToyIdentity(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}) for d in data["identities"]]
        root = Path(root)
        return cls(root=root, train=root / data["train"], reference=root / data["reference"],
                   evaluate=root / data["evaluate"], train_identities=list(data["train_identities"]),
                   unseen_identities=list(data["unseen_identities"]), identities=ids)


def _write(folder: Path, identity: ToyIdentity, rng: np.random.Generator, count: int, size: int,
           face_height: tuple[float, float]) -> None:
    target = folder / identity.name
    target.mkdir(parents=True, exist_ok=True)
    for n in range(count):
        img, caption = draw_image(identity, rng, size=size, face_height=face_height)
        Image.fromarray(img).save(target / f"{n}.png")
        (target / f"{n}.txt").write_text(caption + "\n", encoding="utf-8")


def make_toy_dataset(root: Path, *, identities: int = 8, unseen: int = 3, train_per_identity: int = 12,
                     reference_per_identity: int = 2, evaluate_per_identity: int = 3, size: int = TOY_SIZE,
                     face_height: tuple[float, float] = FACE_HEIGHT, seed: int = 0) -> ToyDataset:
    """Draw ``identities`` training and ``unseen`` held-out identities into ``root`` (see the module docstring).

    Every identity gets ``reference_per_identity`` + ``evaluate_per_identity`` held-out photos; training
    identities also ``train_per_identity`` training photos.  Deterministic in ``seed``.
    """
    root = Path(root)
    people = make_identities(identities + unseen, seed=seed)
    rng = np.random.default_rng(seed + 1000)
    ds = ToyDataset(root=root, train=root / "train", reference=root / "heldout" / "reference",
                    evaluate=root / "heldout" / "evaluate", train_identities=[p.name for p in people[:identities]],
                    unseen_identities=[p.name for p in people[identities:]], identities=people)
    for person in people:
        if person.name in ds.train_identities:
            _write(ds.train, person, rng, train_per_identity, size, face_height)
        _write(ds.reference, person, rng, reference_per_identity, size, face_height)
        _write(ds.evaluate, person, rng, evaluate_per_identity, size, face_height)
    ds.save()
    logger.info("toy data: %d training identities x %d photos, %d unseen identities, %d + %d held-out photos each, in %s",
                identities, train_per_identity, unseen, reference_per_identity, evaluate_per_identity, root)
    return ds


__all__ = ["DATASET_FILE", "HAIR_STYLES", "MARKINGS", "ToyDataset", "ToyIdentity", "draw_image", "make_identities",
           "make_toy_dataset"]
