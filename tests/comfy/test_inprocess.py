"""The pack inside ComfyUI in this process: loaded by ComfyUI's own custom-node loader, nodes
called directly on ComfyUI's real SDXL / SD1.5 model classes (weights on the meta device,
a sample of them made real), patched weights read back from the ModelPatcher."""

from __future__ import annotations

import inspect
import sys
from typing import Any

import pytest
import torch

from tests.comfy.models import ANTELOPE, CLIP_FOLDER, SMALL_MODEL, TINY_MODEL, astronaut
from tests.fixtures.sdxl import meta_model

pytestmark = pytest.mark.comfy

NODE_IDS = {
    "HyperLoRAStudioLoader", "HyperLoRAStudioIdentityFromImages", "HyperLoRAStudioBuildLoRA", "HyperLoRAStudioApply",
    "HyperLoRAStudioApplyFromImages", "HyperLoRAStudioSaveIdentity", "HyperLoRAStudioLoadIdentity", "HyperLoRAStudioExportLoRA",
    "HyperLoRAStudioMixIdentities", "HyperLoRAStudioConceptSlider", "HyperLoRAStudioConditioning", "HyperLoRAStudioFaceMask",
    "HyperLoRAStudioFaceKeypoints", "HyperLoRAStudioFaceAnalysis", "HyperLoRAStudioFaceMasks", "HyperLoRAStudioCropByMask",
    "HyperLoRAStudioPasteByMask",
    "HyperLoRAStudioFaceSimilarity", "HyperLoRAStudioBestOfN", "HyperLoRAStudioRefineIdentity",
    "HyperLoRAStudioDiffLoRALoader", "HyperLoRAStudioDiffLoRAFromImages", "HyperLoRAStudioDiffLoRANewPerson",
}
FACE = dict(face_choice="largest", face_index=0, remove_background=True, grayscale=False, no_face="skip",
            det_size="640")
# LoRA module -> SDXL (ldm) weight, written out by hand from the SDXL UNet layout (diffusers down_blocks.1/2
# = input_blocks 4-5 / 7-8, up_blocks.0/1 = output_blocks 0-2 / 3-5, mid_block = middle_block.1), an
# independent check of the key map ComfyUI builds.
KNOWN_TARGETS = {
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q":
        "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight",
    "lora_unet_down_blocks_2_attentions_1_transformer_blocks_5_attn2_to_v":
        "diffusion_model.input_blocks.8.1.transformer_blocks.5.attn2.to_v.weight",
    "lora_unet_mid_block_attentions_0_transformer_blocks_3_attn2_to_k":
        "diffusion_model.middle_block.1.transformer_blocks.3.attn2.to_k.weight",
    "lora_unet_up_blocks_0_attentions_2_transformer_blocks_9_attn2_to_out_0":
        "diffusion_model.output_blocks.2.1.transformer_blocks.9.attn2.to_out.0.weight",
    "lora_unet_up_blocks_1_attentions_1_transformer_blocks_1_attn1_to_v":
        "diffusion_model.output_blocks.4.1.transformer_blocks.1.attn1.to_v.weight",
}


def _patcher(comfy: Any, kind: str) -> Any:
    import comfy.model_patcher

    model = meta_model(comfy, kind)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


@pytest.fixture(scope="module")
def small(pack) -> Any:
    handle, _info = pack.nodes["HyperLoRAStudioLoader"]().load(model=SMALL_MODEL, clip_vision=CLIP_FOLDER, insightface=ANTELOPE,
                                                     dtype="fp32", provider="CPU")
    return handle


@pytest.fixture(scope="module")
def photo() -> torch.Tensor:
    return torch.from_numpy(astronaut()).float().div(255.0)[None]


@pytest.fixture(scope="module")
def identity_and_lora(pack, small, photo) -> tuple[Any, dict[str, torch.Tensor], torch.Tensor]:
    identity, crops = pack.nodes["HyperLoRAStudioIdentityFromImages"]().run(small, photo, **FACE)
    (lora,) = pack.nodes["HyperLoRAStudioBuildLoRA"]().run(small, identity, "id")
    return identity, lora, crops


def test_loader_registers_every_node_with_comfyui(pack):
    assert set(pack.nodes) == NODE_IDS
    assert set(pack.module.NODE_DISPLAY_NAME_MAPPINGS) == NODE_IDS
    for node_id, cls in pack.nodes.items():
        assert pack.comfy_nodes.NODE_CLASS_MAPPINGS[node_id] is cls
        assert cls.CATEGORY.startswith("HyperLoRA Studio/"), node_id


def test_loader_runs_again_when_a_file_changed_with_its_mtime_put_back(pack, tmp_path):
    """Issue 18: the Loader's IS_CHANGED state was (name, size, mtime), so ComfyUI kept the cached load of a folder
    edited in place with its modification time restored; the status-change time (and inode) now count too."""
    import os

    loader_module = sys.modules[pack.nodes["HyperLoRAStudioLoader"].__module__]
    weights = tmp_path / "model" / "resampler.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(bytes(4096))
    before = loader_module.files_state([weights.parent])
    st = weights.stat()
    with open(weights, "r+b") as f:
        f.write(b"\xff" * 16)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (weights.stat().st_size, weights.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert loader_module.files_state([weights.parent]) != before
    assert loader_module.files_state([weights]) == loader_module.files_state([weights])     # stable when unchanged


def test_identity_from_a_real_photo(identity_and_lora, small, comfy):
    import comfy.model_management as mm

    identity, lora, crops = identity_and_lora
    q = 8 * 140
    assert tuple(identity.tokens.shape) == (q, 4) and identity.tokens.dtype == torch.float32
    norms = identity.tokens.norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-3)   # per-token L2 normalisation (format §5.4)
    assert identity.num_images == 1 and identity.model_name == SMALL_MODEL
    assert crops.ndim == 4 and crops.shape[0] == 1 and crops.shape[-1] == 3
    assert 0.0 <= float(crops.min()) and float(crops.max()) <= 1.0 and float(crops.std()) > 0.01
    assert len(lora) == 140 * 4 * 3
    assert small.model_patcher.model.inner is small.model   # the HyperLoRA model is managed by a ModelPatcher
    basis = sum(b.numel() * b.element_size() for b in small.model.buffers())
    assert small.model_patcher.model_size() >= basis > 0   # ComfyUI's memory accounting sees the basis
    loaded = [lm.model for lm in mm.current_loaded_models]
    assert small.model_patcher in loaded and small.clip_patcher in loaded   # ...and loaded by ComfyUI for use


def test_identity_node_honours_interrupt(pack, small, photo, comfy):
    import comfy.model_management as mm

    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            pack.nodes["HyperLoRAStudioIdentityFromImages"]().run(small, photo, **FACE)
    finally:
        mm.interrupt_current_processing(False)


def test_apply_patches_every_sdxl_weight_with_the_reference_delta(pack, comfy, identity_and_lora):
    import comfy.lora
    import comfy.utils

    _identity, lora, _ = identity_and_lora
    base = _patcher(comfy, "SDXL")
    strength = 0.8
    (patched,) = pack.nodes["HyperLoRAStudioApply"]().run(base, lora, strength)
    assert patched is not base and not base.patches          # the input model is untouched
    assert len(patched.patches) == 560
    key_map = comfy.lora.model_lora_keys_unet(patched.model, {})
    targets = {p: key_map[p] for p in {k.split(".")[0] for k in lora}}
    assert all(targets[p] == key for p, key in KNOWN_TARGETS.items())   # the hand-written mapping agrees
    assert set(targets.values()) == set(patched.patches)
    for n, (prefix, key) in enumerate(sorted(targets.items())):         # every patched weight, one at a time
        up = lora[f"{prefix}.lora_up.weight"].double()
        down = lora[f"{prefix}.lora_down.weight"].double()
        alpha = float(lora[f"{prefix}.alpha"])
        assert alpha / down.shape[0] == 0.5                    # alpha = rank / 2 (format §5.6)
        shape = tuple(up.shape[:1]) + tuple(down.shape[1:])
        w = torch.randn(shape, generator=torch.Generator().manual_seed(n), dtype=torch.float32)
        comfy.utils.set_attr_param(patched.model, key, w.clone())
        patched.patch_weight_to_device(key, device_to=torch.device("cpu"))
        got = comfy.utils.get_attr(patched.model, key).double()
        expected = w.double() + strength * 0.5 * up @ down
        assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5), key
        assert float((got - w.double()).abs().max()) > 1e-6  # the LoRA did change the weight
        assert torch.equal(patched.backup.pop(key).weight, w)  # ComfyUI keeps W to unpatch
        comfy.utils.set_attr_param(patched.model, key, torch.empty(shape, device="meta"))   # free it again


def test_core_load_lora_model_node_takes_our_lora(pack, comfy, identity_and_lora):
    from comfy_extras.nodes_train import LoraModelLoader

    _identity, lora, _ = identity_and_lora
    base = _patcher(comfy, "SDXL")
    (ours,) = pack.nodes["HyperLoRAStudioApply"]().run(base, lora, 0.7)
    (core,) = LoraModelLoader().load_lora_model(base, lora, 0.7)
    assert set(core.patches) == set(ours.patches) and len(core.patches) == 560
    key = KNOWN_TARGETS["lora_unet_mid_block_attentions_0_transformer_blocks_3_attn2_to_k"]
    (s1, a1, *_), (s2, a2, *_) = ours.patches[key][0], core.patches[key][0]
    assert s1 == s2 == 0.7
    assert all(torch.equal(x, y) for x, y in zip(a1.weights[:2], a2.weights[:2]))


def test_apply_on_sd15_stops_with_a_clear_error(pack, comfy, identity_and_lora):
    _identity, lora, _ = identity_and_lora
    sd15 = _patcher(comfy, "SD15")
    with pytest.raises(pack.errors.LoraError) as info:
        pack.nodes["HyperLoRAStudioApply"]().run(sd15, lora, 0.8)
    msg = str(info.value)
    assert "SD15" in msg and "SDXL" in msg and "load an SDXL checkpoint" in msg
    assert "of 560 LoRA modules do not land" in msg
    assert not sd15.patches


def test_face_mask_node_masks_the_astronauts_face(pack, small, photo):
    ([mask],) = pack.nodes["HyperLoRAStudioFaceMask"]().run(small, photo, "largest", 0, 1.3, 8, "skip", "640")
    assert mask.shape == photo.shape[:3] and mask.dtype == torch.float32
    assert float(mask.max()) == 1.0 and float(mask.min()) == 0.0
    ys, xs = torch.nonzero(mask[0] > 0.5, as_tuple=True)
    # astronaut(): Eileen Collins' face is around x 180-270, y 60-190 of the 512x512 photo
    assert 160 < float(xs.float().mean()) < 290 and 50 < float(ys.float().mean()) < 200
    assert 0.03 < float((mask[0] > 0.5).float().mean()) < 0.3
    blank = torch.full((1, 128, 128, 3), 0.5)
    ([empty],) = pack.nodes["HyperLoRAStudioFaceMask"]().run(small, blank, "largest", 0, 1.3, 8, "skip", "640")
    assert empty.shape == (1, 128, 128) and not bool(empty.any())
    with pytest.raises(pack.errors.FaceNotFoundError, match="No face was found in image 1 of 1"):
        pack.nodes["HyperLoRAStudioFaceMask"]().run(small, blank, "largest", 0, 1.3, 8, "error", "640")


def test_identity_on_prompt_attaches_one_checked_hook_with_window_and_mask(pack, comfy, identity_and_lora):
    import comfy.hooks

    _identity, lora, _ = identity_and_lora
    cond = [[torch.zeros(1, 77, 2048), {"pooled_output": torch.zeros(1, 1280)}]]
    neg = [[torch.ones(1, 77, 2048), {"pooled_output": torch.zeros(1, 1280)}]]
    mask = torch.zeros(64, 64)
    mask[:, :32] = 1
    pos_out, neg_out, hooks = pack.nodes["HyperLoRAStudioConditioning"]().run(
        cond, neg, lora, 0.85, 0.2, 0.8, mask=mask, mask_strength=0.7, set_cond_area="mask bounds")
    [hook] = hooks.hooks
    assert type(hook) is sys.modules[f"{pack.module.__name__}.nodes.hooks"].CheckedLoraHook
    assert isinstance(hook, comfy.hooks.WeightHook)
    assert hook.weights is lora and hook._strength_model == 0.85 and hook._strength_clip == 0.0
    frames = [(k.strength, k.start_percent) for k in hook.hook_keyframe.keyframes]
    assert frames == [(0.0, 0.0), (1.0, 0.2), (0.0, 0.8)]
    for out, src in ((pos_out, cond), (neg_out, neg)):
        [[tensor, meta]] = out
        assert tensor is src[0][0]                                    # the prompt itself is untouched
        assert meta["hooks"].contains(hook) and "hooks" not in src[0][1]
        assert meta["mask"].shape == (1, 64, 64) and meta["set_area_to_bounds"] is True
        assert meta["mask_strength"] == 0.7
    _, _, always = pack.nodes["HyperLoRAStudioConditioning"]().run(cond, neg, lora, 1.0, 0.0, 1.0)
    assert always.hooks[0].hook_keyframe.keyframes == []               # no schedule: on for every step
    off_pos, _, off = pack.nodes["HyperLoRAStudioConditioning"]().run(cond, neg, lora, 0.0, 0.0, 1.0, mask=mask)
    assert len(off) == 0 and "hooks" not in off_pos[0][1] and off_pos[0][1]["mask"].shape == (1, 64, 64)


def test_step_window_switches_the_identity_on_the_right_steps(pack, comfy, identity_and_lora):
    """ComfyUI's own keyframe code, driven over a 10-step 'normal' SDXL schedule: step i starts at
    i/9 of sampling (the schedule ends on sigma_min), so the window 0.25-0.65 must cover steps 3, 4
    and 5 (0.33, 0.44, 0.56) only."""
    from types import SimpleNamespace

    import comfy.model_base
    import comfy.samplers
    from tests.fixtures.sdxl import model_config

    _identity, lora, _ = identity_and_lora
    sampling = comfy.model_base.model_sampling(model_config(comfy, "SDXL"), comfy.model_base.ModelType.EPS)
    sigmas = comfy.samplers.calculate_sigmas(sampling, "normal", 10)
    percents = [1 - float(sampling.timestep(s)) / 999 for s in sigmas[:-1]]
    assert percents == pytest.approx([i / 9 for i in range(10)], abs=1e-3)
    for (start, end), want in (((0.25, 0.65), [0, 0, 0, 1, 1, 1, 0, 0, 0, 0]),
                               ((0.0, 0.35), [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]),
                               ((0.55, 1.0), [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]),
                               ((0.0, 1.0), [1] * 10)):
        (_, _, hooks) = pack.nodes["HyperLoRAStudioConditioning"]().run([], [], lora, 0.5, start, end)
        [hook] = hooks.hooks
        hook.initialize_timesteps(SimpleNamespace(model_sampling=sampling))
        got = []
        for sigma in sigmas[:-1]:
            hook.hook_keyframe.prepare_current_keyframe(curr_t=sigma, transformer_options={"sample_sigmas": sigmas})
            got.append(hook.strength_model)
        assert got == [0.5 * w for w in want], (start, end)


def test_identity_hook_lands_on_sdxl_and_refuses_sd15(pack, comfy, identity_and_lora):
    import comfy.hooks

    _identity, lora, _ = identity_and_lora
    (_, _, hooks) = pack.nodes["HyperLoRAStudioConditioning"]().run([], [], lora, 0.85, 0.0, 1.0)
    [hook] = hooks.hooks
    sdxl = _patcher(comfy, "SDXL")
    assert hook.add_hook_patches(sdxl, {}, {}, comfy.hooks.HookGroup()) is True
    assert len(sdxl.hook_patches[hook.hook_ref]) == 560
    sd15 = _patcher(comfy, "SD15")
    with pytest.raises(pack.errors.LoraError) as info:
        hook.add_hook_patches(sd15, {}, {}, comfy.hooks.HookGroup())
    assert "SD15" in str(info.value)
    assert not sd15.hook_patches


def test_identity_hooks_stop_caching_weights_when_the_cache_would_not_fit_in_ram(pack, comfy, identity_and_lora,
                                                                                monkeypatch, caplog):
    """Two identities on prompts made ComfyUI ("max speed" hook mode) keep a patched fp32 copy of the 560 SDXL
    projections per identity, 3.8 GB each, beside a backup: with the default fp32 SDXL on a CPU the server was
    killed on a 24 GB machine (test_default_precision.py, two_people).  When the copies of the identities
    registered so far do not fit in the free RAM, the sampling switches to "min vram" (recomputed, not cached)."""
    import comfy.hooks
    import comfy.model_management as mm

    hooks_module = sys.modules[f"{pack.module.__name__}.nodes.hooks"]
    core = pack.core("lora")
    _identity, lora, _ = identity_and_lora
    hooks = [pack.nodes["HyperLoRAStudioConditioning"]().run([], [], lora, 0.85, 0.0, 1.0)[2].hooks[0]
             for _ in range(2)]
    sd = _patcher(comfy, "SDXL").model.state_dict()
    lora_nodes = sys.modules[f"{pack.module.__name__}.nodes.lora"]
    landed = set(lora_nodes.check_lora_lands(_patcher(comfy, "SDXL"), lora).values())
    numel = sum(sd[k].numel() for k in landed)
    assert len(landed) == 560 and 0.9e9 < numel < 1.0e9               # SDXL's attention projections
    per_group = core.hook_cache_bytes(numel, 4, 1) - core.hook_cache_bytes(numel, 4, 0)
    assert per_group == 4 * numel and core.hook_cache_bytes(numel, 4, 2) == 12 * numel   # 11.4 GB for an fp32 SDXL

    def register(free: int) -> tuple[Any, dict]:
        monkeypatch.setattr(mm, "get_free_memory", lambda *a, **k: free)
        model, options = _patcher(comfy, "SDXL"), {}
        modes = []
        for hook in hooks:
            assert hook.add_hook_patches(model, options, {}, comfy.hooks.HookGroup()) is True
            modes.append(model.hook_mode)
        return modes, options

    itemsize = sd[next(iter(landed))].element_size()
    with caplog.at_level("WARNING"):
        modes, options = register(10 ** 13)                              # plenty: ComfyUI's default stays
        assert modes == [comfy.hooks.EnumHookMode.MaxSpeed] * 2 and options[hooks_module.HOOK_STATE]["groups"] == 2
        assert "recomputes them" not in caplog.text
        one = core.hook_cache_bytes(numel, itemsize, 1) + core.HOOK_CACHE_MARGIN   # room for one identity's copy
        modes, _ = register(one)
        assert modes == [comfy.hooks.EnumHookMode.MaxSpeed, comfy.hooks.EnumHookMode.MinVram]
    assert "2 identities on prompts would make ComfyUI keep" in caplog.text and "recomputes them" in caplog.text


def _sample_through_wrappers(comfy: Any, patched: Any) -> str:
    """What a KSampler (CFGGuider.sample) does with the model Apply returned, up to the point where it loads SDXL:
    ComfyUI merges the model's wrappers into a copy of its options, then runs the OUTER_SAMPLE wrappers around
    the sampling (here a stand-in that returns a word)."""
    import comfy.model_patcher
    import comfy.patcher_extension as pe
    import comfy.sampler_helpers

    options = comfy.model_patcher.create_model_options_clone(patched.model_options)
    options.setdefault("transformer_options", {})
    comfy.sampler_helpers.prepare_model_patcher(patched, {}, options)
    wrappers = pe.get_all_wrappers(pe.WrappersMP.OUTER_SAMPLE, options, is_model_options=True)
    return pe.WrapperExecutor.new_executor(lambda *a, **k: "sampled", wrappers).execute()


def test_memory_setting_releases_the_weights_as_sampling_starts_and_reads_them_back(pack, comfy, photo, caplog,
                                                                                     monkeypatch):
    """issue 21 (the whole graph in memory): with 'release while sampling' the HyperLoRA weights are freed before
    SDXL samples (the model objects are gone, not only unreferenced by the node), the next use reads them back,
    and the identity and LoRA made after that equal those made before; 'keep' keeps, 'auto' decides by free RAM."""
    import gc
    import weakref

    import comfy.model_management as mm

    common = sys.modules[f"{pack.module.__name__}.nodes.common"]
    memory = pack.core("memory")
    monkeypatch.setattr(mm, "get_free_memory", lambda *a, **k: 10 ** 13)      # plenty: only the settings decide
    loader = pack.nodes["HyperLoRAStudioLoader"]()
    args = dict(model=SMALL_MODEL, clip_vision=CLIP_FOLDER, insightface=ANTELOPE, dtype="fp32", provider="CPU")
    kept, _ = loader.load(**args, memory="keep")
    handle, _ = loader.load(**args, memory="release while sampling")
    auto, _ = loader.load(**args)
    assert auto.memory == "auto" and handle in common.LIVE_HANDLES
    identity, _ = pack.nodes["HyperLoRAStudioIdentityFromImages"]().run(handle, photo, **FACE)
    (lora,) = pack.nodes["HyperLoRAStudioBuildLoRA"]().run(handle, identity, "id")
    analyzer_made = handle.analyzer()
    held = handle.held_bytes
    assert held == common.module_bytes(handle.model_patcher.model) + common.module_bytes(handle.clip_patcher.model)
    gone = [weakref.ref(handle.model), weakref.ref(handle.clip)]
    (patched,) = pack.nodes["HyperLoRAStudioApply"]().run(_patcher(comfy, "SDXL"), lora, 0.85)
    with caplog.at_level("INFO"):
        assert _sample_through_wrappers(comfy, patched) == "sampled"
    gc.collect()
    assert handle.released and handle.held_bytes == 0 and [r() for r in gone] == [None, None]
    assert not kept.released and not auto.released and kept.held_bytes == held
    assert f"released {memory.human_bytes(held)} of HyperLoRA weights while SDXL samples" in caplog.text

    caplog.clear()
    with caplog.at_level("INFO"):
        again, _ = pack.nodes["HyperLoRAStudioIdentityFromImages"]().run(handle, photo, **FACE)
    assert f"reading {SMALL_MODEL} back from disk" in caplog.text
    assert not handle.released and handle.held_bytes == held and handle.analyzer() is not analyzer_made
    assert torch.equal(again.tokens, identity.tokens)
    (lora_again,) = pack.nodes["HyperLoRAStudioBuildLoRA"]().run(handle, again, "id")
    (lora_kept,) = pack.nodes["HyperLoRAStudioBuildLoRA"]().run(kept, identity, "id")
    assert lora_again.keys() == lora.keys() and all(torch.equal(lora_again[k], lora[k]) for k in lora)
    assert all(torch.equal(lora_kept[k], lora[k]) for k in lora)

    # 'auto': kept while the free RAM holds the weights plus the headroom, released one byte short of that;
    # Identity on Prompt's hook (the other way into sampling) releases too
    import comfy.hooks

    hook = pack.nodes["HyperLoRAStudioConditioning"]().run([], [], lora, 0.85, 0.0, 1.0)[2].hooks[0]
    handle.model  # noqa: B018 (read back: held again)
    monkeypatch.setattr(mm, "get_free_memory", lambda *a, **k: auto.held_bytes + memory.SAMPLING_HEADROOM)
    assert common.release_for_sampling() >= held          # 'release while sampling' at least
    assert handle.released and not auto.released and not kept.released
    handle.model  # noqa: B018
    monkeypatch.setattr(mm, "get_free_memory", lambda *a, **k: auto.held_bytes + memory.SAMPLING_HEADROOM - 1)
    assert hook.add_hook_patches(_patcher(comfy, "SDXL"), {}, {}, comfy.hooks.HookGroup()) is True
    assert handle.released and auto.released and not kept.released


def test_lora_of_another_unet_size_is_refused_on_sdxl(pack, comfy):
    tiny, _info = pack.nodes["HyperLoRAStudioLoader"]().load(model=TINY_MODEL, clip_vision="clip_vision/vit_l14_random.safetensors",
                                                   insightface=ANTELOPE, dtype="fp32", provider="CPU")
    q, k = tiny.model.arch.resampler.num_queries, tiny.model.arch.hyper_dim
    tokens = torch.nn.functional.normalize(torch.randn(q, k), dim=-1)
    lora = tiny.model.build_lora(tokens)
    with pytest.raises(pack.errors.LoraError) as info:
        pack.nodes["HyperLoRAStudioApply"]().run(_patcher(comfy, "SDXL"), lora, 1.0)
    msg = str(info.value)
    assert "SDXL" in msg and "module sizes differ" in msg and "(LoRA [" in msg


def test_node_choices_match_the_core(pack):
    from hyperlora.faces.options import DETECTION_SIZES, FACE_CHOICES
    from hyperlora.faces.setup import PROVIDERS

    face = pack.nodes["HyperLoRAStudioIdentityFromImages"].INPUT_TYPES()["required"]
    assert tuple(face["face_choice"][0]) == FACE_CHOICES
    assert tuple(int(x) for x in face["det_size"][0]) == DETECTION_SIZES
    assert tuple(pack.nodes["HyperLoRAStudioLoader"].INPUT_TYPES()["required"]["provider"][0]) == PROVIDERS


def test_loader_names_the_folder_to_fill(pack):
    loader = pack.nodes["HyperLoRAStudioLoader"]
    msg = loader.VALIDATE_INPUTS(model="sdxl_hyper_id_lora_v1_fidelity")
    assert isinstance(msg, str) and "hyper_lora_modules.json" in msg
    assert str(pack.base.models / "hyper_lora" / "hyper_lora") in msg
    assert loader.VALIDATE_INPUTS(model=SMALL_MODEL) is True
    with pytest.raises(pack.errors.ModelFileError) as info:
        loader().load(model="nope", clip_vision=CLIP_FOLDER, insightface=ANTELOPE, dtype="auto", provider="auto")
    assert "Put a HyperLoRA model folder" in str(info.value)
    listed = loader.INPUT_TYPES()["required"]
    assert SMALL_MODEL in listed["model"][0] and CLIP_FOLDER in listed["clip_vision"][0]
    assert "clip_vision/vit_l14_random.safetensors" in listed["clip_vision"][0]
    assert listed["insightface"][0] == [ANTELOPE]


def test_base_lora_kinds(pack, small, identity_and_lora):
    identity, lora_id, _ = identity_and_lora
    assert identity.base_tokens is not None and tuple(identity.base_tokens.shape) == (1120, 4)
    build = pack.nodes["HyperLoRAStudioBuildLoRA"]()
    (base,) = build.run(small, identity, "base")
    (both,) = build.run(small, identity, "id+base")
    key = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_v"
    assert base[f"{key}.lora_down.weight"].shape == (1, 2048)      # Base-LoRA rank = rank / 2
    assert both[f"{key}.lora_down.weight"].shape == (3, 2048)      # ranks concatenated
    ref = (0.5 * lora_id[f"{key}.lora_up.weight"].double() @ lora_id[f"{key}.lora_down.weight"].double()
           + float(base[f"{key}.alpha"]) * base[f"{key}.lora_up.weight"].double() @ base[f"{key}.lora_down.weight"].double())
    got = (float(both[f"{key}.alpha"]) / 3) * both[f"{key}.lora_up.weight"].double() @ both[f"{key}.lora_down.weight"].double()
    assert torch.allclose(got, ref, atol=1e-6)


def test_base_lora_of_a_model_without_one_says_so(pack):
    tiny, _info = pack.nodes["HyperLoRAStudioLoader"]().load(model=TINY_MODEL, clip_vision="clip_vision/vit_l14_random.safetensors",
                                                   insightface=ANTELOPE, dtype="fp32", provider="CPU")
    arch = tiny.model.arch
    fake = pack.core("identity").Identity(tokens=torch.zeros(arch.resampler.num_queries, arch.hyper_dim),
                                          base_tokens=None, model_name=TINY_MODEL,
                                          model_fingerprint=tiny.model.fingerprint, num_images=1, settings={})
    with pytest.raises(pack.errors.LoraError) as info:
        pack.nodes["HyperLoRAStudioBuildLoRA"]().run(tiny, fake, "base")
    assert "has no Base-LoRA" in str(info.value) and "'id'" in str(info.value)


def test_auto_dtype_keeps_the_fp16_basis_and_computes_in_the_cpus_precision(pack):
    """'auto' on the CPU: the fp16 basis is not doubled to fp32 (3 GB -> 6 GB for the release); the resampler
    and CLIP compute in this CPU's precision (hyperlora.precision: bf16 with bf16 matrix hardware, fp32 on an
    AVX2 CPU).  'fp32' forces fp32 everywhere."""
    precision = pack.core("precision")
    expected = precision.cpu_precision(precision.read_cpu_features()).dtype
    loader = pack.nodes["HyperLoRAStudioLoader"]()
    auto, _ = loader.load(model=SMALL_MODEL, clip_vision=CLIP_FOLDER, insightface=ANTELOPE, dtype="auto", provider="CPU")
    assert auto.model.basis_dtype == torch.float16          # the fixture files are fp16, as released
    assert auto.model.module_dtype == expected
    assert next(auto.clip.parameters()).dtype == expected
    fp32, _ = loader.load(model=SMALL_MODEL, clip_vision=CLIP_FOLDER, insightface=ANTELOPE, dtype="fp32", provider="CPU")
    assert fp32.model.basis_dtype == torch.float32


class HyperLoRA:   # the class name and attribute of the authors' plugin's loaded model (their HYPER_LORA type)
    hyper_lora_modules = ()


def test_a_foreign_object_is_named_with_the_node_to_connect(pack, identity_and_lora):
    identity, _lora, _ = identity_and_lora
    with pytest.raises(pack.errors.LoraError) as info:
        pack.nodes["HyperLoRAStudioBuildLoRA"]().run(HyperLoRA(), identity, "id")
    msg = str(info.value)
    assert "'hyper_lora' got the authors' ComfyUI-HyperLoRA plugin's HYPER_LORA object" in msg
    assert "Connect the 'HyperLoRA Studio Loader' node (HyperLoRAStudioLoader)" in msg
    with pytest.raises(pack.errors.LoraError, match="'identity' got a builtins.str, not an identity of this pack"):
        pack.nodes["HyperLoRAStudioSaveIdentity"]().run("not an identity", "x")


def test_every_node_with_our_sockets_names_foreign_objects_at_validation(pack):
    """ComfyUI's own socket check answers before a node runs, so the check that names the authors'
    objects must sit in VALIDATE_INPUTS(input_types) of every node that has one of our socket types."""
    common = sys.modules[pack.module.__name__ + ".nodes.common"]
    ours = {common.MODEL_TYPE, common.IDENTITY_TYPE, common.LORA_MODEL}
    guarded = 0
    for node_id, cls in pack.nodes.items():
        declared = common._sockets(cls)
        if not set(declared.values()) & ours:
            continue
        guarded += 1
        check = cls.VALIDATE_INPUTS
        assert "input_types" in inspect.getfullargspec(check).args, node_id
        assert check(input_types={n: t for n, t in declared.items()}) is True, node_id
        name, kind = next((n, t) for n, t in declared.items() if t in ours)
        foreign = {"HYPERLORA_STUDIO_MODEL": "HYPER_LORA", "HYPERLORA_STUDIO_IDENTITY": "ID_COND", "LORA_MODEL": "LORA"}
        msg = check(input_types={name: foreign[kind]})
        assert isinstance(msg, str) and f"'{name}'" in msg and "authors' ComfyUI-HyperLoRA plugin" in msg, msg
        assert "Connect" in msg and "HyperLoRA Studio" in msg, msg
        other = check(input_types={name: "CONDITIONING"})      # an ordinary wrong wire is still refused
        assert isinstance(other, str) and "a CONDITIONING output" in other, other
    assert guarded >= 8
