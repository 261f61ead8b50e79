"""The DiffLoRA nodes inside ComfyUI in this process (no server): a tiny random DiffLoRA model whose LoRAs
target three real SDXL attention layers, loaded from models/difflora by the DiffLoRA Loader, sampled for the
astronaut's photo (face analysis and CLIP from the small HyperLoRA model's Loader) and unconditionally, then
applied to ComfyUI's SDXL model class and exported with Export LoRA."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.comfy.models import DIFFLORA_MODEL as NAME
from tests.comfy.models import DIFFLORA_MODULES as MODULES
from tests.comfy.models import DIFFLORA_RANK as RANK
from tests.comfy.models import FACE, astronaut, faceless_photo, write_tiny_difflora
from tests.fixtures.sdxl import meta_model

pytestmark = pytest.mark.comfy

LOADER, FROM_IMAGES, NEW_PERSON = ("HyperLoRAStudioDiffLoRALoader", "HyperLoRAStudioDiffLoRAFromImages",
                                   "HyperLoRAStudioDiffLoRANewPerson")
SAMPLE = {"steps": 3, "guidance": 2.0}


def sdxl_patcher(comfy: Any) -> Any:
    """ComfyUI's SDXL model class, weights on the meta device, in a ModelPatcher (as test_inprocess uses)."""
    import comfy.model_patcher

    return comfy.model_patcher.ModelPatcher(meta_model(comfy, "SDXL"), load_device=torch.device("cpu"),
                                            offload_device=torch.device("cpu"))


@pytest.fixture(scope="module")
def folders(pack, small) -> dict[str, Path]:
    root = pack.base.models / "difflora"
    width = small.clip.shape.hidden_size
    out = {"good": write_tiny_difflora(root / NAME, width),
           "other_clip": write_tiny_difflora(root / "other_clip", width + 8, seed=1)}
    broken = root / "broken"
    broken.mkdir(parents=True, exist_ok=True)
    (broken / "difflora.json").write_text("{}\n")
    out["broken"] = broken
    return out


@pytest.fixture(scope="module")
def difflora(pack, folders) -> Any:
    handle, info = pack.nodes[LOADER]().load(model=NAME, dtype="fp32")
    assert f"DiffLoRA model '{NAME}'" in info and "3 modules" in info and "CLIP 5 token(s)" in info
    return handle


@pytest.fixture(scope="module")
def photo() -> torch.Tensor:
    return torch.from_numpy(astronaut()).float().div(255.0)[None]


def keys() -> set[str]:
    return {p + s for p in MODULES for s in (".lora_down.weight", ".lora_up.weight", ".alpha")}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Equal up to float rounding (a batch of seeds and a single seed run different matrix kernels)."""
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5) for k in a)


def from_images(pack, difflora, small, photo, seed: int, batch_count: int, **over: Any) -> tuple[list, Any, str]:
    inputs = {**FACE, **SAMPLE, **over}
    return pack.nodes[FROM_IMAGES]().run(difflora=[difflora], hyper_lora=[small], images=[photo], seed=[seed],
                                         batch_count=[batch_count], **{k: [v] for k, v in inputs.items()})


def test_loader_lists_and_loads_the_folder_and_refuses_a_missing_or_broken_one(pack, folders, difflora):
    loader = pack.nodes[LOADER]
    choices = loader.INPUT_TYPES()["required"]["model"][0]
    assert {NAME, "other_clip", "broken"} <= set(choices)
    assert loader.VALIDATE_INPUTS(model=NAME) is True
    message = loader.VALIDATE_INPUTS(model="nobody")
    assert "'nobody' is not available" in message and "difflora.json" in message
    assert str(pack.base.models / "difflora") in message
    with pytest.raises(pack.errors.ModelFileError, match="DiffLoRA model folder 'nobody' was not found"):
        loader().load(model="nobody", dtype="fp32")
    with pytest.raises(pack.errors.ModelFileError, match=r"broken.difflora\.json"):
        loader().load(model="broken", dtype="fp32")
    assert difflora.model.lae.layout.prefixes == tuple(MODULES)
    assert loader.IS_CHANGED(model=NAME) != loader.IS_CHANGED(model="other_clip")


def test_a_difflora_folder_of_extra_model_paths_is_listed_and_loaded(pack, small, tmp_path):
    """An extra_model_paths.yaml 'difflora' entry (added to folder_paths as ComfyUI adds it) is searched too."""
    import folder_paths

    extra = write_tiny_difflora(tmp_path / "elsewhere" / "extra_model", small.clip.shape.hidden_size, seed=2)
    folder_paths.add_model_folder_path("difflora", str(extra.parent))
    try:
        assert "extra_model" in pack.nodes[LOADER].INPUT_TYPES()["required"]["model"][0]
        handle, _ = pack.nodes[LOADER]().load(model="extra_model", dtype="fp32")
        assert handle.folder == extra
    finally:
        folder_paths.folder_names_and_paths["difflora"][0].remove(str(extra.parent))
    assert "extra_model" not in pack.nodes[LOADER].INPUT_TYPES()["required"]["model"][0]


def test_lora_from_images_one_lora_per_seed_reproducible(pack, difflora, small, photo):
    node = pack.nodes[FROM_IMAGES]
    assert node.INPUT_IS_LIST and node.OUTPUT_IS_LIST == (True, False, False)
    assert node.RETURN_TYPES[0] == "LORA_MODEL"
    loras, crops, info = from_images(pack, difflora, small, photo, seed=7, batch_count=3)
    assert len(loras) == 3 and all(set(lora) == keys() for lora in loras)
    assert crops.shape[0] == 1 and "3 LoRA(s) from 1 photo(s)" in info and "#3: seed 9" in info
    for lora in loras:
        for prefix, (out, inp) in MODULES.items():
            assert lora[prefix + ".lora_up.weight"].shape == (out, RANK)
            assert lora[prefix + ".lora_down.weight"].shape == (RANK, inp)
            assert bool(torch.isfinite(lora[prefix + ".lora_up.weight"]).all())
    assert not same(loras[0], loras[1]) and not same(loras[1], loras[2])
    assert [lora.provenance["seed"] for lora in loras] == ["7", "8", "9"]
    assert all(lora.provenance["generator"] == "difflora" and lora.provenance["num_images"] == "1" for lora in loras)
    repeat, _, _ = from_images(pack, difflora, small, photo, seed=7, batch_count=3)
    assert all(same(a, b) for a, b in zip(repeat, loras))       # the same seeds: the same LoRAs, bit for bit
    alone, _, _ = from_images(pack, difflora, small, photo, seed=8, batch_count=1)
    assert len(alone) == 1 and close(alone[0], loras[1]) and not close(alone[0], loras[0])   # seed 8 = 2nd candidate


def test_candidates_feed_apply_and_export(pack, comfy, difflora, small, photo, tmp_path):
    loras, _, _ = from_images(pack, difflora, small, photo, seed=0, batch_count=2)
    # a list output meets a node without INPUT_IS_LIST: ComfyUI runs Apply once per LoRA (one model each)
    assert not getattr(pack.nodes["HyperLoRAStudioApply"], "INPUT_IS_LIST", False)
    assert pack.nodes["HyperLoRAStudioApply"].INPUT_TYPES()["required"]["lora"][0] == "LORA_MODEL"
    base = sdxl_patcher(comfy)
    for lora in loras:
        (patched,) = pack.nodes["HyperLoRAStudioApply"]().run(base, lora, 0.8)
        assert patched is not base and len(patched.patches) == len(MODULES)
    # ... and the images of those models are ranked as one set by Best of N (a list input)
    assert pack.nodes["HyperLoRAStudioBestOfN"].INPUT_IS_LIST


def test_new_person_reproducible_differs_by_seed_and_round_trips_through_export(pack, difflora):
    node = pack.nodes[NEW_PERSON]()
    (first, second), info = node.run(difflora, 11, 2, 3)
    assert set(first) == keys() and not same(first, second) and "2 new person(s)" in info
    ([again], _) = node.run(difflora, 12, 1, 3)
    assert close(again, second) and not close(again, first)
    assert all(same(a, b) for a, b in zip(node.run(difflora, 11, 2, 3)[0], (first, second)))
    assert again.provenance["how"].startswith("DiffLoRA unconditional")
    # saved with Export LoRA, read back as the core Load LoRA node reads the file
    import comfy.utils

    ui = pack.nodes["HyperLoRAStudioExportLoRA"]().run(first, "difflora/person", "fp32")["ui"]["hyper_lora_files"][0]
    path = pack.base.models / "loras" / ui["load_name"]
    loaded, meta = comfy.utils.load_torch_file(str(path), safe_load=True, return_metadata=True)
    assert same({k: v.float() for k, v in loaded.items()}, {k: v.float() for k, v in first.items()})
    assert any("DiffLoRA" in v and "seed 11" in v for v in meta.values()), meta


def test_wrong_inputs_give_clear_errors(pack, folders, difflora, small, photo):
    blank = torch.from_numpy(faceless_photo()).float().div(255.0)[None]
    with pytest.raises(pack.errors.FaceNotFoundError, match=r"No usable face was found.*image 1: no face.*Try a"):
        from_images(pack, difflora, small, blank, seed=0, batch_count=1)
    other, _ = pack.nodes[LOADER]().load(model="other_clip", dtype="fp32")
    width = small.clip.shape.hidden_size
    with pytest.raises(pack.errors.ModelFileError, match=f"gives features {width} wide.*reads {width + 8}-wide"):
        from_images(pack, other, small, photo, seed=0, batch_count=1)
    with pytest.raises(pack.errors.LoraError, match="Connect the 'HyperLoRA Studio DiffLoRA Loader'"):
        pack.nodes[NEW_PERSON]().run(small, 0, 1, 3)
    with pytest.raises(pack.errors.SettingError, match=r"\(HyperLoRAStudioDiffLoRAFromImages\): guidance is nan"):
        from_images(pack, difflora, small, photo, seed=0, batch_count=1, guidance=float("nan"))
    with pytest.raises(pack.errors.SettingError, match="'batch_count' is 0"):
        pack.nodes[NEW_PERSON]().run(difflora, 0, 0, 3)
    message = pack.module.NODE_CLASS_MAPPINGS[NEW_PERSON].VALIDATE_INPUTS({"difflora": "HYPERLORA_STUDIO_MODEL"})
    assert "DiffLoRA Loader" in message
    assert json.loads((folders["good"] / "difflora.json").read_text())["format"] == "hyperlora-difflora"


def test_readme_documents_the_difflora_nodes_and_inputs(pack):
    """What test_readme checks against the server's /object_info, for these nodes in process."""
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    for node_id in (LOADER, FROM_IMAGES, NEW_PERSON):
        head = f"### {pack.module.NODE_DISPLAY_NAME_MAPPINGS[node_id]} (`{node_id}`)"
        assert head in text
        section = text.split(head, 1)[1].split("\n### ", 1)[0]
        spec = pack.nodes[node_id].INPUT_TYPES()
        for name in [*spec["required"], *spec.get("optional", {})]:
            assert f"| `{name}`" in section, (node_id, name)
