"""DiffLoRA's LoRA weights autoencoder (LAE): LoRAs of one :class:`~.lora_space.LoraLayout` <-> latent tokens.

The paper says only that the LAE works on the low-rank factors rather than on full weight deltas; the rest
is our design (``docs/difflora.md``):

**Encoder.**  Each module's factors are first put in canonical form (:func:`~.lora_space.canonical_factors`:
components ordered by singular value, balanced, sign-fixed), so every factorisation of the same LoRA gives
the same latent.  Per module ``m`` (rank ``r_m``, sizes ``out_m``, ``in_m``):

1. each rank-1 component ``i`` becomes a vector ``[u_i; v_i]`` (``out_m + in_m``), divided by the module's
   calibrated scale, and is projected to ``width`` by the module's own linear map (one per module, or one per
   module *shape* with ``share_projections``), plus a learned embedding of the component's position ``i``;
2. the ``r_max`` component tokens (zero beyond ``r_m``) are concatenated and mixed by one linear map (shared by
   all modules) into ``T_m = tokens_per_module`` tokens of ``width``, plus a learned module embedding.

All ``T = M * tokens_per_module`` tokens go through a pre-norm transformer (``depth`` layers, ``heads`` heads)
and a final linear map to ``C = latent_channels``: the latent is ``[B, T, C]``, token ``m * T_m + j`` being the
``j``-th token of module ``m`` in layout order.

**Decoder.**  The mirror image: latent ``[B, T, C]`` -> linear to ``width`` plus its own module embedding ->
transformer -> per module, its ``T_m`` tokens are mixed into ``r_max`` component tokens (plus position
embedding, GELU), and the module's own head maps each of the first ``r_m`` to ``[u_i; v_i]``, times the scale:
``up [B, out, r]``, ``down [B, r, in]`` whose product is the LoRA's ``dW`` (no alpha: ``alpha = rank``).

**Loss.**  Only the products matter, so the reconstruction loss is factorisation-invariant: per module the
squared Frobenius error of ``dW`` divided by the target's squared norm, ``||dW - dW'||^2 / ||dW||^2``
(computed with ``r x r`` Gram matrices, :func:`~.lora_space.product_sq_error`), averaged over modules and
LoRAs, so a small module weighs as much as a large one and a LoRA's overall strength does not matter.
(The ratio has no meaning for a module whose target is all zero, e.g. a LoRA saved straight after a kohya
zero-init: keep such LoRAs out of the training set.)
The regulariser keeps the latent bounded for the diffusion model: ``"kl"`` makes the encoder a Gaussian
posterior (mean and log-variance, sampled in training) with a weighted KL to ``N(0, I)`` averaged over latent
entries, ``"latent_norm"`` adds the weighted mean square of the latent, ``"none"`` nothing.  Whatever the
regulariser, :meth:`LoraAutoencoder.latent_scale` measures the std of the (mean) latents of a data set: the
diffusion model trains on ``z / latent_scale`` (about unit std) and the decoder gets ``z * latent_scale``.

**Scales.**  LoRA factors are small (entries around 1e-2); :meth:`LoraAutoencoder.calibrate` sets each
module's scale (a buffer, saved with the weights) to the RMS of its canonical factors over a batch of
training LoRAs.  Call it once before training.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import LoraError, SettingError
from ..lora import LoraDict
from .lora_space import (
    NORM_FLOOR,
    Factors,
    LoraLayout,
    canonical_factors,
    product_sq_error,
    product_sq_norm,
    relative_frobenius,
    stack_factors,
    to_lora,
)

REGULARISERS = ("kl", "latent_norm", "none")
"""The LAE's latent regularisers (see the module docstring)."""
LOGVAR_RANGE = (-30.0, 20.0)
"""The KL posterior's log-variance is clamped to this range (exp stays finite)."""

LoraBatch = Sequence[Mapping[str, Tensor]] | Sequence[Factors]
"""A batch of LoRAs: ``B`` kohya LoRA dicts, or per module ``(up [B, out, r], down [B, r, in])`` (layout order)."""


@dataclass(frozen=True)
class LaeConfig:
    """The LAE's architecture (JSON-able with :meth:`to_dict` / :meth:`from_dict`).

    ``tokens_per_module``: latent tokens per LoRA module (``T = modules * tokens_per_module``);
    ``latent_channels``: ``C``, the size of each latent token; ``width``, ``depth``, ``heads``: the two
    transformers (encoder and decoder, ``width`` divisible by ``heads``); ``share_projections``: modules of
    the same ``(out, in, rank)`` share their input projection and output head (they are still told apart by
    their module embedding; needed at SDXL scale, where per-module maps would be hundreds of millions of
    parameters); ``regulariser`` and ``regulariser_weight``: see the module docstring.
    """

    tokens_per_module: int = 1
    latent_channels: int = 16
    width: int = 128
    depth: int = 2
    heads: int = 4
    share_projections: bool = False
    regulariser: str = "kl"
    regulariser_weight: float = 1e-4

    def __post_init__(self) -> None:
        for name in ("tokens_per_module", "latent_channels", "width", "depth", "heads"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise SettingError(f"LaeConfig.{name} is {v!r}; it must be a positive whole number.")
        if self.width % self.heads:
            raise SettingError(f"LaeConfig.width ({self.width}) must be divisible by heads ({self.heads}); "
                               "change one of them.")
        if not isinstance(self.share_projections, bool):
            raise SettingError(f"LaeConfig.share_projections is {self.share_projections!r}; use true or false.")
        if self.regulariser not in REGULARISERS:
            raise SettingError(f"LaeConfig.regulariser is {self.regulariser!r}; choose one of "
                               f"{', '.join(map(repr, REGULARISERS))}.")
        w = self.regulariser_weight
        if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w) or w < 0:
            raise SettingError(f"LaeConfig.regulariser_weight is {w!r}; it must be a finite number >= 0.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, label: str = "The LAE config") -> LaeConfig:
        """Inverse of :meth:`to_dict`; unknown fields are refused by name (a missing one takes its default)."""
        if not isinstance(data, Mapping):
            raise SettingError(f"{label} must be a JSON object, got {type(data).__name__}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SettingError(f"{label} has unknown field(s) {unknown}; the known ones are {sorted(known)}. "
                               "Remove them or update the pack.")
        return cls(**dict(data))


@dataclass
class LaeLoss:
    """The terms of :meth:`LoraAutoencoder.loss` (scalar tensors): ``total = reconstruction + weight * regulariser``."""

    total: Tensor
    reconstruction: Tensor
    regulariser: Tensor


def _shape_key(out_features: int, in_features: int, rank: int) -> str:
    return f"o{out_features}_i{in_features}_r{rank}"


def _randn_like(t: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise shaped like ``t``, drawn on ``generator``'s device (a CPU generator for reproducible
    runs on any device) and moved to ``t``'s device and dtype."""
    device = generator.device if generator is not None else t.device
    return torch.randn(t.shape, generator=generator, device=device, dtype=t.dtype).to(t.device)


class LoraAutoencoder(nn.Module):
    """The LAE of one layout: ``B`` LoRAs <-> latent ``[B, T, C]`` (``T = len(layout) * tokens_per_module``,
    ``C = latent_channels``).  See the module docstring for the architecture, loss and scales."""

    def __init__(self, config: LaeConfig, layout: LoraLayout) -> None:
        super().__init__()
        self.config = config
        self.layout = layout
        w, t, r_max = config.width, config.tokens_per_module, layout.max_rank
        self.num_tokens = len(layout) * t
        self.proj_keys: list[str] = [
            _shape_key(m.out_features, m.in_features, m.rank) if config.share_projections else f"m{i}"
            for i, m in enumerate(layout.modules)]
        sizes: dict[str, int] = {}
        for key, m in zip(self.proj_keys, layout.modules):
            sizes[key] = m.out_features + m.in_features
        self.enc_in = nn.ModuleDict({k: nn.Linear(n, w) for k, n in sizes.items()})
        self.dec_out = nn.ModuleDict({k: nn.Linear(w, n) for k, n in sizes.items()})
        self.enc_rank_pos = nn.Parameter(torch.randn(r_max, w) * 0.02)
        self.dec_rank_pos = nn.Parameter(torch.randn(r_max, w) * 0.02)
        self.enc_mix = nn.Linear(r_max * w, t * w)
        self.dec_mix = nn.Linear(t * w, r_max * w)
        self.enc_module_emb = nn.Parameter(torch.randn(len(layout), t, w) * 0.02)
        self.dec_module_emb = nn.Parameter(torch.randn(len(layout), t, w) * 0.02)
        self.encoder = self._transformer(config)
        self.decoder = self._transformer(config)
        self.enc_norm = nn.LayerNorm(w)
        self.dec_norm = nn.LayerNorm(w)
        c = config.latent_channels
        self.to_latent = nn.Linear(w, 2 * c if config.regulariser == "kl" else c)
        self.from_latent = nn.Linear(c, w)
        self.register_buffer("module_scale", torch.ones(len(layout)))

    @property
    def latent_shape(self) -> tuple[int, int]:
        """``(T, C)``: the shape of one LoRA's latent (``T = modules * tokens_per_module``, ``C = latent_channels``)."""
        return self.num_tokens, self.config.latent_channels

    @staticmethod
    def _transformer(config: LaeConfig) -> nn.TransformerEncoder:
        layer = nn.TransformerEncoderLayer(config.width, config.heads, 4 * config.width, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        return nn.TransformerEncoder(layer, config.depth, enable_nested_tensor=False)

    # ------------------------------------------------------------------ inputs

    def _factors(self, batch: LoraBatch) -> list[Factors]:
        """A :data:`LoraBatch` as per-module ``(up [B, out, r], down [B, r, in])`` on this module's device, float32+."""
        if isinstance(batch, Mapping):
            batch = [batch]
        if len(batch) == 0:
            raise LoraError("The LAE got an empty batch of LoRAs; give at least one LoRA.")
        if isinstance(batch[0], Mapping):
            fs = stack_factors(batch, self.layout)  # type: ignore[arg-type]
        else:
            fs = list(batch)  # type: ignore[arg-type]
            if len(fs) != len(self.layout):
                raise LoraError(f"The LAE got factors for {len(fs)} modules; its layout has {len(self.layout)}.")
            for m, (up, down) in zip(self.layout.modules, fs):
                if up.dim() != 3 or tuple(up.shape[1:]) != (m.out_features, m.rank) or down.dim() != 3 \
                        or tuple(down.shape[1:]) != (m.rank, m.in_features) or up.shape[0] != down.shape[0]:
                    raise LoraError(f"The LAE's factors of '{m.prefix}' are up {list(up.shape)} and down "
                                    f"{list(down.shape)}; it needs up [B, {m.out_features}, {m.rank}] and down "
                                    f"[B, {m.rank}, {m.in_features}].")
        dev = self.module_scale.device
        return [(u.to(dev, torch.promote_types(u.dtype, torch.float32)),
                 d.to(dev, torch.promote_types(d.dtype, torch.float32))) for u, d in fs]

    @torch.no_grad()
    def calibrate(self, batch: LoraBatch) -> Tensor:
        """Set each module's scale to the RMS of its canonical factors over ``batch``; returns ``[M]``."""
        scales = []
        for up, down in self._factors(batch):
            u, d = canonical_factors(up, down)
            rms = torch.cat([u.flatten(), d.flatten()]).square().mean().sqrt()
            scales.append(rms if float(rms) > 0 else torch.ones_like(rms))
        self.module_scale.copy_(torch.stack(scales).to(self.module_scale))
        return self.module_scale.clone()

    # ------------------------------------------------------------------ encoder

    def encode_distribution(self, batch: LoraBatch) -> tuple[Tensor, Tensor | None]:
        """``(mean [B, T, C], log-variance [B, T, C] or None)``; the log-variance exists with the KL regulariser.

        The canonical form is computed without autograd: gradients reach the LAE's weights, not the input LoRAs.
        """
        fs = self._factors(batch)
        w, t, r_max = self.config.width, self.config.tokens_per_module, self.layout.max_rank
        tokens = []
        for i, (m, key, (up, down)) in enumerate(zip(self.layout.modules, self.proj_keys, fs)):
            with torch.no_grad():
                u, d = canonical_factors(up, down)                         # [B, out, r], [B, r, in]
            comp = torch.cat([u.transpose(1, 2), d], dim=-1) / self.module_scale[i]  # [B, r, out + in]
            comp = comp.to(self.enc_rank_pos.dtype)
            e = self.enc_in[key](comp) + self.enc_rank_pos[: m.rank]      # [B, r, w]
            if m.rank < r_max:
                e = torch.cat([e, e.new_zeros(e.shape[0], r_max - m.rank, w)], dim=1)
            tokens.append(self.enc_mix(e.flatten(1)).view(-1, t, w) + self.enc_module_emb[i])  # [B, t, w]
        h = self.enc_norm(self.encoder(torch.cat(tokens, dim=1)))           # [B, T, w]
        out = self.to_latent(h)
        if self.config.regulariser == "kl":
            mean, logvar = out.chunk(2, dim=-1)
            return mean, logvar.clamp(*LOGVAR_RANGE)
        return out, None

    def encode(self, batch: LoraBatch, *, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """Latent ``[B, T, C]`` of a batch: the posterior mean, or a draw from it with ``sample`` (KL only)."""
        mean, logvar = self.encode_distribution(batch)
        if sample and logvar is not None:
            noise = _randn_like(mean, generator)
            return mean + (0.5 * logvar).exp() * noise
        return mean

    # ------------------------------------------------------------------ decoder

    def decode(self, latent: Tensor) -> list[Factors]:
        """Latent ``[B, T, C]`` -> per module (layout order) ``(up [B, out, r], down [B, r, in])``, ``up @ down = dW``."""
        fs = self._decode_normalised(latent)
        return [(u * self.module_scale[i], d * self.module_scale[i]) for i, (u, d) in enumerate(fs)]

    def _decode_normalised(self, latent: Tensor) -> list[Factors]:
        """:meth:`decode` before the module scales are applied."""
        t, c, w, r_max = (self.config.tokens_per_module, self.config.latent_channels, self.config.width,
                          self.layout.max_rank)
        if latent.dim() != 3 or tuple(latent.shape[1:]) != (self.num_tokens, c):
            raise LoraError(f"The LAE decodes latents [B, {self.num_tokens}, {c}], got {list(latent.shape)}; "
                            "use latents of the same DiffLoRA model.")
        h = self.from_latent(latent.to(self.from_latent.weight.dtype))
        h = h + self.dec_module_emb.flatten(0, 1)
        h = self.dec_norm(self.decoder(h))                                  # [B, T, w]
        out: list[Factors] = []
        for i, (m, key) in enumerate(zip(self.layout.modules, self.proj_keys)):
            tok = h[:, i * t: (i + 1) * t].flatten(1)                       # [B, t * w]
            comp = self.dec_mix(tok).view(-1, r_max, w)[:, : m.rank] + self.dec_rank_pos[: m.rank]
            vec = self.dec_out[key](nn.functional.gelu(comp))               # [B, r, out + in]
            out.append((vec[..., : m.out_features].transpose(1, 2), vec[..., m.out_features:]))
        return out

    def decode_loras(self, latent: Tensor, *, dtype: torch.dtype | None = None) -> list[LoraDict]:
        """Latent ``[B, T, C]`` -> ``B`` kohya LoRAs of the layout (``alpha = rank``, detached)."""
        fs = self.decode(latent)
        return [to_lora([(u[b], d[b]) for u, d in fs], self.layout, dtype=dtype) for b in range(latent.shape[0])]

    # ------------------------------------------------------------------ training

    def loss(self, batch: LoraBatch, *, generator: torch.Generator | None = None) -> LaeLoss:
        """The training loss of a batch (see the module docstring); the KL posterior is sampled in train mode."""
        fs = self._factors(batch)
        mean, logvar = self.encode_distribution(fs)
        if logvar is not None and self.training:
            noise = _randn_like(mean, generator)
            z = mean + (0.5 * logvar).exp() * noise
        else:
            z = mean
        rec = self._decode_normalised(z)
        terms = []
        for i, ((up, down), (u2, d2)) in enumerate(zip(fs, rec)):
            s = self.module_scale[i]
            ut, dt = (up / s).to(u2.dtype), (down / s).to(d2.dtype)
            terms.append(product_sq_error(ut, dt, u2, d2) / (product_sq_norm(ut, dt) + NORM_FLOOR))  # [B]
        reconstruction = torch.stack(terms).mean()
        if logvar is not None:  # the "kl" regulariser
            reg = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).mean()
        elif self.config.regulariser == "latent_norm":
            reg = z.square().mean()
        else:
            reg = reconstruction.new_zeros(())
        return LaeLoss(reconstruction + self.config.regulariser_weight * reg, reconstruction, reg)

    @torch.no_grad()
    def latent_scale(self, batch: LoraBatch) -> float:
        """The std of the posterior-mean latents of ``batch`` over all entries: divide latents by it for the DiT."""
        z = self.encode(batch)
        std = float(z.float().std())
        if not math.isfinite(std) or std <= 0:
            raise LoraError(f"The LAE's latents of this batch have std {std}; encode more than one distinct LoRA.")
        return std

    @torch.no_grad()
    def reconstruction_report(self, loras: LoraBatch) -> dict[str, Any]:
        """How well the LAE (posterior mean, no sampling) reconstructs ``loras``, in float64.

        Returns ``{"modules": {prefix: mean relative error}, "per_lora": [mean over modules, ...],
        "mean": float, "max": float}`` where the relative error of a module is
        ``||dW - dW'||_F / ||dW||_F`` of the weight deltas.
        """
        fs = self._factors(loras)
        rec = self.decode(self.encode(fs))
        rel = torch.stack([relative_frobenius(u.double(), d.double(), u2.double(), d2.double())
                           for (u, d), (u2, d2) in zip(fs, rec)])              # [M, B]
        return {"modules": {m.prefix: float(rel[i].mean()) for i, m in enumerate(self.layout.modules)},
                "per_lora": [float(v) for v in rel.mean(0)],
                "mean": float(rel.mean()),
                "max": float(rel.max())}


def decoder_flops(config: LaeConfig, layout: LoraLayout, batch: int = 1) -> int:
    """Floating-point operations of :meth:`LoraAutoencoder.decode` for ``batch`` latents (one LoRA each).

    Counted as :func:`hyperlora.difflora.dit.flops_per_step` counts: 2 per multiply-add of every matrix
    product (linear layers, attention scores and the attention-weighted sum); elementwise work (norms,
    softmax, GELU, embeddings, biases, the module scales) is not counted.  With ``T = modules *
    tokens_per_module`` tokens, ``C`` latent channels, width ``W``, ``t`` tokens per module and ``R`` the
    layout's largest rank, per LoRA:

    * ``from_latent``: ``2*T*C*W``;
    * per transformer layer (feed-forward width ``4W``): ``2*T*W*3W`` (q, k, v) ``+ 2*2*T*T*W`` (scores and
      sum) ``+ 2*T*W*W`` (out) ``+ 2*2*T*W*4W`` (feed-forward);
    * per module: ``2*(t*W)*(R*W)`` (``dec_mix``) ``+ 2*r*W*(out + in)`` (its head, on its ``r`` components).

    The same with or without ``share_projections`` (shared heads are the same matrix products).  PyTorch's
    fused inference path of the transformer layers (eval mode without gradients, what sampling runs) does the
    same products, but ``torch.utils.flop_counter`` only sees them outside that path (train mode; dropout is
    0) and with the math attention kernel.
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 0:
        raise SettingError(f"decoder_flops: batch is {batch!r}; it must be a whole number >= 0.")
    t, c, w, r_max = config.tokens_per_module, config.latent_channels, config.width, layout.max_rank
    tokens = len(layout) * t
    layer = 2 * tokens * w * 3 * w + 2 * 2 * tokens * tokens * w + 2 * tokens * w * w + 2 * 2 * tokens * w * 4 * w
    modules = sum(2 * (t * w) * (r_max * w) + 2 * m.rank * w * (m.out_features + m.in_features)
                  for m in layout.modules)
    return batch * (2 * tokens * c * w + config.depth * layer + modules)


__all__ = ["LOGVAR_RANGE", "REGULARISERS", "LaeConfig", "LaeLoss", "LoraAutoencoder", "LoraBatch", "decoder_flops"]
