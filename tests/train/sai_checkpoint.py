"""Write diffusers SDXL parts as one SAI/ComfyUI single-file checkpoint (for tests of hyperlora.train.frozen).

The key layout is that of stabilityai's sd_xl_base_1.0.safetensors (what ComfyUI loads and saves):
``model.diffusion_model.*`` (LDM UNet), ``first_stage_model.*`` (LDM VAE, 1x1-conv attention),
``conditioner.embedders.0.transformer.text_model.*`` (CLIP-L, transformers names) and
``conditioner.embedders.1.model.*`` (CLIP-G, open_clip names: fused in_proj, text_projection transposed).
The mapping is written here independently of diffusers' LDM -> diffusers converter that frozen.py uses,
so a round trip checks that converter on the layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
           ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))


def _resnet(rest: str) -> str:
    for new, old in _RESNET:
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    raise KeyError(rest)


def unet_to_sai(state: dict[str, Tensor], config: dict[str, Any]) -> dict[str, Tensor]:
    """diffusers UNet2DConditionModel keys -> ``model.diffusion_model.*`` LDM keys."""
    L = config["layers_per_block"]
    top = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
           "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
           "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    n_up = len(config["up_block_types"])
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        head = ".".join(parts[:2]) if parts[0] in ("time_embedding", "add_embedding") else parts[0]
        if head in top:
            new = top[head] + "." + ".".join(parts[len(head.split(".")):])
        elif parts[0] == "down_blocks":
            i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            if kind == "resnets":
                new = f"input_blocks.{1 + i * (L + 1) + j}.0.{_resnet(rest)}"
            elif kind == "attentions":
                new = f"input_blocks.{1 + i * (L + 1) + j}.1.{rest}"
            else:   # downsamplers.0.conv.*
                new = f"input_blocks.{1 + i * (L + 1) + L}.0.op.{parts[-1]}"
        elif parts[0] == "mid_block":
            kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            new = f"middle_block.{2 * j}.{_resnet(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
        elif parts[0] == "up_blocks":
            i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            if kind == "resnets":
                new = f"output_blocks.{i * (L + 1) + j}.0.{_resnet(rest)}"
            elif kind == "attentions":
                new = f"output_blocks.{i * (L + 1) + j}.1.{rest}"
            else:   # upsamplers.0.conv.*: after the attention when the block has one
                has_attn = "CrossAttn" in config["up_block_types"][i]
                new = f"output_blocks.{i * (L + 1) + L}.{2 if has_attn else 1}.conv.{parts[-1]}"
            assert i < n_up
        else:
            raise KeyError(key)
        out["model.diffusion_model." + new] = value
    return out


def vae_to_sai(state: dict[str, Tensor], config: dict[str, Any]) -> dict[str, Tensor]:
    """diffusers AutoencoderKL keys -> ``first_stage_model.*`` LDM keys (attention as 1x1 convs)."""
    n = len(config["up_block_types"])
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        new = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        parts = new.split(".")
        if parts[1] == "down_blocks":
            if parts[3] == "resnets":
                new = f"{parts[0]}.down.{parts[2]}.block.{'.'.join(parts[4:])}"
            else:
                new = f"{parts[0]}.down.{parts[2]}.downsample.conv.{parts[-1]}"
        elif parts[1] == "up_blocks":
            b = n - 1 - int(parts[2])
            if parts[3] == "resnets":
                new = f"{parts[0]}.up.{b}.block.{'.'.join(parts[4:])}"
            else:
                new = f"{parts[0]}.up.{b}.upsample.conv.{parts[-1]}"
        elif parts[1] == "mid_block":
            if parts[2] == "resnets":
                new = f"{parts[0]}.mid.block_{int(parts[3]) + 1}.{'.'.join(parts[4:])}"
            else:
                rest = ".".join(parts[4:-1])
                new = f"{parts[0]}.mid.attn_1.{attn[rest]}.{parts[-1]}"
                if parts[-1] == "weight" and rest != "group_norm":
                    value = value[:, :, None, None]
        out["first_stage_model." + new] = value
    return out


def clip_g_to_sai(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """CLIPTextModelWithProjection keys (transformers 4 or 5 names) -> ``conditioner.embedders.1.model.*``."""
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    p = "conditioner.embedders.1.model."
    out = {p + "token_embedding.weight": state["embeddings.token_embedding.weight"],
           p + "positional_embedding": state["embeddings.position_embedding.weight"],
           p + "ln_final.weight": state["final_layer_norm.weight"], p + "ln_final.bias": state["final_layer_norm.bias"],
           p + "text_projection": state["text_projection.weight"].T.contiguous()}
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")})
    for i in layers:
        s, d = f"encoder.layers.{i}.", f"{p}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[d + f"attn.in_proj_{kind}"] = torch.cat([state[s + f"self_attn.{x}_proj.{kind}"] for x in "qkv"])
            out[d + f"attn.out_proj.{kind}"] = state[s + f"self_attn.out_proj.{kind}"]
            out[d + f"ln_1.{kind}"] = state[s + f"layer_norm1.{kind}"]
            out[d + f"ln_2.{kind}"] = state[s + f"layer_norm2.{kind}"]
            out[d + f"mlp.c_fc.{kind}"] = state[s + f"mlp.fc1.{kind}"]
            out[d + f"mlp.c_proj.{kind}"] = state[s + f"mlp.fc2.{kind}"]
    out[p + "logit_scale"] = torch.tensor(4.6052)     # present in SDXL's file, unused
    return out


def clip_l_to_sai(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """CLIPTextModel keys -> ``conditioner.embedders.0.transformer.text_model.*``."""
    return {"conditioner.embedders.0.transformer.text_model." + k.removeprefix("text_model."): v
            for k, v in state.items() if not k.endswith("position_ids")}


def write_sai_checkpoint(folder: Path, path: Path) -> Path:
    """The diffusers SDXL ``folder`` (unet, vae, text encoders) as one SAI-layout .safetensors at ``path``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet")
    vae = AutoencoderKL.from_pretrained(str(folder), subfolder="vae")
    te = CLIPTextModel.from_pretrained(str(folder), subfolder="text_encoder")
    te2 = CLIPTextModelWithProjection.from_pretrained(str(folder), subfolder="text_encoder_2")
    state = {**unet_to_sai(unet.state_dict(), dict(unet.config)), **vae_to_sai(vae.state_dict(), dict(vae.config)),
             **clip_l_to_sai(te.state_dict()), **clip_g_to_sai(te2.state_dict())}
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path
