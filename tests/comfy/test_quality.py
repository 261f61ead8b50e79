"""Face Similarity and Best of N inside ComfyUI (this process, the pack loaded by ComfyUI's loader):
real IMAGE batches of painted stand-in faces and the astronaut photo, the fake AntelopeV2 pack."""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import pytest
import torch

from tests.comfy.models import ANTELOPE, CLIP_FOLDER, SMALL_MODEL, astronaut
from tests.fixtures.antelope import RECOGNITION_SEED, blank_image, cached_antelopev2, face_image

pytestmark = pytest.mark.comfy

FACE = dict(face_choice="largest", face_index=0, det_size="640")


def batch(*arrays: np.ndarray) -> torch.Tensor:
    return torch.stack([torch.from_numpy(a.copy()).float().div(255.0) for a in arrays])


def person(seed: int) -> np.ndarray:
    return face_image((256, 256), [(128, 120, 120)], seeds=[seed])


@pytest.fixture(scope="module")
def small(pack) -> Any:
    handle, _info = pack.nodes["HyperLoRAStudioLoader"]().load(model=SMALL_MODEL, clip_vision=CLIP_FOLDER,
                                                          insightface=ANTELOPE, dtype="fp32", provider="CPU")
    return handle


def test_similarity_of_a_photo_to_itself_and_no_face(pack, small):
    node = pack.nodes["HyperLoRAStudioFaceSimilarity"]()
    photo = batch(astronaut())
    images = batch(astronaut(), blank_image(512, 512))
    scores, report, annotated = node.run(small, images, reference_images=photo, **FACE)
    assert len(scores) == 2 and scores[0] == pytest.approx(1.0, abs=1e-4) and math.isnan(scores[1])
    assert report.splitlines()[1].startswith("image 1: 1.000 (face 0 of 1, largest first)")
    assert report.splitlines()[2] == "image 2: no face (the detector found no face)"
    assert annotated.shape == images.shape and not torch.equal(annotated, images)
    # the identity made from the same photo carries the same reference
    identity, _ = pack.nodes["HyperLoRAStudioIdentityFromImages"]().run(small, photo, remove_background=True,
                                                                        grayscale=False, no_face="skip", **FACE)
    by_identity, report2, _ = node.run(small, images, identity=identity, **FACE)
    assert by_identity[0] == pytest.approx(1.0, abs=1e-4) and math.isnan(by_identity[1])
    assert report2.startswith("reference: the identity (1 photo(s))")


def test_similarity_refuses_old_identities_and_a_missing_reference(pack, small):
    node = pack.nodes["HyperLoRAStudioFaceSimilarity"]()
    identity, _ = pack.nodes["HyperLoRAStudioIdentityFromImages"]().run(
        small, batch(astronaut()), remove_background=True, grayscale=False, no_face="skip", **FACE)
    identity.face_embedding = None          # as loaded from an identity file of format version 1
    with pytest.raises(pack.errors.IdentityFileError, match="saved before HyperLoRA Studio recorded face embeddings"):
        node.run(small, batch(astronaut()), identity=identity, **FACE)
    with pytest.raises(pack.errors.SettingError, match="Connect the person to compare with"):
        node.run(small, batch(astronaut()), **FACE)


OTHER_ANTELOPE = "antelopev2_other"
"""A second face pack, only while the test below runs (the Loader's list is scanned on every call)."""


@pytest.fixture(scope="module")
def other_faces(pack, cache_dir) -> Any:
    """A Loader on another AntelopeV2 pack: the same detector and landmarks, another recognition model."""
    link = pack.base.models / "insightface" / "models" / OTHER_ANTELOPE
    os.symlink(cached_antelopev2(cache_dir, recognition_seed=RECOGNITION_SEED + 1), link)
    try:
        handle, _info = pack.nodes["HyperLoRAStudioLoader"]().load(model=SMALL_MODEL, clip_vision=CLIP_FOLDER,
                                                                   insightface=OTHER_ANTELOPE, dtype="fp32",
                                                                   provider="CPU")
        yield handle
    finally:
        link.unlink()


def test_scoring_refuses_an_identity_made_with_other_face_models(pack, small, other_faces):
    photo = batch(astronaut())
    made, _ = pack.nodes["HyperLoRAStudioIdentityFromImages"]().run(small, photo, remove_background=True,
                                                                    grayscale=False, no_face="skip", **FACE)
    saved = pack.nodes["HyperLoRAStudioSaveIdentity"]().run(made, "faces_check")
    name = saved["ui"]["hyper_lora_files"][0]["load_name"]
    (identity,) = pack.nodes["HyperLoRAStudioLoadIdentity"]().run(name)
    assert identity.face_models == made.face_models == small.analyzer().fingerprint != other_faces.analyzer().fingerprint
    similarity, best = pack.nodes["HyperLoRAStudioFaceSimilarity"](), pack.nodes["HyperLoRAStudioBestOfN"]()
    with pytest.raises(pack.errors.IdentityFileError, match="other face models"):
        similarity.run(other_faces, photo, identity=identity, **FACE)
    with pytest.raises(pack.errors.IdentityFileError, match=f"{identity.face_models}.*reference_images"):
        best.run(other_faces, photo, 1, identity=identity, **FACE)
    # the Loader it was made with scores it 1; the other one scores the photos themselves 1
    scores, _, _ = similarity.run(small, photo, identity=identity, **FACE)
    assert scores[0] == pytest.approx(1.0, abs=1e-4)
    scores, _, _ = similarity.run(other_faces, photo, reference_images=photo, **FACE)
    assert scores[0] == pytest.approx(1.0, abs=1e-4)
    # the reason for refusing: the other pack's embedding of the same photo is unrelated to the identity's
    unchecked = pack.core("similarity").score_image(astronaut(), identity.face_embedding, analyzer=other_faces.analyzer())
    assert unchecked.score is not None and unchecked.score < 0.5


def test_best_of_n_keeps_exactly_the_top_k_in_score_order(pack, small):
    sim_node = pack.nodes["HyperLoRAStudioFaceSimilarity"]()
    best = pack.nodes["HyperLoRAStudioBestOfN"]()
    reference = batch(person(1))
    arrays = [person(2), blank_image(256, 256), person(1), person(3), person(4)]
    images = batch(*arrays)
    all_scores, _, _ = sim_node.run(small, images, reference_images=reference, **FACE)
    expected = sorted((i for i in range(5) if not math.isnan(all_scores[i])), key=lambda i: -all_scores[i])
    assert expected[0] == 2 and 1 not in expected
    for keep in (1, 2, 4):
        [kept], scores, report = best.run(small, images, keep, reference_images=reference, **FACE)
        assert kept.shape[0] == keep == len(scores)
        for rank, i in enumerate(expected[:keep]):
            assert torch.equal(kept[rank], images[i])
            assert scores[rank] == all_scores[i]
        assert scores == sorted(scores, reverse=True)
        assert report.count("\nkept ") == keep
    # more than there are faces: the faceless image comes last, marked NaN
    [kept], scores, _ = best.run(small, images, 9, reference_images=reference, **FACE)
    assert kept.shape[0] == 5 and torch.equal(kept[4], images[1]) and math.isnan(scores[4])
