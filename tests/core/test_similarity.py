"""hyperlora/similarity.py on the hand-made AntelopeV2 models (real insightface, painted stand-in faces).

The stand-in recognition model embeds a face by its pattern of small features (``paint_face`` seed),
so one painted person against itself scores 1 and different seeds score lower.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from hyperlora import pipeline as pl
from hyperlora import similarity as sim
from hyperlora.bundle import identity_from_images
from hyperlora.checkpoint import load_hyper_lora
from hyperlora.errors import FaceNotFoundError, IdentityFileError, SettingError
from hyperlora.faces import preprocess as pp
from hyperlora.faces.analysis import FaceAnalyzer
from hyperlora.faces.options import FaceOptions
from hyperlora.faces.setup import face_models_fingerprint
from hyperlora.identity import Identity, load_identity, mix_identities, save_identity
from tests.fixtures.antelope import RECOGNITION_SEED, blank_image, cached_antelopev2, face_image
from tests.fixtures.clip import TINY as TINY_CLIP
from tests.fixtures.hyperlora_models import TINY, write_hyperlora_folder


@pytest.fixture(scope="module")
def analyzer(cache_dir):
    return FaceAnalyzer(cached_antelopev2(cache_dir), provider="CPU")


@pytest.fixture(autouse=True)
def fresh_cache():
    pl.clear_cache()
    yield
    pl.clear_cache()


def person(seed: int, centre=(260, 230), height=170, size=(480, 520)) -> np.ndarray:
    return face_image(size, [(centre[0], centre[1], height)], seeds=[seed])


def arcface(analyzer, image, face) -> np.ndarray:
    """The reference recipe written out: 4l crop, detection again at 640, L2-normalised embedding."""
    emb = analyzer.embedding(pp.arcface_crop(image, face.landmarks_106))
    return emb / np.linalg.norm(emb)


def test_an_image_scores_1_against_itself_and_other_people_lower(analyzer):
    a, a_moved, b, c = person(1), person(1, centre=(250, 240), height=180), person(2), person(3)
    ref, notes = sim.reference_from_photos([a], analyzer=analyzer)
    assert ref.shape == (512,) and ref.dtype == torch.float32 and abs(float(ref.norm()) - 1) < 1e-6
    assert notes[0].startswith("image 1 of 1: took 1 of 1 face(s)")
    scores = sim.score_images([a, a_moved, b, c], ref, analyzer=analyzer)
    assert scores[0].score == pytest.approx(1.0, abs=1e-5) and scores[0].face == 0 and scores[0].faces == 1
    assert all(s.score is not None for s in scores)
    assert scores[1].score > max(scores[2].score, scores[3].score)      # the same person, moved and larger
    assert max(scores[2].score, scores[3].score) < scores[1].score - 0.02   # stand-ins share a face template: ~0.95
    # the score is the cosine of the reference recipe's embeddings, written out here
    (face,) = analyzer.find_faces(b)
    expected = float(np.dot(arcface(analyzer, b, face), ref.double().numpy()))
    assert scores[2].score == pytest.approx(expected, abs=1e-5)
    np.testing.assert_allclose(scores[2].box, face.bbox, atol=1e-3)


def test_several_reference_photos_give_the_normalised_mean(analyzer):
    a, b = person(1), person(2)
    ref, _ = sim.reference_from_photos([a, b], analyzer=analyzer)
    ea = arcface(analyzer, a, analyzer.find_faces(a)[0])
    eb = arcface(analyzer, b, analyzer.find_faces(b)[0])
    mean = (ea + eb) / np.linalg.norm(ea + eb)
    np.testing.assert_allclose(ref.numpy(), mean, atol=1e-5)


def test_the_best_matching_face_is_scored_and_named_largest_first(analyzer):
    # person 1 small on the left, person 2 large on the right
    group = face_image((400, 720), [(170, 200, 110), (520, 210, 170)], seeds=[1, 2])
    ref1, _ = sim.reference_from_photos([person(1)], analyzer=analyzer)
    ref2, _ = sim.reference_from_photos([person(2)], analyzer=analyzer)
    s1 = sim.score_image(group, ref1, analyzer=analyzer)
    s2 = sim.score_image(group, ref2, analyzer=analyzer)
    assert (s1.faces, s2.faces) == (2, 2)
    assert s1.face == 1 and abs((s1.box[0] + s1.box[2]) / 2 - 170) < 30     # the smaller face: index 1
    assert s2.face == 0 and abs((s2.box[0] + s2.box[2]) / 2 - 520) < 30     # the larger face: index 0
    assert "face 1 of 2, largest first" in s1.label()
    # the best face's score is the maximum over the faces, each embedded by the reference recipe
    faces = sim.image_faces(group, analyzer=analyzer)
    assert [round(f.area) for f, _ in faces] == sorted((round(f.area) for f, _ in faces), reverse=True)
    cosines = [float(np.dot(e / np.linalg.norm(e), ref1.double().numpy())) for _, e in faces]
    assert s1.score == pytest.approx(max(cosines), abs=1e-5)


def test_no_face_is_marked_not_scored(analyzer):
    ref, _ = sim.reference_from_photos([person(1)], analyzer=analyzer)
    empty = sim.score_image(blank_image(300, 300), ref, analyzer=analyzer)
    assert empty.score is None and empty.face is None and empty.faces == 0 and empty.box is None
    assert empty.label() == "no face (the detector found no face)"
    with pytest.raises(FaceNotFoundError, match="No usable face was found in any of the 1 image"):
        sim.reference_from_photos([blank_image(300, 300)], analyzer=analyzer)
    with pytest.raises(FaceNotFoundError, match="No usable face in image\\(s\\) 2 of 2"):
        sim.reference_from_photos([person(1), blank_image(300, 300)], analyzer=analyzer,
                                  options=FaceOptions(no_face="error"))
    with pytest.raises(SettingError, match="non-zero finite ArcFace embedding"):
        sim.score_image(person(1), torch.zeros(512), analyzer=analyzer)


def test_rank_keeps_the_top_k_in_score_order():
    s = [sim.ImageScore(v, 0 if v is not None else None, 1 if v is not None else 0, None) for v in
         (0.2, None, 0.9, 0.5, 0.9, -0.3, None)]
    assert sim.rank(s) == [2, 4, 3, 0, 5, 1, 6]          # ties keep input order, faceless last
    assert sim.rank(s, 2) == [2, 4]
    assert sim.rank(s, 6) == [2, 4, 3, 0, 5, 1]
    assert sim.rank(s, 100) == sim.rank(s)
    for bad in (0, -1, True, 1.5):
        with pytest.raises(SettingError, match="keep at least 1"):
            sim.rank(s, bad)
    assert sim.describe(s, [2, 1]) == "image 3: 0.900 (face 0 of 1, largest first)\nimage 2: no face"


def test_annotate_draws_the_box_and_the_mark():
    img = blank_image(128, 160)
    scored = sim.annotate(img, sim.ImageScore(0.5, 0, 1, (40.0, 30.0, 100.0, 110.0)))
    assert scored.shape == img.shape and scored.dtype == np.uint8
    assert (scored[70, 40] == (40, 220, 40)).all() and (scored[70, 70] == img[70, 70]).all()   # box edge, inside
    assert (scored[3:12, 3:30] != img[3:12, 3:30]).any()                                     # the score text
    none = sim.annotate(img, sim.ImageScore(None, None, 0, None, "x"))
    red = (none[..., 0] > 200) & (none[..., 1] < 80)
    assert red.any() and not red[40:].any()                # "no face" in red at the top, no box
    assert (img == blank_image(128, 160)).all()            # the input is not drawn on


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    preset = dataclasses.replace(TINY, clip_dim=TINY_CLIP["hidden_size"])
    return load_hyper_lora(write_hyperlora_folder(tmp_path_factory.mktemp("sim") / "tiny", preset=preset, seed=5),
                           dtype=torch.float32)


def test_identity_records_the_reference_of_its_photos(analyzer, clip, tiny_model):
    photos = [person(1), person(1, centre=(250, 240), height=180)]
    identity, _cond = identity_from_images(tiny_model, photos, analyzer=analyzer, clip=clip)
    ref, _ = sim.reference_from_photos(photos, analyzer=analyzer)
    assert identity.face_embedding is not None
    torch.testing.assert_close(identity.face_embedding, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(sim.reference_from_identity(identity, analyzer=analyzer), ref, atol=1e-6, rtol=0)
    old = Identity(identity.tokens, None, "m", "f", 1, {})
    with pytest.raises(IdentityFileError, match="saved before HyperLoRA Studio recorded face embeddings; connect "
                                                "reference photos or make the identity again"):
        sim.reference_from_identity(old, analyzer=analyzer)


# ----------------------------------------------------------------------------- face models of the identity


@pytest.fixture(scope="module")
def other_analyzer(cache_dir):
    """A second face pack: the same detector and landmarks, another recognition model."""
    return FaceAnalyzer(cached_antelopev2(cache_dir, recognition_seed=RECOGNITION_SEED + 1), provider="CPU")


def test_the_face_models_fingerprint_names_the_files(analyzer, other_analyzer, tmp_path):
    assert len(analyzer.fingerprint) == 16 and analyzer.fingerprint != other_analyzer.fingerprint
    copy = tmp_path / "antelopev2"
    copy.mkdir()
    for f in analyzer.model_dir.iterdir():
        if f.suffix == ".onnx":
            (copy / f.name).write_bytes(f.read_bytes())
    assert face_models_fingerprint(copy) == analyzer.fingerprint          # the files count, not where they are
    data = bytearray((copy / "glintr100.onnx").read_bytes())
    data[-1] ^= 1
    (copy / "glintr100.onnx").write_bytes(bytes(data))
    assert face_models_fingerprint(copy) != analyzer.fingerprint          # one changed byte


def test_scoring_refuses_an_identity_made_with_other_face_models(analyzer, other_analyzer, clip, tiny_model,
                                                                  tmp_path, caplog):
    photo = person(1)
    identity, _ = identity_from_images(tiny_model, [photo], analyzer=analyzer, clip=clip)
    assert identity.face_models == analyzer.fingerprint
    # the problem: the other pack's embedding of the very same photo is unrelated to the identity's
    wrong = sim.score_image(photo, identity.face_embedding, analyzer=other_analyzer)
    assert wrong.score is not None and wrong.score < 0.5
    with pytest.raises(IdentityFileError, match=f"other face models .*{identity.face_models}.*"
                                                f"{other_analyzer.fingerprint}.*reference_images"):
        sim.reference_from_identity(identity, analyzer=other_analyzer)
    ref = sim.reference_from_identity(identity, analyzer=analyzer)
    assert sim.score_image(photo, ref, analyzer=analyzer).score == pytest.approx(1.0, abs=1e-5)
    # saved and loaded, the identity still knows its face models
    save_identity(identity, tmp_path / "me.safetensors")
    loaded = load_identity(tmp_path / "me.safetensors")
    assert loaded.face_models == analyzer.fingerprint
    with pytest.raises(IdentityFileError, match="other face models"):
        sim.reference_from_identity(loaded, analyzer=other_analyzer)
    # an identity that does not record them (saved before) is scored, with a warning
    old = dataclasses.replace(identity, face_models="")
    save_identity(old, tmp_path / "old.safetensors")
    assert load_identity(tmp_path / "old.safetensors").face_models == ""
    with caplog.at_level("WARNING"):
        torch.testing.assert_close(sim.reference_from_identity(old, analyzer=other_analyzer), ref)
    assert "does not record which face models" in caplog.text
    # a mix keeps the fingerprint of its parts; parts of different face models leave no face embedding
    same = mix_identities([identity, identity], [0.5, 0.5])
    assert same.face_models == analyzer.fingerprint and same.face_embedding is not None
    other = dataclasses.replace(identity, face_models=other_analyzer.fingerprint)
    mixed = mix_identities([identity, other], [0.5, 0.5])
    assert mixed.face_embedding is None and mixed.face_models == ""
