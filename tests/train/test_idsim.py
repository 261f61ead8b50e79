"""Identity in pictures, the cheap parts: the CPU DDIM sampler through the functional LoRA, the paired bootstrap,
the per-group figures and their pass rule, the ``evaluate`` CLI's errors, and the toy decoder (encoder frozen,
cache key).  The trained-toy checks are in test_toy_training.py (they share its training)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hyperlora.train.idsim import GroupScores, group_scores, paired_bootstrap, similarity_table

diffusers = pytest.importorskip("diffusers")


# --------------------------------------------------------------------------------- statistics


def test_paired_bootstrap_interval() -> None:
    rng = np.random.default_rng(0)
    const = [np.full(9, 0.2), np.full(9, 0.1)]
    lo, hi = paired_bootstrap(const)
    assert lo == pytest.approx(0.15) and hi == pytest.approx(0.15)          # mean over identities of the means
    noise = [rng.normal(0.0, 1.0, 9) for _ in range(4)]
    lo, hi = paired_bootstrap(noise)
    assert lo < np.mean([d.mean() for d in noise]) < hi and hi - lo > 0.3
    shifted = [d - d.mean() + 1.0 for d in noise]                           # every identity's mean is 1
    assert paired_bootstrap(shifted)[0] > 0.4
    assert np.isnan(paired_bootstrap([np.zeros(0)])[0])


def _sims(n: int, s: int, *, own: float, base: float = 0.5, seed: int = 0) -> np.ndarray:
    """[1 + n, n, s]: image of condition c vs reference i; own-LoRA images match their reference by ``own``."""
    rng = np.random.default_rng(seed)
    sims = base + 0.02 * rng.standard_normal((1 + n, n, s))
    for i in range(n):
        sims[1 + i, i] += own
    return sims


def test_group_scores_pass_rule() -> None:
    names = [f"p{i}" for i in range(5)]
    good = group_scores(_sims(5, 9, own=0.2), names, names[:3])
    assert isinstance(good, GroupScores) and good.identities == names[:3]
    assert good.own == pytest.approx(0.7, abs=0.02) and good.other == pytest.approx(0.5, abs=0.02)
    assert good.own_minus_other_ci[0] > 0.15 and good.retrieval_own == 1.0 and good.chance == pytest.approx(0.2)
    assert good.retrieval_other == 0.0 and good.faces == 1.0
    assert good.passes(retrieval_margin=0.2)
    same = group_scores(_sims(5, 9, own=0.0), names, names)                 # LoRAs that change nothing
    assert same.own_minus_other_ci[0] < 0 < same.own_minus_other_ci[1]
    assert not same.passes(retrieval_margin=0.2)
    # no LoRA at all: every condition gives the same image -> identical sims, interval [0, 0]: fails
    flat = np.repeat(_sims(5, 9, own=0.0)[:1], 6, axis=0)
    zero = group_scores(flat, names, names)
    assert zero.own_minus_other == 0.0 and zero.own_minus_other_ci == (0.0, 0.0)
    assert not zero.passes(retrieval_margin=0.0)


def test_images_without_a_face_are_left_out() -> None:
    refs = np.eye(3, 512)
    e = [[refs[0], None], [refs[0], refs[0]], [refs[1], None], [None, None]]   # none, own p0, own p1, own p2
    sims = similarity_table(e, refs)
    assert sims.shape == (4, 3, 2) and np.isnan(sims[0, :, 1]).all() and sims[1, 0, 0] == 1.0
    g = group_scores(sims, ["p0", "p1", "p2"], ["p0", "p1", "p2"])
    assert g.per_identity["p2"].own is None and g.per_identity["p2"].faces_own == 0.0
    assert g.per_identity["p0"].pairs == 2 and g.per_identity["p0"].retrieval_own == 1.0
    assert g.faces == pytest.approx(np.mean([0.5, 1.0, 0.5, 0.0]))


# --------------------------------------------------------------------------------- sampler


def _tiny_unet_and_lora():
    from hyperlora.lora_functional import diffusers_lora_targets
    from hyperlora.train.toy.sdxl import tiny_unet

    unet = tiny_unet(seed=0).eval()
    g = torch.Generator().manual_seed(1)
    factors = {p: (torch.randn(1, 2, m.in_features, generator=g) * 0.3, torch.randn(1, m.out_features, 2, generator=g) * 0.3)
               for p, m in diffusers_lora_targets(unet).items()}
    return unet, factors


def test_ddim_sampler_runs_on_cpu_through_the_functional_lora() -> None:
    from hyperlora.lora_functional import LoraTerm
    from hyperlora.train.sampler import Conditioning, ddim_sample, ddim_timesteps, seeded_noise
    from hyperlora.train.toy.sdxl import POOLED_DIM, TEXT_HIDDEN

    assert ddim_timesteps(1000, 4) == [999, 749, 499, 249]
    with pytest.raises(ValueError, match="DDIM steps must be in 1..1000"):
        ddim_timesteps(1000, 0)
    unet, factors = _tiny_unet_and_lora()
    ac = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2, 0)
    cond = Conditioning(torch.randn(2, 77, 2 * TEXT_HIDDEN, generator=torch.Generator().manual_seed(2)),
                        torch.zeros(2, POOLED_DIM), torch.tensor([[128.0, 128, 0, 0, 128, 128]]).repeat(2, 1))
    noise = seeded_noise((4, 16, 16), [3, 3])
    assert torch.equal(noise[0], noise[1])
    base = ddim_sample(unet, ac, noise, cond, steps=3)
    assert base.shape == (2, 4, 16, 16) and torch.isfinite(base).all()
    assert torch.equal(base, ddim_sample(unet, ac, noise, cond, steps=3))              # deterministic
    zero = {p: (d, torch.zeros_like(u)) for p, (d, u) in factors.items()}
    assert torch.equal(base, ddim_sample(unet, ac, noise, cond, steps=3, terms=[LoraTerm(zero, 1.0)]))
    with_lora = ddim_sample(unet, ac, noise, cond, steps=3, terms=[LoraTerm(factors, 1.0)])
    assert (with_lora - base).abs().max() > 1e-3
    # the hooks are gone afterwards
    assert torch.equal(base, ddim_sample(unet, ac, noise, cond, steps=3))


# --------------------------------------------------------------------------------- toy decoder


def test_decoder_training_keeps_the_encoder_and_the_cache_key_follows_every_input(tmp_path) -> None:
    from dataclasses import replace

    from hyperlora.train.toy import decoder as dec
    from hyperlora.train.toy.sdxl import _calibrated_vae

    vae = _calibrated_vae(0)
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    settings = dec.DecoderTraining(steps=2, batch_size=2, photos=4, identities=2)
    path = dec.cached_decoder(vae, seed=0, settings=settings, root=tmp_path, progress=False)
    after = vae.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(k.startswith(("decoder.", "post_quant_conv.")) for k in changed)
    assert path.parent == tmp_path and path.suffix == ".safetensors"
    again = _calibrated_vae(0)
    assert dec.cached_decoder(again, seed=0, settings=settings, root=tmp_path, progress=False) == path   # from cache
    assert all(torch.equal(again.state_dict()[k], after[k]) for k in after)
    key = dec.cache_key(dict(vae.config), settings, seed=0)
    assert key != dec.cache_key(dict(vae.config), replace(settings, steps=3), seed=0)
    assert key != dec.cache_key(dict(vae.config), settings, seed=1)
    assert key != dec.cache_key({**dict(vae.config), "scaling_factor": 2.0}, settings, seed=0)


def test_whole_vae_training_trains_the_encoder_and_recalibrates_the_scale(tmp_path) -> None:
    """``whole``: the encoder moves too, and the cache keeps the new scaling factor (1 / std of the latent means of
    the training photos), which a VAE loaded from the cache gets back."""
    from dataclasses import replace

    from hyperlora.train.toy import decoder as dec
    from hyperlora.train.toy.sdxl import _calibrated_vae

    vae = _calibrated_vae(0)
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    settings = replace(dec.WHOLE, steps=2, batch_size=2, photos=4, identities=2)
    path = dec.cached_decoder(vae, seed=0, settings=settings, root=tmp_path, progress=False)
    changed = {k for k, v in vae.state_dict().items() if not torch.equal(v, before[k])}
    assert any(k.startswith("encoder.") for k in changed) and any(k.startswith("decoder.") for k in changed)
    photos = dec.draw_photos(settings, size=int(vae.config.sample_size))
    with torch.no_grad():
        z = vae.encode(photos).latent_dist.mean
    assert vae.config.scaling_factor == pytest.approx(1 / float(z.std()), rel=1e-4)
    again = _calibrated_vae(0)
    assert dec.cached_decoder(again, seed=0, settings=settings, root=tmp_path, progress=False) == path
    assert again.config.scaling_factor == vae.config.scaling_factor
    assert all(torch.equal(again.state_dict()[k], v) for k, v in vae.state_dict().items())


# --------------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("extra, message", [
    ([], "--base is missing; give it, or --tree"),
    (["--tree", "{tmp}/nowhere"], "has no hyper_lora/clip_vit/"),
    (["--base", "{tmp}", "--antelope", "{tmp}/no_antelope", "--clip", "{tmp}"], "--antelope {tmp}/no_antelope does not exist"),
    (["--base", "{tmp}", "--antelope", "{tmp}", "--clip", "{tmp}", "--seeds", "a,b"], "--seeds 'a,b' must be"),
    (["--base", "{tmp}", "--antelope", "{tmp}", "--clip", "{tmp}", "--identities", "zed"], "no folder"),
    (["--base", "{tmp}", "--antelope", "{tmp}", "--clip", "{tmp}", "--unseen", "zed"], "--unseen names 'zed'"),
])
def test_evaluate_cli_names_the_mistake_in_one_line(tmp_path, capsys, extra, message) -> None:
    from hyperlora.train.__main__ import main

    (tmp_path / "refs" / "p0").mkdir(parents=True)
    (tmp_path / "model").mkdir()
    args = ["evaluate", "--model", str(tmp_path / "model"), "--references", str(tmp_path / "refs"),
            "--out", str(tmp_path / "out")] + [a.replace("{tmp}", str(tmp_path)) for a in extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("evaluate: ") and err.count("\n") == 1 and message.replace("{tmp}", str(tmp_path)) in err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------- the trained toy decoder

RECON_MARGIN = 0.25
"""Reconstructions must retrieve their identity 25 points above chance (the original photos: 0.67, chance 0.125)."""


@pytest.fixture(scope="module")
def reconstructions(tmp_path_factory):
    """8 toy identities (2 reference + 3 held-out photos each): the held-out photos and their reconstructions
    through the toy VAE with the trained decoder (cached; trained once per machine), scored by the pack's face
    pipeline with the stand-in AntelopeV2 against each identity's reference embedding."""
    from PIL import Image

    from hyperlora.faces.analysis import FaceAnalyzer
    from hyperlora.similarity import reference_from_photos
    from hyperlora.train.idsim import image_embedding
    from hyperlora.train.toy.decoder import cached_decoder
    from hyperlora.standins import cached_antelopev2
    from hyperlora.train.toy.faces import make_toy_dataset
    from hyperlora.train.toy.sdxl import _calibrated_vae

    root = tmp_path_factory.mktemp("recon")
    vae = _calibrated_vae(0)
    cached_decoder(vae, seed=0, progress=False)
    ds = make_toy_dataset(root / "data", identities=8, unseen=0, train_per_identity=0, reference_per_identity=2,
                          evaluate_per_identity=3, seed=5)
    analyzer = FaceAnalyzer(cached_antelopev2(root / "antelope"))
    refs = []
    for n in ds.train_identities:
        photos = [np.asarray(Image.open(p).convert("RGB")) for p in sorted((ds.reference / n).glob("*.png"))]
        e = reference_from_photos(photos, analyzer=analyzer)[0].double().numpy()
        refs.append(e / np.linalg.norm(e))
    refs = np.stack(refs)
    rows = {"photo": [], "recon": []}
    for i, n in enumerate(ds.train_identities):
        for p in sorted((ds.evaluate / n).glob("*.png")):
            img = np.array(Image.open(p).convert("RGB"))
            x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 127.5 - 1
            with torch.no_grad():
                y = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
            rec = ((y[0] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
            for kind, im in (("photo", img), ("recon", rec)):
                e = image_embedding(im, analyzer=analyzer)
                rows[kind].append((i, None if e is None else refs @ e))
    return rows


def _retrieval(rows) -> float:
    return float(np.mean([s is not None and int(np.argmax(s)) == i for i, s in rows]))


def test_the_trained_toy_decoder_draws_faces_the_detector_finds(reconstructions):
    assert all(s is not None for _, s in reconstructions["recon"])       # a random decoder's output: no face
    assert _retrieval(reconstructions["photo"]) > 0.125 + RECON_MARGIN   # the scorer tells the photos apart


@pytest.mark.xfail(strict=True, reason=(
    "measured (docs/training.md, 'The toy VAE draws'): after 1,000 decoder steps the reconstructions show the "
    "face's place, size and skin tone but not its eyes, paint or stripes; they retrieve their identity 4 of 24 "
    "times (chance 3, the photos themselves 16). The frozen random encoder scrambles the face's inside over the "
    "whole latent. Training the whole VAE (demo --vae whole, not the default) reaches 11 of 24, but changes every "
    "latent; see 'Tried since: the whole VAE trained'."))
def test_toy_reconstructions_keep_the_identity(reconstructions):
    assert _retrieval(reconstructions["recon"]) > 0.125 + RECON_MARGIN


def test_evaluate_cli_writes_eval_json_and_png(tmp_path, capsys) -> None:
    """End to end on the demo's tree layout (no training: a generator as fit builds it, zero up bases, so every
    LoRA picture is the no-LoRA picture and own - other is exactly 0)."""
    import json

    from PIL import Image

    from hyperlora.train import demo
    from hyperlora.train.__main__ import main
    from hyperlora.train.export import export_folder
    from hyperlora.train.frozen import load_unet
    from hyperlora.train.hypernet import TrainableHyperLoRA, unet_modules
    from hyperlora.train.toy.faces import make_toy_dataset

    tree = demo.build_tree(tmp_path / "models")
    ds = make_toy_dataset(tmp_path / "data", identities=3, unseen=0, train_per_identity=0, reference_per_identity=1,
                          evaluate_per_identity=0, seed=3)
    m = demo.toy_fit_config(base_model=tree.sdxl, shards=tmp_path, out=tmp_path, name="x", stages=(1, 1, 1)).model
    gen = TrainableHyperLoRA.new(unet_modules(load_unet(tree.sdxl)), rank=m.rank, base_rank=m.base_rank,
                                 hyper_dim=m.hyper_dim, clip_dim=128, heads=m.heads, dim=m.dim, depth=m.depth,
                                 dim_head=m.dim_head, ff_mult=m.ff_mult, num_id_tokens=m.num_id_tokens, seed=5)
    model = export_folder(gen, tmp_path / "model")
    out = tmp_path / "eval"
    code = main(["evaluate", "--model", str(model), "--tree", str(tree.root), "--references", str(ds.reference),
                 "--unseen", ds.train_identities[2], "--seeds", "4", "--prompt", "a portrait of a person",
                 "--steps", "2", "--out", str(out)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0, lines
    assert lines[0].startswith("evaluate (training, 2 identities): id-sim own ")
    assert lines[1].startswith("evaluate (unseen, 1 identities): id-sim own ") and lines[-1].endswith("eval.png")
    data = json.loads((out / "eval.json").read_text())
    assert data["identities"] == ds.train_identities and data["seeds"] == [4] and data["steps"] == 2
    assert set(data["groups"]) == {"training", "unseen"}
    g = data["groups"]["training"]
    assert set(g["per_identity"]) == set(ds.train_identities[:2]) and g["chance"] == pytest.approx(1 / 3)
    if g["own"] is not None:            # a random decoder's picture may show no face at all: then no score
        assert g["own"] == g["none"] and g["own_minus_other"] == 0.0
    png = Image.open(out / "eval.png")
    assert png.size[1] > 3 * 2 * 128 and png.size[0] > 4 * 2 * 128      # 3 rows, 4 columns of 256 px cells
