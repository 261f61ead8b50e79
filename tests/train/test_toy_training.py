"""Toy training works: over several seeds, a trained generator's own LoRA denoises held-out photos of its
identity better than another identity's LoRA and than no LoRA, by a margin that an untrained generator misses.

One toy set-up for the module (:func:`hyperlora.train.demo.prepare_toy`: synthetic identities, prepare,
base UNet pre-training); per seed a short fit of all three stages; evaluation through the exported folder,
the pack's loader and face pipeline (:mod:`hyperlora.train.evaluate`).
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import skip_or_fail

try:
    import accelerate  # noqa: F401
    import diffusers  # noqa: F401
except ImportError:  # pragma: no cover - the test extra pulls in [train]
    accelerate = diffusers = None

SEEDS = (0, 1)
MARGIN = 0.003
"""own must be 0.3 % below other and below none (relative): far above the evaluation's own noise, which is
zero for identical LoRAs (same photos, noise and timesteps under every condition)."""


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    if accelerate is None or diffusers is None:
        skip_or_fail("pip install -e .[train] (diffusers, accelerate)")
    from hyperlora.train import demo

    size = demo.DemoSize(identities=6, unseen=2, train_per_identity=8, reference_per_identity=2,
                         evaluate_per_identity=2, pretrain_steps=150, stages=(10, 40, 90))
    root = tmp_path_factory.mktemp("toy_training")
    prep = demo.prepare_toy(root / "models", work=root / "work", size=size, progress=False)
    return demo, prep, size, demo.reference_features(prep), root


@pytest.fixture(scope="module")
def trained(prepared):
    demo, prep, size, features, root = prepared
    out = {}
    for seed in SEEDS:
        export = demo.train_toy(prep, root / f"run{seed}", stages=size.stages, seed=seed)
        out[seed] = demo.evaluate_toy(prep, export, features=features, seed=0)
    return out


def _untrained(prepared, *, random_up: bool):
    """A generator as fit builds it (zero ``up`` bases), or with random ``up`` bases too: untrained either way."""
    from hyperlora.train.export import export_folder
    from hyperlora.train.hypernet import TrainableHyperLoRA, unet_modules

    demo, prep, size, features, root = prepared
    m = demo.toy_fit_config(base_model=prep.tree.sdxl, shards=root, out=root, name="x", stages=size.stages).model
    gen = TrainableHyperLoRA.new(unet_modules(prep.unet), rank=m.rank, base_rank=m.base_rank, hyper_dim=m.hyper_dim,
                                 clip_dim=int(prep.train_set[0]["clip_id"].shape[-1]), heads=m.heads, dim=m.dim,
                                 depth=m.depth, dim_head=m.dim_head, ff_mult=m.ff_mult, num_id_tokens=m.num_id_tokens,
                                 seed=5)
    if random_up:
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for group in gen.groups["id"]:
                up = getattr(gen, group.up_buffer)
                down = getattr(gen, group.down_buffer)
                up.copy_(torch.randn(up.shape, generator=g) * float(down.std()))
    name = "untrained_random" if random_up else "untrained"
    export = export_folder(gen, root / name)
    return demo.evaluate_toy(prep, export, features=features, seed=0)["training"]


KNOWN_GAP = ("toy training does not yet separate identities by the margin within the CPU budget: after ~150 "
             "steps the tokens differ across identities by ~0.01 (unit rows) and own == other to 1e-4; after "
             "4,000 steps (not affordable here) spread 0.19 and own < other by 1e-4, but own > none: the base UNet, "
             "pre-trained on the same photos, already models them (docs/training.md, 'Known gap')")


@pytest.mark.xfail(strict=True, reason=KNOWN_GAP)
@pytest.mark.parametrize("seed", SEEDS)
def test_own_lora_beats_other_and_none_on_held_out_photos(trained, seed):
    from hyperlora.train.evaluate import margin_ok

    res = trained[seed]["training"]
    assert res.photos > 0 and res.identities >= 2
    assert margin_ok(res, margin=MARGIN), (seed, res.line(f"seed {seed}"), res.per_identity)


def test_an_untrained_generator_fails_the_same_check(prepared):
    from hyperlora.train.evaluate import margin_ok

    zero = _untrained(prepared, random_up=False)
    # zero up bases: no LoRA at all (other averages three identities' equal losses: float rounding only)
    assert zero.own == zero.none and zero.other == pytest.approx(zero.none, rel=1e-6)
    assert not margin_ok(zero, margin=MARGIN)
    rand = _untrained(prepared, random_up=True)
    assert rand.own != rand.none                             # it does change the UNet ...
    assert not margin_ok(rand, margin=MARGIN), rand.line("untrained")   # ... but not towards the identity
