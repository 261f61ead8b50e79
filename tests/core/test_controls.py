"""Face controls with the real insightface and the hand-weighted AntelopeV2 fixture: keypoint images
of a painted face at a known place, one mask per face in order, and the analysis report / preview
choosing exactly the face the identity nodes take."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("insightface", reason="insightface is not installed")
pytestmark = pytest.mark.filterwarnings("ignore:`estimate` is deprecated:FutureWarning")

from hyperlora.controls import Placement, analysis_preview, face_report, keypoint_image, per_face_masks  # noqa: E402
from hyperlora.errors import FaceNotFoundError, SettingError  # noqa: E402
from hyperlora.faces.analysis import FaceAnalyzer, choose_face  # noqa: E402
from hyperlora.faces.options import FaceOptions  # noqa: E402
from hyperlora.pipeline import find_faces_scaled  # noqa: E402
from tests.core.test_drawing import assert_same_drawing, reference_keypoints  # noqa: E402
from tests.fixtures import antelope as A  # noqa: E402

LEFT, RIGHT = (230.0, 300.0, 160.0), (640.0, 290.0, 220.0)     # (cx, cy, height): small left, big right


@pytest.fixture(scope="module")
def analyzer(cache_dir) -> FaceAnalyzer:
    return FaceAnalyzer(A.cached_antelopev2(cache_dir), provider="CPU")


@pytest.fixture(scope="module")
def two_faces() -> np.ndarray:
    return A.face_image((560, 900), [LEFT, RIGHT], seeds=[1, 2])


def expected_kps(cx: float, cy: float, height: float) -> np.ndarray:
    """Where the fixture detector puts the keypoints of a painted face: fixed fractions of the half
    box (0.4 x height wide, 0.5 x height tall) from the face centre (tests/fixtures/antelope.py)."""
    half = np.array([0.4 * height, 0.5 * height])
    return np.array([cx, cy]) + np.array(A.KPS_TEMPLATE) * half


def _inside(cx: float, cy: float, height: float, shape: tuple[int, int], scale: float = 1.0) -> np.ndarray:
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    return ((xx - cx) / (0.4 * height * scale)) ** 2 + ((yy - cy) / (0.5 * height * scale)) ** 2 <= 1.0


def test_keypoint_image_of_a_face_at_a_known_place(analyzer):
    image = A.face_image((400, 500), [(260.0, 190.0, 180.0)], seeds=[4])
    drawn, face = keypoint_image(image, analyzer=analyzer)
    assert face is not None and drawn.shape == (400, 500, 3)
    kps = expected_kps(260.0, 190.0, 180.0)
    assert np.abs(np.asarray(face.kps) - kps).max() < 4.0
    assert_same_drawing(drawn, reference_keypoints(kps, 500, 400), within=5)


def test_keypoints_follow_face_choice(analyzer, two_faces):
    for choice, index, where in (("largest", 0, RIGHT), ("left_to_right", 0, LEFT), ("index", 1, LEFT)):
        drawn, face = keypoint_image(two_faces, analyzer=analyzer, face_choice=choice, face_index=index)
        assert abs(face.center_x - where[0]) < 8
        ys, xs = np.nonzero(drawn.any(axis=-1))
        assert abs(xs.mean() - where[0]) < 0.2 * where[2]


def test_canvas_mode_places_the_face(analyzer, two_faces):
    placement = Placement(width=1024, height=768, center_x=0.25, center_y=0.5, face_width=0.2)
    drawn, face = keypoint_image(two_faces, analyzer=analyzer, placement=placement)   # largest = right face
    assert drawn.shape == (768, 1024, 3)
    scale = 0.2 * 1024 / float(face.bbox[2] - face.bbox[0])
    box_centre = np.array([(face.bbox[0] + face.bbox[2]) / 2, (face.bbox[1] + face.bbox[3]) / 2])
    kps = (np.asarray(face.kps, np.float64) - box_centre) * scale + np.array([256.0, 384.0])
    assert_same_drawing(drawn, reference_keypoints(kps, 1024, 768), within=2)
    with pytest.raises(SettingError, match="face_width"):
        Placement(face_width=0.0)


def test_no_face_policy(analyzer):
    blank = A.blank_image(200, 300)
    drawn, face = keypoint_image(blank, analyzer=analyzer, label="image 2 of 3")
    assert face is None and drawn.shape == (200, 300, 3) and not drawn.any()
    with pytest.raises(FaceNotFoundError, match="image 2 of 3"):
        keypoint_image(blank, analyzer=analyzer, no_face="error", label="image 2 of 3")


def test_one_mask_per_face_left_to_right(analyzer, two_faces):
    masks, faces = per_face_masks(two_faces, analyzer=analyzer, order="left_to_right")
    assert masks.shape == (2, 560, 900) and masks.dtype == np.float32
    assert [round(f.center_x) for f in faces] == pytest.approx([LEFT[0], RIGHT[0]], abs=8)
    for mask, own, other in ((masks[0], LEFT, RIGHT), (masks[1], RIGHT, LEFT)):
        core = _inside(*own, masks.shape[1:], scale=0.6)
        assert mask[core].min() > 0.9                          # covers its face
        assert mask[_inside(*other, masks.shape[1:])].max() < 1e-3   # and not the other one
    assert 0.0 <= masks.min() and masks.max() <= 1.0


def test_masks_largest_first_and_none(analyzer, two_faces):
    masks, faces = per_face_masks(two_faces, analyzer=analyzer, order="largest")
    assert faces[0].area > faces[1].area and abs(faces[0].center_x - RIGHT[0]) < 8
    assert masks[0][_inside(*RIGHT, masks.shape[1:], scale=0.6)].min() > 0.9
    empty, none = per_face_masks(A.blank_image(120, 160), analyzer=analyzer)
    assert empty.shape == (0, 120, 160) and none == []
    with pytest.raises(SettingError, match="order"):
        per_face_masks(two_faces, analyzer=analyzer, order="index")


@pytest.mark.parametrize("choice, index", [("largest", 0), ("left_to_right", 0), ("left_to_right", 1),
                                           ("index", 1), ("highest_score", 0)])
def test_report_and_preview_mark_the_face_that_face_choice_takes(analyzer, two_faces, choice, index):
    options = FaceOptions(face_choice=choice, face_index=index)
    report = face_report(two_faces, analyzer=analyzer, options=options)
    taken = choose_face(find_faces_scaled(analyzer, two_faces, det_size=640), choice, index)
    assert report.faces[report.chosen].bbox.tolist() == taken.bbox.tolist()
    assert [label for label, _ in report.crops] == ["CLIP input (ID condition)", "ArcFace input (4x face box)"]
    assert f"#{report.chosen}" in report.text and "<- chosen" in report.text
    preview = analysis_preview(two_faces, report)
    assert preview.shape[0] == 560 and preview.shape[1] > 900
    green = np.all(preview[:, :900] == np.array([40, 230, 90]), axis=-1)
    x1, y1, x2, y2 = (int(round(float(v))) for v in taken.bbox)
    # the green (chosen) box is the taken face's: its left and bottom edges are green, the other's lower half is not
    assert green[y1 + 30:y2 - 5, max(0, x1 - 2):x1 + 3].any(axis=1).mean() > 0.9
    assert green[y2 - 2:y2 + 3, x1 + 5:x2 - 5].any(axis=0).mean() > 0.9
    (other,) = [f for f in report.faces if f is not report.faces[report.chosen]]
    ox1, oy1, ox2, oy2 = (int(round(float(v))) for v in other.bbox)
    assert not green[(oy1 + oy2) // 2:oy2 + 3, ox1 - 2:ox2 + 3].any()


def test_report_when_face_index_is_beyond_the_faces(analyzer, two_faces):
    report = face_report(two_faces, analyzer=analyzer, options=FaceOptions(face_choice="index", face_index=5))
    assert report.chosen is None and len(report.faces) == 2 and report.crops == []
    assert "face_index 5 is out of range" in report.text
    preview = analysis_preview(two_faces, report)
    assert not np.all(preview == np.array([40, 230, 90]), axis=-1).any()
