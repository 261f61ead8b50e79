"""Refine an identity outside ComfyUI: ``python -m hyperlora.tools.refine`` (plain PyTorch + diffusers).

The same fine-tune as the Refine Identity node (:func:`hyperlora.refine.refine`), on a diffusers SDXL
folder (``unet/``, ``vae/``, ``text_encoder/``, ``text_encoder_2/``, ``tokenizer/``, ``tokenizer_2/``,
``scheduler/``, as ``save_pretrained`` writes it)::

    python -m hyperlora.tools.refine --identity me.safetensors --hyper-lora models/hyper_lora/hyper_lora/sdxl_hyper_id_lora_v1_fidelity \\
        --sdxl stable-diffusion-xl-base-1.0 --photo me1.jpg --photo me2.jpg \\
        --prompt "fcsks fxhks fhyks, a photo of a man" --out me_refined.safetensors [--mode lora --lora-out me.safetensors]

Photos are centre-cropped and resized to ``--size`` (1024), encoded by the VAE; the prompt goes through
both text encoders as SDXL does (penultimate hidden states, pooled text embedding, size/crop ids).
``coefficients`` writes the refined identity file; ``lora`` writes a kohya LoRA (``--lora-out``).
diffusers is needed only here (``pip install diffusers``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..checkpoint import load_hyper_lora
from ..errors import (DependencyError, HyperLoRAError, SettingError, check_folder_option,
                      os_error_line)
from ..identity import load_identity, save_identity
from ..image_files import read_image
from ..lora_file import lora_metadata, save_lora_file
from ..lora_functional import diffusers_lora_targets
from ..refine import DEFAULT_STEPS, MODES, DenoiseTask, refine

logger = logging.getLogger(__name__)

def load_photos(paths: Sequence[str | Path], size: int) -> Tensor:
    """Photos -> ``[N, 3, size, size]`` in -1..1 (centre crop to a square, then resize)."""
    from PIL import Image

    out = []
    for p in paths:
        img = Image.fromarray(read_image(p))       # the size is checked before decoding
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.LANCZOS)
        out.append(torch.from_numpy(np.array(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1))
    return torch.stack(out)


def sdxl_parts(folder: Path, device: torch.device) -> dict[str, object]:
    try:
        import diffusers
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    except ImportError as exc:
        raise DependencyError(f"python -m hyperlora.tools.refine needs diffusers and transformers ({exc}); "
                              "pip install diffusers.") from exc
    if not (folder / "unet").is_dir():
        raise HyperLoRAError(f"'{folder}' is not a diffusers SDXL folder (no unet/); give the folder that "
                             "StableDiffusionXLPipeline.save_pretrained wrote.")
    parts: dict[str, object] = {
        "unet": diffusers.UNet2DConditionModel.from_pretrained(folder, subfolder="unet"),
        "vae": diffusers.AutoencoderKL.from_pretrained(folder, subfolder="vae"),
        "text_encoder": CLIPTextModel.from_pretrained(folder / "text_encoder"),
        "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2"),
        "tokenizer": CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        "tokenizer_2": CLIPTokenizer.from_pretrained(folder / "tokenizer_2"),
        "scheduler": diffusers.DDPMScheduler.from_pretrained(folder, subfolder="scheduler"),
    }
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        parts[name].to(device).requires_grad_(False).eval()  # type: ignore[attr-defined]
    return parts


@torch.no_grad()
def encode_prompt(parts: dict[str, object], prompt: str, size: int, device: torch.device) -> dict[str, Tensor]:
    """SDXL conditioning for a batch of one: ``encoder_hidden_states [1, 77, 2048]``, ``text_embeds [1, 1280]``,
    ``time_ids [1, 6]`` (original size, crop 0, 0, target size)."""
    hidden, pooled = [], None
    for tok_name, enc_name in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
        length = min(int(parts[tok_name].model_max_length),  # type: ignore[attr-defined]
                     int(parts[enc_name].config.max_position_embeddings))  # type: ignore[attr-defined]
        tok = parts[tok_name](prompt, padding="max_length", max_length=length, truncation=True,  # type: ignore[operator]
                              return_tensors="pt")
        out = parts[enc_name](tok.input_ids.to(device), output_hidden_states=True)  # type: ignore[operator]
        hidden.append(out.hidden_states[-2])
        if enc_name == "text_encoder_2":
            pooled = out.text_embeds
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32, device=device)
    return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": pooled, "time_ids": time_ids}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hyperlora.tools.refine", description=__doc__.split("\n\n")[0])
    ap.add_argument("--identity", required=True, type=Path, help="identity file to refine (Save Identity)")
    ap.add_argument("--hyper-lora", required=True, type=Path, help="the HyperLoRA model folder that made it")
    ap.add_argument("--sdxl", required=True, type=Path, help="diffusers SDXL folder")
    ap.add_argument("--photo", action="append", required=True, help="a photo of the person (repeat)")
    ap.add_argument("--prompt", required=True, help="prompt of the photos: trigger words + class word")
    ap.add_argument("--mode", choices=MODES, default=MODES[0])
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    ap.add_argument("--learning-rate", type=float, default=0.0, help="0 = the mode's default")
    ap.add_argument("--strength", type=float, default=0.85)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=1024, help="photo size in pixels")
    ap.add_argument("--out", type=Path, help="refined identity file (coefficients mode)")
    ap.add_argument("--lora-out", type=Path, help="refined LoRA as a kohya file (either mode)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.mode == "coefficients" and args.out is None and args.lora_out is None:
        ap.error("give --out (the refined identity) and/or --lora-out")
    if args.mode == "lora" and args.lora_out is None:
        ap.error("lora mode writes a LoRA: give --lora-out")
    try:
        for option, path in (("--out", args.out), ("--lora-out", args.lora_out)):
            if path is not None:                 # checked before minutes of refining, not after
                check_folder_option(path.parent, f"the folder of {option}")
                if path.is_dir():
                    raise SettingError(f"{option} '{path}' is a folder; give a file path to write.")
                path.parent.mkdir(parents=True, exist_ok=True)
        device = torch.device(args.device)
        model = load_hyper_lora(args.hyper_lora, device=device)
        identity = load_identity(args.identity)
        parts = sdxl_parts(args.sdxl, device)
        unet, vae = parts["unet"], parts["vae"]
        with torch.no_grad():
            px = load_photos(args.photo, args.size).to(device)
            latents = vae.encode(px).latent_dist.mean * vae.config.scaling_factor  # type: ignore[attr-defined]
        cond = encode_prompt(parts, args.prompt, args.size, device)
        abar = parts["scheduler"].alphas_cumprod.to(device=device, dtype=torch.float32)  # type: ignore[attr-defined]
        sigmas = ((1 - abar) / abar).sqrt()

        def denoise(x: Tensor, sigma: Tensor, _images: Tensor) -> Tensor:
            t = (sigmas[None, :] - sigma[:, None].float()).abs().argmin(dim=1)
            b = x.shape[0]
            s = sigma.view(-1, 1, 1, 1)
            eps = unet(x / (s ** 2 + 1).sqrt(), t, encoder_hidden_states=cond["encoder_hidden_states"].expand(b, -1, -1),  # type: ignore[operator]
                       added_cond_kwargs={"text_embeds": cond["text_embeds"].expand(b, -1),
                                          "time_ids": cond["time_ids"].expand(b, -1)}).sample
            return x - s * eps

        blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]  # type: ignore[attr-defined]
        result = refine(model, identity, diffusers_lora_targets(unet), DenoiseTask(denoise, latents, sigmas),  # type: ignore[arg-type]
                        mode=args.mode, steps=args.steps, learning_rate=args.learning_rate, strength=args.strength,
                        seed=args.seed, checkpoint_modules=blocks,
                        on_step=lambda i, loss: logger.info("step %d/%d: loss %.5f", i + 1, args.steps, loss))
    except HyperLoRAError as exc:
        logger.error("%s", exc)
        return 1
    except OSError as exc:
        logger.error("%s", os_error_line(exc))
        return 1
    sys.stdout.write(result.report() + "\n")
    if result.identity is not None and args.out is not None:
        save_identity(result.identity, args.out)
        sys.stdout.write(f"refined identity written to {args.out}\n")
    if args.lora_out is not None:
        info = result.lora.provenance
        save_lora_file(result.lora, args.lora_out, metadata=lora_metadata(
            title=args.lora_out.stem, model_name=info.get("model_name", ""),
            model_fingerprint=info.get("model_fingerprint", ""), num_images=identity.num_images),
            dtype=torch.float16)
        sys.stdout.write(f"refined LoRA written to {args.lora_out}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
