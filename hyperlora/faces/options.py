"""How faces are found, chosen and prepared: the choices and their defaults, in one place.

Nodes build their inputs from these, the core functions take their defaults from
:data:`DEFAULTS`, and identity files record :meth:`FaceOptions.settings`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import SettingError, check_choice

FACE_CHOICES = ("largest", "left_to_right", "index", "highest_score")
"""largest: the largest box (index ignored); index: the index-th largest; left_to_right: the
index-th from the left; highest_score: the detector's surest face (the authors' plugin's pick)."""
FACE_ORDERS = ("left_to_right", "largest", "highest_score")
"""How faces are numbered when every face is used (per-face masks, the analysis preview): the
orders of :func:`hyperlora.faces.analysis.order_faces` ('index' counts like 'largest')."""
DETECTION_SIZES = (640, 512, 384, 256)
"""The released detector sizes, tried in this order when a size finds nothing (format §6)."""
NO_FACE_POLICIES = ("skip", "error")
"""A photo without a usable face: drop it (and go on with the others) or stop, naming it."""
MIN_DET_SIZE, MAX_DET_SIZE, DET_SIZE_STEP = 128, 2048, 32
MAX_FACE_INDEX = 64


def check_det_size(det_size: int) -> int:
    """Validate a detector input size (a multiple of 32 in 128..2048)."""
    try:
        size = int(det_size)
    except (TypeError, ValueError):
        size = -1
    if size != det_size or not (MIN_DET_SIZE <= size <= MAX_DET_SIZE) or size % DET_SIZE_STEP:
        raise SettingError(
            f"det_size {det_size!r} is not usable: use a multiple of {DET_SIZE_STEP} between "
            f"{MIN_DET_SIZE} and {MAX_DET_SIZE} (the released default is 640).")
    return size


def retry_sizes(det_size: int = DETECTION_SIZES[0]) -> tuple[int, ...]:
    """Detector sizes to try for a user-set first size: it, then the released sizes below it.

    ``retry_sizes(640) == DETECTION_SIZES``; ``retry_sizes(1024) == (1024, 640, 512, 384, 256)``.
    """
    first = check_det_size(det_size)
    return (first,) + tuple(s for s in DETECTION_SIZES if s < first)


@dataclass(frozen=True)
class FaceOptions:
    """Face finding and preparation; the defaults are the released behaviour (format §6)."""

    face_choice: str = "largest"
    face_index: int = 0
    remove_background: bool = True
    grayscale: bool = False
    no_face: str = "skip"
    det_size: int = DETECTION_SIZES[0]

    def __post_init__(self) -> None:
        check_choice(self.face_choice, FACE_CHOICES, "face_choice")
        check_choice(self.no_face, NO_FACE_POLICIES, "no_face")
        if isinstance(self.face_index, bool) or not isinstance(self.face_index, int) \
                or not 0 <= self.face_index <= MAX_FACE_INDEX:
            raise SettingError(f"face_index is {self.face_index!r}; use a whole number from 0 to {MAX_FACE_INDEX}.")
        check_det_size(self.det_size)

    def settings(self) -> dict[str, str]:
        """The options as strings, stored in identity files."""
        return {k: str(v) for k, v in asdict(self).items()}


DEFAULTS = FaceOptions()

__all__ = ["DEFAULTS", "DETECTION_SIZES", "FACE_CHOICES", "FACE_ORDERS", "FaceOptions", "MAX_FACE_INDEX", "NO_FACE_POLICIES",
           "check_det_size", "retry_sizes"]
