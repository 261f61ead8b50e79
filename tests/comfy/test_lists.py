"""Lists of photos through ComfyUI's own node mapping (execution._async_map_node_over_list), in this
process: mixed sizes are one set of photos for the identity nodes, one mask per photo for Face Mask."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch

from tests.comfy.models import FACE, astronaut

pytestmark = pytest.mark.comfy

@pytest.fixture(scope="module")
def photos() -> list[torch.Tensor]:
    """The astronaut at 512 px and a 400x300 crop of it: one person, two sizes (a list, not a batch)."""
    full = torch.from_numpy(astronaut()).float().div(255.0)[None]
    return [full, full[:, 0:400, 40:340, :].contiguous()]


def run_as_comfyui(cls: type, inputs: dict[str, Any]) -> list[Any]:
    """Call a node the way ComfyUI's executor does for linked list outputs (every input a list)."""
    import execution

    async def go() -> list[Any]:
        results = await execution._async_map_node_over_list("p", "n", cls(), inputs, cls.FUNCTION)
        return await execution.resolve_map_node_over_list_results(results)

    return asyncio.run(go())


def test_a_mixed_size_list_is_one_identity(pack, small, photos):
    cls = pack.nodes["HyperLoRAStudioIdentityFromImages"]
    results = run_as_comfyui(cls, {"hyper_lora": [small], "images": photos, **{k: [v] for k, v in FACE.items()}})
    assert len(results) == 1                          # one call: one identity, not one per photo
    identity, crops = results[0]
    assert identity.num_images == 2 and crops.shape[0] == 2
    one, _ = cls().run(small, photos[0], **FACE)
    assert not torch.allclose(identity.tokens, one.tokens)   # the second photo counts


def test_apply_from_images_takes_the_list_and_refuses_different_settings(pack, small, photos):
    cls = pack.nodes["HyperLoRAStudioApplyFromImages"]
    inputs = {"model": [object()], "hyper_lora": [small], "images": photos, "strength": [0.8, 0.9],
              **{k: [v] for k, v in FACE.items()}}
    with pytest.raises(pack.errors.SettingError, match="the input 'strength' got 2 different values from a list"):
        run_as_comfyui(cls, inputs)


def test_face_mask_gives_one_mask_per_photo_in_its_size(pack, small, photos):
    cls = pack.nodes["HyperLoRAStudioFaceMask"]
    inputs = {"hyper_lora": [small], "images": photos, "face_choice": ["largest"], "face_index": [0], "grow": [1.3],
              "feather": [8], "no_face": ["skip"], "det_size": ["640"]}
    [(masks,)] = run_as_comfyui(cls, inputs)
    assert [tuple(m.shape) for m in masks] == [(1, 512, 512), (1, 400, 300)]
    assert all(float(m.max()) == 1.0 for m in masks)


SCORE = {"face_choice": ["largest"], "face_index": [0], "det_size": ["640"]}


def test_best_of_n_ranks_a_mixed_size_list_as_one_set(pack, small, photos):
    """keep=1 of a list of two images (two sizes) is one image, not one per list item; keep=2 gives both,
    most alike first, each in its own size (a batch needs one size)."""
    cls = pack.nodes["HyperLoRAStudioBestOfN"]
    inputs = {"hyper_lora": [small], "images": photos, "reference_images": [photos[0]], **SCORE}
    [(kept, scores, report)] = run_as_comfyui(cls, {**inputs, "keep": [1]})      # one call for the whole list
    assert len(kept) == 1 and tuple(kept[0].shape) == (1, 512, 512, 3) and torch.equal(kept[0], photos[0])
    assert len(scores) == 1 and scores[0] == pytest.approx(1.0, abs=1e-4)
    assert report.splitlines()[0] == "reference: 1 photo(s); kept 1 of 2"
    [(kept, scores, _)] = run_as_comfyui(cls, {**inputs, "keep": [2]})
    assert [tuple(k.shape) for k in kept] == [(1, 512, 512, 3), (1, 400, 300, 3)]
    assert torch.equal(kept[1], photos[1]) and scores[0] >= scores[1]


def test_face_similarity_gives_each_image_one_score_against_a_mixed_size_reference_list(pack, small, photos):
    cls = pack.nodes["HyperLoRAStudioFaceSimilarity"]
    inputs = {"hyper_lora": [small], "images": [photos[0]], "reference_images": photos, **SCORE}
    [(scores, report, annotated)] = run_as_comfyui(cls, inputs)        # one reference from both photos
    assert len(scores) == 1 and -1.0 <= scores[0] <= 1.0 + 1e-4          # one score, a cosine
    assert report.startswith("reference: 2 photo(s)\nimage 1: ")
    assert tuple(annotated.shape) == (1, 512, 512, 3)
    [(scores, report, annotated)] = run_as_comfyui(cls, {**inputs, "images": photos, "reference_images": [photos[0]]})
    assert len(scores) == 2 and scores[0] == pytest.approx(1.0, abs=1e-4) and len(report.splitlines()) == 3
    assert tuple(annotated.shape) == (2, 512, 512, 3)                  # two sizes: scaled to one batch


def test_a_list_of_too_many_photos_is_refused_before_any_is_converted(pack, small):
    """10,000 photos used to be converted up front (RSS 1 -> 9.3 GB, kept); past MAX_PHOTOS the node says
    why before converting or analysing any."""
    import time

    limit = pack.core("identity").MAX_PHOTOS
    cls = pack.nodes["HyperLoRAStudioIdentityFromImages"]
    tiny = [torch.zeros(1, 8, 8, 3)] * (limit + 1)
    started = time.monotonic()
    with pytest.raises(pack.errors.ImageInputError, match=f"Got {limit + 1} photos; one identity is made from at "
                                                          f"most {limit}. It is the mean"):
        run_as_comfyui(cls, {"hyper_lora": [small], "images": tiny, **{k: [v] for k, v in FACE.items()}})
    with pytest.raises(pack.errors.ImageInputError, match=f"Got {limit + 1} photos"):
        cls().run(small, torch.zeros(limit + 1, 8, 8, 3), **FACE)              # one batch: the same limit
    assert time.monotonic() - started < 5.0
