"""Refine Identity at every diffusion-model precision ComfyUI 0.3.64 offers (``--*-unet``), in this process.
(The real server started with ComfyUI's defaults, where it once crashed with "Inference tensors cannot be
saved for backward", runs it and every other node in ``test_default_precision.py``.)

The UNet is ComfyUI's own SDXL class at 32 channels instead of 320 (every module of SDXL, with its
name, so the LoRA key map and the checkpointed blocks are the real ones; 1/100 of the weights), made
the way ``CheckpointLoaderSimple`` makes a model: ``model_management.unet_dtype`` /
``unet_manual_cast`` decide the weight and compute dtypes from the command-line flags (set here on
``comfy.cli_args.args`` as ``main.py`` would), the model is built and its fp16 state dict loaded
inside ``torch.inference_mode()``, as ComfyUI's executor runs every node.  The node then runs in
inference mode too, with a latent and a conditioning made there.

Flags and what a CPU does with them (``--cpu``): the default, ``--fp32-unet`` and ``--fp64-unet`` run
in that dtype without manual cast; ``--fp16-unet``, ``--bf16-unet`` and the fp8 storage flags
(``--fp8_e4m3fn-unet``, ``--fp8_e5m2-unet``) store the weights so and manual-cast them to fp32 at each
layer (the CPU has no fast fp16 / bf16 / fp8 compute in ComfyUI's eyes).  ``--fp8_e8m0fnu-unet`` is
a format of exponents only (no sign, no zero, no mantissa: made for block scales): the CPU runs it
(ComfyUI casts it to fp32 like the other fp8 formats), but a UNet stored in it has lost its signs, so
its pictures are noise on any device; the node still runs through it.  Fast fp8 compute
(``--fast fp8_matrix_mult``) needs a CUDA GPU of compute capability 8.9 or newer; a CPU never takes
that path (``model_management.supports_fp8_compute`` is False), so it is not covered here.
"""

from __future__ import annotations

import math
import sys
from types import SimpleNamespace
from typing import Any, Iterator

import pytest
import torch

from tests.comfy.models import ANTELOPE, CLIP_FOLDER
from tests.fixtures.hyperlora_models import Preset, write_hyperlora_folder
from tests.fixtures.sdxl import model_config

pytestmark = pytest.mark.comfy

CHANNELS = 32
UNET_FLAGS = ("fp32_unet", "fp64_unet", "bf16_unet", "fp16_unet", "fp8_e4m3fn_unet", "fp8_e5m2_unet",
              "fp8_e8m0fnu_unet")
MODEL_NAME = "sdxl_32_channels"
STEPS = 2


def _unet_state_dict(comfy: Any) -> dict[str, torch.Tensor]:
    """Random weights of the 32-channel SDXL UNet, fp16 as in a checkpoint file (Linear/conv ~ N(0, 1/fan_in),
    norms 1, biases 0.01 so that the biases matter)."""
    config = model_config(comfy, "SDXL", dtype=torch.float32)
    config.unet_config = dict(config.unet_config, model_channels=CHANNELS)
    with torch.device("meta"):
        meta = config.get_model({}, "model.diffusion_model.", device="meta")
    gen = torch.Generator().manual_seed(0)
    sd = {}
    for key, t in meta.diffusion_model.state_dict().items():
        if t.dim() >= 2:
            v = torch.randn(t.shape, generator=gen) * t[0].numel() ** -0.5
        elif key.endswith("weight"):
            v = torch.ones(t.shape)
        else:
            v = torch.full(t.shape, 0.01)
        sd[f"model.diffusion_model.{key}"] = v.half()
    return sd


@pytest.fixture(scope="module")
def unet_sd(comfy) -> dict[str, torch.Tensor]:
    return _unet_state_dict(comfy)


def _flags(monkeypatch: pytest.MonkeyPatch, flag: str | None) -> None:
    import comfy.cli_args

    for f in UNET_FLAGS:
        monkeypatch.setattr(comfy.cli_args.args, f, f == flag)


def load_like_checkpoint_loader(comfy: Any, sd: dict[str, torch.Tensor]) -> Any:
    """A ModelPatcher made as ``comfy.sd.load_state_dict_guess_config`` makes it (dtype choice from the
    flags, weights loaded in inference mode), for the 32-channel SDXL config."""
    import comfy.model_management as mm
    import comfy.model_patcher

    config = model_config(comfy, "SDXL", dtype=torch.float16)
    config.unet_config = dict(config.unet_config, model_channels=CHANNELS)
    load_device = mm.get_torch_device()
    params = sum(t.numel() for t in sd.values())
    unet_dtype = mm.unet_dtype(model_params=params, supported_dtypes=list(config.supported_inference_dtypes),
                               weight_dtype=torch.float16)
    manual_cast = mm.unet_manual_cast(unet_dtype, load_device, config.supported_inference_dtypes)
    config.set_inference_dtype(unet_dtype, manual_cast)
    with torch.inference_mode():
        model = config.get_model(sd, "model.diffusion_model.", device=mm.unet_offload_device())
        model.load_model_weights(dict(sd), "model.diffusion_model.")
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=mm.unet_offload_device())


@pytest.fixture(scope="module")
def handle(pack, comfy, unet_sd, tmp_path_factory) -> Iterator[Any]:
    """The pack's Loader on a HyperLoRA model whose modules are those of the 32-channel UNet."""
    import folder_paths

    config = model_config(comfy, "SDXL", dtype=torch.float32)
    config.unet_config = dict(config.unet_config, model_channels=CHANNELS)
    with torch.device("meta"):
        meta = config.get_model({}, "model.diffusion_model.", device="meta")
    targets = _quality(pack).lora_targets(SimpleNamespace(model=meta))
    specs = []
    for prefix, m in targets.items():
        if prefix.endswith("_to_q"):
            name = prefix[: -len("_to_q")]
            specs.append((name, m.in_features, targets[name + "_to_k"].in_features if "_attn2" in name else None))
    preset = Preset(modules=tuple(specs), hyper_dim=8, rank=2, dim=32, depth=1, heads=12, dim_head=4, ff_mult=2,
                    id_embed_dim=512, num_id_tokens=4, id_token_dim=48, clip_dim=128)   # CLIP_FOLDER: 128 wide
    root = tmp_path_factory.mktemp("hyper_lora_root")
    write_hyperlora_folder(root / "hyper_lora" / MODEL_NAME, preset=preset, seed=4)
    folder_paths.add_model_folder_path("hyper_lora", str(root))
    try:
        loaded, _info = pack.nodes["HyperLoRAStudioLoader"]().load(model=MODEL_NAME, clip_vision=CLIP_FOLDER,
                                                                   insightface=ANTELOPE, dtype="fp32", provider="CPU")
    finally:
        folder_paths.folder_names_and_paths["hyper_lora"][0].remove(str(root))
    yield loaded


def _quality(pack) -> Any:
    """The pack's own nodes/quality.py module (as ComfyUI's loader imported it)."""
    return sys.modules[f"{pack.module.__name__}.nodes.quality"]


def _identity(pack, handle) -> Any:
    Identity = pack.core("identity").Identity
    normalize = pack.core("lora").normalize_tokens
    hl = handle.model
    q, k = hl.arch.num_tokens, hl.arch.hyper_dim
    return Identity(normalize(torch.randn(q, k, generator=torch.Generator().manual_seed(1))), None, hl.name,
                    hl.fingerprint, 1, {})


def refine_in_inference_mode(pack, patcher, handle, *, steps: int = STEPS, samples: torch.Tensor | None = None,
                             mode: str = "coefficients") -> dict:
    """The node's run as ComfyUI's executor calls it: everything in inference mode."""
    with torch.inference_mode():
        if samples is None:
            samples = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
        cond = torch.randn(1, 77, 2048, generator=torch.Generator().manual_seed(3))
        pooled = torch.randn(1, 1280, generator=torch.Generator().manual_seed(4))
        positive = [[cond, {"pooled_output": pooled, "width": 64, "height": 64}]]
        return pack.nodes["HyperLoRAStudioRefineIdentity"]().run(
            patcher, handle, _identity(pack, handle), {"samples": samples}, positive, mode, steps, 0.0, 0.85, 0)


def _state(patcher) -> dict[str, Any]:
    """What the rest of the graph sees of the model: every tensor object, and each layer's functions."""
    m = patcher.model
    return {"tensors": {k: (id(v), v.is_inference()) for k, v in [*m.named_parameters(), *m.named_buffers()]},
            "functions": {n: (list(getattr(mod, "weight_function", [])), list(getattr(mod, "bias_function", [])))
                          for n, mod in m.named_modules()}}


@pytest.mark.parametrize("flag", [None, *UNET_FLAGS])
def test_refine_runs_at_every_unet_precision(flag, pack, comfy, handle, unet_sd, monkeypatch):
    """Default (fp32, no manual cast) failed in LayerNorm before: only weights were copied, not biases."""
    _flags(monkeypatch, flag)
    patcher = load_like_checkpoint_loader(comfy, unet_sd)
    dm = patcher.model.diffusion_model
    expected = {None: (torch.float32, None), "fp32_unet": (torch.float32, None), "fp64_unet": (torch.float64, None),
                "bf16_unet": (torch.bfloat16, torch.float32), "fp16_unet": (torch.float16, torch.float32),
                "fp8_e4m3fn_unet": (torch.float8_e4m3fn, torch.float32),
                "fp8_e5m2_unet": (torch.float8_e5m2, torch.float32),
                "fp8_e8m0fnu_unet": (torch.float8_e8m0fnu, torch.float32)}[flag]
    assert (dm.input_blocks[0][0].weight.dtype, patcher.model.manual_cast_dtype) == expected
    assert all(p.is_inference() for p in dm.parameters())           # as ComfyUI's loader leaves them
    before = _state(patcher)
    out = refine_in_inference_mode(pack, patcher, handle)
    report = out["result"][2]
    assert f"{STEPS} steps" in report and math.isfinite(float(report.split("after ")[1].split(" ")[0])), report
    assert out["result"][0].settings["refined"].startswith(f"coefficients, {STEPS} steps")
    assert _state(patcher) == before        # the same tensors (still inference-mode), no wrapper left on a layer


def test_refine_in_lora_mode_at_the_default_precision(pack, comfy, handle, unet_sd, monkeypatch):
    _flags(monkeypatch, None)
    patcher = load_like_checkpoint_loader(comfy, unet_sd)
    out = refine_in_inference_mode(pack, patcher, handle, mode="lora")
    assert "refined in lora mode" in out["result"][2]


def test_manual_cast_with_a_tensor_already_in_the_compute_dtype(pack, comfy, handle, unet_sd, monkeypatch):
    """Manual cast (fp16 weights, fp32 compute) copies a tensor only when its dtype differs: a LayerNorm
    kept in fp32 (as ComfyUI keeps some layers of some models) reached autograd as an inference tensor."""
    _flags(monkeypatch, "fp16_unet")
    patcher = load_like_checkpoint_loader(comfy, unet_sd)
    assert patcher.model.manual_cast_dtype == torch.float32
    norm = patcher.model.diffusion_model.input_blocks[4][1].transformer_blocks[0].norm1
    with torch.inference_mode():
        norm.weight = torch.nn.Parameter(norm.weight.float(), requires_grad=False)
        norm.bias = torch.nn.Parameter(norm.bias.float(), requires_grad=False)
    out = refine_in_inference_mode(pack, patcher, handle)
    assert f"{STEPS} steps" in out["result"][2]


def test_other_inference_tensors_are_copied_only_while_refining(pack, comfy, handle, unet_sd, monkeypatch):
    """A parameter outside ComfyUI's cast layers (here one given to a plain torch LayerNorm) is copied for the
    refinement alone; the copied bytes stay small (the cast layers copy one layer at a time)."""
    _flags(monkeypatch, None)
    patcher = load_like_checkpoint_loader(comfy, unet_sd)
    block = patcher.model.diffusion_model.input_blocks[4][1].transformer_blocks[0]
    with torch.inference_mode():
        plain = torch.nn.LayerNorm(block.norm1.normalized_shape)
        plain.weight.copy_(block.norm1.weight.float())
        plain.bias.fill_(0.01)
        plain.requires_grad_(False)
    block.norm1 = plain
    _patcher, wrapped, others = _quality(pack).trainable_patcher(patcher)
    assert {(id(m), a) for m, a in others} >= {(id(plain), "weight"), (id(plain), "bias")}
    assert not any(m is plain for m, _a in wrapped)
    refine_core = pack.core("refine")
    with torch.inference_mode(False), refine_core.plain_copies(others) as copied:
        assert not plain.weight.is_inference() and not plain.bias.is_inference()
    assert copied < 1 << 20 and plain.weight.is_inference()
    out = refine_in_inference_mode(pack, patcher, handle)
    assert f"{STEPS} steps" in out["result"][2]


def test_refine_refuses_a_nan_latent_and_a_16_channel_latent_with_the_fix(pack, comfy, handle, unet_sd, monkeypatch):
    """Before: the NaN latent ended in "The loss became nan; lower the learning rate" (the wrong fix), the
    16-channel latent in a raw convolution error."""
    _flags(monkeypatch, None)
    patcher = load_like_checkpoint_loader(comfy, unet_sd)
    nan = torch.randn(1, 4, 8, 8)
    nan[0, 2, 3, 4] = float("nan")
    with pytest.raises(pack.errors.SettingError, match=r"Refine Identity: the latent input holds 1 NaN or infinite "
                                                       r"values \(of 256\).*start ComfyUI with --fp32-vae"):
        refine_in_inference_mode(pack, patcher, handle, samples=nan)
    with pytest.raises(pack.errors.SettingError, match=r"Refine Identity: the latent input has 16 channels but the "
                                                       r"connected SDXL model works on 4-channel latents.*Connect the "
                                                       r"VAE output of the SDXL checkpoint"):
        refine_in_inference_mode(pack, patcher, handle, samples=torch.randn(1, 16, 8, 8))


def test_activation_checkpointing_engages_in_comfyuis_unet(pack, comfy, handle, unet_sd, monkeypatch):
    """ComfyUI's UNet calls the layers of each block, never the block's forward: checkpointing the blocks
    never engaged, so the backward kept every activation and every weight copy (an fp32 SDXL server was
    killed for memory).  Now every ResBlock / SpatialTransformer call with gradients is checkpointed."""
    _flags(monkeypatch, None)
    patcher = load_like_checkpoint_loader(comfy, unet_sd)
    refine_core = pack.core("refine")
    calls = []
    original = refine_core.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(refine_core, "checkpoint", counting)
    refine_in_inference_mode(pack, patcher, handle, steps=1)
    layers = sum(len(b) for b in (*patcher.model.diffusion_model.input_blocks, patcher.model.diffusion_model.middle_block,
                                  *patcher.model.diffusion_model.output_blocks))
    assert len(calls) >= layers, (len(calls), layers)      # every layer at least once in the one training step
