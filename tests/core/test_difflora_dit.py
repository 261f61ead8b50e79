"""DiffLoRA's diffusion part (hyperlora/difflora/condition.py, dit.py, diffusion.py): the MIF condition, the
latent DiT, the rectified-flow loss and sampler, and a tiny DiT that learns a synthetic conditional law."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from hyperlora.difflora.condition import (MifEncoder, MifSpec, mif_from_conditions, mixed_image_features,
                                         stack_mifs)
from hyperlora.difflora.diffusion import sample, training_loss
from hyperlora.difflora.dit import DitConfig, LatentDiT, flops_per_step, timestep_embedding
from hyperlora.errors import ImageInputError, SettingError
from hyperlora.pipeline import FaceConditions

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: one thread is faster than several (and on a shared, loaded CPU by far)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SPEC = MifSpec(arcface_dim=8, clip_dim=12, clip_tokens=5, arcface_tokens=2, width=16)
CFG = DitConfig(tokens=4, channels=8, width=32, depth=2, heads=4, mlp_ratio=2.0, cond_dim=16, cond_tokens=7)


def _unit(n: int, dim: int, seed: int) -> torch.Tensor:
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=1, keepdim=True)


def _randomised(seed: int = 0, cfg: DitConfig = CFG, spec: MifSpec = SPEC) -> LatentDiT:
    """A DiT whose every parameter is random (the zero-initialised ones too), so no path is trivially zero."""
    torch.manual_seed(seed)
    model = LatentDiT(cfg, spec)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def _cond(model: LatentDiT, b: int, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return model.encode(_unit(b, 8, seed), torch.randn(b, 5, 12, generator=g)).detach()


# ----------------------------------------------------------------------------- MIF


def test_mif_from_the_pack_clip_encoder_and_its_pooling(clip):
    """Real (tiny) CLIP hidden states [N, 257, 128] -> class token + the 16 x 16 grid pooled to 2 x 2, averaged
    over photos (weighted), checked against a slow per-cell reference; ArcFace -> the normalised mean."""
    rng = np.random.default_rng(0)
    photos = [rng.integers(0, 255, (180 + 20 * i, 200, 3), dtype=np.uint8) for i in range(3)]
    feats = clip.encode(photos)                                            # [3, 257, 128]
    assert tuple(feats.shape) == (3, 257, 128)
    spec = MifSpec(clip_dim=128, clip_tokens=5)
    embeds = _unit(3, 512, 1)
    weights = [1.0, 2.0, 0.5]
    mif = mixed_image_features(embeds, feats, spec, weights=weights)
    assert tuple(mif.face.shape) == (512,) and tuple(mif.clip.shape) == (5, 128)
    w = torch.tensor(weights)
    mean = (w[:, None] * embeds).sum(0)
    torch.testing.assert_close(mif.face, mean / mean.norm())
    grid = feats[:, 1:].reshape(3, 16, 16, 128)
    ref = [feats[:, 0]] + [grid[:, 8 * r:8 * r + 8, 8 * c:8 * c + 8].mean(dim=(1, 2)) for r in range(2) for c in range(2)]
    ref = torch.stack(ref, dim=1)                                           # [3, 5, 128]
    torch.testing.assert_close(mif.clip, (w[:, None, None] * ref).sum(0) / w.sum(), rtol=1e-5, atol=1e-5)
    cond = FaceConditions(id_embeds=embeds, clip_features=feats, base_clip_features=None, crops=[], used=[0, 1, 2],
                          skipped=[])
    from_cond = mif_from_conditions(cond, spec, weights=weights)
    assert torch.equal(from_cond.face, mif.face) and torch.equal(from_cond.clip, mif.clip)
    cond.clip_features = None
    with pytest.raises(ImageInputError, match=r"no CLIP features; extract them with need_clip=True"):
        mif_from_conditions(cond, spec)
    cond.id_embeds = None
    with pytest.raises(ImageInputError, match=r"no ArcFace embeddings; extract them with need_id=True"):
        mif_from_conditions(cond, spec)
    only_cls = mixed_image_features(embeds, feats, MifSpec(clip_dim=128, clip_tokens=1))
    torch.testing.assert_close(only_cls.clip, feats[:, :1].mean(0))
    assert mixed_image_features(embeds, None, MifSpec(clip_tokens=0)).clip is None


def test_mif_encoder_shapes_null_and_spec_json():
    enc = MifEncoder(SPEC)
    batch = stack_mifs([mixed_image_features(_unit(2, 8, s), torch.randn(2, 17, 12), SPEC) for s in range(3)])
    assert tuple(batch.face.shape) == (3, 8) and tuple(batch.clip.shape) == (3, 5, 12)
    tokens = enc.encode(batch)
    assert tuple(tokens.shape) == (3, SPEC.num_tokens, 16) and SPEC.num_tokens == 7
    assert tuple(enc.null_tokens(3).shape) == (3, 7, 16)
    assert MifSpec.from_dict(json.loads(json.dumps(SPEC.to_dict()))) == SPEC
    assert DitConfig.from_dict(json.loads(json.dumps(CFG.to_dict()))) == CFG
    assert SPEC.clip_grid == 2 and MifSpec().num_tokens == 9 and MifSpec().clip_dim == 1024
    assert (DitConfig().cond_tokens, DitConfig().cond_dim) == (MifSpec().num_tokens, MifSpec().width)   # defaults fit


def test_mif_errors_name_the_input_and_the_fix():
    with pytest.raises(ImageInputError, match=r"id_embeds.*\[N, 8\].*got \[3, 7\].*FaceConditions.id_embeds"):
        mixed_image_features(torch.randn(3, 7), torch.randn(3, 17, 12), SPEC)
    bad = torch.randn(3, 17, 12)
    bad[1, 4, 2] = float("nan")
    with pytest.raises(ImageInputError, match=r"CLIP features \(clip_features\) contain NaN.*encode the photos again"):
        mixed_image_features(_unit(3, 8, 0), bad, SPEC)
    nan_face = _unit(3, 8, 0)
    nan_face[0, 0] = float("inf")
    with pytest.raises(ImageInputError, match=r"ArcFace embeddings \(id_embeds\) contain NaN.*face analysis again"):
        mixed_image_features(nan_face, torch.randn(3, 17, 12), SPEC)
    with pytest.raises(ImageInputError, match=r"3 ArcFace embeddings but 2 CLIP feature sets"):
        mixed_image_features(_unit(3, 8, 0), torch.randn(2, 17, 12), SPEC)
    with pytest.raises(ImageInputError, match=r"clip_features\) must be \[N, 1 \+ P\*P, 12\].*got None"):
        mixed_image_features(_unit(3, 8, 0), None, SPEC)
    with pytest.raises(ImageInputError, match=r"16 tokens.*square patch grid"):
        mixed_image_features(_unit(3, 8, 0), torch.randn(3, 16, 12), SPEC)
    with pytest.raises(ImageInputError, match=r"photo weights must be 3"):
        mixed_image_features(_unit(3, 8, 0), torch.randn(3, 17, 12), SPEC, weights=[1.0, 2.0])
    with pytest.raises(ImageInputError, match=r"CLIP input must be \[2, 5, 12\]"):
        MifEncoder(SPEC)(_unit(2, 8, 0), torch.randn(2, 4, 12))
    nan_face = _unit(2, 8, 0)
    nan_face[1, 3] = float("nan")
    with pytest.raises(ImageInputError, match=r"face input values contain NaN.*rebuild the MIF"):
        MifEncoder(SPEC)(nan_face, torch.randn(2, 5, 12))
    with pytest.raises(ImageInputError, match=r"some identities have CLIP tokens and some do not"):
        stack_mifs([mixed_image_features(_unit(1, 8, 0), torch.randn(1, 17, 12), SPEC),
                    mixed_image_features(_unit(1, 8, 0), None, MifSpec(arcface_dim=8, clip_tokens=0))])
    with pytest.raises(SettingError, match=r"clip_tokens is 4; use 0 .* 1 \+ g\*g"):
        MifSpec(clip_tokens=4)
    with pytest.raises(SettingError, match=r"width 30 is not divisible by heads 4"):
        DitConfig(width=30, heads=4)
    with pytest.raises(SettingError, match=r"unknown fields \['extra'\].*newer"):
        DitConfig.from_dict({**CFG.to_dict(), "extra": 1})
    with pytest.raises(SettingError, match=r"set DitConfig.cond_tokens = 7 and cond_dim = 16"):
        LatentDiT(DitConfig(cond_tokens=9, cond_dim=16), SPEC)


# ----------------------------------------------------------------------------- DiT


def test_dit_shapes_and_zero_initialised_output():
    torch.manual_seed(0)
    model = LatentDiT(CFG, SPEC)
    x = torch.randn(3, 4, 8)
    cond = _cond(model, 3)
    out = model(x, torch.rand(3), cond)
    assert tuple(out.shape) == (3, 4, 8)
    assert torch.equal(out, torch.zeros_like(out))                        # untrained: exactly 0
    with torch.no_grad():
        model.x_out.bias.add_(0.1)                                          # the check sees a non-zero output
    assert not torch.equal(model(x, torch.rand(3), cond), torch.zeros_like(out))
    with pytest.raises(SettingError, match=r"latents must be \[B, 4, 8\].*got \[3, 5, 8\]"):
        model(torch.randn(3, 5, 8), torch.rand(3), cond)
    with pytest.raises(SettingError, match=r"condition must be \[3, 7, 16\]"):
        model(x, torch.rand(3), cond[:, :6])
    with pytest.raises(SettingError, match=r"time must be a float vector \[3\] in \[0, 1\]"):
        model(x, torch.tensor([1, 2, 3]), cond)
    with pytest.raises(SettingError, match=r"drop_mask must be a bool vector \[3\]"):
        model(x, torch.rand(3), cond, torch.tensor([1, 0, 1]))


def test_timestep_embedding_equals_a_slow_reference():
    t = torch.tensor([0.0, 0.013, 0.5, 0.999, 1.0])
    for dim in (256, 7):
        emb = timestep_embedding(t, dim)
        half = dim // 2
        ref = torch.zeros(len(t), dim, dtype=torch.float64)
        for row, tv in enumerate(t.tolist()):
            for i in range(half):
                f = 10000.0 ** (-i / half)
                ref[row, i] = math.cos(1000.0 * tv * f)
                ref[row, half + i] = math.sin(1000.0 * tv * f)
        assert tuple(emb.shape) == (5, dim)
        torch.testing.assert_close(emb.double(), ref, rtol=0, atol=2e-4)   # float32 argument up to 1000


def test_drop_mask_swaps_in_the_null_condition():
    model = _randomised()
    x, t, cond = torch.randn(3, 4, 8), torch.rand(3), _cond(model, 3)
    with torch.no_grad():
        full = model(x, t, cond)
        none = model(x, t, None)
        explicit_null = model(x, t, model.cond_encoder.null_tokens(3))
        mixed = model(x, t, cond, torch.tensor([True, False, True]))
    torch.testing.assert_close(none, explicit_null, rtol=0, atol=0)
    torch.testing.assert_close(mixed[[0, 2]], none[[0, 2]], rtol=0, atol=0)
    torch.testing.assert_close(mixed[1], full[1], rtol=0, atol=0)
    assert (mixed[0] - full[0]).abs().max() > 1e-2                        # the condition does matter


# ----------------------------------------------------------------------------- loss and sampler


def _euler(model, x, cond, steps, guidance=None):
    """Slow reference sampler: separate conditional / null forwards, Euler from t = 1 to 0."""
    with torch.no_grad():
        for i in range(steps):
            t = torch.full((x.shape[0],), 1.0 - i / steps)
            v = model(x, t, cond)
            if guidance is not None:
                v_u = model(x, t, None)
                v = v_u + guidance * (v - v_u)
            x = x + (-1.0 / steps) * v
    return x


def test_guidance_one_is_the_conditional_path_and_guidance_follows_the_formula():
    model = _randomised()
    cond = _cond(model, 2)
    noise = torch.stack([torch.randn(4, 8, generator=torch.Generator().manual_seed(s)) for s in (11, 12)])
    g1 = sample(model, cond, steps=4, guidance=1.0, seed=11)
    torch.testing.assert_close(g1, _euler(model, noise.clone(), cond, 4), rtol=1e-5, atol=1e-5)
    g3 = sample(model, cond, steps=4, guidance=3.0, seed=11)
    torch.testing.assert_close(g3, _euler(model, noise.clone(), cond, 4, guidance=3.0), rtol=1e-4, atol=1e-4)
    assert (g3 - g1).abs().max() > 1e-2
    uncond = sample(model, None, steps=4, seed=[11, 12])
    torch.testing.assert_close(uncond, _euler(model, noise.clone(), None, 4), rtol=1e-5, atol=1e-5)


def test_seed_determinism_and_batch_equals_single():
    model = _randomised()
    cond = _cond(model, 3)
    a = sample(model, cond, steps=5, guidance=2.0, seed=[7, 8, 9])
    assert torch.equal(a, sample(model, cond, steps=5, guidance=2.0, seed=[7, 8, 9]))   # same seed, same bits
    assert torch.equal(a, sample(model, cond, steps=5, guidance=2.0, seed=7))           # int seed: 7, 8, 9
    for i, s in enumerate((7, 8, 9)):
        single = sample(model, cond[i:i + 1], steps=5, guidance=2.0, seed=s)
        # batch 3 and batch 1 take different matmul kernels (AVX-512 blocks differently: 4e-6 measured)
        torch.testing.assert_close(single[0], a[i], rtol=1e-4, atol=1e-5)
    assert (a[0] - sample(model, cond[:1], steps=5, guidance=2.0, seed=70)[0]).abs().max() > 1e-2
    gen = sample(model, cond, steps=3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(gen, sample(model, cond, steps=3, generator=torch.Generator().manual_seed(1)))
    with pytest.raises(SettingError, match=r"2 seeds for 3 samples"):
        sample(model, cond, steps=3, seed=[1, 2])
    with pytest.raises(SettingError, match=r"steps is 0"):
        sample(model, cond, steps=0, seed=1)
    with pytest.raises(SettingError, match=r"exactly one of seed and generator"):
        sample(model, cond, steps=3)


def test_progress_callback_and_interruption():
    model = _randomised()
    cond = _cond(model, 1)
    seen = []
    sample(model, cond, steps=4, seed=0, callback=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]

    class Stop(Exception):
        pass

    checks = []

    def check():
        checks.append(1)
        if len(checks) == 3:
            raise Stop

    seen.clear()
    with pytest.raises(Stop):
        sample(model, cond, steps=10, seed=0, check_interrupt=check,
               callback=lambda done, total: seen.append(done))
    assert seen == [1, 2] and len(checks) == 3


def test_training_loss_drops_the_condition_per_sample():
    model = _randomised()
    x0, cond = torch.randn(5, 4, 8), _cond(model, 5)

    def loss(c, p):
        with torch.no_grad():
            return float(training_loss(model, x0, c, p, torch.Generator().manual_seed(4)))

    assert loss(cond, 1.0) == pytest.approx(loss(None, 0.0), rel=1e-6)          # all dropped = unconditional
    assert abs(loss(cond, 0.0) - loss(None, 0.0)) > 1e-3
    # by hand: the same draws, the rectified-flow target eps - x0
    g = torch.Generator().manual_seed(4)
    t, eps, drop = torch.rand(5, generator=g), torch.randn(5, 4, 8, generator=g), torch.rand(5, generator=g) < 0.5
    assert drop.any() and not drop.all()
    with torch.no_grad():
        pred = model((1 - t)[:, None, None] * x0 + t[:, None, None] * eps, t, cond, drop)
    assert loss(cond, 0.5) == pytest.approx(float(((pred - (eps - x0)) ** 2).mean()), rel=1e-6)
    with pytest.raises(SettingError, match=r"drop_prob is 1.5"):
        training_loss(model, x0, cond, 1.5)


# ----------------------------------------------------------------------------- FLOPs


@pytest.mark.parametrize("cfg", [CFG, DitConfig(tokens=16, channels=64, width=96, depth=3, heads=6, mlp_ratio=4.0,
                                                cond_dim=16, cond_tokens=7)])
def test_flops_per_step_matches_torch_flop_counter(cfg):
    """Stated tolerance: 1 % (the analytic count follows the flop counter's rules and is exact today)."""
    torch.manual_seed(0)
    model = LatentDiT(cfg, SPEC).eval()
    cond = _cond(model, 3)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(3, cfg.tokens, cfg.channels), torch.rand(3), cond)
    assert flops_per_step(cfg, 3) == pytest.approx(counter.get_total_flops(), rel=0.01)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        sample(model, cond, steps=1, guidance=2.0, seed=0)                  # one guided step: two passes
    assert flops_per_step(cfg, 3, guided=True) == pytest.approx(counter.get_total_flops(), rel=0.01)


# ----------------------------------------------------------------------------- a tiny DiT learns

T, C, A = 4, 8, 8
TRAIN_SPEC = MifSpec(arcface_dim=A, clip_tokens=0, arcface_tokens=2, width=32)
TRAIN_CFG = DitConfig(tokens=T, channels=C, width=32, depth=2, heads=4, mlp_ratio=2.0, cond_dim=32, cond_tokens=2)
MAP = torch.randn(T * C, A, generator=torch.Generator().manual_seed(0))


def _law(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The synthetic conditional law: a unit condition vector c [n, 8] and its target latent MAP @ c [n, 4, 8]
    (entries of about unit std over c, like LAE latents)."""
    c = _unit(n, A, seed)
    return c, (c @ MAP.T).reshape(n, T, C)


@pytest.fixture(scope="module")
def trained():
    """(trained, untrained) tiny DiTs: 300 AdamW steps of batch 32 on latents = MAP c + 0.05 noise, 10 % dropout."""
    torch.manual_seed(0)
    untrained = LatentDiT(TRAIN_CFG, TRAIN_SPEC).eval()
    model = LatentDiT(TRAIN_CFG, TRAIN_SPEC)
    steps = 300
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=5e-3, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        c, x0 = _law(32, 1000 + step)
        x0 = x0 + 0.05 * torch.randn(x0.shape, generator=gen)
        loss = training_loss(model, x0, model.encode(c), 0.1, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval(), untrained


def _rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).mean().sqrt())


def test_a_trained_tiny_dit_samples_the_conditions_target(trained):
    model, untrained = trained
    c, target = _law(32, 99)                                                 # conditions never trained on
    with torch.no_grad():
        good = _rms(sample(model, model.encode(c), steps=20, seed=0), target)
        guided = _rms(sample(model, model.encode(c), steps=20, guidance=2.0, seed=0), target)
        raw = _rms(sample(untrained, untrained.encode(c), steps=20, seed=0), target)
        wrong = _rms(sample(model, model.encode(c.roll(1, 0)), steps=20, seed=0), target)
    bound = 0.4                                                              # the data's own spread is ~1
    assert good < bound and guided < bound
    assert raw > bound and wrong > bound                                    # both controls fail the check
    assert good < raw / 4 and good < wrong / 4


def test_unconditional_samples_have_the_datas_spread(trained):
    model, _ = trained
    with torch.no_grad():
        free = sample(model, None, steps=20, seed=list(range(256)))
    _, data = _law(256, 5)
    ratio = free.std(dim=0) / data.std(dim=0)                               # per latent entry, over samples
    assert 0.7 < float(ratio.mean()) < 1.3
    assert float((free.mean(0) - data.mean(0)).abs().mean()) < 0.3
    # not collapsed onto one person: samples differ from each other as much as the data's do
    assert float(torch.pdist(free.flatten(1)).mean()) > 0.7 * float(torch.pdist(data.flatten(1)).mean())
