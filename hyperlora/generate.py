"""HyperLoRAModel: encoder features -> coefficient tokens -> kohya LoRA (format §5).

Token mapping (format §5.5): module ``i`` (JSON order) owns tokens ``8i .. 8i+7``; layers in the
order to_q, to_k, to_v, to_out, two tokens each: the first holds the down coefficients ``a``,
the second the up coefficients ``b``::

    lora_down = (sum_k a_k * down_basis[k])^T   [rank, in]
    lora_up   = (sum_k b_k * up_basis[k])^T     [out, rank]
    alpha     = rank / 2

Fast path: matrices with equal (in, out) share a *group*; a group's basis is one buffer
``[M, in*rank, K]`` (down) / ``[M, rank*out, K]`` (up), i.e. each basis tensor transposed so
that K is contiguous.  Building a group is then a batched matrix-vector product over one
contiguous block (memory-bandwidth bound) on the model's device and dtype, followed by one
transposing copy of the small result.  Three kernels are available: ``"bmm"`` (one batched
matmul per group; the right choice on GPUs), ``"mv"`` (``torch.mv`` per matrix into a
preallocated group output: no allocation and no host round trip; on CPU, ATen's fp16/bf16
``bmm`` has no batched mat-vec kernel and is 4-30x slower than its ``mv``) and ``"native"``
(fp16 on x86-64 CPUs: the AVX2 row-dot kernel of ``cpu_kernel``, which streams the basis at the
memory-bandwidth floor where ATen's fp16 mat-vec with 128-wide rows reaches about half of it).
``"auto"`` picks ``"native"`` for fp16 on a CPU where that kernel is available, else ``"mv"`` on
CPU and ``"bmm"`` elsewhere.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import cpu_kernel
from .cache import LRU, digest
from .errors import ImageInputError, LoraError
from .lora import normalize_tokens
from .resampler import IDProjector, Resampler
from .spec import LORA_LAYERS, HyperLoRAArchitecture, kohya_prefix, token_index

log = logging.getLogger(__name__)

STRATEGIES = ("auto", "mv", "bmm", "native")
TOKEN_CACHE_SIZE = 32    # token sets kept (each [Q, K] float32: 0.6 MB for the release)
TOKEN_CACHE: LRU[Tensor] = LRU(TOKEN_CACHE_SIZE)
"""Resampler outputs by (features, model fingerprint, resampler config, precision, device type);
a re-queue with the same photos and settings runs no resampler.  See ``HyperLoRAModel.token_key``."""


def clear_token_cache() -> None:
    """Forget every cached token set."""
    TOKEN_CACHE.clear()


@dataclass(frozen=True)
class BasisGroup:
    """Matrices of one kind ("id"/"base") sharing (in, out); buffers live on the model."""

    kind: str
    index: int
    in_features: int
    out_features: int
    rank: int
    entries: tuple[tuple[int, str], ...]  # (module index, layer) in JSON order

    @property
    def down_buffer(self) -> str:
        return f"{self.kind}_down_{self.index}"  # [M, in*rank, K]

    @property
    def up_buffer(self) -> str:
        return f"{self.kind}_up_{self.index}"  # [M, rank*out, K]

    @property
    def token_buffer(self) -> str:
        return f"{self.kind}_tok_{self.index}"  # [M] long: index of the down token; up = +1


def make_groups(arch: HyperLoRAArchitecture, kind: str) -> list[BasisGroup]:
    """Group the (module, layer) matrices by (in, out), first appearance in JSON order."""
    rank = arch.rank if kind == "id" else arch.base_rank
    if rank is None:
        return []
    order: dict[tuple[int, int], list[tuple[int, str]]] = {}
    for i, m in enumerate(arch.modules):
        for layer in LORA_LAYERS:
            order.setdefault((m.in_features(layer), m.out_features(layer)), []).append((i, layer))
    return [BasisGroup(kind, j, fin, fout, rank, tuple(entries))
            for j, ((fin, fout), entries) in enumerate(order.items())]


_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOL_LOCK = threading.Lock()


def _mv_pool(workers: int) -> ThreadPoolExecutor:
    """A process-wide pool of ``workers`` threads for the CPU mat-vec kernel (made on first use)."""
    with _POOL_LOCK:
        if workers not in _POOLS:
            _POOLS[workers] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hyperlora-mv")
        return _POOLS[workers]


def _mv_rows(triples: list[tuple[Tensor, Tensor, Tensor]], inference: bool = False) -> None:
    # grad / inference mode are thread-local: a worker thread takes the caller's explicitly
    with torch.inference_mode(inference), torch.no_grad():
        for b, c, o in triples:
            torch.mv(b, c, out=o)


def _workers(basis: Tensor, workers: int | None, units: int) -> int:
    n = workers if workers is not None else (torch.get_num_threads() if basis.device.type == "cpu" else 1)
    return max(1, min(int(n), 8, units))


def _resolve(strategy: str, basis: Tensor, coeffs: Tensor) -> str:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; use one of {STRATEGIES}")
    if strategy != "auto":
        return strategy
    if basis.device.type != "cpu":
        return "bmm"
    if basis.dtype == torch.float16 and cpu_kernel.supports(basis, coeffs):
        return "native"
    return "mv"


def batched_matvecs(pairs: list[tuple[Tensor, Tensor]], *, strategy: str = "auto",
                    workers: int | None = None) -> list[Tensor]:
    """``[batched_matvec(b, c) for b, c in pairs]`` with one thread dispatch for all native pairs."""
    outs: list[Tensor] = []
    native: list[tuple[Tensor, Tensor, Tensor]] = []
    for basis, coeffs in pairs:
        chosen = _resolve(strategy, basis, coeffs)
        if chosen != "native":
            outs.append(batched_matvec(basis, coeffs, strategy=chosen, workers=workers))
            continue
        if strategy == "native" and not cpu_kernel.supports(basis, coeffs):    # "auto" checked it already
            raise LoraError("the native CPU kernel needs a contiguous fp16 CPU basis [M, N, K] with K a multiple of "
                            f"{cpu_kernel.K_MULTIPLE}, coeffs [M, K] and no autograd (got basis {list(basis.shape)} "
                            f"{basis.dtype} on {basis.device}; kernel: {cpu_kernel.status().reason}); "
                            "use strategy 'auto' or 'mv'.")
        out = torch.empty(basis.shape[:2], dtype=basis.dtype)
        native.append((basis, coeffs.to(torch.float32).contiguous(), out))
        outs.append(out)
    if native:
        rows = sum(b.shape[0] * b.shape[1] for b, _, _ in native)
        w = _workers(native[0][0], workers, max(1, rows // cpu_kernel.CHUNK_ROWS))
        cpu_kernel.rowdot_f16(native, workers=w, pool=_mv_pool(w - 1) if w > 1 else None)
    return outs


def batched_matvec(basis: Tensor, coeffs: Tensor, *, strategy: str = "auto", out: Tensor | None = None,
                   workers: int | None = None) -> Tensor:
    """``out[m] = basis[m] @ coeffs[m]``: basis ``[M, N, K]``, coeffs ``[M, K]`` -> ``[M, N]`` (basis dtype).

    ``"mv"`` runs one ``torch.mv`` per matrix; on the CPU the matrices are spread over ``workers``
    threads (default: torch's intra-op thread count), because ATen's fp16 mat-vec kernel with
    K-wide rows hardly uses a second core by itself.  ``"native"`` (fp16, CPU, K % 8 == 0) runs
    ``cpu_kernel.rowdot_f16`` on the same number of threads and raises ``LoraError`` when that
    kernel is unavailable or cannot take these tensors.  Each output value is computed by exactly
    one call in a fixed order, so both are bit-identical for any number of workers.
    """
    strategy = _resolve(strategy, basis, coeffs)
    if strategy == "native":
        res = batched_matvecs([(basis, coeffs)], strategy="native", workers=workers)[0]
        return res if out is None else out.copy_(res)
    if strategy == "bmm":
        res = torch.bmm(basis, coeffs.unsqueeze(-1)).squeeze(-1)
        return res if out is None else out.copy_(res)
    if out is None:
        out = torch.empty(basis.shape[:2], dtype=basis.dtype, device=basis.device)
    triples = list(zip(basis.unbind(0), coeffs.unbind(0), out.unbind(0)))
    n = _workers(basis, workers, len(triples))
    # the caller's inference mode goes along, also on this thread: ``out`` made inside inference mode
    # is an inference tensor, which may only be written inside it
    inference = torch.is_inference_mode_enabled()
    if n == 1:
        _mv_rows(triples, inference)
    else:
        list(_mv_pool(n).map(_mv_rows, [triples[i::n] for i in range(n)], [inference] * n))
    return out


def _seq_len(t: Tensor) -> int:
    return t.shape[1] if t.dim() == 3 else 257


class HyperLoRAModel(nn.Module):
    """A loaded HyperLoRA model.  Build it with :func:`hyperlora.checkpoint.load_hyper_lora`.

    Constructed directly, the resampler / projector parameters live on the meta device and the
    basis buffers are uninitialised (useful to inspect keys and shapes for free).
    """

    def __init__(self, arch: HyperLoRAArchitecture, *, name: str = "", fingerprint: str = "",
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float16,
                 resampler_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        basis_dtype, dtype = dtype, resampler_dtype or dtype
        self.arch = arch
        self.name = name
        self.fingerprint = fingerprint
        self.resampler = Resampler(arch.resampler, device="meta", dtype=dtype)
        self.id_projector: IDProjector | None = None
        if arch.id_embed_dim is not None and arch.num_id_tokens is not None:
            self.id_projector = IDProjector(id_embed_dim=arch.id_embed_dim, embed_dim=arch.resampler.embed_dims[0],
                                            num_tokens=arch.num_id_tokens, device="meta", dtype=dtype)
        self.base_resampler: Resampler | None = None
        if arch.base_resampler is not None:
            self.base_resampler = Resampler(arch.base_resampler, device="meta", dtype=dtype)
        self.groups: dict[str, list[BasisGroup]] = {"id": make_groups(arch, "id"), "base": make_groups(arch, "base")}
        K = arch.hyper_dim
        for groups in self.groups.values():
            for g in groups:
                M = len(g.entries)
                self.register_buffer(g.down_buffer, torch.empty(M, g.in_features * g.rank, K, device=device,
                                                                dtype=basis_dtype), persistent=False)
                self.register_buffer(g.up_buffer, torch.empty(M, g.rank * g.out_features, K, device=device,
                                                              dtype=basis_dtype), persistent=False)
                tok = torch.tensor([token_index(i, layer) for i, layer in g.entries], dtype=torch.long)
                self.register_buffer(g.token_buffer, tok.to(device), persistent=False)

    # ----------------------------------------------------------------------------- properties

    @property
    def basis_dtype(self) -> torch.dtype:
        return getattr(self, self.groups["id"][0].down_buffer).dtype

    @property
    def device(self) -> torch.device:
        return getattr(self, self.groups["id"][0].down_buffer).device

    @property
    def module_dtype(self) -> torch.dtype:
        return self.resampler.latents.dtype

    def basis_groups(self, kind: str = "id") -> list[tuple[BasisGroup, Tensor, Tensor]]:
        """``(group, down [M, in*rank, K], up [M, rank*out, K])`` for each group of ``kind``."""
        return [(g, getattr(self, g.down_buffer), getattr(self, g.up_buffer)) for g in self.groups[kind]]

    # ----------------------------------------------------------------------------- tokens

    def _mean_tokens(self, resampler: Resampler, x: Tensor, y: Tensor | None, weights: Tensor | None,
                     chunk: int, check_interrupt: Callable[[], None] | None = None) -> Tensor:
        n = x.shape[0]
        if weights is None:
            w = torch.full((n,), 1.0 / n, dtype=torch.float32)
        else:
            w = torch.as_tensor(weights, dtype=torch.float32).flatten()
            if w.numel() != n or bool((w < 0).any()) or not float(w.sum()) > 0:
                raise ImageInputError(f"image weights must be {n} non-negative numbers with a positive sum, "
                                      f"got {w.tolist()}; give one weight per image.")
            w = w / w.sum()
        w = w.to(self.device)
        acc = None
        with torch.no_grad():
            for s in range(0, n, chunk):
                if check_interrupt is not None:
                    check_interrupt()
                out = resampler(x[s:s + chunk], None if y is None else y[s:s + chunk]).float()  # [n, Q, K]
                part = torch.einsum("n,nqk->qk", w[s:s + chunk], out)
                acc = part if acc is None else acc + part
        return normalize_tokens(acc)

    def _prep(self, t: Tensor, what: str, shape_tail: tuple[int, ...]) -> Tensor:
        if t.dim() != 1 + len(shape_tail) or tuple(t.shape[1:]) != shape_tail or t.shape[0] == 0:
            raise ImageInputError(f"{what} must have shape [N, {', '.join(map(str, shape_tail))}] with N >= 1, "
                                  f"got {list(t.shape)}; check that the encoder matches this HyperLoRA model.")
        return t.to(device=self.device, dtype=self.module_dtype)

    def _weights_untouched(self) -> bool:
        """True unless a parameter was changed in place since loading (its version counter moved).

        Inference tensors (ComfyUI loads under ``torch.inference_mode``) keep no version counter;
        they cannot be trained, so they count as untouched.
        """
        return all(p.is_inference() or p._version == 0 for p in self.parameters())

    def token_key(self, kind: str, *features: Tensor | None, weights: Tensor | None = None,
                  chunk: int = 4) -> tuple | None:
        """The :data:`TOKEN_CACHE` key of ``id_tokens`` / ``base_tokens`` for these inputs, or None (no caching).

        Everything the tokens depend on: the features' bytes, shapes and dtypes (wherever they
        live), the weights and chunking, the model files (fingerprint), the resampler's config
        (heads are not in the shapes), its precision and the device type it runs on (CPU and GPU
        kernels round differently).  A model without a fingerprint (built in memory) or whose
        weights were changed in place since loading is not cached.
        """
        if not self.fingerprint or not self._weights_untouched():
            return None
        resampler = self.resampler if kind == "id" else self.base_resampler
        w = None if weights is None else torch.as_tensor(weights, dtype=torch.float32)
        return (kind, self.fingerprint, resampler.config if resampler is not None else None,
                str(self.module_dtype), self.device.type, int(chunk), digest(*features, w))

    def _cached(self, key: tuple | None, compute: Callable[[], Tensor]) -> Tensor:
        hit = TOKEN_CACHE.get(key) if key is not None else None
        if hit is not None:
            return hit.to(self.device, copy=True)
        tokens = compute()
        if key is not None:
            TOKEN_CACHE.put(key, tokens.detach().to("cpu", copy=True))
        return tokens

    def id_tokens(self, *, id_embeds: Tensor | None, clip_features: Tensor | None,
                  weights: Tensor | None = None, chunk: int = 4, use_cache: bool = True,
                  check_interrupt: Callable[[], None] | None = None) -> Tensor:
        """id_embeds ``[N, 512]`` (L2-normalised ArcFace), clip_features ``[N, 257, E]`` -> ``[Q, K]`` float32.

        Mean (or ``weights``-weighted mean) of the resampler outputs over the N images, then
        per-token L2 normalisation.  Two-condition models need both inputs; a one-condition
        model uses the ID embedding when it has an id_projector, else the CLIP features.
        The same inputs again return the cached tokens (bit-identical) without running the resampler.
        ``check_interrupt`` is called before each chunk of ``chunk`` images.
        """
        key = self.token_key("id", id_embeds, clip_features, weights=weights, chunk=chunk) if use_cache else None
        return self._cached(key, lambda: self._id_tokens(id_embeds, clip_features, weights, chunk, check_interrupt))

    def _id_tokens(self, id_embeds: Tensor | None, clip_features: Tensor | None, weights: Tensor | None,
                   chunk: int, check_interrupt: Callable[[], None] | None = None) -> Tensor:
        cfg = self.arch.resampler
        x = y = None
        if self.id_projector is not None:
            if id_embeds is None:
                raise ImageInputError("this HyperLoRA model needs the ArcFace face embedding (id_embeds); "
                                      "run face analysis on the images first.")
            e = self._prep(id_embeds, "id_embeds", (self.arch.id_embed_dim,))
            with torch.no_grad():
                x = self.id_projector(e)
        need_clip = len(cfg.embed_dims) == 2 or self.id_projector is None
        if need_clip:
            if clip_features is None:
                raise ImageInputError("this HyperLoRA model needs CLIP image features (clip_features); "
                                      "encode the face crops with the CLIP vision model first.")
            c = self._prep(clip_features, "clip_features", (_seq_len(clip_features), cfg.embed_dims[-1]))
            if x is None:
                x = c
            else:
                y = c
                if c.shape[0] != x.shape[0]:
                    raise ImageInputError(f"got {x.shape[0]} face embeddings but {c.shape[0]} CLIP feature sets; "
                                          "give both for the same images.")
        return self._mean_tokens(self.resampler, x, y, weights, chunk, check_interrupt)

    def base_tokens(self, clip_features: Tensor, weights: Tensor | None = None, *, chunk: int = 4,
                    use_cache: bool = True, check_interrupt: Callable[[], None] | None = None) -> Tensor:
        """clip_features of the base-condition crops ``[N, 257, E]`` -> ``[Qb, K]`` float32 (cached like ``id_tokens``;
        ``check_interrupt`` before each chunk)."""
        if self.base_resampler is None:
            raise LoraError(f"HyperLoRA model '{self.name}' has no Base-LoRA (no base_resampler.safetensors); "
                            f"use kind 'id' or a model trained with a Base-LoRA.")
        resampler = self.base_resampler
        key = self.token_key("base", clip_features, weights=weights, chunk=chunk) if use_cache else None

        def compute() -> Tensor:
            c = self._prep(clip_features, "clip_features", (_seq_len(clip_features), resampler.config.embed_dims[0]))
            return self._mean_tokens(resampler, c, None, weights, chunk, check_interrupt)

        return self._cached(key, compute)

    # ----------------------------------------------------------------------------- LoRA

    def build_lora(self, tokens: Tensor, *, kind: str = "id", dtype: torch.dtype | None = None,
                   strategy: str = "auto") -> dict[str, Tensor]:
        """tokens ``[Q, K]`` -> kohya LoRA dict in JSON module order.

        ``{module}_{to_q|to_k|to_v|to_out_0}.lora_down.weight [rank, in]``, ``.lora_up.weight
        [out, rank]``, ``.alpha`` (scalar, rank/2).  Built in the basis dtype on the model's device
        (fp16/bf16 kernels accumulate in fp32); ``dtype`` sets the output dtype (default: basis dtype).
        The matrices of one group are views of one tensor (clone them before
        ``safetensors.torch.save_file``, which refuses shared storage).
        """
        if kind not in ("id", "base"):
            raise LoraError(f"LoRA kind must be 'id' or 'base', got {kind!r}.")
        groups = self.groups[kind]
        if not groups:
            raise LoraError(f"HyperLoRA model '{self.name}' has no Base-LoRA basis; use kind 'id'.")
        q, k = self.arch.num_tokens, self.arch.hyper_dim
        if tokens.dim() != 2 or tuple(tokens.shape) != (q, k):
            raise LoraError(f"coefficient tokens have shape {list(tokens.shape)} but HyperLoRA model '{self.name}' "
                            f"needs [{q}, {k}]; the identity was made with another model - make it again with this one.")
        out_dtype = dtype or self.basis_dtype
        t = tokens.to(device=self.device, dtype=self.basis_dtype)
        slots: dict[tuple[int, str], tuple[Tensor, Tensor]] = {}
        with torch.no_grad():
            parts = self.basis_groups(kind)
            pairs = []
            for g, down_b, up_b in parts:
                tok = getattr(self, g.token_buffer)
                pairs += [(down_b, t.index_select(0, tok)), (up_b, t.index_select(0, tok + 1))]
            results = batched_matvecs(pairs, strategy=strategy)       # [M, in*rank], [M, rank*out] per group
            for (g, _, _), down, up in zip(parts, results[0::2], results[1::2]):
                m, r = len(g.entries), g.rank
                down_t = torch.empty(m, r, g.in_features, dtype=out_dtype, device=self.device)
                down_t.copy_(down.view(m, g.in_features, r).transpose(1, 2))
                up_t = torch.empty(m, g.out_features, r, dtype=out_dtype, device=self.device)
                up_t.copy_(up.view(m, r, g.out_features).transpose(1, 2))
                for (i, layer), d, u in zip(g.entries, down_t.unbind(0), up_t.unbind(0)):
                    slots[(i, layer)] = (d, u)
        rank = groups[0].rank
        lora: dict[str, Tensor] = {}
        for i, mod in enumerate(self.arch.modules):
            for layer in LORA_LAYERS:
                d, u = slots[(i, layer)]
                prefix = kohya_prefix(mod, layer)
                lora[f"{prefix}.lora_down.weight"] = d
                lora[f"{prefix}.lora_up.weight"] = u
                lora[f"{prefix}.alpha"] = torch.tensor(rank / 2, dtype=out_dtype)
        return lora
