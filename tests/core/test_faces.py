"""FaceAnalyzer with the real insightface and the hand-weighted AntelopeV2 fixture.

The fixture detector finds skin-coloured blobs 40-290 px tall (in detector-input pixels) that do
not touch the frame (see tests/fixtures/antelope.py), so which detector size and whether padding
was used can be read off the result.

Runs against whichever insightface is importable; to check 0.7.3 next to an installed 2.x, install
0.7.3 into a separate directory (``pip install --no-deps --target DIR insightface==0.7.3`` plus its
import-time deps albumentations, matplotlib) and run with ``PYTHONPATH=DIR``.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("insightface", reason="insightface is not installed")
# the raw insightface reference calls below hit a scikit-image deprecation inside insightface
pytestmark = pytest.mark.filterwarnings("ignore:`estimate` is deprecated:FutureWarning")

from hyperlora.errors import FaceNotFoundError, ImageInputError, ModelFileError, SettingError  # noqa: E402
from hyperlora.faces.analysis import DetectedFace, FaceAnalyzer, choose_face, order_faces  # noqa: E402
from hyperlora.faces.options import DETECTION_SIZES, check_det_size, retry_sizes  # noqa: E402
from tests.core.ref_hyperlora import arcface_crop as ref_arcface_crop  # noqa: E402
from tests.fixtures import antelope as A  # noqa: E402


@pytest.fixture(scope="module")
def analyzer(cache_dir) -> FaceAnalyzer:
    return FaceAnalyzer(A.cached_antelopev2(cache_dir), provider="CPU")


@pytest.fixture(scope="module")
def insight(cache_dir):
    """The raw insightface models (reference path, not our code)."""
    from insightface.model_zoo import get_model

    folder = A.cached_antelopev2(cache_dir)
    models = {}
    for name in (A.DETECTOR_FILE, A.LANDMARK_FILE, A.RECOGNITION_FILE):
        m = get_model(str(folder / name), providers=["CPUExecutionProvider"])
        m.prepare(0, det_thresh=0.5, input_size=(640, 640)) if m.taskname == "detection" else m.prepare(0)
        models[m.taskname] = m
    return models


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    from skimage import data

    return data.astronaut()


def _bgr(img: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(img[..., ::-1])


def _ellipse_box(cx: float, cy: float, height: float) -> np.ndarray:
    return np.array([cx - 0.4 * height, cy - 0.5 * height, cx + 0.4 * height, cy + 0.5 * height])


# ----------------------------------------------------------------------------- basics


def test_loads_only_three_models(analyzer):
    assert analyzer._det.taskname == "detection"
    assert analyzer._lmk.taskname == "landmark_2d_106"
    assert analyzer._rec.taskname == "recognition"
    assert analyzer.providers == ["CPUExecutionProvider"]
    assert analyzer.model_dir.name == "antelopev2"


def test_astronaut_face(analyzer, astronaut):
    analyzer.stats.reset()
    faces = analyzer.find_faces(astronaut)
    assert len(faces) == 1
    f = faces[0]
    # the face of skimage's astronaut: about x 170-265, y 60-195 (skin from forehead to chin)
    x1, y1, x2, y2 = f.bbox
    assert 160 < x1 < 190 and 245 < x2 < 270 and 55 < y1 < 85 and 170 < y2 < 200
    assert f.det_size == 640 and not f.padded and 0.5 <= f.score <= 1.0
    assert f.landmarks_106.shape == (106, 2) and f.landmarks_106.dtype == np.float32
    assert f.kps.shape == (5, 2)
    assert f.embedding is None
    # landmarks lie on the face
    assert np.all(f.landmarks_106.min(0) > [150, 40]) and np.all(f.landmarks_106.max(0) < [280, 210])
    assert analyzer.stats.as_dict() == {"detector_runs": 1, "landmark_runs": 1, "recognition_runs": 0,
                                        "padded_runs": 0, "model_runs": 2, "det_sizes": [640]}


def test_detect_matches_raw_insightface(analyzer, insight, astronaut):
    faces = analyzer.detect(astronaut, det_size=640, with_embedding=True)
    bgr = _bgr(astronaut)
    boxes, kpss = insight["detection"].detect(bgr, input_size=(640, 640))
    assert len(faces) == len(boxes) == 1
    np.testing.assert_allclose(faces[0].bbox, boxes[0, :4], atol=1e-4)
    np.testing.assert_allclose(faces[0].kps, kpss[0], atol=1e-4)
    from insightface.app.common import Face

    ref = Face(bbox=boxes[0, :4], kps=kpss[0], det_score=boxes[0, 4])
    insight["landmark_2d_106"].get(bgr, ref)
    insight["recognition"].get(bgr, ref)
    np.testing.assert_allclose(faces[0].landmarks_106, ref.landmark_2d_106, atol=1e-4)
    np.testing.assert_allclose(faces[0].embedding, ref.normed_embedding, atol=1e-5)


def test_no_face_gives_empty_list(analyzer):
    analyzer.stats.reset()
    assert analyzer.find_faces(A.blank_image(300, 400)) == []
    # every size on the image, then every size on the padded image; no landmark runs
    assert analyzer.stats.det_sizes == list(DETECTION_SIZES) * 2
    assert analyzer.stats.padded_runs == 4 and analyzer.stats.landmark_runs == 0
    assert analyzer.find_faces(A.blank_image(300, 400), pad=False) == []
    assert analyzer.detect(A.blank_image(64, 64)) == []
    assert analyzer.embedding(A.blank_image(200, 200)) is None


# ----------------------------------------------------------------------------- retry sizes


def test_face_found_only_at_384(analyzer):
    img = A.face_image((1024, 1024), [(512, 500, 660)])
    # at 640 and 512 the face is 412 / 330 px in the detector input: too big for the detector
    assert analyzer.detect(img, det_size=640) == []
    assert analyzer.detect(img, det_size=512) == []
    analyzer.stats.reset()
    faces = analyzer.find_faces(img)
    assert len(faces) == 1 and faces[0].det_size == 384 and not faces[0].padded
    assert analyzer.stats.det_sizes == [640, 512, 384]
    np.testing.assert_allclose(faces[0].bbox, _ellipse_box(512, 500, 660), atol=12)


def test_face_found_only_at_256(analyzer):
    img = A.face_image((1024, 1024), [(512, 512, 900)])
    analyzer.stats.reset()
    faces = analyzer.find_faces(img)
    assert len(faces) == 1 and faces[0].det_size == 256
    assert analyzer.stats.det_sizes == [640, 512, 384, 256] and analyzer.stats.padded_runs == 0


def test_size_really_changes_the_detector_input(analyzer):
    """insightface 2.x builds one fixed-shape session per input size: the sizes we asked for exist."""
    img = A.face_image((1024, 1024), [(512, 500, 660)])
    analyzer.find_faces(img)
    sessions = getattr(analyzer._det, "resolution_session_input_sizes", None)
    if sessions is None:
        pytest.skip("insightface 0.7.3 has one dynamic session; the 384-only face above covers it")
    assert {(640, 640), (512, 512), (384, 384)} <= set(sessions)


def test_released_style_retry_stays_at_640_in_insightface_2(analyzer, insight):
    """The pitfall: changing the detector size after prepare() (as the released retry does) has no
    effect in insightface 2.x (it works in 0.7.3); our per-call size works in both."""
    det = insight["detection"]
    img = A.face_image((1024, 1024), [(512, 500, 660)])
    bgr = _bgr(img)
    found = []
    for size in DETECTION_SIZES:
        det.input_size = (size, size)  # the released way
        found.append(len(det.detect(bgr)[0]))
    det.input_size = (640, 640)
    if analyzer.insightface_major >= 1:
        assert found == [0, 0, 0, 0]  # silently stayed at 640
    else:
        assert found == [0, 0, 1, 1]
    faces = analyzer.find_faces(img, pad=False)
    assert len(faces) == 1 and faces[0].det_size == 384


def test_user_set_detector_size(analyzer):
    img = A.face_image((1024, 1024), [(512, 500, 660)])
    analyzer.stats.reset()
    faces = analyzer.find_faces(img, det_sizes=(384,))
    assert faces and analyzer.stats.det_sizes == [384]
    analyzer.stats.reset()
    assert analyzer.find_faces(img, det_sizes=(640,), pad=False) == []
    assert analyzer.stats.det_sizes == [640]
    # a small face in a big photo is found at a bigger size only
    img = A.face_image((2048, 2048), [(1000, 1000, 100)])
    assert analyzer.detect(img, det_size=640) == []  # 31 px in the detector input: too small
    faces = analyzer.find_faces(img, det_sizes=retry_sizes(1024), pad=False)
    assert len(faces) == 1 and faces[0].det_size == 1024


def test_retry_sizes_and_det_size_checks():
    assert retry_sizes(640) == DETECTION_SIZES == (640, 512, 384, 256)
    assert retry_sizes(1024) == (1024, 640, 512, 384, 256)
    assert retry_sizes(448) == (448, 384, 256)
    assert check_det_size(256) == 256
    for bad in (600, 64, 4096, "640", 640.5):
        with pytest.raises(SettingError, match="multiple of 32 between 128 and 2048"):
            check_det_size(bad)


# ----------------------------------------------------------------------------- padding


def test_padding_rescues_a_face_that_fills_the_frame(analyzer, insight):
    img = A.face_image((512, 512), [(256, 256, 560)])  # cut by the frame on top and bottom
    assert analyzer.find_faces(img, pad=False) == []
    analyzer.stats.reset()
    faces = analyzer.find_faces(img)
    assert len(faces) == 1
    f = faces[0]
    assert f.padded and f.det_size == 512
    assert analyzer.stats.padded_runs == 2 and analyzer.stats.det_sizes == [640, 512, 384, 256, 640, 512]
    # the visible face is x 32..480 and y 0..512; its box is in original pixels
    x1, y1, x2, y2 = f.bbox
    assert abs(x1 - 32) < 12 and abs(x2 - 480) < 12 and -40 < y1 < 10 and 500 < y2 < 550
    # independent reference: pad by hand, run raw insightface, shift back
    border = 256
    padded = np.zeros((1024, 1024, 3), np.uint8)
    padded[border:border + 512, border:border + 512] = img
    boxes, kpss = insight["detection"].detect(_bgr(padded), input_size=(512, 512))
    np.testing.assert_allclose(f.bbox, boxes[0, :4] - border, atol=1e-3)
    np.testing.assert_allclose(f.kps, kpss[0] - border, atol=1e-3)
    from insightface.app.common import Face

    ref = Face(bbox=boxes[0, :4], kps=kpss[0], det_score=boxes[0, 4])
    lmk = insight["landmark_2d_106"].get(_bgr(padded), ref)
    np.testing.assert_allclose(f.landmarks_106, lmk - border, atol=1e-2)


def test_padding_of_a_big_photo_maps_back(analyzer):
    # a 2000 px close-up: shrunk to 1280 before padding, coordinates scaled back
    img = A.face_image((2000, 1600), [(800, 1000, 2200)])
    faces = analyzer.find_faces(img)
    assert len(faces) == 1 and faces[0].padded
    x1, y1, x2, y2 = faces[0].bbox
    assert abs(x1 - (800 - 880)) < 40 and abs(x2 - (800 + 880)) < 40  # ellipse 1760 px wide, clipped at 0 / 1600
    assert faces[0].landmarks_106[:, 0].mean() == pytest.approx(800, abs=60)


# ----------------------------------------------------------------------------- face choice


@pytest.fixture(scope="module")
def two_faces(analyzer):
    # small face on the left, big face on the right
    img = A.face_image((600, 900), [(200, 300, 120), (620, 300, 220)], seeds=[1, 2])
    faces = analyzer.find_faces(img)
    assert len(faces) == 2
    return img, faces


def test_choose_largest(two_faces):
    _, faces = two_faces
    f = choose_face(faces, "largest")
    assert f.center_x == pytest.approx(620, abs=6)
    assert choose_face(faces, "largest", 5) is f  # index ignored


def test_choose_by_index(two_faces):
    _, faces = two_faces
    assert choose_face(faces, "index", 0).center_x == pytest.approx(620, abs=6)
    assert choose_face(faces, "index", 1).center_x == pytest.approx(200, abs=6)


def test_choose_left_to_right(two_faces):
    _, faces = two_faces
    assert choose_face(faces, "left_to_right", 0).center_x == pytest.approx(200, abs=6)
    assert choose_face(faces, "left_to_right", 1).center_x == pytest.approx(620, abs=6)
    assert [f.center_x for f in order_faces(faces, "left_to_right")] == sorted(f.center_x for f in faces)


def test_choose_highest_score_follows_detector_order(two_faces):
    """'highest_score' = the released plugin's pick (insightface's first face), whatever its size."""
    import dataclasses

    _, faces = two_faces
    small, big = sorted(faces, key=lambda f: f.area)
    # make the smaller face the surer one: highest_score must follow the score, largest the area
    rescored = [dataclasses.replace(small, score=0.99), dataclasses.replace(big, score=0.60)]
    assert choose_face(rescored, "highest_score") is rescored[0]
    assert choose_face(rescored, "largest") is rescored[1]
    assert [f.score for f in order_faces(rescored, "highest_score")] == [0.99, 0.60]
    assert choose_face(rescored, "highest_score", 5) is rescored[0]  # index ignored


def test_embedding_choice_in_a_two_face_crop(analyzer, two_faces):
    """embedding(choice=...) embeds the largest face by default, the surest one with 'highest_score'."""
    img, _ = two_faces
    faces = analyzer.detect(img, det_size=640, with_embedding=True)
    assert len(faces) == 2
    largest = max(faces, key=lambda f: f.area)
    surest = max(faces, key=lambda f: f.score)
    assert surest is not largest  # the fixture's small face is the surer one, so the two choices differ
    np.testing.assert_allclose(analyzer.embedding(img), largest.embedding, atol=1e-5)
    np.testing.assert_allclose(analyzer.embedding(img, choice="highest_score"), surest.embedding, atol=1e-5)


@pytest.mark.parametrize("shape,size", [((1, 1568, 3), 1568), ((1568, 1, 3), 1568), ((1, 3000, 3), 640)])
def test_extremely_thin_image_finds_nothing_instead_of_crashing(analyzer, shape, size):
    """insightface rejects a resized side of 0 px; our pre-check must use its exact arithmetic."""
    assert analyzer.detect(np.zeros(shape, np.uint8), det_size=size) == []


def test_index_out_of_range(two_faces):
    _, faces = two_faces
    with pytest.raises(SettingError, match=r"face_index 2 is out of range: 2 face\(s\) were found \(valid: 0 to 1"):
        choose_face(faces, "index", 2)
    with pytest.raises(SettingError, match="counted from the left"):
        choose_face(faces, "left_to_right", 7)
    with pytest.raises(SettingError, match="out of range"):
        choose_face(faces, "index", -1)
    with pytest.raises(FaceNotFoundError, match="No face was found"):
        choose_face([], "largest")
    with pytest.raises(SettingError, match="face_choice is 'biggest'"):
        choose_face(faces, "biggest")


def test_describe(two_faces):
    _, faces = two_faces
    f = choose_face(faces)
    x1, y1, x2, y2 = (int(round(float(v))) for v in f.bbox)
    assert abs(x1 - 532) <= 6 and abs(x2 - 708) <= 8  # ellipse 176 px wide around x = 620
    assert f.describe() == f"face at ({x1}, {y1})-({x2}, {y2}), score {f.score:.2f}, det size 640"


# ----------------------------------------------------------------------------- embeddings


def test_embedding_is_normalised_and_matches_reference(analyzer, insight, astronaut):
    face = analyzer.find_faces(astronaut)[0]
    crop = ref_arcface_crop(astronaut, face.landmarks_106)
    analyzer.stats.reset()
    emb = analyzer.embedding(crop)
    assert emb is not None and emb.shape == (512,) and emb.dtype == np.float32
    assert abs(float(np.linalg.norm(emb.astype(np.float64))) - 1.0) < 1e-5
    # one detector pass at 640, one recognition run, no landmarks
    assert analyzer.stats.as_dict() == {"detector_runs": 1, "landmark_runs": 0, "recognition_runs": 1,
                                        "padded_runs": 0, "model_runs": 2, "det_sizes": [640]}
    # reference: raw insightface detection at 640 on the crop, largest face, normed embedding
    from insightface.app.common import Face

    boxes, kpss = insight["detection"].detect(_bgr(crop), input_size=(640, 640))
    i = int(np.argmax((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])))
    ref = Face(bbox=boxes[i, :4], kps=kpss[i], det_score=boxes[i, 4])
    insight["recognition"].get(_bgr(crop), ref)
    np.testing.assert_allclose(emb, ref.normed_embedding, atol=1e-5)


def test_embedding_takes_the_largest_face(analyzer, two_faces):
    img, faces = two_faces
    emb = analyzer.embedding(img)
    big = choose_face(faces, "largest")
    small = choose_face(faces, "index", 1)
    with_emb = {round(f.center_x): f.embedding for f in analyzer.detect(img, with_embedding=True)}
    np.testing.assert_allclose(emb, with_emb[round(big.center_x)], atol=1e-6)
    assert float(emb @ with_emb[round(small.center_x)]) < 0.99


def test_different_people_different_embeddings_same_person_similar(analyzer):
    def emb(seed, cx, cy, height, size=(700, 700)):
        img = A.face_image(size, [(cx, cy, height)], seeds=[seed])
        return analyzer.find_faces(img, with_embedding=True)[0].embedding

    a1, a2 = emb(11, 350, 350, 250), emb(11, 300, 380, 250)  # same person, moved
    b = emb(12, 350, 350, 250)
    for e in (a1, a2, b):
        assert abs(float(np.linalg.norm(e.astype(np.float64))) - 1.0) < 1e-5
    assert float(a1 @ a2) > 0.98
    assert float(a1 @ b) < float(a1 @ a2) - 0.02
    assert not np.allclose(a1, b, atol=1e-3)


def test_embedding_does_not_retry_smaller_sizes(analyzer):
    img = A.face_image((1024, 1024), [(512, 500, 660)])  # not found at 640, found at 384 (find_faces)
    analyzer.stats.reset()
    assert analyzer.embedding(img) is None  # released behaviour: one pass at 640, no retry, no padding
    assert analyzer.stats.det_sizes == [640]
    assert analyzer.find_faces(img, det_sizes=(512, 384)) != []


# ----------------------------------------------------------------------------- inputs


@pytest.mark.parametrize(
    "image, shape_text",
    [
        (np.zeros((64, 64), np.uint8), "(64, 64)"),
        (np.zeros((64, 64, 1), np.uint8), "(64, 64, 1)"),
        (np.zeros((64, 64, 4), np.uint8), "(64, 64, 4)"),
        (np.zeros((1, 64, 64, 3), np.uint8), "(1, 64, 64, 3)"),
        (np.zeros((64, 64, 3), np.float32), "float32"),
        (np.zeros((0, 64, 3), np.uint8), "(0, 64, 3)"),
    ],
)
def test_bad_images_are_rejected_with_their_shape(analyzer, image, shape_text):
    for call in (analyzer.find_faces, analyzer.detect, analyzer.embedding):
        with pytest.raises(ImageInputError) as err:
            call(image)
        assert shape_text in str(err.value) and "uint8 RGB" in str(err.value)


def test_non_array_is_rejected(analyzer):
    with pytest.raises(ImageInputError, match="got list"):
        analyzer.find_faces([[0, 0, 0]])


def test_tiny_and_extreme_images(analyzer):
    assert analyzer.find_faces(A.blank_image(4, 4)) == []
    assert analyzer.find_faces(A.blank_image(1, 1)) == []
    assert analyzer.find_faces(A.blank_image(1, 3000)) == []  # 640 px wide, 0 px tall after resize
    assert analyzer.embedding(A.blank_image(2, 1)) is None


def test_4k_photo(analyzer):
    img = A.face_image((2160, 3840), [(1900, 1000, 600)])
    faces = analyzer.find_faces(img)
    assert len(faces) == 1 and faces[0].det_size == 640 and not faces[0].padded
    np.testing.assert_allclose(faces[0].bbox, _ellipse_box(1900, 1000, 600), atol=25)


def test_damaged_model_file_is_reported(tmp_path):
    folder = A.make_antelopev2(tmp_path / "antelopev2", extras=False)
    (folder / A.LANDMARK_FILE).write_bytes(b"not an onnx file")
    with pytest.raises(ModelFileError, match=r"could not load .*2d106det\.onnx.*download the AntelopeV2 pack again"):
        FaceAnalyzer(folder, provider="CPU")


def test_swapped_model_file_is_reported(tmp_path):
    folder = A.make_antelopev2(tmp_path / "antelopev2", extras=False)
    (folder / A.LANDMARK_FILE).write_bytes((folder / A.RECOGNITION_FILE).read_bytes())
    with pytest.raises(ModelFileError, match=r"2d106det\.onnx is not the landmark_2d_106 model .*read it as recognition"):
        FaceAnalyzer(folder, provider="CPU")


def test_nested_folder_loads(tmp_path):
    outer = tmp_path / "antelopev2"
    A.make_antelopev2(outer, nested=True, extras=False)
    fa = FaceAnalyzer(outer, provider="auto")
    assert fa.model_dir == outer / "antelopev2"
    assert fa.providers[-1] == "CPUExecutionProvider"


def test_detected_face_area_and_center():
    f = DetectedFace(bbox=np.array([10, 20, 50, 100], np.float32), kps=np.zeros((5, 2), np.float32), score=0.9,
                     landmarks_106=np.zeros((106, 2), np.float32))
    assert f.area == 40 * 80 and f.center_x == 30 and f.embedding is None and f.det_size == 640
