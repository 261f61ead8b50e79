"""Inputs that used to go wrong silently (issue 18), through the nodes as ComfyUI registered them, in this
process: lists taken as one set by the scoring nodes, NaN and empty masks and crops, huge strengths
from links, identity files whose tokens are not unit vectors, file names and modes of saved files,
oversized image files and very long photo lists."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest
import torch

from tests.comfy.models import SMALL_MODEL, astronaut

pytestmark = pytest.mark.comfy

@pytest.fixture(scope="module")
def photo() -> torch.Tensor:
    return torch.from_numpy(astronaut()).float().div(255.0)[None]


def run_as_comfyui(cls: type, inputs: dict[str, Any]) -> list[Any]:
    """Call a node the way ComfyUI's executor does for linked list outputs (every input a list)."""
    import execution

    async def go() -> list[Any]:
        results = await execution._async_map_node_over_list("p", "n", cls(), inputs, cls.FUNCTION)
        return await execution.resolve_map_node_over_list_results(results)

    return asyncio.run(go())


# ------------------------------------------------------------------------------------------- masks and crops


def _square_mask(n: int = 1) -> torch.Tensor:
    m = torch.zeros(n, 64, 64)
    m[:, 20:40, 24:44] = 1.0
    return m


def test_crop_by_mask_refuses_a_nan_mask(pack):
    image = torch.rand(1, 64, 64, 3)
    mask = _square_mask()
    mask[0, 30, 30] = math.nan
    with pytest.raises(pack.errors.ImageInputError, match=r"The mask holds 1 NaN or infinite value\(s\)"):
        pack.nodes["HyperLoRAStudioCropByMask"]().run(image, mask, 0.5, 256)


def test_crop_by_mask_refuses_an_empty_image_batch(pack):
    with pytest.raises(pack.errors.ImageInputError, match="The image batch is empty"):
        pack.nodes["HyperLoRAStudioCropByMask"]().run(torch.zeros(0, 64, 64, 3), _square_mask(), 0.5, 256)
    with pytest.raises(pack.errors.ImageInputError, match="The mask batch is empty"):
        pack.nodes["HyperLoRAStudioCropByMask"]().run(torch.rand(1, 64, 64, 3), torch.zeros(0, 64, 64), 0.5, 256)


def test_paste_by_mask_refuses_a_nan_patch_and_pastes_a_finite_one(pack):
    image = torch.rand(1, 64, 64, 3)
    _crop_image, _crop_mask, crop = pack.nodes["HyperLoRAStudioCropByMask"]().run(image, _square_mask(), 0.5, 256)
    patch = torch.rand(1, 256, 256, 3)
    [out] = pack.nodes["HyperLoRAStudioPasteByMask"]().run(image, patch, crop)
    assert out.shape == image.shape and bool(torch.isfinite(out).all())
    assert not torch.equal(out, image)
    patch[0, 100, 100, 1] = math.nan
    with pytest.raises(pack.errors.ImageInputError, match=r"The re-rendered crop holds 1 NaN .* --fp32-vae"):
        pack.nodes["HyperLoRAStudioPasteByMask"]().run(image, patch, crop)


# ------------------------------------------------------------------------------------------- strengths


@pytest.fixture(scope="module")
def unit_identity(pack, small) -> Any:
    """An identity of the small model with unit tokens, as the resampler makes them (no photos needed)."""
    arch = small.model.arch
    g = torch.Generator().manual_seed(0)
    tokens = torch.nn.functional.normalize(torch.randn(arch.resampler.num_queries, arch.hyper_dim, generator=g), dim=-1)
    return pack.core("identity").Identity(tokens=tokens, base_tokens=None, model_name=SMALL_MODEL,
                                          model_fingerprint=small.model.fingerprint, num_images=1, settings={})


@pytest.fixture(scope="module")
def lora(pack, small, unit_identity) -> dict[str, torch.Tensor]:
    (built,) = pack.nodes["HyperLoRAStudioBuildLoRA"]().run(small, unit_identity, "id")
    return built


def _sdxl(comfy: Any) -> Any:
    import comfy.model_patcher
    from tests.fixtures.sdxl import meta_model

    return comfy.model_patcher.ModelPatcher(meta_model(comfy, "SDXL"), load_device=torch.device("cpu"),
                                            offload_device=torch.device("cpu"))


def _conditioning(lora: dict[str, torch.Tensor], strength: float) -> dict[str, Any]:
    cond = [[torch.zeros(1, 77, 2048), {"pooled_output": torch.zeros(1, 1280)}]]
    return dict(positive=cond, negative=cond, lora=lora, strength=strength, start_percent=0.0, end_percent=1.0)


@pytest.mark.parametrize("strength", [1e9, -4.5, 4.01])
def test_a_huge_strength_from_a_link_is_refused_by_every_strength_input(pack, comfy, lora, strength):
    """ComfyUI checks only typed-in values against min/max; a link can bring 1e9 (weight changes of 3e7).
    Apply, Identity on Prompt and the block multipliers all follow one rule (checks.check_strength)."""
    model = _sdxl(comfy)
    with pytest.raises(pack.errors.SettingError,
                       match=r"HyperLoRA Studio Apply \(HyperLoRAStudioApply\): strength is .*from -4 to 4"):
        pack.nodes["HyperLoRAStudioApply"]().run(model, lora, strength)
    with pytest.raises(pack.errors.SettingError, match=r"Identity on Prompt .*HyperLoRAStudioConditioning.*"
                                                       r"strength is .*from -4 to 4"):
        pack.nodes["HyperLoRAStudioConditioning"]().run(**_conditioning(lora, strength))
    with pytest.raises(pack.errors.SettingError, match="The block multiplier 'output' is .*from -4 to 4"):
        pack.nodes["HyperLoRAStudioApply"]().run(model, lora, 0.85, output_blocks=strength)
    assert not model.patches


def test_the_largest_allowed_strength_still_patches(pack, comfy, lora):
    model = _sdxl(comfy)
    (patched,) = pack.nodes["HyperLoRAStudioApply"]().run(model, lora, -4.0)
    assert len(patched.patches) == 560 and not model.patches
    hooks = pack.nodes["HyperLoRAStudioConditioning"]().run(**_conditioning(lora, 4.0))[2]
    assert len(hooks.hooks) == 1 and hooks.hooks[0].strength_model == 4.0
    strength = pack.nodes["HyperLoRAStudioApply"].INPUT_TYPES()["required"]["strength"][1]
    assert (strength["min"], strength["max"]) == (-4.0, 4.0)
    for name in ("input_blocks", "cross_attention"):
        block = pack.nodes["HyperLoRAStudioApply"].INPUT_TYPES()["optional"][name][1]
        assert (block["min"], block["max"]) == (-4.0, 4.0)


# ------------------------------------------------------------------------------------------- identity files


def _identity_dir(pack) -> Any:
    import folder_paths
    from pathlib import Path

    return Path(folder_paths.get_output_directory()) / "hyper_lora_identities"


@pytest.mark.parametrize("scale, says", [(0.0, "its tokens are all zero"),
                                         (1e6, "token 0 has length 1e\\+06")])
def test_load_identity_refuses_tokens_that_are_not_unit_vectors(pack, unit_identity, scale, says):
    """All-zero tokens would build a LoRA that does nothing, tokens x 1e6 weight changes of 2.5e10."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    ui = pack.nodes["HyperLoRAStudioSaveIdentity"]().run(unit_identity, "inputs/unit")["ui"]
    saved = _identity_dir(pack) / "inputs" / ui["hyper_lora_files"][0]["filename"]
    with safe_open(str(saved), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    (loaded,) = pack.nodes["HyperLoRAStudioLoadIdentity"]().run("inputs/" + saved.name)
    assert torch.equal(loaded.tokens, unit_identity.tokens)
    tensors["tokens"] = tensors["tokens"] * scale
    save_file(tensors, str(saved.with_name("scaled.safetensors")), metadata=meta)
    with pytest.raises(pack.errors.IdentityFileError, match=f"scaled.safetensors' is damaged: .*{says}"):
        pack.nodes["HyperLoRAStudioLoadIdentity"]().run("inputs/scaled.safetensors")


# ------------------------------------------------------------------------------------------- saved files


def _saving_nodes(pack, unit_identity, lora) -> list[tuple[str, Any]]:
    save = pack.nodes["HyperLoRAStudioSaveIdentity"]
    export = pack.nodes["HyperLoRAStudioExportLoRA"]
    return [("HyperLoRAStudioSaveIdentity", lambda prefix: save().run(unit_identity, prefix), save),
            ("HyperLoRAStudioExportLoRA", lambda prefix: export().run(lora, prefix, "fp16"), export)]


def test_a_dot_prefix_is_refused_instead_of_writing_a_hidden_file(pack, unit_identity, lora):
    for node_id, run, cls in _saving_nodes(pack, unit_identity, lora):
        for prefix in (".", "inputs/.hidden"):
            answer = cls.VALIDATE_INPUTS(filename_prefix=prefix)          # typed in: refused when queued
            assert isinstance(answer, str) and "hidden file" in answer and node_id in answer
            with pytest.raises(pack.errors.SettingError, match="starting with '.', which would write a hidden file"):
                run(prefix)                                               # through a link: refused when run
    assert not list(_identity_dir(pack).glob("._*")) and not list(_identity_dir(pack).glob("inputs/.hidden*"))


def test_the_prefix_length_is_checked_against_the_output_folders_name_limit(pack, unit_identity, lora):
    """The limit is the output folder's NAME_MAX less the counter, '.safetensors' and the temporary name
    ('.<name>.<pid>.tmp'), so no prefix that passes can fail with a raw [Errno 36] while writing."""
    import os

    for node_id, run, cls in _saving_nodes(pack, unit_identity, lora):
        folder = cls.output_folder()
        limit = os.pathconf(folder, "PC_NAME_MAX")
        longest = limit - len("_00001_.safetensors") - len(f"..{4194304}.tmp")
        for n in (longest + 1, 226, 236):
            assert isinstance(cls.VALIDATE_INPUTS(filename_prefix="n" * n), str)
            with pytest.raises(pack.errors.SettingError, match=f"file names of at most {limit} bytes in '"):
                run("inputs/" + "n" * n)
        ui = run("inputs/" + "n" * longest)["ui"]                        # the longest allowed is written
        [entry] = ui["hyper_lora_files"]
        assert entry["filename"] == "n" * longest + "_00001_.safetensors", node_id


def test_saved_files_get_the_mode_of_comfyuis_own_outputs(pack, unit_identity, lora, tmp_path):
    """0o666 less the umask, as a plain open() gives (ComfyUI's images), not safetensors' 0o600."""
    import os

    mask = os.umask(0o022)
    os.umask(mask)
    with open(tmp_path / "plain", "wb"):
        pass
    expected = os.stat(tmp_path / "plain").st_mode & 0o777
    assert expected == 0o666 & ~mask
    for node_id, run, cls in _saving_nodes(pack, unit_identity, lora):
        [entry] = run("inputs/mode")["ui"]["hyper_lora_files"]
        path = os.path.join(cls.output_folder(), "inputs", entry["filename"])
        assert os.stat(path).st_mode & 0o777 == expected, node_id


def test_the_concept_sliders_strength_follows_the_same_rule_with_its_own_bound(pack, small, unit_identity):
    """The slider's strength goes through checks.check_strength too, with its wider documented bound (10)."""
    node = pack.nodes["HyperLoRAStudioConceptSlider"]()
    with pytest.raises(pack.errors.SettingError, match=r"Concept Slider \(HyperLoRAStudioConceptSlider\): strength is "
                                                       r"1e\+09; use a number from -10 to 10"):
        node.run(small, unit_identity, unit_identity, 1e9)
    (lora,) = node.run(small, unit_identity, unit_identity, -10.0)
    assert lora and all(torch.isfinite(t).all() for t in lora.values())
    spec = pack.nodes["HyperLoRAStudioConceptSlider"].INPUT_TYPES()["required"]["strength"][1]
    assert (spec["min"], spec["max"]) == (-10.0, 10.0)
