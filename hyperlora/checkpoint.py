"""HyperLoRA model folders: files, strict validation, architecture from shapes, loading.

A model folder holds the released files (format §1, §3-4)::

    hyper_lora_modules.json          ordered {module: {"hidden_size", "cross_attention_dim"}}
    hyper_lora_modules.safetensors   {i}.{to_q|to_k|to_v|to_out}.id_down_basis [K, in, rank], id_up_basis [K, rank, out]
    resampler.safetensors            perceiver resampler
    id_projector.safetensors         ArcFace embedding -> ID tokens
    base_resampler.safetensors       only for models trained with a Base-LoRA

Everything that tensor shapes can tell is read from the safetensors *headers* (no tensor data,
nothing unpickled, ever).  Heads vs head size cannot be read off shapes: the released 12 is the
default and ``heads=`` overrides it.  Loading streams the tensors with plain file reads (no
memory map, so the page cache never counts against the process) straight into the model's
preallocated buffers: peak RAM stays close to the file size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ModelFileError
from .generate import HyperLoRAModel
from .resampler import Resampler
from .safetensors_io import SafetensorsHeader, TensorReader, read_header
from .spec import (BASE_RESAMPLER_FILE, BASIS_FILE, DEFAULT_HEADS, ID_PROJECTOR_FILE, LORA_LAYERS, MARKER_FILE,
                   MODEL_FILES, PICKLE_SUFFIXES, RESAMPLER_FILE, RESAMPLER_HEADS_META, TOKENS_PER_MODULE,
                   HyperLoRAArchitecture, LoraModuleSpec, ResamplerConfig)

log = logging.getLogger(__name__)

REDOWNLOAD = ("download the released model folder again (Hugging Face bytedance-research/HyperLoRA, "
              "e.g. sdxl_hyper_id_lora_v1_fidelity) into models/hyper_lora/hyper_lora/")


# --------------------------------------------------------------------------- folder checks


def is_model_folder(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a folder holding ``hyper_lora_modules.json``."""
    p = Path(path)
    return p.is_dir() and (p / MARKER_FILE).is_file()


def _looks_like_lora(path: Path) -> bool:
    try:
        keys = read_header(path).tensors.keys()
    except ModelFileError:
        return False
    return any(".lora_down" in k or ".lora_up" in k or k.startswith("lora_unet_") for k in keys)


def _check_folder(folder: Path) -> None:
    if folder.is_file():
        if folder.suffix == ".safetensors" and _looks_like_lora(folder):
            raise ModelFileError(
                f"'{folder}' is a plain LoRA file, not a HyperLoRA model. Load it with ComfyUI's LoraLoader; "
                f"for HyperLoRA choose the folder that holds {MARKER_FILE} and its .safetensors files.")
        raise ModelFileError(
            f"'{folder}' is a file; a HyperLoRA model is a folder holding {MARKER_FILE}, {BASIS_FILE}, "
            f"{RESAMPLER_FILE} and {ID_PROJECTOR_FILE}. Choose that folder instead.")
    if not folder.is_dir():
        raise ModelFileError(f"HyperLoRA model folder '{folder}' does not exist; {REDOWNLOAD}.")
    if (folder / MARKER_FILE).is_file():
        return
    subs = sorted(p.name for p in folder.iterdir() if is_model_folder(p))
    if subs:
        raise ModelFileError(
            f"'{folder}' is not a HyperLoRA model folder but holds models: choose one of {', '.join(subs)}.")
    loras = [p.name for p in sorted(folder.glob("*.safetensors")) if _looks_like_lora(p)]
    if loras:
        raise ModelFileError(
            f"'{folder}' holds plain LoRA files ({', '.join(loras[:3])}), not a HyperLoRA model (no {MARKER_FILE}). "
            f"Load plain LoRAs with ComfyUI's LoraLoader; for HyperLoRA choose the released model folder.")
    raise ModelFileError(f"'{folder}' has no {MARKER_FILE}, so it is not a HyperLoRA model folder; {REDOWNLOAD}.")


def _file(folder: Path, name: str, *, required: bool, why: str = "") -> Path | None:
    path = folder / name
    if path.is_file():
        return path
    stem = name[: -len(".safetensors")]
    pickled = [p.name for p in folder.iterdir() if p.stem == stem and p.suffix in PICKLE_SUFFIXES]
    if pickled:
        raise ModelFileError(
            f"'{folder / pickled[0]}' is a pickle file; this pack only reads .safetensors and never unpickles "
            f"(pickles can run code). Get '{name}' instead: {REDOWNLOAD}.")
    if required:
        raise ModelFileError(f"HyperLoRA model folder '{folder}' has no '{name}'{why}; {REDOWNLOAD}.")
    return None


def _read_modules_json(path: Path) -> tuple[LoraModuleSpec, ...]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=list)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"'{path}' is not valid JSON ({exc}); {REDOWNLOAD}.") from exc
    if not isinstance(raw, list) or not raw:
        raise ModelFileError(f"'{path}' must be a non-empty JSON object of module names; {REDOWNLOAD}.")
    specs: list[LoraModuleSpec] = []
    seen: set[str] = set()
    for name, value in raw:  # keeps the file's order: it maps tokens to modules (format §3)
        info = dict(value) if isinstance(value, list) else None
        hidden = info.get("hidden_size") if info else None
        cross = info.get("cross_attention_dim") if info else None
        if (not isinstance(hidden, int) or hidden <= 0 or
                not (cross is None or (isinstance(cross, int) and cross > 0)) or name in seen):
            raise ModelFileError(
                f"'{path}': entry '{name}' must be unique and look like "
                f"{{\"hidden_size\": int, \"cross_attention_dim\": int or null}}, found {value!r}; {REDOWNLOAD}.")
        seen.add(name)
        specs.append(LoraModuleSpec(name, hidden, cross))
    return tuple(specs)


# --------------------------------------------------------------------------- header validation


def _shape_error(path: Path, key: str, expected: Any, found: Any, why: str, fix: str) -> ModelFileError:
    return ModelFileError(f"'{path}': tensor '{key}' has shape {list(found)} but {list(expected)} was expected "
                          f"({why}). {fix}")


def _compare_keys(hdr: SafetensorsHeader, expected: dict[str, tuple[int, ...]], *, why: str, fix: str) -> None:
    """Exact key set and shapes, naming the file, key, expected and found shape."""
    found = hdr.tensors
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    if missing:
        raise ModelFileError(
            f"'{hdr.path}' lacks {len(missing)} tensor(s) the model needs, e.g. "
            f"{', '.join(repr(k) for k in missing[:3])} ({why}). {fix}")
    if unexpected:
        raise ModelFileError(
            f"'{hdr.path}' has {len(unexpected)} unexpected tensor(s), e.g. "
            f"{', '.join(repr(k) for k in unexpected[:3])} ({why}). {fix}")
    for key, shape in expected.items():
        if found[key].shape != tuple(shape):
            raise _shape_error(hdr.path, key, shape, found[key].shape, why, fix)


def _need(hdr: SafetensorsHeader, key: str, ndim: int, what: str) -> tuple[int, ...]:
    info = hdr.tensors.get(key)
    if info is None:
        raise ModelFileError(f"'{hdr.path}' has no tensor '{key}', so it is not a HyperLoRA {what} file; "
                             f"{REDOWNLOAD}.")
    if len(info.shape) != ndim:
        raise ModelFileError(f"'{hdr.path}': tensor '{key}' has shape {list(info.shape)}, expected {ndim} "
                             f"dimensions; {REDOWNLOAD}.")
    return info.shape


def _heads(hdr: SafetensorsHeader, heads: int | None) -> tuple[int, str]:
    """Resampler heads and where the number came from: the caller, the file's metadata
    (models trained by this pack record it), else the released default 12."""
    if heads is not None:
        return int(heads), "as requested"
    raw = hdr.metadata.get(RESAMPLER_HEADS_META)
    if raw is None:
        return DEFAULT_HEADS, f"the released default; the file has no '{RESAMPLER_HEADS_META}' metadata"
    try:
        return int(raw), f"from the file's metadata '{RESAMPLER_HEADS_META}'"
    except ValueError:
        raise ModelFileError(f"'{hdr.path}': the metadata '{RESAMPLER_HEADS_META}' is {raw!r}, not a whole number; "
                             f"the file is damaged or was written by a broken exporter; {REDOWNLOAD}.") from None


def _resampler_config(hdr: SafetensorsHeader, *, heads: int | None, what: str) -> ResamplerConfig:
    _, q, dim = _need(hdr, "latents", 3, what)
    e_x = _need(hdr, "proj_in.weight", 2, what)[1]
    embed = (e_x,)
    if "proj_in_2.weight" in hdr.tensors:
        embed = (e_x, _need(hdr, "proj_in_2.weight", 2, what)[1])
    k = _need(hdr, "proj_out.weight", 2, what)[0]
    inner = _need(hdr, "layers.0.attn1.to_q.weight", 2, what)[0]
    ff = _need(hdr, "layers.0.ff.net.0.proj.weight", 2, what)[0]
    depth = 1 + max(int(key.split(".")[1]) for key in hdr.tensors
                    if key.startswith("layers.") and key.split(".")[1].isdigit())
    n_heads, source = _heads(hdr, heads)
    if n_heads <= 0 or inner % n_heads:
        raise ModelFileError(
            f"'{hdr.path}': the attention width {inner} (tensor 'layers.0.attn1.to_q.weight') cannot be split into "
            f"{n_heads} heads ({source}). The file is damaged or was written by a broken exporter; {REDOWNLOAD}.")
    if ff % dim:
        raise _shape_error(hdr.path, "layers.0.ff.net.0.proj.weight", [dim * max(1, round(ff / dim)), dim],
                           [ff, dim], "the feed-forward width must be a multiple of the resampler width", REDOWNLOAD)
    cfg = ResamplerConfig(dim=dim, depth=depth, heads=n_heads, dim_head=inner // n_heads, ff_mult=ff // dim,
                          num_queries=q, output_dim=k, embed_dims=embed)
    ref = Resampler(cfg, device="meta")
    expected = {key: tuple(t.shape) for key, t in ref.state_dict().items()}
    _compare_keys(hdr, expected, why=f"a {len(embed)}-condition resampler of width {dim}, depth {depth}",
                  fix=f"The file is damaged or from another model; {REDOWNLOAD}.")
    return cfg


def _basis_layout(hdr: SafetensorsHeader, modules: tuple[LoraModuleSpec, ...], json_path: Path
                  ) -> tuple[int, int, int | None]:
    """Checks every basis tensor against the JSON; returns (K, rank, base_rank or None)."""
    k, _, rank = _need(hdr, "0.to_q.id_down_basis", 3, "basis")
    base_rank = None
    if "0.to_q.base_down_basis" in hdr.tensors:
        base_rank = _need(hdr, "0.to_q.base_down_basis", 3, "basis")[2]
    expected: dict[str, tuple[int, ...]] = {}
    for i, m in enumerate(modules):
        for layer in LORA_LAYERS:
            fin, fout = m.in_features(layer), m.out_features(layer)
            expected[f"{i}.{layer}.id_down_basis"] = (k, fin, rank)
            expected[f"{i}.{layer}.id_up_basis"] = (k, rank, fout)
            if base_rank is not None:
                expected[f"{i}.{layer}.base_down_basis"] = (k, fin, base_rank)
                expected[f"{i}.{layer}.base_up_basis"] = (k, base_rank, fout)
    n_json = len(modules)
    n_file = len({key.split(".")[0] for key in hdr.tensors if key.split(".")[0].isdigit()})
    if n_file != n_json:
        raise ModelFileError(
            f"'{json_path}' lists {n_json} modules but '{hdr.path}' holds a basis for {n_file}: the two files come "
            f"from different models. Use the JSON and safetensors of the same model; {REDOWNLOAD}.")
    _compare_keys(hdr, expected, why=f"module sizes from '{json_path.name}', K={k}, rank={rank}",
                  fix=f"'{json_path.name}' and '{hdr.path.name}' must come from the same model; {REDOWNLOAD}.")
    return k, rank, base_rank


def read_architecture(folder: str | os.PathLike[str], *, heads: int | None = None) -> HyperLoRAArchitecture:
    """Architecture of a model folder from the JSON and safetensors headers (no tensor data read).

    Raises :class:`ModelFileError` naming the file, key, expected and found shape and the fix.
    """
    folder = Path(folder)
    _check_folder(folder)
    json_path = folder / MARKER_FILE
    modules = _read_modules_json(json_path)
    basis = read_header(_file(folder, BASIS_FILE, required=True))
    k, rank, base_rank = _basis_layout(basis, modules, json_path)
    res_hdr = read_header(_file(folder, RESAMPLER_FILE, required=True))
    res = _resampler_config(res_hdr, heads=heads, what="resampler")
    q = TOKENS_PER_MODULE * len(modules)
    fix = f"'{RESAMPLER_FILE}' and '{BASIS_FILE}' must come from the same model; {REDOWNLOAD}."
    if res.num_queries != q:
        raise _shape_error(res_hdr.path, "latents", [1, q, res.dim], [1, res.num_queries, res.dim],
                           f"{TOKENS_PER_MODULE} tokens for each of the {len(modules)} modules in {MARKER_FILE}", fix)
    if res.output_dim != k:
        raise _shape_error(res_hdr.path, "proj_out.weight", [k, res.dim], [res.output_dim, res.dim],
                           f"one coefficient per basis element, K={k} in {BASIS_FILE}", fix)

    two = len(res.embed_dims) == 2
    why = " (its resampler has two conditions: ID tokens and CLIP features)" if two else ""
    idp_path = _file(folder, ID_PROJECTOR_FILE, required=two, why=why)
    id_embed_dim = num_id_tokens = None
    if idp_path is not None:
        idp = read_header(idp_path)
        out_f, id_embed_dim = _need(idp, "0.weight", 2, "id_projector")
        e_x = res.embed_dims[0]
        num_id_tokens = out_f // e_x
        _compare_keys(idp, {"0.weight": (e_x * num_id_tokens, id_embed_dim), "0.bias": (e_x * num_id_tokens,),
                            "2.weight": (e_x,), "2.bias": (e_x,)},
                      why=f"ID tokens of width {e_x} = the input width of the resampler's proj_in",
                      fix=f"'{ID_PROJECTOR_FILE}' and '{RESAMPLER_FILE}' must come from the same model; {REDOWNLOAD}.")
        if out_f % e_x:
            raise _shape_error(idp.path, "0.weight", [e_x * max(1, num_id_tokens), id_embed_dim],
                               [out_f, id_embed_dim], f"a multiple of the ID token width {e_x}", REDOWNLOAD)

    base_path = _file(folder, BASE_RESAMPLER_FILE, required=base_rank is not None,
                      why=f" although '{BASIS_FILE}' holds a Base-LoRA basis")
    base_res = None
    if base_path is not None:
        base_hdr = read_header(base_path)
        if base_rank is None:
            raise ModelFileError(
                f"'{base_path}' exists but '{basis.path}' holds no base basis ('0.to_q.base_down_basis'): the files "
                f"come from different models. Remove '{BASE_RESAMPLER_FILE}' or {REDOWNLOAD}.")
        base_res = _resampler_config(base_hdr, heads=heads, what="base resampler")
        if base_res.num_queries != q or base_res.output_dim != k or len(base_res.embed_dims) != 1:
            raise _shape_error(base_hdr.path, "latents / proj_out.weight", [q, k, 1],
                               [base_res.num_queries, base_res.output_dim, len(base_res.embed_dims)],
                               "queries, K and number of conditions of a base resampler for this basis", fix)
    return HyperLoRAArchitecture(modules=modules, hyper_dim=k, rank=rank, base_rank=base_rank, resampler=res,
                                 base_resampler=base_res, id_embed_dim=id_embed_dim, num_id_tokens=num_id_tokens)


def model_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The model's files that exist, in a fixed order (JSON first)."""
    folder = Path(folder)
    return [folder / n for n in MODEL_FILES if (folder / n).is_file()]


def model_fingerprint(folder: str | os.PathLike[str]) -> str:
    """Cheap content fingerprint (16 hex digits): JSON bytes, safetensors headers, file sizes and
    64 KB sampled at 16 fixed places of each file's data (reads well under 1 MB in all)."""
    h = hashlib.sha256(b"hyperlora-fingerprint-v1")
    for path in model_files(folder):
        size = path.stat().st_size
        h.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as f:
            if path.suffix == ".json":
                h.update(f.read())
                continue
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            h.update(head + f.read(min(n, size)))
            start = 8 + n
            span = max(0, size - start)
            for j in range(16):
                f.seek(start + span * j // 16)
                h.update(f.read(4096))
    return h.hexdigest()[:16]


def _load_model(folder: Path, arch: HyperLoRAArchitecture, *, dtype: torch.dtype | None, device: torch.device,
               fingerprint: str, resampler_dtype: torch.dtype | None = None,
               check_interrupt: Callable[[], None] | None = None) -> HyperLoRAModel:
    """Stream a validated folder into a new :class:`HyperLoRAModel` (see ``load_hyper_lora``).

    Modules are created on the meta device and receive the loaded tensors with strict
    ``load_state_dict(assign=True)``; the basis is read tensor by tensor (one staging buffer)
    and copied, transposed, straight into the preallocated group buffers.  No fp32 copy of
    the basis is ever made unless ``dtype`` is fp32.
    """
    basis_hdr = read_header(folder / BASIS_FILE)
    file_dtype = next(iter(basis_hdr.tensors.values())).torch_dtype
    dtype = dtype or file_dtype
    module_dtype = resampler_dtype or dtype
    model = HyperLoRAModel(arch, name=folder.name, fingerprint=fingerprint, device=device, dtype=dtype,
                           resampler_dtype=module_dtype)
    parts: list[tuple[str, nn.Module | None]] = [(RESAMPLER_FILE, model.resampler),
                                                 (ID_PROJECTOR_FILE, model.id_projector),
                                                 (BASE_RESAMPLER_FILE, model.base_resampler)]
    for filename, module in parts:
        if module is None:
            continue
        with TensorReader(read_header(folder / filename)) as reader:
            sd = {key: reader.read(key, copy=True).to(device=device, dtype=module_dtype)
                  for key in reader.header.tensors}
        try:
            module.load_state_dict(sd, strict=True, assign=True)
        except RuntimeError as exc:  # read_architecture checked the keys already; keep the user-facing type
            raise ModelFileError(f"'{folder / filename}' does not fit the model: {exc}") from exc
        module.requires_grad_(False).eval()
        del sd
    K = arch.hyper_dim
    with TensorReader(basis_hdr) as reader, torch.no_grad():
        for kind in ("id", "base"):
            for g, down_b, up_b in model.basis_groups(kind):
                for m, (i, layer) in enumerate(g.entries):
                    if check_interrupt is not None:                                 # ~5 ms per pair (3 GB total)
                        check_interrupt()
                    src = reader.read(f"{i}.{layer}.{kind}_down_basis")            # [K, in, rank]
                    down_b[m].copy_(src.view(K, -1).t())                            # [in*rank, K]
                    src = reader.read(f"{i}.{layer}.{kind}_up_basis")              # [K, rank, out]
                    up_b[m].copy_(src.view(K, -1).t())                              # [rank*out, K]
    model.requires_grad_(False).eval()
    log.info("loaded HyperLoRA '%s' (%d modules, K=%d, rank %d, %s on %s)", folder.name, len(arch.modules), K,
             arch.rank, dtype, device)
    return model


def load_hyper_lora(folder: str | os.PathLike[str], *, dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu", heads: int | None = None,
                    resampler_dtype: torch.dtype | None = None,
                    check_interrupt: Callable[[], None] | None = None) -> HyperLoRAModel:
    """Validate and load a model folder into a :class:`~hyperlora.generate.HyperLoRAModel`.

    ``dtype`` None keeps the files' dtype (fp16 for the release).  Strict: every tensor is
    checked against the architecture and for NaN/inf; nothing is unpickled.  Peak RAM is about
    the loaded size (basis streamed tensor by tensor into grouped buffers).  ``resampler_dtype``
    overrides ``dtype`` for the resampler / projectors only (on an AVX2 CPU the fp16 resampler is
    about 4x and bf16 about 6x slower than fp32, bench/bench_resampler.py --also fp16 bf16; the fp32
    resampler costs ~150 MB more).  ``heads`` overrides the resampler heads
    (default: the file's ``hyperlora_resampler_heads`` metadata, else the released 12).
    ``check_interrupt`` is called before each basis matrix pair is read (it raises to stop).
    """
    folder = Path(folder)
    arch = read_architecture(folder, heads=heads)
    return _load_model(folder, arch, dtype=dtype, device=torch.device(device),
                       fingerprint=model_fingerprint(folder), resampler_dtype=resampler_dtype,
                       check_interrupt=check_interrupt)


__all__ = [
    "REDOWNLOAD", "is_model_folder", "load_hyper_lora", "model_files", "model_fingerprint", "read_architecture",
]
