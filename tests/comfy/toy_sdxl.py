"""The trainer's toy SDXL (diffusers, SDXL's layout at toy sizes) inside ComfyUI's own SDXL model class, and
the check that a LoRA applied by the pack's Apply node changes ComfyUI's UNet exactly as the trainer's
functional LoRA changes the diffusers UNet.  Used by the two demo-tree tests (HyperLoRA and DiffLoRA)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch


def comfy_unet_config(diffusers_config: dict[str, Any]) -> dict[str, Any]:
    """ComfyUI's ``unet_config`` of the toy SDXL-shaped UNet (SDXL's keys, the toy's sizes)."""
    levels = len(diffusers_config["block_out_channels"])
    base = diffusers_config["block_out_channels"][0]
    attn = [t.startswith("CrossAttn") for t in diffusers_config["down_block_types"]]
    per = diffusers_config["layers_per_block"]
    return dict(
        use_checkpoint=False, image_size=diffusers_config["sample_size"], out_channels=4, use_spatial_transformer=True,
        legacy=False, num_classes="sequential", adm_in_channels=diffusers_config["projection_class_embeddings_input_dim"],
        in_channels=4, model_channels=base, num_res_blocks=[per] * levels,
        transformer_depth=[1 if a else 0 for a in attn for _ in range(per)],
        channel_mult=[c // base for c in diffusers_config["block_out_channels"]], transformer_depth_middle=1,
        use_linear_in_transformer=True, context_dim=diffusers_config["cross_attention_dim"], num_head_channels=64,
        transformer_depth_output=[1 if a else 0 for a in attn for _ in range(per + 1)],
        use_temporal_attention=False, use_temporal_resblock=False)


def assert_apply_matches_the_trainer(pack: Any, sdxl: Path, lora: dict[str, torch.Tensor], strength: float,
                                     patches: int, min_change: float = 1e-5) -> None:
    """Apply ``lora`` with the pack's Apply node to ComfyUI's SDXL class holding the toy UNet of ``sdxl`` (a
    diffusers folder); the patched ComfyUI UNet must compute what the diffusers UNet computes with the same LoRA
    applied functionally (the training path), to fp32 precision, and differ from the plain UNet.
    ``patches``: how many weights the LoRA must patch; ``min_change``: how much (max abs) the LoRA must change
    the UNet's output at least."""
    import comfy.model_detection
    import comfy.model_patcher
    import comfy.supported_models
    import comfy.utils
    from diffusers import UNet2DConditionModel

    from hyperlora.lora_functional import LoraTerm, applied, diffusers_lora_targets, factors_from_lora

    unet = UNet2DConditionModel.from_pretrained(sdxl, subfolder="unet").eval()
    cfg = comfy.model_detection.convert_config(comfy_unet_config(dict(unet.config)))
    model = comfy.supported_models.SDXL(cfg).get_model({})
    key_map = comfy.utils.unet_to_diffusers(cfg)
    theirs = unet.state_dict()
    model.diffusion_model.load_state_dict({c: theirs[d] for d, c in key_map.items() if d in theirs}, strict=True)
    base = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))

    (patched,) = pack.nodes["HyperLoRAStudioApply"]().run(base, lora, strength)
    assert len(patched.patches) == patches and not base.patches

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([300, 700])
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    text_embeds = torch.randn(2, 32, generator=g)
    time_ids = torch.tensor([[128.0, 128.0, 0.0, 0.0, 128.0, 128.0]] * 2)
    with torch.no_grad():
        y = torch.cat([text_embeds, unet.add_time_proj(time_ids.flatten()).reshape(2, -1)], dim=-1)
        plain = model.diffusion_model(x, timesteps=t, context=ctx, y=y)
        ref_plain = unet(x, t, ctx, added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}).sample
        assert torch.allclose(plain, ref_plain, atol=1e-4), "ComfyUI's SDXL class and the toy UNet differ"
        patched.patch_model(device_to=torch.device("cpu"))
        try:
            got = patched.model.diffusion_model(x, timesteps=t, context=ctx, y=y)
        finally:
            patched.unpatch_model(device_to=torch.device("cpu"))
        with applied(diffusers_lora_targets(unet), [LoraTerm(factors_from_lora(lora), strength)]):
            ref = unet(x, t, ctx, added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}).sample
    assert float((ref - ref_plain).abs().max()) > min_change     # the LoRA changes the UNet's output
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4), float((got - ref).abs().max())


@contextlib.contextmanager
def tree_folders_registered(root: Path, keys: Sequence[str]) -> Iterator[None]:
    """A demo tree's ``root/<key>`` folders in front of the test base's, as ``extra_model_paths.yaml`` entries
    would be, taken out again afterwards."""
    import folder_paths

    added = [(key, str(root / key)) for key in keys]
    for key, path in added:
        folder_paths.add_model_folder_path(key, path, is_default=True)
    try:
        yield
    finally:
        for key, path in added:
            paths = folder_paths.folder_names_and_paths[key][0]
            if path in paths:
                paths.remove(path)
