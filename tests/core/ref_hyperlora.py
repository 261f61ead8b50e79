"""Independent, slow, obvious float64 reference of the HyperLoRA math (format §5).

Written from the facts document only - it shares no code with ``hyperlora/``: it reads the
files with ``safetensors`` and ``json``, runs one image at a time, splits heads in a Python
loop, writes LayerNorm, softmax and the erf GELU out by hand and sums the basis one ``k`` at a
time.  Tests compare the fast path against it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

LAYERS = ["to_q", "to_k", "to_v", "to_out"]
KOHYA = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out_0"}


def load64(path: Path, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k).double() for k in (keys if keys is not None else f.keys())}


def layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-5) * w + b


def ln(x: torch.Tensor, sd: dict, p: str) -> torch.Tensor:
    return layer_norm(x, sd[p + ".weight"], sd[p + ".bias"])


def linear(x: torch.Tensor, sd: dict, p: str, bias: bool = True) -> torch.Tensor:
    y = x @ sd[p + ".weight"].T
    return y + sd[p + ".bias"] if bias else y


def softmax(s: torch.Tensor) -> torch.Tensor:
    e = torch.exp(s - s.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def attention(q_in: torch.Tensor, ctx: torch.Tensor, sd: dict, p: str, heads: int) -> torch.Tensor:
    """q_in [Lq, dim], ctx [Lc, dim]; no biases; per-head loop."""
    q = linear(q_in, sd, p + ".to_q", bias=False)
    k = linear(ctx, sd, p + ".to_k", bias=False)
    v = linear(ctx, sd, p + ".to_v", bias=False)
    dh = q.shape[-1] // heads
    outs = []
    for h in range(heads):
        sl = slice(h * dh, (h + 1) * dh)
        outs.append(softmax(q[:, sl] @ k[:, sl].T / math.sqrt(dh)) @ v[:, sl])
    return linear(torch.cat(outs, -1), sd, p + ".to_out.0", bias=False)


def resampler(sd: dict, x: torch.Tensor, y: torch.Tensor | None, heads: int) -> torch.Tensor:
    """One image: x [Lx, E_x], y [Ly, E_y] or None -> [Q, K]."""
    lat = sd["latents"][0]
    x = linear(x, sd, "proj_in")
    if y is not None:
        y = linear(y, sd, "proj_in_2")
    depth = len({k.split(".")[1] for k in sd if k.startswith("layers.")})
    for j in range(depth):
        p = f"layers.{j}"
        h = ln(lat, sd, f"{p}.norm_attn1")
        lat = lat + attention(h, h, sd, f"{p}.attn1", heads)
        lat = lat + attention(ln(lat, sd, f"{p}.norm_attn2_l"), ln(x, sd, f"{p}.norm_attn2_x"), sd, f"{p}.attn2", heads)
        if y is not None:
            lat = lat + attention(ln(lat, sd, f"{p}.norm_attn3_l"), ln(y, sd, f"{p}.norm_attn3_y"), sd,
                                  f"{p}.attn3", heads)
        f = gelu(linear(ln(lat, sd, f"{p}.norm_ff"), sd, f"{p}.ff.net.0.proj"))
        lat = lat + linear(f, sd, f"{p}.ff.net.2")
    return linear(lat, sd, "proj_out")


def id_project(sd: dict, e: torch.Tensor) -> torch.Tensor:
    """e [512] -> [T, E]."""
    width = sd["2.weight"].shape[0]
    out = (sd["0.weight"] @ e + sd["0.bias"]).reshape(-1, width)
    return layer_norm(out, sd["2.weight"], sd["2.bias"])


def normalise(t: torch.Tensor) -> torch.Tensor:
    return t / torch.sqrt((t * t).sum(-1, keepdim=True) + 1e-8)


def tokens(folder: Path, *, id_embeds: torch.Tensor | None, clip: torch.Tensor | None,
           weights: list[float] | None = None, heads: int = 12, kind: str = "id") -> torch.Tensor:
    """[Q, K] float64: per-image resampler outputs, (weighted) mean over images, L2 per token."""
    folder = Path(folder)
    if kind == "base":
        sd = load64(folder / "base_resampler.safetensors")
        outs = [resampler(sd, clip[n].double(), None, heads) for n in range(clip.shape[0])]
    else:
        sd = load64(folder / "resampler.safetensors")
        two = "proj_in_2.weight" in sd
        has_idp = (folder / "id_projector.safetensors").is_file()
        idp = load64(folder / "id_projector.safetensors") if has_idp else None
        n_img = (id_embeds if has_idp else clip).shape[0]
        outs = []
        for n in range(n_img):
            if has_idp:
                x = id_project(idp, id_embeds[n].double())
                y = clip[n].double() if two else None
            else:
                x, y = clip[n].double(), None
            outs.append(resampler(sd, x, y, heads))
    w = [1.0] * len(outs) if weights is None else list(weights)
    total = sum(w)
    mean = sum(wi / total * o for wi, o in zip(w, outs))
    return normalise(mean)


def module_names(folder: Path) -> list[str]:
    """JSON key order as written in the file (Python dicts keep it)."""
    return list(json.loads((Path(folder) / "hyper_lora_modules.json").read_text()))


def lora(folder: Path, toks: torch.Tensor, *, kind: str = "id", modules: list[int] | None = None
         ) -> dict[str, torch.Tensor]:
    """Per-matrix basis sum, one k at a time, float64; only ``modules`` (indices) when given."""
    folder = Path(folder)
    names = module_names(folder)
    idx = range(len(names)) if modules is None else modules
    toks = toks.double()
    out: dict[str, torch.Tensor] = {}
    for i in idx:
        keys = [f"{i}.{L}.{kind}_{w}_basis" for L in LAYERS for w in ("down", "up")]
        basis = load64(folder / "hyper_lora_modules.safetensors", keys)
        for li, L in enumerate(LAYERS):
            a, b = toks[8 * i + 2 * li], toks[8 * i + 2 * li + 1]
            D, U = basis[f"{i}.{L}.{kind}_down_basis"], basis[f"{i}.{L}.{kind}_up_basis"]
            down = torch.zeros_like(D[0])
            up = torch.zeros_like(U[0])
            for k in range(D.shape[0]):
                down += a[k] * D[k]
                up += b[k] * U[k]
            prefix = f"{names[i]}_{KOHYA[L]}"
            out[f"{prefix}.lora_down.weight"] = down.T
            out[f"{prefix}.lora_up.weight"] = up.T
            out[f"{prefix}.alpha"] = torch.tensor(D.shape[2] / 2, dtype=torch.float64)
    return out


def max_rel_diff(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| / max |ref| (values' scale)."""
    ref = ref.double()
    return float((a.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def arcface_crop(img: np.ndarray, lmk: np.ndarray) -> np.ndarray:
    """Format §6, written out independently: square [c - 2l, c + 2l] around the landmark face box
    (l = 0.75 x its larger side, centre moved up by l / 8), black outside the image; uint8 RGB."""
    (x0, y0), (x1, y1) = lmk.min(0), lmk.max(0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    half = 0.75 * max(x1 - x0, y1 - y0)
    cy -= 0.125 * half
    n = max(1, int(round(4 * half)))
    left, top = int(np.floor(cx - 2 * half)), int(np.floor(cy - 2 * half))
    out = np.zeros((n, n, 3), np.uint8)
    h, w = img.shape[:2]
    xs, ys, xe, ye = max(0, left), max(0, top), min(w, left + n), min(h, top + n)
    if xe > xs and ye > ys:
        out[ys - top:ye - top, xs - left:xe - left] = img[ys:ye, xs:xe]
    return out
