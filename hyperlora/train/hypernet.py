"""The trainable HyperLoRA generator: resampler(s), ID projector and the ID / Base bases.

:class:`TrainableHyperLoRA` holds exactly the parts the released folders hold (format §4), as float32
``nn.Parameter`` s, and reuses the pack's inference code for everything that is not training-specific:

* the perceiver :class:`~hyperlora.resampler.Resampler` and :class:`~hyperlora.resampler.IDProjector`
  (so ``state_dict()`` keys of the sub-modules are the released tensor names);
* the grouped basis layout of :mod:`hyperlora.generate` (:func:`~hyperlora.generate.make_groups`,
  :class:`~hyperlora.generate.BasisGroup`): one parameter ``down [M, in*rank, K]`` and one
  ``up [M, rank*out, K]`` per group of equally sized matrices, named like the inference buffers
  (``id_down_0``, ``id_up_0``, ``base_down_0`` ...);
* :func:`hyperlora.lora_functional.basis_factors` to turn per-sample tokens into per-sample factors.

Tokens are **per sample** (training never averages photos): ``[B, Q, K]``, each of the Q rows scaled
to unit length with the pack's :func:`hyperlora.lora.normalize_tokens`.

Initialisation (:meth:`TrainableHyperLoRA.new`): resampler and projector Linear layers use PyTorch's
default init, LayerNorms weight 1 / bias 0, ``latents ~ N(0, 1/dim)``; every **down** basis element is
``N(0, 1/in)`` (so a unit-length coefficient token gives a down matrix with Kaiming-like rows) and every
**up** basis element is **zero**.  An untrained generator therefore produces LoRAs that are exactly zero
(``up = 0``), like a freshly initialised plain LoRA: training starts from the frozen UNet's own
predictions.  The ArcFace branch of a two-condition resampler (``layers.j.attn2``, which reads the ID
tokens) starts with ``to_out.0.weight = 0``; see :meth:`TrainableHyperLoRA.id_tokens` for why.

Parts (names used by the stage configuration in :mod:`hyperlora.train.config`):

========================  ==================================================================
``base_resampler``        the whole Base-LoRA resampler (one condition: blurred-face CLIP features)
``base_basis``            ``base_down_*`` / ``base_up_*``
``id_basis``              ``id_down_*`` / ``id_up_*``
``id_projector``          ArcFace embedding -> ID tokens
``arcface_branch``        ``resampler.proj_in`` and, per layer, ``norm_attn2_l``, ``norm_attn2_x``, ``attn2``
``clip_branch``           ``resampler.proj_in_2`` and, per layer, ``norm_attn3_l``, ``norm_attn3_y``, ``attn3``
``resampler_core``        the rest of the ID resampler: ``latents``, ``proj_out``, ``attn1``, ``ff`` and their norms
========================  ==================================================================
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import ModelFileError, SettingError
from ..generate import BasisGroup, make_groups
from ..lora import normalize_tokens
from ..lora_functional import Factors, basis_factors
from ..resampler import IDProjector, Resampler
from ..spec import (DEFAULT_HEADS, FACE_EMBEDDING_DIM, RELEASED_BASE_RANK, RELEASED_DIM_HEAD, RELEASED_FF_MULT,
                    RELEASED_HYPER_DIM, RELEASED_ID_TOKENS, RELEASED_RANK, RELEASED_RESAMPLER_DEPTH,
                    RELEASED_RESAMPLER_DIM, TOKENS_PER_MODULE, VIT_L14_WIDTH, HyperLoRAArchitecture, LoraModuleSpec,
                    ResamplerConfig)

log = logging.getLogger(__name__)

PARTS = ("base_resampler", "base_basis", "id_basis", "id_projector", "arcface_branch", "clip_branch",
         "resampler_core")
"""Names of the trainable parts (see the module docstring)."""

_ARCFACE_LAYER_PARTS = ("norm_attn2_l", "norm_attn2_x", "attn2")
_CLIP_LAYER_PARTS = ("norm_attn3_l", "norm_attn3_y", "attn3")


class TrainableHyperLoRA(nn.Module):
    """Resampler (+ IDProjector) + optional base Resampler + ID/Base bases, float32 parameters.

    Bases in the grouped layout of :mod:`hyperlora.generate`: for each :class:`BasisGroup` ``g`` of kind
    ``"id"`` / ``"base"`` a parameter named ``g.down_buffer`` ``[M, in*rank, K]`` and ``g.up_buffer``
    ``[M, rank*out, K]``.  Build one with :meth:`new` or :meth:`from_released`; the constructor leaves
    every parameter uninitialised.
    """

    def __init__(self, arch: HyperLoRAArchitecture, *, device: str | torch.device | None = None) -> None:
        super().__init__()
        fk = {"device": device, "dtype": torch.float32}
        self.arch = arch
        self.resampler = Resampler(arch.resampler, **fk)
        self.id_projector: IDProjector | None = None
        if arch.id_embed_dim is not None and arch.num_id_tokens is not None:
            self.id_projector = IDProjector(id_embed_dim=arch.id_embed_dim, embed_dim=arch.resampler.embed_dims[0],
                                            num_tokens=arch.num_id_tokens, **fk)
        self.base_resampler: Resampler | None = None
        if arch.base_resampler is not None:
            self.base_resampler = Resampler(arch.base_resampler, **fk)
        self.groups: dict[str, list[BasisGroup]] = {"id": make_groups(arch, "id"), "base": make_groups(arch, "base")}
        K = arch.hyper_dim
        for groups in self.groups.values():
            for g in groups:
                m = len(g.entries)
                self.register_parameter(g.down_buffer, nn.Parameter(torch.empty(m, g.in_features * g.rank, K, **fk)))
                self.register_parameter(g.up_buffer, nn.Parameter(torch.empty(m, g.rank * g.out_features, K, **fk)))
        self.distilled_base = 0.0
        """Fraction of the Base-LoRA already absorbed by the ID generator (set by fit's distil stage)."""

    # ----------------------------------------------------------------------------- construction

    @classmethod
    def new(cls, modules: Sequence[LoraModuleSpec], *, rank: int = RELEASED_RANK,
            base_rank: int | None = RELEASED_BASE_RANK, hyper_dim: int = RELEASED_HYPER_DIM,
            clip_dim: int = VIT_L14_WIDTH, heads: int = DEFAULT_HEADS, dim: int = RELEASED_RESAMPLER_DIM,
            depth: int = RELEASED_RESAMPLER_DEPTH, dim_head: int = RELEASED_DIM_HEAD, ff_mult: int = RELEASED_FF_MULT,
            id_embed_dim: int | None = FACE_EMBEDDING_DIM, num_id_tokens: int = RELEASED_ID_TOKENS, id_token_dim: int | None = None, seed: int = 0,
            device: str | torch.device | None = None) -> TrainableHyperLoRA:
        """A freshly initialised generator (see the module docstring for the initialisation).

        ``modules``: the UNet's LoRA modules in JSON order (:func:`unet_modules`).  ``base_rank`` None or 0:
        no Base-LoRA (no base resampler, no base basis).  ``id_embed_dim`` None: a one-condition resampler
        on CLIP features only (no ID projector).  ``id_token_dim`` (the ID tokens' width ``E_x``) defaults
        to ``clip_dim`` as in the release.  Released sizes are the defaults (K 128, ranks 8 / 4, resampler
        1024 wide, depth 4, 12 x 64 heads, 16 ID tokens).
        """
        modules = tuple(modules)
        if not modules:
            raise SettingError("the UNet has no attention modules to put a LoRA on; use an SDXL-shaped UNet.")
        for what, v in (("rank", rank), ("hyper_dim", hyper_dim), ("heads", heads), ("dim", dim),
                        ("depth", depth), ("dim_head", dim_head), ("ff_mult", ff_mult), ("clip_dim", clip_dim)):
            if int(v) <= 0:
                raise SettingError(f"model setting '{what}' is {v}; it must be a positive whole number.")
        base_rank = int(base_rank) if base_rank else None
        q = TOKENS_PER_MODULE * len(modules)
        e_x = int(id_token_dim or clip_dim)
        two = id_embed_dim is not None
        embed = (e_x, clip_dim) if two else (clip_dim,)
        res = ResamplerConfig(dim=dim, depth=depth, heads=heads, dim_head=dim_head, ff_mult=ff_mult,
                              num_queries=q, output_dim=hyper_dim, embed_dims=embed)
        base_res = None
        if base_rank is not None:
            base_res = ResamplerConfig(dim=dim, depth=depth, heads=heads, dim_head=dim_head, ff_mult=ff_mult,
                                       num_queries=q, output_dim=hyper_dim, embed_dims=(clip_dim,))
        arch = HyperLoRAArchitecture(modules=modules, hyper_dim=hyper_dim, rank=rank, base_rank=base_rank,
                                     resampler=res, base_resampler=base_res,
                                     id_embed_dim=id_embed_dim if two else None,
                                     num_id_tokens=num_id_tokens if two else None)
        model = cls(arch, device=device)
        model.reset_parameters(seed=seed)
        return model

    @torch.no_grad()
    def reset_parameters(self, *, seed: int = 0) -> None:
        """Initialise every parameter from ``seed`` (deterministic, independent of the global RNG)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for module in self.modules():
                if isinstance(module, (nn.Linear, nn.LayerNorm)):
                    module.reset_parameters()
            for res in (self.resampler, self.base_resampler):
                if res is not None:
                    res.latents.normal_(0.0, res.config.dim ** -0.5)
            if self.id_projector is not None and len(self.arch.resampler.embed_dims) == 2:
                for layer in self.resampler.layers:
                    layer.attn2.to_out[0].weight.zero_()
            for groups in self.groups.values():
                for g in groups:
                    getattr(self, g.down_buffer).normal_(0.0, g.in_features ** -0.5)
                    getattr(self, g.up_buffer).zero_()

    @classmethod
    def from_released(cls, folder: str | os.PathLike[str], *, heads: int | None = None,
                      device: str | torch.device | None = None) -> TrainableHyperLoRA:
        """A released-layout folder (``--init-from``) as float32 trainable parameters.

        Loads with the pack's strict loader (:func:`hyperlora.checkpoint.load_hyper_lora`, which also
        reads the heads metadata) and copies every tensor into a new module.
        """
        from ..checkpoint import load_hyper_lora

        loaded = load_hyper_lora(Path(folder), dtype=torch.float32, heads=heads)
        model = cls(loaded.arch, device=device)
        with torch.no_grad():
            model.resampler.load_state_dict(loaded.resampler.state_dict(), strict=True)
            if model.id_projector is not None and loaded.id_projector is not None:
                model.id_projector.load_state_dict(loaded.id_projector.state_dict(), strict=True)
            if model.base_resampler is not None and loaded.base_resampler is not None:
                model.base_resampler.load_state_dict(loaded.base_resampler.state_dict(), strict=True)
            for kind in ("id", "base"):
                for g, down, up in loaded.basis_groups(kind):
                    getattr(model, g.down_buffer).copy_(down)
                    getattr(model, g.up_buffer).copy_(up)
        log.info("initialised from '%s' (%d modules, K=%d, rank %d, base rank %s)", folder,
                 len(loaded.arch.modules), loaded.arch.hyper_dim, loaded.arch.rank, loaded.arch.base_rank)
        return model

    # ----------------------------------------------------------------------------- parts

    @property
    def has_base(self) -> bool:
        return self.base_resampler is not None and bool(self.groups["base"])

    @property
    def two_conditions(self) -> bool:
        return len(self.arch.resampler.embed_dims) == 2

    def basis_groups(self, kind: str = "id") -> list[tuple[BasisGroup, Tensor, Tensor]]:
        """``(group, down [M, in*rank, K], up [M, rank*out, K])`` per group of ``kind`` (the parameters)."""
        return [(g, getattr(self, g.down_buffer), getattr(self, g.up_buffer)) for g in self.groups[kind]]

    def part_of(self, name: str) -> str:
        """The part (:data:`PARTS`) a parameter name of ``named_parameters()`` belongs to."""
        head, _, rest = name.partition(".")
        if head == "base_resampler":
            return "base_resampler"
        if head == "id_projector":
            return "id_projector"
        if head.startswith("base_down_") or head.startswith("base_up_"):
            return "base_basis"
        if head.startswith("id_down_") or head.startswith("id_up_"):
            return "id_basis"
        if head == "resampler":
            if rest.startswith("proj_in_2."):
                return "clip_branch"
            if rest.startswith("proj_in.") and self.two_conditions:
                return "arcface_branch"
            if rest.startswith("layers."):
                sub = rest.split(".")[2]
                if sub in _ARCFACE_LAYER_PARTS:
                    return "arcface_branch"
                if sub in _CLIP_LAYER_PARTS:
                    return "clip_branch"
            return "resampler_core"
        raise KeyError(f"parameter {name!r} belongs to no part")

    def part_parameters(self, parts: Sequence[str]) -> Iterator[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` of every parameter in one of ``parts``."""
        unknown = [p for p in parts if p not in PARTS]
        if unknown:
            raise SettingError(f"unknown model part(s) {unknown}; choose from {', '.join(PARTS)}.")
        wanted = set(parts)
        for name, p in self.named_parameters():
            if self.part_of(name) in wanted:
                yield name, p

    # ----------------------------------------------------------------------------- tokens

    def id_tokens(self, arcface: Tensor | None, clip: Tensor | None) -> Tensor:
        """Per-sample ID coefficient tokens ``[B, Q, K]`` (float32, each row unit length).

        arcface ``[B, 512]`` (L2-normalised ArcFace embeddings) or None; clip ``[B, L, E]`` (penultimate
        CLIP features of the gray-background face crop) or None.

        *Bypassing* a branch of the two-condition resampler (stage 2 trains without ArcFace): with
        ``arcface=None`` the ID projector is not run and the resampler's first condition gets zeros
        ``[B, num_id_tokens, E_x]``.  The ArcFace branch's attention output projection
        (``layers.j.attn2.to_out.0.weight``) starts at zero and stays frozen until stage 3, so its
        residual term is exactly zero and the CLIP-only stage is exactly a CLIP-only resampler; stage 3
        then opens the branch from zero, i.e. the ArcFace tokens are *added* to an unchanged generator.
        (A generator initialised from a released folder has a non-zero ``attn2``: there the bypassed
        branch contributes a constant learned offset, which is why fine-tuning released weights should
        run stage 3 only.)  ``clip=None`` on a two-condition model likewise feeds zeros to the CLIP branch.
        """
        cfg = self.arch.resampler
        if not self.two_conditions:
            if self.id_projector is not None:
                if arcface is None:
                    raise SettingError("this generator reads only ArcFace embeddings; pass arcface.")
                x = self.id_projector(arcface.float())
            else:
                if clip is None:
                    raise SettingError("this generator reads only CLIP features; pass clip.")
                x = clip.float()
            return normalize_tokens(self.resampler(x))
        if arcface is None and clip is None:
            raise SettingError("pass the ArcFace embeddings, the CLIP features or both.")
        ref = arcface if arcface is not None else clip
        b, device = ref.shape[0], ref.device
        if arcface is not None:
            x = self.id_projector(arcface.float())
        else:
            x = torch.zeros(b, self.arch.num_id_tokens, cfg.embed_dims[0], device=device)
        y = clip.float() if clip is not None else torch.zeros(b, 1, cfg.embed_dims[1], device=device)
        return normalize_tokens(self.resampler(x, y))

    def base_tokens(self, clip_base: Tensor) -> Tensor:
        """clip_base ``[B, L, E]`` (CLIP features of the blurred-face crop) -> ``[B, Q, K]`` unit rows."""
        if self.base_resampler is None:
            raise SettingError("this generator has no Base-LoRA (base_rank 0); drop stage 1 and the base scenarios.")
        return normalize_tokens(self.base_resampler(clip_base.float()))

    def id_factors(self, tokens: Tensor) -> Factors:
        """tokens ``[B, Q, K]`` -> per-sample ID factors ``{prefix: (down [B, r, in], up [B, out, r])}``."""
        return basis_factors(tokens, self.basis_groups("id"), self.arch.modules)

    def base_factors(self, tokens: Tensor) -> Factors:
        """tokens ``[B, Q, K]`` -> per-sample Base factors (rank ``base_rank``)."""
        return basis_factors(tokens, self.basis_groups("base"), self.arch.modules)

    def forward(self, arcface: Tensor | None, clip: Tensor | None, clip_base: Tensor | None, *,
                want_id: bool = True, want_base: bool = True, base_grad: bool = True
                ) -> tuple[Factors | None, Factors | None]:
        """Both LoRAs' per-sample factors in one call (the entry point under DDP/FSDP wrappers).

        Returns ``(id_factors or None, base_factors or None)``; ``base_grad`` False computes the Base
        factors without autograd (a frozen Base-LoRA costs no backward).
        """
        idf = self.id_factors(self.id_tokens(arcface, clip)) if want_id else None
        basef = None
        if want_base and clip_base is not None:
            with torch.set_grad_enabled(base_grad and torch.is_grad_enabled()):
                basef = self.base_factors(self.base_tokens(clip_base))
        return idf, basef


# --------------------------------------------------------------------------------- UNet modules


def unet_modules(unet: nn.Module) -> tuple[LoraModuleSpec, ...]:
    """The UNet's LoRA modules in the released JSON order (format §3).

    Order: diffusers ``attn_processors`` (module registration order: down blocks, up blocks, mid
    block; ``attn1`` before ``attn2``); names: ``lora_unet_`` + the diffusers path with ``_``
    (``lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1``); ``hidden_size`` the query /
    output width; ``cross_attention_dim`` the context width for cross-attention, None for self-attention.
    """
    procs = getattr(unet, "attn_processors", None)
    if procs is None:
        raise ModelFileError("the base model is not a diffusers UNet2DConditionModel (no attn_processors); "
                             "load it with hyperlora.train.frozen.load_unet.")
    specs: list[LoraModuleSpec] = []
    for key in procs:
        path = key[: -len(".processor")] if key.endswith(".processor") else key
        attn = unet.get_submodule(path)
        hidden = attn.to_q.in_features
        if attn.to_q.out_features != hidden or attn.to_out[0].out_features != hidden:
            raise ModelFileError(f"attention '{path}' maps {hidden} -> {attn.to_q.out_features} features; HyperLoRA "
                                 f"needs SDXL-style attention (inner width = hidden size).")
        cross = attn.to_k.in_features if getattr(attn, "is_cross_attention", False) else None
        specs.append(LoraModuleSpec("lora_unet_" + path.replace(".", "_"), hidden, cross))
    if not specs:
        raise ModelFileError("the UNet has no attention modules; HyperLoRA needs an SDXL-shaped UNet.")
    return tuple(specs)


__all__ = ["PARTS", "TrainableHyperLoRA", "unet_modules"]
