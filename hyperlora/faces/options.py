"""How faces are found, chosen and prepared: the choices and their defaults, in one place.

Each option is one field of :class:`FaceOptions` (its default, its choices or range and its help text):
nodes build their inputs from :func:`option_specs`, the core functions take a whole
:class:`FaceOptions` (default :data:`DEFAULTS`), the result cache is keyed by
:meth:`FaceOptions.cache_key` and identity files record :meth:`FaceOptions.settings`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

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


def option(default: Any, help: str, *, choices: Sequence[Any] | None = None, low: int | None = None,
           high: int | None = None, cached: bool = True) -> Any:
    """A :class:`FaceOptions` field: its default and what the nodes show for it.

    ``help``: the input's tooltip.  ``choices``: the allowed values (a dropdown; for an int field the
    node lists them as strings, as ComfyUI's combos are).  ``low`` / ``high``: the range of an int.
    ``cached=False``: the option does not change what is extracted from one photo (it is applied
    after the result cache), so it is left out of :meth:`FaceOptions.cache_key`.
    """
    return field(default=default, metadata={"help": help, "choices": None if choices is None else tuple(choices),
                                            "low": low, "high": high, "cached": cached})


@dataclass(frozen=True)
class OptionSpec:
    """One face option as the nodes present it (from the field of :class:`FaceOptions`)."""

    name: str
    kind: type            # bool, int, float or str
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    low: int | None = None
    high: int | None = None
    cached: bool = True


@dataclass(frozen=True)
class FaceOptions:
    """Face finding and preparation; the defaults are the released behaviour (format §6).

    The one place where a face option is declared: the nodes make their inputs from
    :func:`option_specs`, read them back with :meth:`from_values`; :func:`hyperlora.pipeline.extract_conditions`
    takes the options whole and keys its cache with :meth:`cache_key`; identity files record
    :meth:`settings`.  A new option is a new field here (with :func:`option`).
    """

    face_choice: str = option(
        "largest", "Which face to use when a photo shows several: the largest, or (with 'index') the face_index-th "
        "largest; 'left_to_right' takes the face_index-th from the left; 'highest_score' takes the face the "
        "detector is surest of, as the authors' plugin does.", choices=FACE_CHOICES)
    face_index: int = option(0, "0-based face number for 'index' and 'left_to_right'.", low=0, high=MAX_FACE_INDEX)
    remove_background: bool = option(
        True, "Replace everything outside the face outline by gray before CLIP sees it, as the released models "
              "were trained (recommended).")
    grayscale: bool = option(
        False, "Give CLIP a grayscale face, so the colours of the photo (lighting, make-up) carry over less.")
    no_face: str = option(
        "skip", "A photo without a detectable face: 'skip' drops it and uses the others, 'error' stops the queue "
                "naming the photo.", choices=NO_FACE_POLICIES, cached=False)
    det_size: int = option(
        DETECTION_SIZES[0], "Face-detector input size. 640 as released; if nothing is found the smaller sizes are "
                            "tried too. Pick a smaller size first for tight close-ups.", choices=DETECTION_SIZES)

    def __post_init__(self) -> None:
        check_choice(self.face_choice, FACE_CHOICES, "face_choice")
        check_choice(self.no_face, NO_FACE_POLICIES, "no_face")
        if isinstance(self.face_index, bool) or not isinstance(self.face_index, int) \
                or not 0 <= self.face_index <= MAX_FACE_INDEX:
            raise SettingError(f"face_index is {self.face_index!r}; use a whole number from 0 to {MAX_FACE_INDEX}.")
        check_det_size(self.det_size)

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> FaceOptions:
        """The options from a node's inputs (``{name: value}``; other keys are ignored, options a node does
        not have keep their defaults).  Values are converted to the field's type (det_size arrives as the
        string of a dropdown)."""
        given = {}
        for spec in option_specs(cls):
            if spec.name in values:
                value = values[spec.name]
                given[spec.name] = spec.kind(value) if spec.kind in (int, float, bool) else value
        return cls(**given)

    def cache_key(self) -> tuple[Any, ...]:
        """``((name, value), ...)`` of every option that changes what is extracted from a photo."""
        return tuple((spec.name, getattr(self, spec.name)) for spec in option_specs(type(self)) if spec.cached)

    def settings(self) -> dict[str, str]:
        """The options as strings, stored in identity files."""
        return {k: str(v) for k, v in asdict(self).items()}


_KINDS = {"bool": bool, "int": int, "float": float, "str": str}


def option_specs(cls: type[FaceOptions] = FaceOptions) -> tuple[OptionSpec, ...]:
    """Every field of ``cls`` (:class:`FaceOptions` or a subclass) as an :class:`OptionSpec`, in field order."""
    out = []
    for f in fields(cls):
        kind = f.type if isinstance(f.type, type) else _KINDS.get(str(f.type))
        if kind is None:
            raise TypeError(f"FaceOptions.{f.name}: annotate it as bool, int, float or str, not {f.type!r}")
        meta = f.metadata
        out.append(OptionSpec(name=f.name, kind=kind, default=f.default, help=meta.get("help", ""),
                              choices=meta.get("choices"), low=meta.get("low"), high=meta.get("high"),
                              cached=meta.get("cached", True)))
    return tuple(out)


DEFAULTS = FaceOptions()

__all__ = ["DEFAULTS", "DETECTION_SIZES", "FACE_CHOICES", "FACE_ORDERS", "FaceOptions", "MAX_FACE_INDEX", "NO_FACE_POLICIES",
           "OptionSpec", "check_det_size", "option", "option_specs", "retry_sizes"]
