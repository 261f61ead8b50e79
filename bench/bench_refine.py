"""Cost of one Refine Identity step: coefficients mode vs lora mode vs a plain forward + backward pass
of the frozen UNet, in one process, interleaved; and the peak extra memory of each.

    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_refine.py [--channels 320 --depth full] [--size 64]
    COMFYUI_PATH=... python bench/bench_refine.py --smoke        # seconds: a tiny UNet, K=8, rank 2 (CI)

The UNet is ComfyUI's own SDXL UNet class built from the SDXL config that ComfyUI detects, with
random weights; by default narrowed (``--channels 64``, one transformer block per level) so it runs
on a CPU, ``--channels 320 --depth full`` is the real SDXL UNet (use a GPU).  The HyperLoRA model has
the released basis size (K = 128, rank 8) on the UNet's attention layers.  All three measurements
use the same epsilon loss, the same draw and activation checkpointing per UNet block:

* plain: forward + backward of the frozen UNet to its input (no LoRA): the floor of any fine-tune;
* lora:  one Refine step in lora mode (LoRA hooks, gradients to the down / up matrices, Adam);
* coefficients: one step in coefficients mode (the LoRA rebuilt from the 1,120 x K tokens through
  the basis, backward through the basis to the tokens, Adam).

Memory, per call: the bytes autograd keeps for the backward pass (every saved tensor's storage,
counted once, through ``saved_tensors_hooks``: deterministic, any device) plus the trainable state
(parameters, gradients, Adam's two moments); on a GPU also torch.cuda.max_memory_allocated above the
steady state.  (The CPU's resident set is no use here: the allocator reuses freed memory.)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for p in (str(REPO), str(REPO / "bench")):
    if p not in sys.path:
        sys.path.insert(1, p)

import torch  # noqa: E402

from bench_core import interleaved  # noqa: E402
from hyperlora.checkpoint import load_hyper_lora  # noqa: E402
from hyperlora.identity import Identity  # noqa: E402
from hyperlora.lora import normalize_tokens  # noqa: E402
from hyperlora.refine import DEFAULT_LEARNING_RATE, DenoiseTask, Refiner, epsilon_loss, plain_task  # noqa: E402
from hyperlora.spec import RELEASED_HYPER_DIM, RELEASED_RANK  # noqa: E402
from tests.fixtures.hyperlora_models import Preset, write_hyperlora_folder  # noqa: E402

MB = 1e6


def build_unet(comfy_root: str, channels: int, depth: str, device: torch.device):
    """ComfyUI's SDXL BaseModel with random weights; returns (model, {kohya prefix: Linear}, module specs)."""
    from tests.fixtures.sdxl import import_comfy, model_config

    comfy = import_comfy(comfy_root)
    import comfy.lora  # noqa: F811  (the submodule, after import_comfy put ComfyUI on sys.path)

    config = model_config(comfy, "SDXL", dtype=torch.float32)
    config.unet_config = dict(config.unet_config, model_channels=channels)
    if depth != "full":
        config.unet_config["transformer_depth"] = [min(d, 1) for d in config.unet_config["transformer_depth"]]
        config.unet_config["transformer_depth_output"] = [min(d, 1) for d in config.unet_config["transformer_depth_output"]]
        config.unet_config["transformer_depth_middle"] = 1
    model = config.get_model({}, "model.diffusion_model.", device=device)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * p[0].numel() ** -0.5)
            else:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
    model.requires_grad_(False)
    targets = {}
    for prefix, key in comfy.lora.model_lora_keys_unet(model, {}).items():
        if isinstance(key, str) and prefix.startswith("lora_unet_") and "_attn" in prefix:
            try:
                module = model.get_submodule(key[: -len(".weight")])
            except AttributeError:
                continue
            if isinstance(module, torch.nn.Linear):
                targets[prefix] = module
    specs = []
    for prefix, m in targets.items():
        if prefix.endswith("_to_q"):
            name = prefix[: -len("_to_q")]
            k_in = targets[name + "_to_k"].in_features
            specs.append((name, m.in_features, k_in if "_attn2" in name else None))
    return model, targets, tuple(specs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH", ""), help="ComfyUI checkout")
    ap.add_argument("--channels", type=int, default=64, help="UNet model_channels (320 = SDXL)")
    ap.add_argument("--depth", choices=("one", "full"), default="one", help="transformer blocks per level")
    ap.add_argument("--size", type=int, default=64, help="photo size in pixels (latent = size / 8)")
    ap.add_argument("--hyper-dim", type=int, default=RELEASED_HYPER_DIM, help=f"K ({RELEASED_HYPER_DIM} as released)")
    ap.add_argument("--rank", type=int, default=RELEASED_RANK, help=f"LoRA rank ({RELEASED_RANK} as released)")
    ap.add_argument("--repeat", type=int, default=5, help="timed rounds (interleaved)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="seconds: tiny UNet, K=8, rank 2, 2 rounds")
    args = ap.parse_args(argv)
    if not args.comfyui:
        ap.error("set COMFYUI_PATH or --comfyui (the UNet is ComfyUI's own SDXL class)")
    if args.smoke:
        args.channels, args.depth, args.size, args.hyper_dim, args.rank, args.repeat = 32, "one", 32, 8, 2, 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    unet, targets, specs = build_unet(args.comfyui, args.channels, args.depth, device)
    preset = Preset(modules=specs, hyper_dim=args.hyper_dim, rank=args.rank, dim=32, depth=1, heads=12, dim_head=4,
                    ff_mult=2, id_embed_dim=512, num_id_tokens=4, id_token_dim=48, clip_dim=128)
    with tempfile.TemporaryDirectory() as tmp:
        hl = load_hyper_lora(write_hyperlora_folder(Path(tmp) / "bench", preset=preset, seed=3), device=device)
    q, k = hl.arch.resampler.num_queries, hl.arch.hyper_dim
    identity = Identity(normalize_tokens(torch.randn(q, k, generator=torch.Generator().manual_seed(1))), None,
                        hl.name, hl.fingerprint, 1, {})
    lat = args.size // 8
    context = torch.randn(1, 77, 2048, device=device)
    adm = torch.randn(1, 2816, device=device)
    sigmas = unet.model_sampling.sigmas.detach().float().to(device)

    def denoise(x: torch.Tensor, sigma: torch.Tensor, _images: torch.Tensor) -> torch.Tensor:
        return unet.apply_model(x, sigma, c_crossattn=context.expand(x.shape[0], -1, -1), y=adm.expand(x.shape[0], -1))

    blocks = [*unet.diffusion_model.input_blocks, unet.diffusion_model.middle_block, *unet.diffusion_model.output_blocks]
    task = plain_task(DenoiseTask(denoise, torch.randn(1, 4, lat, lat, device=device), sigmas))
    from hyperlora.refine import Draw, checkpointed

    draw = Draw(0, 500, 7)
    refiners = {mode: Refiner(hl, identity, targets, mode=mode, learning_rate=DEFAULT_LEARNING_RATE[mode],
                              strength=0.85, checkpoint_modules=blocks) for mode in ("coefficients", "lora")}

    def plain() -> None:
        with checkpointed(blocks):
            x = task.latents.clone().requires_grad_(True)
            t = DenoiseTask(task.denoise, x, task.sigmas)
            torch.autograd.grad(epsilon_loss(t, [draw]), x)

    def step(mode: str):
        def run() -> None:
            with refiners[mode]:
                refiners[mode].step(task, draw)
        return run

    fns = {"plain fwd+bwd": plain, "lora step": step("lora"), "coefficients step": step("coefficients")}
    times = interleaved(fns, args.repeat)
    saved: dict[str, float] = {}
    peak: dict[str, float] = {}
    for name, fn in fns.items():
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
            return t

        if device.type == "cuda":
            torch.cuda.synchronize()
            base_alloc = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        saved[name] = sum(storages.values()) / MB
        if device.type == "cuda":
            peak[name] = (torch.cuda.max_memory_allocated() - base_alloc) / MB
    state = {"plain fwd+bwd": 0.0}
    for mode, r in refiners.items():     # parameters + gradients + Adam's exp_avg and exp_avg_sq: 4 copies
        state[f"{mode} step"] = 4 * sum(p.numel() * p.element_size() for p in r.params) / MB
    n_params = sum(p.numel() for p in unet.diffusion_model.parameters())
    print(f"UNet: ComfyUI SDXL class, model_channels {args.channels}, transformer depth {args.depth}, "
          f"{n_params / 1e6:.0f} M parameters; {len(targets)} LoRA layers; latent {lat}x{lat}; K={k}, rank {args.rank}; "
          f"{device}, {args.threads} threads, {args.repeat} interleaved rounds")
    base = statistics.median(times["plain fwd+bwd"])
    gpu = "  GPU peak MB" if peak else ""
    print(f"{'measurement':<20} {'median s':>10} {'x plain':>9} {'saved for bwd MB':>17} {'trainable MB':>13}{gpu}")
    for name, ts in times.items():
        med = statistics.median(ts)
        extra = f" {peak[name]:>12.1f}" if peak else ""
        print(f"{name:<20} {med:>10.3f} {med / base:>9.2f} {saved[name]:>17.1f} {state[name]:>13.2f}{extra}")
    print(f"coefficients / lora step: {statistics.median(times['coefficients step']) / statistics.median(times['lora step']):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
