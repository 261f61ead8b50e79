"""hyperlora/refine.py on a tiny HyperLoRA model and a small plain-PyTorch epsilon model whose
attention layers carry the model's kohya names (the hooks themselves: tests/core/test_lora_functional.py).

* the inference-safe token factors equal the built LoRA, their gradient a float64 einsum reference, and
  they work on a model whose basis was made in inference mode;
* checkpointing changes no gradient;
* refine lowers the denoising loss in both modes, leaves the network untouched, and the
  coefficients result is an identity that saves and reloads.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hyperlora.bundle import lora_from_identity
from hyperlora.checkpoint import load_hyper_lora
from hyperlora.errors import IdentityFileError, LoraError, SettingError
from hyperlora.identity import Identity, load_identity, save_identity
from hyperlora.lora import normalize_tokens
from hyperlora.lora_functional import LORA_SCALE, LoraTerm, applied
from hyperlora.refine import (DenoiseTask, checkpointed, epsilon_loss, eval_draws, inference_tensors, plain_copies,
                              refine, token_factors, training_draws)
from tests.fixtures.hyperlora_models import TINY, write_hyperlora_folder
from tests.fixtures.loras import random_tokens

LAYERS = ("to_q", "to_k", "to_v", "to_out")
KOHYA = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out_0"}
CTX = max(c or 0 for _n, _h, c in TINY.modules)     # width of the toy text conditioning


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_hyperlora_folder(tmp_path_factory.mktemp("refine") / "tiny", seed=21)


@pytest.fixture(scope="module")
def model(folder):
    return load_hyper_lora(folder, dtype=torch.float32)


def identity_of(model, seed: int = 3) -> Identity:
    q, k = model.arch.resampler.num_queries, model.arch.hyper_dim
    emb = torch.randn(512, generator=torch.Generator().manual_seed(seed))
    return Identity(normalize_tokens(random_tokens(q, k, seed=seed)), None, model.name, model.fingerprint, 2,
                    {"face_choice": "largest"}, face_embedding=emb / emb.norm(), face_models="0123456789abcdef")


class Attention(nn.Module):
    def __init__(self, hidden: int, cross: int | None):
        super().__init__()
        self.to_q = nn.Linear(hidden, hidden, bias=False)
        self.to_k = nn.Linear(cross or hidden, hidden, bias=False)
        self.to_v = nn.Linear(cross or hidden, hidden, bias=False)
        self.to_out = nn.Sequential(nn.Linear(hidden, hidden))
        self.cross = cross

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        c = context[..., : self.cross] if self.cross else x
        q, k, v = self.to_q(x), self.to_k(c), self.to_v(c)
        a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1) @ v
        return self.to_out(a)


class ToyEps(nn.Module):
    """A small epsilon model: latent pixels as tokens through one attention block per LoRA module."""

    def __init__(self, modules, channels: int = 4):
        super().__init__()
        self.blocks = nn.ModuleList()
        self.ins = nn.ModuleList()
        self.outs = nn.ModuleList()
        for _name, hidden, cross in modules:
            self.ins.append(nn.Linear(channels + 1, hidden))
            self.blocks.append(Attention(hidden, cross))
            self.outs.append(nn.Linear(hidden, channels))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        xin = x / torch.sqrt(sigma.view(-1, 1, 1, 1) ** 2 + 1)
        tokens = xin.flatten(2).transpose(1, 2)                                  # [B, HW, C]
        tokens = torch.cat([tokens, torch.log(sigma).view(-1, 1, 1).expand(b, h * w, 1)], dim=-1)
        eps = torch.zeros(b, h * w, c)
        for lin, block, out in zip(self.ins, self.blocks, self.outs):
            eps = eps + out(block(lin(tokens), context))
        return eps.transpose(1, 2).reshape(b, c, h, w)


def toy_setup(seed: int = 0):
    torch.manual_seed(seed)
    net = ToyEps(TINY.modules).requires_grad_(False)
    targets = {}
    for (name, _h, _c), block in zip(TINY.modules, net.blocks):
        for layer in LAYERS:
            targets[f"{name}_{KOHYA[layer]}"] = block.to_out[0] if layer == "to_out" else getattr(block, layer)
    latents = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(seed + 1))
    context = torch.randn(2, 3, CTX, generator=torch.Generator().manual_seed(seed + 2))
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    abar = torch.cumprod(1 - betas, 0)
    sigmas = ((1 - abar) / abar).sqrt()

    def denoise(x, sigma, images):
        return x - sigma.view(-1, 1, 1, 1) * net(x, sigma, context[images])

    return net, targets, DenoiseTask(denoise, latents, sigmas)


# --------------------------------------------------------------------------- factors, checkpointing


def test_token_factors_equal_the_built_lora_and_their_gradient_the_reference(model, folder):
    from safetensors.torch import load_file

    ident = identity_of(model)
    built = lora_from_identity(model, ident)
    tokens = ident.tokens.clone().requires_grad_(True)
    factors = token_factors(model, tokens)
    assert len(factors) == len(TINY.modules) * 4
    for prefix, (down, up) in factors.items():
        assert down.shape[0] == up.shape[0] == 1
        assert torch.equal(down[0], built[prefix + ".lora_down.weight"]) and torch.equal(up[0], built[prefix + ".lora_up.weight"])
    weights = {p: torch.randn(up.shape[1], down.shape[2], generator=torch.Generator().manual_seed(i))
               for i, (p, (down, up)) in enumerate(sorted(factors.items()))}
    loss = sum((up[0] @ down[0] * weights[p]).sum() for p, (down, up) in factors.items())
    (grad,) = torch.autograd.grad(loss, tokens)
    # float64 reference straight from the basis file (format §5.5)
    basis = load_file(str(folder / "hyper_lora_modules.safetensors"))
    t = ident.tokens.double().requires_grad_(True)
    ref = 0
    for i, (name, _h, _c) in enumerate(TINY.modules):
        for j, layer in enumerate(LAYERS):
            down = torch.einsum("k,kir->ir", t[8 * i + 2 * j], basis[f"{i}.{layer}.id_down_basis"].double()).T
            up = torch.einsum("k,kro->ro", t[8 * i + 2 * j + 1], basis[f"{i}.{layer}.id_up_basis"].double()).T
            ref = ref + (up @ down * weights[f"{name}_{KOHYA[layer]}"].double()).sum()
    (ref_grad,) = torch.autograd.grad(ref, t)
    torch.testing.assert_close(grad.double(), ref_grad, atol=1e-4, rtol=1e-4)
    with pytest.raises(LoraError, match="needs \\[40, 6\\]"):
        token_factors(model, torch.zeros(8, 6))


def test_token_factors_work_on_a_model_loaded_in_inference_mode(folder):
    with torch.inference_mode():            # as ComfyUI loads every model: inference-mode buffers
        frozen = load_hyper_lora(folder, dtype=torch.float32)
    ident = identity_of(frozen)
    tokens = ident.tokens.clone().requires_grad_(True)
    loss = sum(u.sum() * d.sum() for d, u in token_factors(frozen, tokens).values())
    (grad,) = torch.autograd.grad(loss, tokens)
    assert grad.shape == tokens.shape and float(grad.abs().sum()) > 0


def test_checkpointing_changes_no_gradient():
    net, targets, task = toy_setup()
    w = torch.randn(4, 4, requires_grad=True)
    zero = {p: (torch.zeros(1, 1, m.in_features), torch.zeros(1, m.out_features, 1)) for p, m in targets.items()}

    def grad(modules):
        factors = {p: (d + w.sum() * 0.01, u + 0.1) for p, (d, u) in zero.items()}
        with applied(targets, [LoraTerm(factors, 1.0)]), checkpointed(modules):
            loss = epsilon_loss(task, eval_draws(2, 1000, 0, 2))
            return torch.autograd.grad(loss, w)[0]

    plain = grad([])
    torch.testing.assert_close(grad(list(net.blocks)), plain)
    assert all("forward" not in b.__dict__ for b in net.blocks)


def test_draws_are_seeded_and_cover_the_photos():
    a, b = training_draws(3, 7, 1000, seed=5), training_draws(3, 7, 1000, seed=5)
    assert a == b and a != training_draws(3, 7, 1000, seed=6)
    assert sorted(d.image for d in a[:3]) == [0, 1, 2] and sorted(d.image for d in a[3:6]) == [0, 1, 2]
    ev = eval_draws(2, 1000, 0)
    assert [d.timestep for d in ev] == [62, 187, 312, 437, 562, 687, 812, 937] and [d.image for d in ev][:3] == [0, 1, 0]


# --------------------------------------------------------------------------- refine


# the tiny basis (K = 6) leaves the coefficients little room: about 1% here; the LoRA matrices ~30%
@pytest.mark.parametrize("mode, lr, strength, factor", [("coefficients", 0.02, 4.0, 0.995), ("lora", 0.01, 1.0, 0.8)])
def test_refine_lowers_the_loss_and_leaves_the_network_untouched(model, mode, lr, strength, factor, tmp_path):
    net, targets, task = toy_setup()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    ident = identity_of(model)
    steps = []
    result = refine(model, ident, targets, task, mode=mode, steps=25, strength=strength, seed=1, learning_rate=lr,
                    checkpoint_modules=list(net.blocks), on_step=lambda i, loss: steps.append(i))
    assert steps == list(range(25)) and len(result.losses) == 25
    assert result.loss_after < result.loss_before * factor, result.report()
    assert "before" in result.report() and "after" in result.report()
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters())
    assert all(not m._forward_hooks for m in net.modules()) and all("forward" not in b.__dict__ for b in net.blocks)
    # the before loss is the loss of the unrefined LoRA, measured the same way
    with torch.no_grad(), applied(targets, [LoraTerm(token_factors(model, ident.tokens), LORA_SCALE * strength)]):
        again = float(epsilon_loss(task, eval_draws(2, 1000, 1)[:4]) + epsilon_loss(task, eval_draws(2, 1000, 1)[4:])) / 2
    assert again == pytest.approx(result.loss_before, rel=1e-5)
    if mode == "coefficients":
        new = result.identity
        assert new.tokens.shape == ident.tokens.shape and not torch.allclose(new.tokens, ident.tokens)
        torch.testing.assert_close(new.tokens.norm(dim=-1), torch.ones(new.tokens.shape[0]))
        assert torch.equal(new.face_embedding, ident.face_embedding) and "coefficients, 25 steps" in new.settings["refined"]
        save_identity(new, tmp_path / "refined.safetensors")
        back = load_identity(tmp_path / "refined.safetensors")
        assert torch.equal(back.tokens, new.tokens) and torch.equal(back.face_embedding, ident.face_embedding)
        assert back.face_models == new.face_models == ident.face_models      # still scored with its face models
        assert torch.equal(lora_from_identity(model, back)["" + next(iter(targets)) + ".lora_up.weight"],
                           result.lora[next(iter(targets)) + ".lora_up.weight"])
    else:
        assert result.identity is None
        built = lora_from_identity(model, ident)
        assert set(result.lora) == set(built)
        p = next(iter(targets))
        assert float(result.lora[p + ".alpha"]) == float(built[p + ".alpha"])
        assert not torch.equal(result.lora[p + ".lora_up.weight"], built[p + ".lora_up.weight"])
        assert result.lora.provenance["model_name"] == model.name


def test_refine_settings_and_misfits_are_refused(model):
    net, targets, task = toy_setup()
    ident = identity_of(model)
    for kwargs, match in ((dict(mode="full"), "mode is 'full'"), (dict(steps=0), "steps is 0"),
                          (dict(learning_rate=-1.0), "learning_rate is -1.0"), (dict(strength=0.0), "strength is 0.0")):
        with pytest.raises(SettingError, match=match):
            refine(model, ident, targets, task, **kwargs)
    fewer = dict(list(targets.items())[1:])
    with pytest.raises(LoraError, match="1 of 20 LoRA modules have no layer"):
        refine(model, ident, fewer, task, steps=1)
    other = Identity(ident.tokens[:8], None, "x", "y", 1, {})
    with pytest.raises(IdentityFileError):
        refine(model, other, targets, task, steps=1)


def test_refine_stops_on_interrupt_and_cleans_up(model):
    net, targets, task = toy_setup()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    calls = []

    class Stop(Exception):
        pass

    def check():
        calls.append(1)
        if len(calls) == 3:
            raise Stop

    with pytest.raises(Stop):
        refine(model, identity_of(model), targets, task, steps=10, checkpoint_modules=list(net.blocks),
               check_interrupt=check)
    assert len(calls) == 3                                  # checked before every step, stopped at the third
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    assert all(not m._forward_hooks for m in net.modules()) and all("forward" not in b.__dict__ for b in net.blocks)


def test_refine_refuses_non_finite_latents_with_the_fix(model):
    _net, targets, task = toy_setup()
    bad = task.latents.clone()
    bad[0, 1, 2, 3] = float("nan")
    bad[1, 0, 0, 0] = float("inf")
    with pytest.raises(SettingError, match=r"latents hold 2 NaN or infinite values \(of 288\); encode the photos "
                                           r"again with the SDXL VAE in full precision"):
        refine(model, identity_of(model), targets, DenoiseTask(task.denoise, bad, task.sigmas), steps=1)


def test_a_network_made_in_inference_mode_trains_through_plain_copies(model):
    """Every parameter and buffer made in inference mode (as ComfyUI loads models), biases and norms too,
    is found; with plain copies of them a LoRA trains through the network, and afterwards the very same
    inference tensors are back."""
    with torch.inference_mode():
        net, targets, task = toy_setup()
        norm = nn.LayerNorm(4)
        norm.register_buffer("shift", torch.full((4,), 0.01))
    net.norm = norm
    found = {(name, attr) for name, _m, attr in inference_tensors(net)}
    assert ("norm", "bias") in found and ("norm", "shift") in found and ("ins.0", "bias") in found
    assert len(found) == len(list(net.parameters())) + 1
    before = {k: id(v) for k, v in [*net.named_parameters(), *net.named_buffers()]}
    slots = [(m, a) for _n, m, a in inference_tensors(net)]
    with torch.inference_mode(False):
        task = DenoiseTask(task.denoise, task.latents.clone(), task.sigmas.clone())
        with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
            refine(model, identity_of(model), targets, task, steps=1)
        with plain_copies(slots) as copied:
            assert copied == sum(t.numel() * t.element_size() for t in [*net.parameters(), *net.buffers()])
            assert not any(t.is_inference() for t in [*net.parameters(), *net.buffers()])
            result = refine(model, identity_of(model), targets, task, steps=2)
    assert len(result.losses) == 2 and math.isfinite(result.loss_after)
    assert {k: id(v) for k, v in [*net.named_parameters(), *net.named_buffers()]} == before
    assert all(t.is_inference() for t in [*net.parameters(), *net.buffers()])
    with torch.inference_mode(), pytest.raises(RuntimeError, match="needs torch.inference_mode\\(False\\)"):
        with plain_copies(slots):
            pass


def test_refine_refuses_a_model_that_gives_nan_before_tuning(model):
    """Not "lower the learning rate": the model's own outputs are NaN before any step."""
    net, targets, task = toy_setup()
    with torch.no_grad():
        net.outs[0].bias[0] = float("nan")
    with pytest.raises(SettingError, match="denoising loss on the photos is nan before any tuning: the model itself"):
        refine(model, identity_of(model), targets, task, steps=1)
