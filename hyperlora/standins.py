"""Stand-in models for tests and the toy training demo: a fake AntelopeV2 pack, a tiny CLIP vision folder
and a tiny CLIP tokenizer.

All are random or hand-weighted, built offline in seconds, and load through the pack's real code
(insightface for the ONNX files, transformers for CLIP), so a toy run or a test exercises the same paths
as a real one.  They live outside ``hyperlora.train`` so the core's tests need no training code:
``tests/fixtures/antelope.py`` and ``tests/fixtures/clip.py`` re-export from here, and the training demo
(:mod:`hyperlora.train.demo`, :mod:`hyperlora.train.toy.sdxl`) imports from here.  Nothing of the node
pack imports this module.

Fake AntelopeV2 (:func:`make_antelopev2`, :func:`cached_antelopev2`)
--------------------------------------------------------------------
The folder holds the five file names of the released pack (format §1)::

    scrfd_10g_bnkps.onnx   detector, SCRFD layout: 9 outputs, strides 8/16/32, 2 anchors, 5 keypoints
    2d106det.onnx          106-point landmarks, input [1, 3, 192, 192] -> [1, 212]
    glintr100.onnx         recognition, input [N, 3, 112, 112] -> [N, 512]
    1k3d68.onnx            3D-68 landmarks, input [1, 3, 192, 192] -> [1, 3309] (present, unused)
    genderage.onnx         attributes, input [1, 3, 96, 96] -> [1, 3] (present, unused)

The real ``insightface`` package (0.7.3 or 2.x) loads and routes them by their input/output
shapes.  Nothing is trained: every weight is set by hand so the outputs are deterministic and
depend on the image in a documented way.

**What the detector finds** ("painted faces"): a compact blob of skin-coloured pixels.  A pixel
is skin when, in RGB 0..255, ``R > 185``, ``15 < R - G < 75`` and ``6 < G - B < 45`` (soft
sigmoid edges).  :data:`SKIN_RGB` is a safe colour; :func:`paint_face` draws an elliptic face
with dark eyes and mouth.  It also finds the face in ``skimage.data.astronaut()`` (det sizes
384-640).

* The skin map is averaged over 8x8 cells, and around every stride-16 anchor a 41x41-cell window
  (328 px) measures the blob's mass, centroid and spread.  A face is reported where the blob is
  centred on the anchor, compact (fills its ellipse), bigger than about 40 px, entirely inside the
  inner 37x37 cells of the window (its outer 2-cell ring must be free of skin) and **not touching
  the frame** of the detector input (no skin in its outermost 8 px; the black letterbox insightface
  adds below/right of a non-square image is not skin, so only the top/left edges and the edges
  along the long side count).
* So, like a real detector, it has a **size range in detector-input pixels**: faces from about
  40 px up to 290 px tall are always found, faces 310 px or taller never (in between it depends on
  the position against the anchor grid).  In a 1024 px image a face 660 px tall is found at det
  size 384 (and 256) but not at 640 or 512; a face 900 px tall only at 256; a face cut by the
  frame (a tight close-up) at no size at all, but after padding the image with a black border.
* Box = blob centroid +- 2 standard deviations (exact for a uniform ellipse); the 5 keypoints sit
  at fixed fractions of the box (eyes, nose, mouth corners).  Only stride 16 produces scores;
  strides 8 and 32 output zeros (below any threshold).  Scores are about 0.9-0.99.

**Landmarks**: a fixed face template (indices 0-32 trace the jaw contour in the 2d106 order, so
the outline indices of format §6 form a simple face polygon) plus a small shift that depends on
the crop's mean colour.

**Recognition**: a fixed random projection (seed 106) of the 8x8 average-pooled 112x112 aligned
crop minus its mean, so different faces give different embeddings; not L2-normalised (like glintr100).

Tiny CLIP vision folder (:func:`make_clip_folder`)
--------------------------------------------------
The released Hugging Face layout ``clip_vit/<name>/{config.json, model.safetensors}`` (keys
``vision_model.*`` as transformers saved them) plus ``clip_processor/<name>_processor/preprocessor_config.json``.
The tiny model keeps ViT-L/14's input geometry (224 px, patch 14, 257 tokens) with hidden size 128,
2 heads and 3 layers; random weights with a fixed seed.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from safetensors.torch import save_file

if TYPE_CHECKING:  # pragma: no cover
    from transformers import CLIPTokenizer

from .spec import (ANTELOPE_DETECTOR_FILE, ANTELOPE_FILES, ANTELOPE_LANDMARK_FILE, ANTELOPE_NAME,
                   ANTELOPE_RECOGNITION_FILE, CLIP_PROCESSOR_SUBDIR, CLIP_VIT_SUBDIR, RELEASED_CLIP_NAME,
                   clip_processor_name)


FIXTURE_VERSION = "antelope-fake-v2"

DETECTOR_FILE = ANTELOPE_DETECTOR_FILE
LANDMARK_FILE = ANTELOPE_LANDMARK_FILE
RECOGNITION_FILE = ANTELOPE_RECOGNITION_FILE
LANDMARK_3D_FILE, GENDERAGE_FILE = ANTELOPE_FILES[3:]
PACK_FILES = ANTELOPE_FILES

SKIN_RGB = (225, 180, 150)
"""A colour the fake detector treats as skin."""
BACKGROUND_RGB = (70, 90, 120)
"""A colour it does not."""

# detector constants (documented in the module docstring)
CELL = 8  # px per skin cell
WINDOW_RADIUS = 20  # cells; window = 41 x 41 cells
BORDER = 2  # outer ring of the window that must be free of skin
DET_STRIDE = 16  # the stride whose anchors carry the detections
MIN_MASS = 12.0  # cells (about a 40 px face)
KPS_TEMPLATE = ((-0.36, -0.25), (0.36, -0.25), (0.0, 0.1), (-0.3, 0.45), (0.3, 0.45))
"""Keypoints as fractions of the box half-size from the box centre (eyes, nose, mouth)."""

OPSET = 17

# Jaw contour order of the 2d106 markup (format §6 outline without the brow part) and brows.
_JAW_ORDER = (1, 9, 10, 11, 12, 13, 14, 15, 16, 2, 3, 4, 5, 6, 7, 8, 0,
              24, 23, 22, 21, 20, 19, 18, 32, 31, 30, 29, 28, 27, 26, 25, 17)
_BROW_ORDER = (101, 105, 104, 103, 102, 50, 51, 49, 48, 43)


def _onnx():
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    return onnx, TensorProto, helper, numpy_helper


class _Graph:
    """Tiny helper to write ONNX graphs node by node."""

    def __init__(self, name: str):
        self.name = name
        self.nodes: list = []
        self.inits: list = []
        self._n = 0

    def const(self, value, name: str | None = None) -> str:
        _, _, _, numpy_helper = _onnx()
        self._n += 1
        name = name or f"c{self._n}"
        arr = np.asarray(value)
        if isinstance(value, (int, float)) or arr.dtype.kind == "f":
            arr = arr.astype(np.float32)
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def op(self, op_type: str, inputs: Sequence[str], out: str | None = None, **attrs) -> str:
        _, _, helper, _ = _onnx()
        self._n += 1
        out = out or f"t{self._n}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=f"n{self._n}_{op_type.lower()}", **attrs))
        return out

    def save(self, path: Path, inputs, outputs) -> None:
        onnx, _, helper, _ = _onnx()
        graph = helper.make_graph(self.nodes, self.name, inputs, outputs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="hyperlora-tests")
        model.ir_version = 8
        onnx.checker.check_model(model)
        onnx.save(model, str(path))


def _value(name: str, shape) -> object:
    _, TensorProto, helper, _ = _onnx()
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


# --------------------------------------------------------------------------- detector


def _window_kernels() -> np.ndarray:
    """[7, 2, 41, 41]: on the skin map: ones, dx, dy, dx^2, dy^2, border ring (dx, dy in cells);
    on the frame-edge skin map: ones."""
    r = WINDOW_RADIUS
    d = np.arange(-r, r + 1, dtype=np.float32)
    dy, dx = np.meshgrid(d, d, indexing="ij")
    ring = ((np.abs(dx) > r - BORDER) | (np.abs(dy) > r - BORDER)).astype(np.float32)
    ring /= ring.sum()
    k = np.zeros((7, 2) + dx.shape, dtype=np.float32)
    for i, kern in enumerate((np.ones_like(dx), dx, dy, dx * dx, dy * dy, ring)):
        k[i, 0] = kern
    k[6, 1] = 1.0
    return k


def _flat(g: _Graph, x: str, width: int) -> str:
    """[1, A*width, h, w] -> [h*w*A, width] in insightface's anchor order."""
    t = g.op("Transpose", [x], perm=[0, 2, 3, 1])
    return g.op("Reshape", [t, g.const(np.array([-1, width], dtype=np.int64))])


def _zeros_like_channels(g: _Graph, x: str, channels: int) -> str:
    """[1, 1, h, w] -> zeros [1, channels, h, w]."""
    w = g.const(np.zeros((channels, 1, 1, 1), dtype=np.float32))
    return g.op("Conv", [x, w])


def build_detector(path: Path) -> None:
    """SCRFD-format skin-blob detector (see the module docstring)."""
    g = _Graph("fake_scrfd")
    x = "input.1"
    # insightface feeds (RGB - 127.5) / 128; back to 0..255
    v = g.op("Add", [g.op("Mul", [x, g.const(128.0)]), g.const(127.5)])
    k = 0.25
    # rows: R-185, R-G-15, 75-(R-G), G-B-6, 45-(G-B); columns R, G, B
    w = np.array([[1, 0, 0], [1, -1, 0], [-1, 1, 0], [0, 1, -1], [0, -1, 1]], dtype=np.float32) * k
    b = np.array([-185, -15, 75, -6, 45], dtype=np.float32) * k
    f = g.op("Sigmoid", [g.op("Conv", [v, g.const(w[:, :, None, None]), g.const(b)])])
    skin = g.op("ReduceProd", [f], axes=[1], keepdims=1)  # [1, 1, H, W]
    s8 = g.op("AveragePool", [skin], kernel_shape=[CELL, CELL], strides=[CELL, CELL])
    q = g.op("Clip", [g.op("Div", [g.op("Sub", [s8, g.const(0.3)]), g.const(0.5)]), g.const(0.0), g.const(1.0)])
    # skin on the outermost cell ring of the detector input: a face touching the frame
    ones = g.op("Add", [g.op("Mul", [q, g.const(0.0)]), g.const(1.0)])
    inner = g.op("AveragePool", [ones], kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1], count_include_pad=1)
    frame = g.op("Clip", [g.op("Mul", [g.op("Sub", [g.const(1.0), inner]), g.const(100.0)]), g.const(0.0), g.const(1.0)])
    qe = g.op("Concat", [q, g.op("Mul", [q, frame])], axis=1)
    r = WINDOW_RADIUS
    st = g.op("Conv", [qe, g.const(_window_kernels())], pads=[r, r, r, r], strides=[DET_STRIDE // CELL] * 2)

    def ch(i: int) -> str:
        return g.op("Slice", [st, g.const(np.array([i], np.int64)), g.const(np.array([i + 1], np.int64)),
                              g.const(np.array([1], np.int64))])

    m, sx, sy, sxx, syy, ring, edge = (ch(i) for i in range(7))
    mc = g.op("Max", [m, g.const(1e-3)])
    mx = g.op("Div", [sx, mc])
    my = g.op("Div", [sy, mc])

    def spread(s2: str, mu: str) -> str:
        var = g.op("Sub", [g.op("Sub", [g.op("Div", [s2, mc]), g.op("Mul", [mu, mu])]), g.const(1.0 / 12.0)])
        return g.op("Sqrt", [g.op("Max", [var, g.const(0.25)])])

    hx = g.op("Mul", [spread(sxx, mx), g.const(2.0)])  # half-size in cells
    hy = g.op("Mul", [spread(syy, my), g.const(2.0)])
    fill = g.op("Div", [m, g.op("Mul", [g.op("Mul", [hx, hy]), g.const(math.pi)])])

    def sig(a: str, offset: float, gain: float) -> str:  # sigmoid(gain * (a - offset))
        return g.op("Sigmoid", [g.op("Mul", [g.op("Sub", [a, g.const(offset)]), g.const(gain)])])

    score = g.op("Mul", [sig(m, MIN_MASS, 0.5), sig(ring, 0.01, -500.0)])
    score = g.op("Mul", [score, sig(edge, 0.5, -10.0)])
    score = g.op("Mul", [score, sig(g.op("Abs", [mx]), 1.6, -6.0)])
    score = g.op("Mul", [score, sig(g.op("Abs", [my]), 1.6, -6.0)])
    score = g.op("Mul", [g.op("Mul", [score, sig(fill, 0.5, 15.0)]), g.const(0.99)])
    # box: centre relative to the anchor in px = CELL * mu + CELL / 2 (window centre is the middle
    # of cell 2j, the anchor is its top-left corner); outputs are in units of the stride
    inv = 1.0 / DET_STRIDE
    ox = g.op("Add", [g.op("Mul", [mx, g.const(CELL)]), g.const(CELL / 2)])
    oy = g.op("Add", [g.op("Mul", [my, g.const(CELL)]), g.const(CELL / 2)])
    hxp = g.op("Mul", [hx, g.const(float(CELL))])
    hyp = g.op("Mul", [hy, g.const(float(CELL))])
    left = g.op("Mul", [g.op("Sub", [hxp, ox]), g.const(inv)])
    top = g.op("Mul", [g.op("Sub", [hyp, oy]), g.const(inv)])
    right = g.op("Mul", [g.op("Add", [hxp, ox]), g.const(inv)])
    bottom = g.op("Mul", [g.op("Add", [hyp, oy]), g.const(inv)])
    kps = []
    for fx, fy in KPS_TEMPLATE:
        kps.append(g.op("Mul", [g.op("Add", [ox, g.op("Mul", [hxp, g.const(fx)])]), g.const(inv)]))
        kps.append(g.op("Mul", [g.op("Add", [oy, g.op("Mul", [hyp, g.const(fy)])]), g.const(inv)]))
    score16 = _flat(g, g.op("Concat", [score, score], axis=1), 1)
    box16 = _flat(g, g.op("Concat", [left, top, right, bottom] * 2, axis=1), 4)
    kps16 = _flat(g, g.op("Concat", kps * 2, axis=1), 10)
    # strides 8 and 32: zeros of the right shapes
    p8 = s8
    p32 = g.op("AveragePool", [s8], kernel_shape=[4, 4], strides=[4, 4])
    outs = {}
    for stride, p in ((8, p8), (32, p32)):
        outs[("score", stride)] = _flat(g, _zeros_like_channels(g, p, 2), 1)
        outs[("box", stride)] = _flat(g, _zeros_like_channels(g, p, 8), 4)
        outs[("kps", stride)] = _flat(g, _zeros_like_channels(g, p, 20), 10)
    outs[("score", 16)], outs[("box", 16)], outs[("kps", 16)] = score16, box16, kps16
    names = []
    out_values = []
    for kind, width in (("score", 1), ("box", 4), ("kps", 10)):
        for stride in (8, 16, 32):
            name = f"{kind}_{stride}"
            g.op("Identity", [outs[(kind, stride)]], out=name)
            names.append(name)
            out_values.append(_value(name, [f"n{kind}{stride}", width]))
    g.save(path, [_value(x, [1, 3, "height", "width"])], out_values)


# --------------------------------------------------------------------------- landmarks


def landmark_template() -> np.ndarray:
    """[106, 2] template in the landmark model's output units ([-1, 1] over the 192 crop).

    The detector box maps to [-2/3, 2/3] (insightface crops 1.5x the box).  Jaw contour on an
    ellipse from the left temple through the chin to the right temple, brows above the eyes,
    the other points on a grid inside the face.
    """
    pts = np.zeros((106, 2), dtype=np.float32)
    n = len(_JAW_ORDER)
    for i, idx in enumerate(_JAW_ORDER):
        phi = math.pi * (1.0 - i / (n - 1))  # pi (left) -> 0 (right) through pi/2 (chin)
        pts[idx] = (0.62 * math.cos(phi), -0.2 + 0.84 * math.sin(phi))
    for i, idx in enumerate(_BROW_ORDER):  # right to left
        pts[idx] = (0.55 - 1.1 * i / (len(_BROW_ORDER) - 1), -0.6 + 0.05 * abs(i - 4.5) / 4.5)
    rest = [i for i in range(106) if i not in _JAW_ORDER and i not in _BROW_ORDER]
    cols = 9
    for j, idx in enumerate(rest):
        r, c = divmod(j, cols)
        pts[idx] = (-0.4 + 0.8 * c / (cols - 1), -0.4 + 0.9 * r / max(1, (len(rest) - 1) // cols))
    return pts


def build_landmark(path: Path) -> None:
    g = _Graph("fake_2d106det")
    x = "data"
    pooled = g.op("Flatten", [g.op("GlobalAveragePool", [x])])  # [1, 3]
    rng = np.random.default_rng(212)
    w = (rng.standard_normal((3, 212)) * 0.01).astype(np.float32)
    shift = g.op("MatMul", [g.op("Tanh", [pooled]), g.const(w)])
    g.op("Add", [shift, g.const(landmark_template().reshape(1, 212))], out="fc1")
    g.save(path, [_value(x, [1, 3, 192, 192])], [_value("fc1", [1, 212])])


# --------------------------------------------------------------------------- recognition


RECOGNITION_SEED = 106
"""Seed of the fake recognition model's projection; another seed gives a second, incompatible face pack."""


def build_recognition(path: Path, *, seed: int = RECOGNITION_SEED) -> None:
    g = _Graph("fake_glintr100")
    x = "input.1"
    pooled = g.op("Flatten", [g.op("AveragePool", [x], kernel_shape=[14, 14], strides=[14, 14])])  # [N, 192]
    pooled = g.op("Sub", [pooled, g.op("ReduceMean", [pooled], axes=[1], keepdims=1)])  # pattern, not brightness
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((192, 512)).astype(np.float32)
    b = rng.standard_normal((512,)).astype(np.float32) * 0.5
    g.op("Add", [g.op("MatMul", [pooled, g.const(w)]), g.const(b)], out="683")
    g.save(path, [_value(x, ["None", 3, 112, 112])], [_value("683", ["None", 512])])


def _build_pool_linear(path: Path, *, size: int, out: int, seed: int, name: str) -> None:
    g = _Graph(name)
    pooled = g.op("Flatten", [g.op("GlobalAveragePool", ["data"])])
    w = np.random.default_rng(seed).standard_normal((3, out)).astype(np.float32) * 0.1
    g.op("MatMul", [pooled, g.const(w)], out="fc1")
    g.save(path, [_value("data", [1, 3, size, size])], [_value("fc1", [1, out])])


# --------------------------------------------------------------------------- folders


def make_antelopev2(folder: str | os.PathLike[str], *, nested: bool = False, extras: bool = True,
                    recognition_seed: int = RECOGNITION_SEED) -> Path:
    """Write the fake pack into ``folder`` (created) and return the folder holding the files.

    ``nested=True`` reproduces the too-deep unzip: files in ``folder/antelopev2/``.
    ``extras=False`` leaves out the two files the pipeline does not use.
    ``recognition_seed``: another seed makes another recognition model (same detector and landmarks),
    whose embeddings cannot be compared with the default one's: a second face pack.
    """
    target = Path(folder) / ANTELOPE_NAME if nested else Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    build_detector(target / DETECTOR_FILE)
    build_landmark(target / LANDMARK_FILE)
    build_recognition(target / RECOGNITION_FILE, seed=recognition_seed)
    if extras:
        _build_pool_linear(target / LANDMARK_3D_FILE, size=192, out=3309, seed=68, name="fake_1k3d68")
        _build_pool_linear(target / GENDERAGE_FILE, size=96, out=3, seed=3, name="fake_genderage")
    return target


def cached_antelopev2(cache_dir: str | os.PathLike[str], *, recognition_seed: int = RECOGNITION_SEED) -> Path:
    """The fake pack in ``cache_dir/<FIXTURE_VERSION>/antelopev2`` (built once, process-safe); with another
    ``recognition_seed`` (a second face pack) in ``cache_dir/<FIXTURE_VERSION>-rec<seed>/antelopev2``."""
    suffix = "" if recognition_seed == RECOGNITION_SEED else f"-rec{int(recognition_seed)}"
    root = Path(cache_dir) / (FIXTURE_VERSION + suffix)
    root.mkdir(parents=True, exist_ok=True)
    final = root / ANTELOPE_NAME
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (final / ".complete").exists():
            tmp = root / f"tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            make_antelopev2(tmp, recognition_seed=recognition_seed)
            (tmp / ".complete").write_text(FIXTURE_VERSION, encoding="utf-8")
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
    return final


# --------------------------------------------------------------------------- images


def blank_image(height: int, width: int, color: Sequence[int] = BACKGROUND_RGB) -> np.ndarray:
    """uint8 RGB [height, width, 3] filled with ``color``."""
    img = np.empty((height, width, 3), dtype=np.uint8)
    img[:] = np.asarray(color, dtype=np.uint8)
    return img


def paint_face(image: np.ndarray, cx: float, cy: float, height: float, *,
               color: Sequence[int] = SKIN_RGB, seed: int | None = None) -> np.ndarray:
    """Draw (in place) a face the fake detector finds: a skin ellipse ``height`` px tall,
    0.8 as wide, with dark eyes and a mouth.  ``seed`` adds a per-person pattern of small
    features (different seeds -> different embeddings).  Returns ``image``.
    """
    h, w = image.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a, b = 0.4 * height, 0.5 * height
    inside = ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2 <= 1.0
    image[inside] = np.asarray(color, dtype=np.uint8)
    dark = np.array([60, 40, 35], dtype=np.uint8)

    def spot(px: float, py: float, rx: float, ry: float, col=dark) -> None:
        m = ((xx - px) / max(rx, 0.5)) ** 2 + ((yy - py) / max(ry, 0.5)) ** 2 <= 1.0
        image[m & inside] = col

    spot(cx - 0.36 * a, cy - 0.25 * b, 0.12 * a, 0.06 * b)
    spot(cx + 0.36 * a, cy - 0.25 * b, 0.12 * a, 0.06 * b)
    spot(cx, cy + 0.45 * b, 0.3 * a, 0.05 * b, np.array([150, 60, 60], dtype=np.uint8))
    if seed is not None:
        rng = np.random.default_rng(seed)
        for _ in range(6):
            px = cx + rng.uniform(-0.6, 0.6) * a
            py = cy + rng.uniform(-0.6, 0.6) * b
            tone = rng.integers(0, 200, size=3).astype(np.uint8)
            spot(px, py, 0.1 * a, 0.1 * b, tone)
    return image


def face_image(size: tuple[int, int], faces: Sequence[tuple[float, float, float]], *,
               seeds: Sequence[int | None] | None = None) -> np.ndarray:
    """[H, W, 3] uint8 with painted faces ``(cx, cy, height)`` on the background colour."""
    img = blank_image(size[0], size[1])
    for i, (cx, cy, height) in enumerate(faces):
        paint_face(img, cx, cy, height, seed=None if seeds is None else seeds[i])
    return img


# --------------------------------------------------------------------------- tiny CLIP vision folder

TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2,
            image_size=224, patch_size=14, projection_dim=64)
PROCESSOR_CONFIG = {
    "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3, "size": 224,
}   # the old-style values of openai/clip-vit-large-patch14's preprocessor_config.json


@dataclass(frozen=True)
class ClipFolders:
    model: Path          # .../clip_vit/<name>
    processor: Path      # .../clip_processor/<name>_processor


def vision_config(dims: dict[str, int]) -> dict[str, object]:
    """config.json content of a CLIPVisionModel with these dimensions (OpenAI-style quick_gelu)."""
    return {
        "architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model", "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5, "num_channels": 3, "attention_dropout": 0.0, "dropout": 0.0,
        "initializer_factor": 1.0, "initializer_range": 0.02, "torch_dtype": "float32", **dims,
    }


def random_vision_state(dims: dict[str, int], *, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Deterministic random weights, transformers names without prefix (``embeddings.*``, ``encoder.layers.*``)."""
    g = torch.Generator().manual_seed(seed)
    h, ff, p = dims["hidden_size"], dims["intermediate_size"], dims["patch_size"]
    tokens = (dims["image_size"] // p) ** 2 + 1

    def rnd(*shape: int, std: float = 0.02, mean: float = 0.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * std + mean).to(dtype)

    state = {
        "embeddings.class_embedding": rnd(h, std=0.5),
        "embeddings.patch_embedding.weight": rnd(h, 3, p, p, std=0.05),
        "embeddings.position_embedding.weight": rnd(tokens, h, std=0.1),
        "pre_layrnorm.weight": rnd(h, std=0.1, mean=1.0), "pre_layrnorm.bias": rnd(h),
        "post_layernorm.weight": rnd(h, std=0.1, mean=1.0), "post_layernorm.bias": rnd(h),
    }
    for i in range(dims["num_hidden_layers"]):
        b = f"encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            state[f"{b}self_attn.{proj}.weight"] = rnd(h, h, std=h ** -0.5)
            state[f"{b}self_attn.{proj}.bias"] = rnd(h)
        for ln in ("layer_norm1", "layer_norm2"):
            state[f"{b}{ln}.weight"] = rnd(h, std=0.1, mean=1.0)
            state[f"{b}{ln}.bias"] = rnd(h)
        state[f"{b}mlp.fc1.weight"] = rnd(ff, h, std=h ** -0.5)
        state[f"{b}mlp.fc1.bias"] = rnd(ff)
        state[f"{b}mlp.fc2.weight"] = rnd(h, ff, std=ff ** -0.5)
        state[f"{b}mlp.fc2.bias"] = rnd(h)
    return state


def make_clip_folder(folder: str | Path, *, tiny: bool = True, seed: int = 0, name: str = RELEASED_CLIP_NAME,
                     with_processor: bool = True) -> ClipFolders:
    """Write ``folder/clip_vit/<name>/`` (+ ``folder/clip_processor/<name>_processor/``), released layout."""
    if not tiny:
        raise ValueError("the full-size model is only built as a single file: "
                         "use tests.fixtures.clip.full_vit_l14_file(cache_dir)")
    folder = Path(folder)
    model_dir = folder / CLIP_VIT_SUBDIR / name
    proc_dir = folder / CLIP_PROCESSOR_SUBDIR / clip_processor_name(name)
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(vision_config(TINY), indent=2))
    state = {f"vision_model.{k}": v for k, v in random_vision_state(TINY, seed=seed).items()}
    save_file(state, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    if with_processor:
        proc_dir.mkdir(parents=True, exist_ok=True)
        (proc_dir / "preprocessor_config.json").write_text(json.dumps(PROCESSOR_CONFIG, indent=2))
    return ClipFolders(model=model_dir, processor=proc_dir)



# --------------------------------------------------------------------------- tiny CLIP tokenizer

TEXT_HIDDEN = 32
"""Hidden size of each tiny text encoder (the toy SDXL's UNet reads both, concatenated: 64)."""


def write_tiny_tokenizer(folder: str | Path) -> CLIPTokenizer:
    """A CLIP tokenizer in ``folder`` (``vocab.json``, ``merges.txt``) with a hand-made byte-level vocabulary
    (every byte alone and word-final, no merges): real CLIP BPE behaviour, one token per character."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # byte-level BPE alphabet: printable bytes stand for themselves, the others map to 256 + n (GPT-2 / CLIP)
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    chars = [chr(b) for b in printable] + [chr(256 + n) for n in range(256 - len(printable))]
    vocab = {tok: i for i, tok in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def tiny_text_config(tokenizer: CLIPTokenizer, **extra: object) -> dict[str, object]:
    """A tiny CLIP text tower (hidden 32, 2 layers) for :func:`write_tiny_tokenizer`'s vocabulary."""
    return dict(vocab_size=len(tokenizer.get_vocab()), hidden_size=TEXT_HIDDEN, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **extra)

__all__ = [
    "BACKGROUND_RGB", "BORDER", "CELL", "ClipFolders", "DET_STRIDE", "DETECTOR_FILE", "FIXTURE_VERSION", "GENDERAGE_FILE",
    "KPS_TEMPLATE", "LANDMARK_3D_FILE", "LANDMARK_FILE", "MIN_MASS", "OPSET", "PACK_FILES", "PROCESSOR_CONFIG",
    "RECOGNITION_FILE", "RECOGNITION_SEED", "SKIN_RGB", "TEXT_HIDDEN", "TINY", "WINDOW_RADIUS", "blank_image", "build_detector", "build_landmark",
    "build_recognition", "cached_antelopev2", "face_image", "landmark_template", "make_antelopev2", "make_clip_folder",
    "paint_face", "random_vision_state", "tiny_text_config", "vision_config", "write_tiny_tokenizer",
]
