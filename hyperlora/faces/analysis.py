"""Face analysis with insightface's AntelopeV2 pack (format §6): detection, 106-point landmarks,
ArcFace embeddings.

* insightface / onnxruntime are imported lazily (in :class:`FaceAnalyzer`), never at module level.
* Only three models are loaded, straight from their files (detector, ``landmark_2d_106``,
  recognition); insightface's ``FaceAnalysis`` is not used, so it can never start a download and
  the too-deep ``antelopev2/antelopev2`` folder works.
* Detection retry over the released sizes (640, 512, 384, 256).  The size is passed to the
  detector's ``detect(img, input_size=...)`` on every run: insightface 2.x ignores a detector
  size changed after ``prepare()`` (it keeps its ``input_sizes`` list), so a retry written the
  released way silently stays at 640 there; passing it per call works in 0.7.3 and 2.x alike.
* When no size finds a face, the image is padded with a black border (a face that fills the
  frame has no context for the detector) and the sizes are tried again; coordinates are mapped
  back to the original image.  Black is also what insightface's crops use outside the image, so
  landmarks computed on the original image with the mapped box equal those on the padded one.
* :meth:`FaceAnalyzer.embedding` is the released ArcFace step: detect again at 640 on the given
  crop, take the largest face, L2-normalised 512-d embedding.
* :attr:`FaceAnalyzer.fingerprint` names the three files (identities record it; embeddings of
  different face models cannot be compared).
* :attr:`FaceAnalyzer.stats` counts detector passes and model runs (for bench/bench_faces.py).

Images are ``np.ndarray`` uint8 ``[H, W, 3]`` RGB; other shapes raise :class:`ImageInputError`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import threading
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import FaceNotFoundError, ImageInputError, ModelFileError, SettingError, check_choice
from ..spec import ANTELOPE_DETECTOR_FILE, ANTELOPE_FILES, ANTELOPE_LANDMARK_FILE, ANTELOPE_RECOGNITION_FILE
from .options import DETECTION_SIZES, FACE_CHOICES, check_det_size
from .setup import PACK_LOCATION, face_models_fingerprint, find_antelopev2, import_backend, insightface_major, resolve_providers

logger = logging.getLogger(__name__)

__all__ = ["DetectedFace", "FaceAnalyzer", "FaceStats", "check_rgb_image", "choose_face", "order_faces"]

EMBEDDING_DET_SIZE = DETECTION_SIZES[0]
PAD_FRACTION = 0.5
"""Black border added on every side, as a fraction of the longer image side (image -> 2x)."""
PAD_MAX_SIDE = 1280
"""Images are shrunk to this longer side before padding (the detector sees <= 640 px anyway)."""
STATS_MAX_SIZES = 1024


@dataclass
class DetectedFace:
    """One face, in original image pixels."""

    bbox: np.ndarray  # [4] x1 y1 x2 y2
    kps: np.ndarray  # [5, 2] eyes, nose, mouth corners
    score: float
    landmarks_106: np.ndarray  # [106, 2] float32
    embedding: np.ndarray | None = None  # [512] L2-normalised, or None
    det_size: int = 640  # detector input size of the pass that found it
    padded: bool = False  # found only after padding the image

    @property
    def area(self) -> float:
        return float(max(0.0, self.bbox[2] - self.bbox[0]) * max(0.0, self.bbox[3] - self.bbox[1]))

    @property
    def center_x(self) -> float:
        return float(self.bbox[0] + self.bbox[2]) / 2.0

    def describe(self) -> str:
        """Short text for logs/UI: where the face is and how it was found."""
        x1, y1, x2, y2 = (int(round(float(v))) for v in self.bbox)
        how = f"det size {self.det_size}" + (", after padding" if self.padded else "")
        return f"face at ({x1}, {y1})-({x2}, {y2}), score {self.score:.2f}, {how}"


@dataclass
class FaceStats:
    """Counters of model runs since the last :meth:`reset`."""

    detector_runs: int = 0
    landmark_runs: int = 0
    recognition_runs: int = 0
    padded_runs: int = 0  # detector runs on a padded image (included in detector_runs)
    det_sizes: list[int] = field(default_factory=list)  # detector input size of every run, in order (last 1024)

    @property
    def model_runs(self) -> int:
        return self.detector_runs + self.landmark_runs + self.recognition_runs

    def reset(self) -> None:
        self.detector_runs = self.landmark_runs = self.recognition_runs = self.padded_runs = 0
        self.det_sizes = []

    def as_dict(self) -> dict[str, Any]:
        """Every counter and ``model_runs`` (what bench/bench_faces.py and bench_preprocess.py print)."""
        return {**asdict(self), "det_sizes": list(self.det_sizes), "model_runs": self.model_runs}


def check_rgb_image(image: Any, what: str = "image") -> np.ndarray:
    """Return ``image`` if it is uint8 ``[H, W, 3]`` with H, W >= 1; ImageInputError otherwise."""
    if not isinstance(image, np.ndarray):
        raise ImageInputError(
            f"Face analysis needs the {what} as a numpy uint8 RGB array [H, W, 3], got {type(image).__name__}; "
            "convert ComfyUI IMAGE tensors with hyperlora.pipeline.images_from_comfy first."
        )
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or min(image.shape[:2]) < 1:
        raise ImageInputError(
            f"Face analysis needs the {what} as uint8 RGB [H, W, 3], got shape {tuple(image.shape)} "
            f"dtype {image.dtype}; convert grayscale/RGBA/float images to uint8 RGB first "
            "(hyperlora.pipeline.images_from_comfy does)."
        )
    return image


def order_faces(faces: Sequence[DetectedFace], choice: str = "largest") -> list[DetectedFace]:
    """Faces in the order ``choice`` counts them: largest first (``largest``, ``index``), by
    the centre's x coordinate (``left_to_right``) or by detection score, highest first
    (``highest_score``: insightface's own order, what the released plugin takes).  Stable for ties."""
    check_choice(choice, FACE_CHOICES, "face_choice")
    if choice == "left_to_right":
        return sorted(faces, key=lambda f: f.center_x)
    if choice == "highest_score":
        return sorted(faces, key=lambda f: -f.score)
    return sorted(faces, key=lambda f: -f.area)


def choose_face(faces: Sequence[DetectedFace], choice: str = "largest", index: int = 0) -> DetectedFace:
    """Pick one face.

    * ``largest``: the face with the largest box (``index`` ignored; our default, as InstantID/PuLID).
    * ``highest_score``: the face the detector is surest of (``index`` ignored); the released
      plugin takes this one (the first face insightface returns).
    * ``index``: the ``index``-th largest (0 = largest).
    * ``left_to_right``: the ``index``-th face from the left (0 = leftmost).

    An ``index`` beyond the faces found is a :class:`SettingError` (face_index), no faces at all a
    :class:`FaceNotFoundError`.
    """
    ordered = order_faces(faces, choice)
    if not ordered:
        raise FaceNotFoundError("No face was found, so none can be chosen.")
    if choice in ("largest", "highest_score"):
        return ordered[0]
    if not isinstance(index, (int, np.integer)) or index < 0 or index >= len(ordered):
        counted = "largest first" if choice == "index" else "from the left"
        raise SettingError(
            f"face_index {index} is out of range: {len(ordered)} face(s) were found (valid: 0 to "
            f"{len(ordered) - 1}, counted {counted}); lower face_index or use face_choice 'largest'."
        )
    return ordered[int(index)]


def _bgr(image_rgb: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(image_rgb[..., ::-1])


def _pad(image_bgr: np.ndarray) -> tuple[np.ndarray, int, np.ndarray]:
    """Shrink to <= PAD_MAX_SIDE, add a black border.

    Returns (padded, border, scale [2] = (sx, sy) of the shrink); original = (padded - border) / scale.
    """
    import cv2

    h, w = image_bgr.shape[:2]
    small = image_bgr
    if max(h, w) > PAD_MAX_SIDE:
        f = PAD_MAX_SIDE / max(h, w)
        small = cv2.resize(image_bgr, (max(1, int(round(w * f))), max(1, int(round(h * f)))),
                           interpolation=cv2.INTER_AREA)
    scale = np.array([small.shape[1] / w, small.shape[0] / h], dtype=np.float32)
    border = int(round(PAD_FRACTION * max(small.shape[:2])))
    padded = cv2.copyMakeBorder(small, border, border, border, border, cv2.BORDER_CONSTANT, value=(0, 0, 0))
    return padded, border, scale


class FaceAnalyzer:
    """AntelopeV2 face analysis; construct once and reuse (loading the sessions is the costly part).

    ``model_dir``: the antelopev2 folder (or ``antelopev2/antelopev2``, or the insightface root).
    ``provider``: one of :data:`PROVIDERS`; ``auto`` = best available onnxruntime provider.
    """

    def __init__(self, model_dir: str | Path, *, provider: str = "auto", det_thresh: float = 0.5):
        self.model_dir = find_antelopev2(model_dir)
        backend = import_backend()
        self.insightface_version = backend.insightface_version
        self._Face = backend.Face
        self.provider = provider
        self.providers = resolve_providers(provider, backend.onnxruntime.get_available_providers())
        self.det_thresh = float(det_thresh)
        self.stats = FaceStats()
        self._lock = threading.RLock()
        self._fingerprint: str | None = None
        with contextlib.suppress(AttributeError):
            backend.onnxruntime.set_default_logger_severity(3)
        self._det = self._load(backend, ANTELOPE_DETECTOR_FILE, "detection")
        self._lmk = self._load(backend, ANTELOPE_LANDMARK_FILE, "landmark_2d_106")
        self._rec = self._load(backend, ANTELOPE_RECOGNITION_FILE, "recognition")
        with self._quiet():
            self._det.prepare(0, det_thresh=self.det_thresh, input_size=(EMBEDDING_DET_SIZE, EMBEDDING_DET_SIZE))
            self._lmk.prepare(0)
            self._rec.prepare(0)
        logger.info(
            "AntelopeV2 loaded from %s with %s (insightface %s)",
            self.model_dir, ", ".join(self.providers), self.insightface_version,
        )

    # ------------------------------------------------------------------ loading

    @staticmethod
    @contextlib.contextmanager
    def _quiet():
        """insightface 0.7.3 prints to stdout while loading; send that to the debug log."""
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            yield
        text = buf.getvalue().strip()
        if text:
            logger.debug("insightface: %s", text)

    def _load(self, backend: Any, filename: str, task: str) -> Any:
        path = self.model_dir / filename
        try:
            with self._quiet():
                model = backend.get_model(str(path), providers=list(self.providers))
        except Exception as exc:  # onnxruntime raises its own exception types for damaged files
            raise ModelFileError(
                f"insightface {self.insightface_version} could not load {path} ({type(exc).__name__}: {exc}). "
                f"The file may be damaged or incomplete: download the AntelopeV2 pack again and put its "
                f"files ({', '.join(ANTELOPE_FILES)}) in {PACK_LOCATION}."
            ) from exc
        got = getattr(model, "taskname", None)
        if got != task:
            raise ModelFileError(
                f"{path} is not the {task} model of the AntelopeV2 pack (insightface read it as {got or 'unknown'}); "
                f"replace it with the original file from the antelopev2 pack."
            )
        return model

    @property
    def fingerprint(self) -> str:
        """The face models' fingerprint (:func:`~hyperlora.faces.setup.face_models_fingerprint` of
        :attr:`model_dir`): identities record it, scoring compares it.  Hashed on first use."""
        if self._fingerprint is None:
            self._fingerprint = face_models_fingerprint(self.model_dir)
        return self._fingerprint

    @property
    def insightface_major(self) -> int:
        return insightface_major(self.insightface_version)

    # ------------------------------------------------------------------ model runs

    def _detect_raw(self, image_bgr: np.ndarray, size: int, *, padded: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """One detector pass at ``size``: boxes [n, 5] (x1 y1 x2 y2 score), keypoints [n, 5, 2]."""
        h, w = image_bgr.shape[:2]
        # insightface resizes the longer side to `size`; a side that rounds to 0 px cannot hold a face
        ratio = float(h) / w  # the same float arithmetic as insightface's detect()
        if int(size / ratio if ratio > 1.0 else size * ratio) < 1:
            return np.zeros((0, 5), np.float32), np.zeros((0, 5, 2), np.float32)
        with self._lock:
            bboxes, kpss = self._det.detect(image_bgr, input_size=(size, size), max_num=0, metric="default")
            self.stats.detector_runs += 1
            self.stats.det_sizes.append(int(size))
            if len(self.stats.det_sizes) > STATS_MAX_SIZES:  # bounded in a long-running ComfyUI
                del self.stats.det_sizes[:-STATS_MAX_SIZES]
            if padded:
                self.stats.padded_runs += 1
        bboxes = np.asarray(bboxes, dtype=np.float32).reshape(-1, 5)
        if kpss is None:
            kpss = np.zeros((len(bboxes), 5, 2), np.float32)
        return bboxes, np.asarray(kpss, dtype=np.float32).reshape(-1, 5, 2)

    def _face(self, bbox: np.ndarray, kps: np.ndarray, score: float) -> Any:
        return self._Face(bbox=np.asarray(bbox, np.float32), kps=np.asarray(kps, np.float32), det_score=score)

    def _landmarks(self, image_bgr: np.ndarray, bbox: np.ndarray, kps: np.ndarray, score: float) -> np.ndarray:
        face = self._face(bbox, kps, score)
        with self._lock:
            pts = self._lmk.get(image_bgr, face)
            self.stats.landmark_runs += 1
        return np.asarray(pts, dtype=np.float32).reshape(106, 2)

    def _embed(self, image_bgr: np.ndarray, bbox: np.ndarray, kps: np.ndarray, score: float) -> np.ndarray:
        face = self._face(bbox, kps, score)
        with self._lock, warnings.catch_warnings():
            # insightface's norm_crop calls a scikit-image API that newer versions deprecate
            warnings.simplefilter("ignore", FutureWarning)
            emb = self._rec.get(image_bgr, face)
            self.stats.recognition_runs += 1
        emb = np.asarray(emb, dtype=np.float64).reshape(-1)
        norm = float(np.linalg.norm(emb))
        if not np.isfinite(norm) or norm == 0.0:
            raise ModelFileError(
                f"The recognition model {self.model_dir / ANTELOPE_RECOGNITION_FILE} returned a zero or non-finite "
                "embedding; the file may be damaged: replace it with the original glintr100.onnx."
            )
        return (emb / norm).astype(np.float32)

    def _build(self, image_bgr: np.ndarray, bboxes: np.ndarray, kpss: np.ndarray, *, det_size: int,
               padded: bool, with_embedding: bool) -> list[DetectedFace]:
        faces = []
        for box, kps in zip(bboxes, kpss):
            score = float(box[4])
            lmk = self._landmarks(image_bgr, box[:4], kps, score)
            emb = self._embed(image_bgr, box[:4], kps, score) if with_embedding else None
            faces.append(DetectedFace(bbox=box[:4].copy(), kps=kps.copy(), score=score, landmarks_106=lmk,
                                      embedding=emb, det_size=int(det_size), padded=padded))
        return faces

    # ------------------------------------------------------------------ public API

    def detect(self, image_rgb: np.ndarray, *, det_size: int = 640, with_embedding: bool = False) -> list[DetectedFace]:
        """One detector pass at ``det_size`` (no retry, no padding), landmarks for every face found
        and, with ``with_embedding``, their normalised embeddings.  Detector order (by score)."""
        image = check_rgb_image(image_rgb)
        size = check_det_size(det_size)
        bgr = _bgr(image)
        bboxes, kpss = self._detect_raw(bgr, size)
        return self._build(bgr, bboxes, kpss, det_size=size, padded=False, with_embedding=with_embedding)

    def find_faces(self, image_rgb: np.ndarray, *, det_sizes: Sequence[int] = DETECTION_SIZES,
                   pad: bool = True, with_embedding: bool = False) -> list[DetectedFace]:
        """Faces with landmarks from the first detector size (in ``det_sizes`` order) that finds any;
        if none does and ``pad``, the same on the image padded with a black border.  [] if no face.

        Coordinates are in original image pixels (boxes of padded finds may reach outside it).
        """
        image = check_rgb_image(image_rgb)
        sizes = [check_det_size(s) for s in det_sizes]
        if not sizes:
            raise SettingError("find_faces needs at least one detector size (e.g. 640).")
        bgr = _bgr(image)
        for size in sizes:
            bboxes, kpss = self._detect_raw(bgr, size)
            if len(bboxes):
                return self._build(bgr, bboxes, kpss, det_size=size, padded=False, with_embedding=with_embedding)
        if not pad:
            return []
        padded, border, scale = _pad(bgr)
        for size in sizes:
            bboxes, kpss = self._detect_raw(padded, size, padded=True)
            if len(bboxes):
                bboxes = bboxes.copy()
                bboxes[:, :4] = (bboxes[:, :4] - border) / np.tile(scale, 2)
                kpss = (kpss - border) / scale
                logger.debug("face found after padding by %d px at det size %d", border, size)
                return self._build(bgr, bboxes, kpss, det_size=size, padded=True, with_embedding=with_embedding)
        return []

    def embedding(self, image_rgb: np.ndarray, *, choice: str = "largest") -> np.ndarray | None:
        """Released ArcFace step (format §6): detect again at 640 on ``image_rgb`` (the 4l crop),
        take the largest face (``choice="highest_score"``: the surest one, as the released plugin
        does), return its L2-normalised embedding [512] float32, or None when 640 finds no face
        (as released: no retry at smaller sizes or with padding).
        """
        image = check_rgb_image(image_rgb, "ArcFace crop")
        bgr = _bgr(image)
        bboxes, kpss = self._detect_raw(bgr, EMBEDDING_DET_SIZE)
        if not len(bboxes):
            return None
        if choice == "highest_score":
            i = int(np.argmax(bboxes[:, 4]))
        else:
            areas = (bboxes[:, 2] - bboxes[:, 0]).clip(min=0) * (bboxes[:, 3] - bboxes[:, 1]).clip(min=0)
            i = int(np.argmax(areas))
        return self._embed(bgr, bboxes[i, :4], kpss[i], float(bboxes[i, 4]))
