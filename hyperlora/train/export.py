"""Export a trained generator as a released-layout HyperLoRA folder (format §1-§4).

:func:`export_folder` writes, with the authors' file and key names exactly:

* ``hyper_lora_modules.json``: ``{kohya module name: {"hidden_size", "cross_attention_dim"}}`` in
  JSON (= token) order, never sorted;
* ``hyper_lora_modules.safetensors``: ``{i}.{to_q|to_k|to_v|to_out}.id_down_basis [K, in, rank]``,
  ``id_up_basis [K, rank, out]`` (+ ``base_down_basis [K, in, base_rank]``, ``base_up_basis``), i.e.
  each grouped training parameter ``[M, in*rank, K]`` transposed back per matrix;
* ``resampler.safetensors``, ``id_projector.safetensors`` (the modules' own ``state_dict`` keys);
* ``base_resampler.safetensors`` only when the generator has a Base-LoRA that is exported.

Every tensor is written in ``dtype`` (fp16 as released).  The resampler heads, which tensor shapes
cannot tell, go into each resampler file's safetensors metadata under
:data:`hyperlora.spec.RESAMPLER_HEADS_META`; :func:`hyperlora.checkpoint.load_hyper_lora` reads it
(released files without it keep the default 12).

**Distilling the Base-LoRA** (``distill_base``, the release's "0.25x of the Base-LoRA folded into the
ID-LoRA"): no exact fold exists.  The Base-LoRA's coefficients come from a different resampler reading a
different image (the blurred face), which a released folder never sees, and a rank-8 ID-LoRA cannot hold
rank 8 + 4 in general.  So the fold is *learned*: fit's optional ``distill`` stage fine-tunes the ID
generator (resampler, projector, ID basis) so that the UNet with the ID-LoRA alone predicts what it
predicts with ``ID + distill_base x Base`` (teacher: a frozen copy of the generator at the start of the
stage).  The generator records the fraction it absorbed (``model.distilled_base``); export with
``distill_base`` checks that it matches and then writes the folder without the Base-LoRA, like the
released models.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import HyperLoRAError, SettingError, check_folder_option, os_error_line
from ..safetensors_io import save_file_atomic
from ..spec import (BASE_RESAMPLER_FILE, BASIS_FILE, ID_PROJECTOR_FILE, LORA_LAYERS, MARKER_FILE,
                    RESAMPLER_FILE, RESAMPLER_HEADS_META, HyperLoRAArchitecture, LoraModuleSpec, ResamplerConfig)
from .hypernet import TrainableHyperLoRA

log = logging.getLogger(__name__)

FORMAT_META = {"format": "pt"}
STATE_FILE = "trainer_state.json"
"""fit's trainer state in each checkpoint (step, stage, RNG scheme, architecture); written last."""
GENERATOR_FILE = "generator.safetensors"
"""fit's float32 generator weights in each checkpoint (``TrainableHyperLoRA.state_dict()`` keys)."""


def _module_tensors(module: nn.Module, dtype: torch.dtype) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", dtype).contiguous().clone() for k, v in module.state_dict().items()}


def basis_tensors(model: TrainableHyperLoRA, *, dtype: torch.dtype = torch.float16, base: bool = True
                  ) -> dict[str, Tensor]:
    """The released basis tensors: ``{i}.{layer}.{kind}_{down|up}_basis`` -> ``[K, in, r]`` / ``[K, r, out]``.

    Insertion order follows the released files (module, layer, id then base, down then up).
    """
    K = model.arch.hyper_dim
    per: dict[tuple[str, int, str], tuple[Tensor, Tensor]] = {}
    kinds = ("id", "base") if base else ("id",)
    for kind in kinds:
        for g, down, up in model.basis_groups(kind):
            for m, (i, layer) in enumerate(g.entries):
                d = down[m].detach().t().reshape(K, g.in_features, g.rank)      # [K, in, r]
                u = up[m].detach().t().reshape(K, g.rank, g.out_features)       # [K, r, out]
                per[(kind, i, layer)] = (d, u)
    out: dict[str, Tensor] = {}
    for i in range(len(model.arch.modules)):
        for layer in LORA_LAYERS:
            for kind in kinds:
                d, u = per[(kind, i, layer)]
                out[f"{i}.{layer}.{kind}_down_basis"] = d.to("cpu", dtype).contiguous()
                out[f"{i}.{layer}.{kind}_up_basis"] = u.to("cpu", dtype).contiguous()
    return out


def modules_json(model: TrainableHyperLoRA) -> str:
    """``hyper_lora_modules.json`` text (module order = token order)."""
    data = {m.name: {"hidden_size": m.hidden_size, "cross_attention_dim": m.cross_attention_dim}
            for m in model.arch.modules}
    return json.dumps(data, indent=4)


def _check_finite(tensors: dict[str, Tensor], what: str) -> None:
    for key, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise SettingError(f"{what}: tensor '{key}' holds NaN/inf after conversion (training diverged or the "
                               f"values overflow the export dtype); export from an earlier checkpoint or in float32.")


def export_folder(model: TrainableHyperLoRA, out: str | os.PathLike[str], *, dtype: torch.dtype = torch.float16,
                  distill_base: float = 0.0, overwrite: bool = True) -> Path:
    """Write ``model`` as a released-layout folder at ``out`` (see the module docstring); returns ``out``.

    ``distill_base`` > 0: the generator must have absorbed that fraction of its Base-LoRA (fit's
    ``distill_base`` setting); the folder then has no Base-LoRA.  Files are written atomically; a
    ``base_resampler.safetensors`` left from an earlier export into the same folder is removed when
    this export has none.
    """
    out = Path(out)
    if distill_base < 0 or not math.isfinite(distill_base):
        raise SettingError(f"distill_base is {distill_base}; use 0 (keep the Base-LoRA) or a fraction like 0.25.")
    if distill_base > 0:
        if not math.isclose(model.distilled_base, distill_base, rel_tol=1e-6):
            raise SettingError(
                f"distill_base {distill_base} was asked for, but this generator absorbed "
                f"{model.distilled_base or 'none'} of its Base-LoRA. Set \"distill_base\": {distill_base} (and "
                f"\"distill_steps\") in the fit config so the distil stage runs, then export that run.")
    with_base = model.has_base and distill_base == 0 and model.distilled_base == 0
    if out.exists() and not out.is_dir():
        raise SettingError(f"export folder '{out}' is a file; choose a folder path.")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER_FILE).is_file():
        raise SettingError(f"export folder '{out}' exists and is not a HyperLoRA folder; choose an empty or new folder.")
    if out.is_dir() and not overwrite:
        raise SettingError(f"export folder '{out}' exists; remove it or choose another name.")
    out.mkdir(parents=True, exist_ok=True)
    heads = {RESAMPLER_HEADS_META: str(model.arch.resampler.heads), **FORMAT_META}

    basis = basis_tensors(model, dtype=dtype, base=with_base)
    _check_finite(basis, BASIS_FILE)
    save_file_atomic(basis, out / BASIS_FILE, metadata=FORMAT_META)
    del basis
    res = _module_tensors(model.resampler, dtype)
    _check_finite(res, RESAMPLER_FILE)
    save_file_atomic(res, out / RESAMPLER_FILE, metadata=heads)
    if model.id_projector is not None:
        idp = _module_tensors(model.id_projector, dtype)
        _check_finite(idp, ID_PROJECTOR_FILE)
        save_file_atomic(idp, out / ID_PROJECTOR_FILE, metadata=FORMAT_META)
    elif (out / ID_PROJECTOR_FILE).exists():
        (out / ID_PROJECTOR_FILE).unlink()
    if with_base:
        base_cfg = model.arch.base_resampler
        base_heads = {RESAMPLER_HEADS_META: str(base_cfg.heads if base_cfg else model.arch.resampler.heads),
                      **FORMAT_META}
        b = _module_tensors(model.base_resampler, dtype)
        _check_finite(b, BASE_RESAMPLER_FILE)
        save_file_atomic(b, out / BASE_RESAMPLER_FILE, metadata=base_heads)
    elif (out / BASE_RESAMPLER_FILE).exists():
        (out / BASE_RESAMPLER_FILE).unlink()
    # the marker last: a folder is only a model once everything else is in place
    tmp = out / f".{MARKER_FILE}.tmp"
    tmp.write_text(modules_json(model), encoding="utf-8")
    os.replace(tmp, out / MARKER_FILE)
    log.info("exported HyperLoRA to '%s' (%s, %d modules, base %s)", out, dtype, len(model.arch.modules),
             "yes" if with_base else "no")
    return out


# --------------------------------------------------------------------------------- checkpoints of fit


def arch_to_json(arch: HyperLoRAArchitecture) -> dict[str, Any]:
    def res(c: ResamplerConfig | None) -> dict[str, Any] | None:
        return None if c is None else {**c.__dict__, "embed_dims": list(c.embed_dims)}

    return {"modules": [[m.name, m.hidden_size, m.cross_attention_dim] for m in arch.modules],
            "hyper_dim": arch.hyper_dim, "rank": arch.rank, "base_rank": arch.base_rank,
            "resampler": res(arch.resampler), "base_resampler": res(arch.base_resampler),
            "id_embed_dim": arch.id_embed_dim, "num_id_tokens": arch.num_id_tokens}


def arch_from_json(d: dict[str, Any]) -> HyperLoRAArchitecture:
    def res(c: dict[str, Any] | None) -> ResamplerConfig | None:
        return None if c is None else ResamplerConfig(**{**c, "embed_dims": tuple(c["embed_dims"])})

    return HyperLoRAArchitecture(modules=tuple(LoraModuleSpec(n, h, c) for n, h, c in d["modules"]),
                                 hyper_dim=d["hyper_dim"], rank=d["rank"], base_rank=d["base_rank"],
                                 resampler=res(d["resampler"]), base_resampler=res(d["base_resampler"]),
                                 id_embed_dim=d["id_embed_dim"], num_id_tokens=d["num_id_tokens"])


def load_generator_from_checkpoint(ckpt: str | Path) -> TrainableHyperLoRA:
    """The generator saved in a ``checkpoints/step-XXXXXX`` folder (float32)."""
    from safetensors.torch import load_file

    ckpt = Path(ckpt)
    state_path = ckpt / STATE_FILE
    if not state_path.is_file() or not (ckpt / GENERATOR_FILE).is_file():
        raise SettingError(f"'{ckpt}' is not a complete fit checkpoint (needs {STATE_FILE} and {GENERATOR_FILE}); "
                           f"pass a checkpoints/step-XXXXXX folder of a fit run.")
    state = json.loads(state_path.read_text(encoding="utf-8"))
    model = TrainableHyperLoRA(arch_from_json(state["arch"]))
    model.load_state_dict(load_file(str(ckpt / GENERATOR_FILE)), strict=True)
    model.distilled_base = float(state.get("distilled_base", 0.0))
    return model


# --------------------------------------------------------------------------------- CLI


def latest_checkpoint(run: Path) -> Path | None:
    """The newest complete ``checkpoints/step-XXXXXX/`` of a run folder, or None."""
    root = run / "checkpoints"
    if not root.is_dir():
        return None
    done = sorted(p for p in root.glob("step-*") if (p / "trainer_state.json").is_file())
    return done[-1] if done else None


def main(argv: list[str] | None = None) -> int:
    """``python -m hyperlora.train export --run RUN_DIR [--checkpoint DIR] --out DIR [--dtype fp16|fp32]``."""
    parser = argparse.ArgumentParser(prog="python -m hyperlora.train export",
                                     description="Export a training run's generator as a released-layout folder.")
    parser.add_argument("--run", type=Path, help="run folder of 'fit' (its newest checkpoint is exported)")
    parser.add_argument("--checkpoint", type=Path, help="a checkpoints/step-XXXXXX folder (instead of --run)")
    parser.add_argument("--out", type=Path, required=True, help="folder to write (models/hyper_lora/hyper_lora/<name>)")
    parser.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16")
    parser.add_argument("--distill-base", type=float, default=0.0,
                        help="fraction of the Base-LoRA folded into the ID-LoRA by fit's distil stage (e.g. 0.25)")
    args = parser.parse_args(argv)
    try:
        check_folder_option(args.out, "--out")
        ckpt = args.checkpoint
        if ckpt is None:
            if args.run is None:
                raise SettingError("export needs --run RUN_DIR (the 'out' folder of fit) or --checkpoint DIR.")
            ckpt = latest_checkpoint(args.run)
            if ckpt is None:
                raise SettingError(f"run folder '{args.run}' has no complete checkpoint (checkpoints/step-*/"
                                   f"trainer_state.json); run fit first or pass --checkpoint.")
        model = load_generator_from_checkpoint(ckpt)
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
        export_folder(model, args.out, dtype=dtype, distill_base=args.distill_base)
    except HyperLoRAError as exc:
        sys.stderr.write(f"export: {exc}\n")
        return 2
    except OSError as exc:
        sys.stderr.write(f"export: {os_error_line(exc)}\n")
        return 2
    sys.stdout.write(f"exported {args.out}\n")
    return 0


__all__ = ["GENERATOR_FILE", "STATE_FILE", "arch_from_json", "arch_to_json", "basis_tensors", "export_folder",
           "latest_checkpoint", "load_generator_from_checkpoint", "main", "modules_json"]
