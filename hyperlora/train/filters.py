"""The data filters of the paper's supplement A.5, as small pure functions, and the report that counts them.

Order in :func:`hyperlora.train.prepare.prepare` (cheap first; each sample is counted once, under the first
filter that drops it): unreadable file -> no caption -> shorter side -> plural pronoun in the caption ->
face count / face size -> face larger than the training crop -> aesthetic score -> face lost in the ArcFace
crop.  (The training crop is moved to keep the face box whenever the face fits in it; see
:func:`hyperlora.train.prepare.crop_plan`.  Kept samples whose crop was moved are counted too.)

* shorter side >= ``min_side`` (paper: 768);
* exactly one face (AntelopeV2 detection of this pack, with its retry sizes and padding), and its box area
  over the image area > ``min_face_area`` (paper: 0.03);
* no plural personal pronoun in the caption (:data:`PLURAL_PRONOUNS`, whole words, any case: a caption
  about "them" or "our family" shows more than one person);
* aesthetic score > ``min_aesthetic`` (paper: 5.5; :mod:`hyperlora.train.aesthetic`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

PLURAL_PRONOUNS: tuple[str, ...] = (
    "we", "us", "our", "ours", "ourselves", "they", "them", "their", "theirs", "themselves", "themself",
)
"""First- and third-person plural personal pronouns (subject, object, possessive, reflexive).  Contractions
("we're", "they'll") match through their pronoun part."""
_PLURAL_RE = re.compile(r"\b(?:" + "|".join(PLURAL_PRONOUNS) + r")\b", re.IGNORECASE)

REASONS: tuple[str, ...] = (
    "corrupt", "no_caption", "small", "plural_caption", "no_face", "many_faces", "small_face", "aesthetic",
    "arcface",
)
"""Why a sample was dropped, in filter order: the keys :attr:`FilterReport.dropped` always holds."""
LATER_REASONS: tuple[str, ...] = ("face_cut",)
"""Reasons added after the first shard format: a report holds them only once they dropped a sample, so the
reports (and shards) of data that never meets them are unchanged."""
ORDER: tuple[str, ...] = REASONS[:7] + LATER_REASONS + REASONS[7:]
"""Every reason in filter order (for :meth:`FilterReport.lines`)."""
REASON_TEXT: dict[str, str] = {
    "corrupt": "unreadable or corrupt image",
    "no_caption": "no caption (.txt / txt / json caption)",
    "small": "shorter side below min_side",
    "plural_caption": "plural personal pronoun in the caption",
    "no_face": "no face found",
    "many_faces": "more than one face",
    "small_face": "face box area / image area not above min_face_area",
    "face_cut": "face box longer than the square training crop (the crop would cut the face)",
    "aesthetic": "aesthetic score not above min_aesthetic",
    "arcface": "face unusable by the released preprocessing (not found again in its ArcFace crop, or a crop failed)",
}


def plural_pronouns(caption: str) -> list[str]:
    """The plural personal pronouns in ``caption`` (lower case, in order); [] when there is none."""
    return [m.group(0).lower() for m in _PLURAL_RE.finditer(caption)]


def has_plural_pronoun(caption: str) -> bool:
    """True when ``caption`` holds one of :data:`PLURAL_PRONOUNS` as a whole word (case-insensitive)."""
    return _PLURAL_RE.search(caption) is not None


def big_enough(height: int, width: int, min_side: int) -> bool:
    """Shorter side >= ``min_side``."""
    return min(int(height), int(width)) >= int(min_side)


def face_area_ratio(bbox: Sequence[float] | np.ndarray, height: int, width: int) -> float:
    """Area of the face box ``[x1, y1, x2, y2]`` (clipped to the image) over the image area."""
    x1, y1, x2, y2 = (float(v) for v in np.asarray(bbox, dtype=np.float64).reshape(4))
    w = max(0.0, min(x2, width) - max(x1, 0.0))
    h = max(0.0, min(y2, height) - max(y1, 0.0))
    return (w * h) / float(max(1, height * width))


def face_reason(bboxes: Sequence[Sequence[float] | np.ndarray], height: int, width: int,
                min_face_area: float) -> str | None:
    """None when there is exactly one face whose area ratio is above ``min_face_area``; otherwise the
    reason (``no_face``, ``many_faces``, ``small_face``)."""
    if len(bboxes) == 0:
        return "no_face"
    if len(bboxes) > 1:
        return "many_faces"
    if face_area_ratio(bboxes[0], height, width) <= float(min_face_area):
        return "small_face"
    return None


@dataclass
class FilterReport:
    """How many input samples were seen, kept, and dropped by each filter (:data:`REASONS`)."""

    seen: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: {r: 0 for r in REASONS})
    crop_moved: int = 0
    """Kept samples whose training crop was moved off the centre to keep the face box in it."""

    def drop(self, reason: str) -> None:
        """Count one sample dropped for ``reason`` (:data:`ORDER`)."""
        if reason not in ORDER and reason not in self.dropped:
            raise ValueError(f"unknown filter reason {reason!r}")
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def add(self, other: FilterReport) -> None:
        """Add ``other``'s counts to these."""
        self.seen += other.seen
        self.kept += other.kept
        self.crop_moved += other.crop_moved
        for k, v in other.dropped.items():
            self.dropped[k] = self.dropped.get(k, 0) + v

    def as_dict(self) -> dict[str, object]:
        """JSON-ready counts; ``crop_moved`` only when non-zero (reports without it are unchanged)."""
        out: dict[str, object] = {"seen": self.seen, "kept": self.kept, "dropped": dict(self.dropped)}
        if self.crop_moved:
            out["crop_moved"] = self.crop_moved
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> FilterReport:
        """The report :meth:`as_dict` wrote (missing counts are 0)."""
        dropped = {r: 0 for r in REASONS}
        dropped.update({str(k): int(v) for k, v in dict(data.get("dropped", {})).items()})  # type: ignore[arg-type]
        return cls(seen=int(data.get("seen", 0)), kept=int(data.get("kept", 0)), dropped=dropped,  # type: ignore[arg-type]
                   crop_moved=int(data.get("crop_moved", 0)))  # type: ignore[arg-type]

    def lines(self) -> list[str]:
        """Human-readable report: one line per filter (in filter order), then the moved crops when there are."""
        out = [f"seen {self.seen}, kept {self.kept}"]
        keys = [r for r in ORDER if r in self.dropped] + [r for r in self.dropped if r not in ORDER]
        out += [f"  dropped {self.dropped[r]:>6}: {REASON_TEXT.get(r, r)}" for r in keys]
        if self.crop_moved:
            out.append(f"  kept {self.crop_moved:>9} with the training crop moved off the centre to keep the face")
        return out


__all__ = ["FilterReport", "LATER_REASONS", "ORDER", "PLURAL_PRONOUNS", "REASONS", "REASON_TEXT", "big_enough",
           "face_area_ratio", "face_reason", "has_plural_pronoun", "plural_pronouns"]
