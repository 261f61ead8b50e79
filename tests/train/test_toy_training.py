"""Toy training works: over several seeds, a trained generator's own LoRA denoises held-out photos of its
identity better than another identity's LoRA and than no LoRA, by a margin that an untrained generator misses.

One toy set-up for the module: the demo's own (:data:`hyperlora.train.demo.FULL`: 8 training identities x
100 photos, 3 unseen identities, the base UNet pre-trained 2,000 steps), then the demo's fit (all three
stages, :data:`hyperlora.train.demo.FIT_OVERRIDES`) once per seed, two seeds at once in two processes;
evaluation through the exported folder, the pack's loader and face pipeline (:mod:`hyperlora.train.evaluate`).
About twenty minutes on two cores, once per machine and version of the code: the set-up, the exports and
their losses are kept in the test cache under a hash of every input, code included (:func:`toy_key`).

The same two trained generators are then judged as the paper judges them, by identity in generated pictures
(:mod:`hyperlora.train.idsim`: samples with the own LoRA, the other identities' and none, the same noise,
scored by the pack's face pipeline), over :data:`PICTURE_SEEDS` noise seeds x 3 prompts, on the training
identities and the unseen ones; untrained generators must fail the same check.  No extra training: the
pictures come from the exports the loss check already made.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO_ROOT, skip_or_fail, test_cache_root
from tests.fixtures.hyperlora_models import cached_folder

try:
    import accelerate  # noqa: F401
    import diffusers  # noqa: F401
except ImportError:  # pragma: no cover - the test extra pulls in [train]
    accelerate = diffusers = None

SEEDS = (0, 1)
MARGIN = 0.0005
"""own must be 0.05 % below other and below none (relative).  The evaluation has no noise of its own
between conditions (same photos, noise and timesteps under every LoRA; an untrained generator gives exactly
equal losses), and the trained toy measures 0.15-0.26 % (docs/training.md, "The toy result")."""


PICTURE_SEEDS = (0, 1, 2)
"""Noise seeds of the picture check (each with the 3 default prompts: 9 pictures per identity and condition)."""
RETRIEVAL_MARGIN = 0.1
"""Own-LoRA pictures must retrieve their identity (top-1 among the 11) at least 10 points above chance (1/11)."""


def toy_key() -> str:
    """SHA-256 (16 hex digits) of every input of this module's toy set-up and trainings: every source file of the
    ``hyperlora`` package (``.py``, the C kernel, the JSON configs) but its command-line tools (``hyperlora/tools``:
    queue, download, workflow conversion, which training never imports), this file, the library versions and the
    CPU.  A change to the nodes, the tools, the docs or another test does not train the toy again.  Files, not
    imported modules: the key must not depend on what other tests of the session imported."""
    import hashlib
    import importlib.metadata

    from hyperlora.precision import read_cpu_features

    package = REPO_ROOT / "hyperlora"
    files = [f for f in package.rglob("*") if f.suffix in (".py", ".c", ".json") and f.is_file()
             and not {"tools", "__pycache__"} & set(f.relative_to(package).parts)]
    h = hashlib.sha256()
    for path in sorted(files) + [Path(__file__)]:
        h.update(str(path.resolve().relative_to(REPO_ROOT)).encode() + b"\0" + path.read_bytes())
    for dist in ("torch", "diffusers", "transformers", "accelerate", "onnxruntime", "numpy", "safetensors"):
        try:
            h.update(f"{dist}={importlib.metadata.version(dist)};".encode())
        except importlib.metadata.PackageNotFoundError:
            h.update(f"{dist}=none;".encode())
    cpu = read_cpu_features()
    h.update(f"{cpu.model};{cpu.capability};{os.cpu_count()}".encode())
    return h.hexdigest()[:16]


def test_the_cache_key_depends_on_files_not_on_what_the_session_imported(tmp_path, monkeypatch):
    """The key of the cached toy is the same whatever other tests imported (a test importing the CLI module
    once gave the CI run another key than a fresh process, and a needless 20-minute rebuild), and it changes
    when a source file of the package changes."""
    import importlib
    import sys

    before = toy_key()
    importlib.import_module("hyperlora.train.__main__")
    importlib.import_module("hyperlora.tools.queue")
    assert toy_key() == before and len(before) == 16 and int(before, 16) >= 0
    copy = tmp_path / "repo"
    shutil.copytree(REPO_ROOT / "hyperlora", copy / "hyperlora", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO_ROOT / "tests", copy / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    module = sys.modules[__name__]
    monkeypatch.setattr(module, "REPO_ROOT", copy)
    monkeypatch.setattr(module, "__file__", str(copy / "tests" / "train" / "test_toy_training.py"))
    assert toy_key() == before                                        # the same files elsewhere: the same key
    (copy / "hyperlora" / "tools" / "queue.py").write_text("# changed\n")
    assert toy_key() == before                                        # the CLI tools are not an input
    with open(copy / "hyperlora" / "train" / "fit.py", "a") as f:
        f.write("# changed\n")
    assert toy_key() != before


@pytest.fixture(scope="module")
def toy() -> Path:
    """The module's toy set-up and its two trained seeds: built once per machine and code version (about 20 minutes
    on two cores) in the test cache, ``toy-training/<toy_key()>``: ``models/`` (the tree), ``work/`` (data and
    shards), ``exports/seed<k>/`` and ``losses.json``; every later session reads it back."""
    if accelerate is None or diffusers is None:
        skip_or_fail("pip install -e .[train] (diffusers, accelerate)")
    from hyperlora.train import demo

    def build(folder: Path) -> None:
        prep = demo.prepare_toy(folder / "models", work=folder / "work", size=demo.FULL, progress=False)
        features = demo.reference_features(prep)
        results = demo.train_seeds(prep, folder / "runs", SEEDS, stages=demo.FULL.stages, processes=len(SEEDS),
                                   features=features)
        for k in SEEDS:      # the exports only (the runs' checkpoints are not needed again)
            shutil.copytree(folder / "runs" / f"seed{k}" / "export", folder / "exports" / f"seed{k}")
        shutil.rmtree(folder / "runs")
        (folder / "losses.json").write_text(json.dumps(
            {str(k): {group: asdict(loss) for group, loss in r.items()} for k, r in results.items()}, indent=1))

    root = test_cache_root() / "toy-training"
    folder = cached_folder(root, toy_key(), build)
    for old in root.glob("*/.complete"):      # earlier versions of the code, untouched for three days
        if old.parent != folder and time.time() - old.stat().st_mtime > 3 * 86400:
            shutil.rmtree(old.parent, ignore_errors=True)
    return folder


@pytest.fixture(scope="module")
def prepared(toy, tmp_path_factory):
    from hyperlora.train import demo

    prep = demo.load_prepared(toy / "models", toy / "work")
    return demo, prep, demo.FULL, demo.reference_features(prep), tmp_path_factory.mktemp("toy_training")


@pytest.fixture(scope="module")
def trained(toy, prepared):
    from hyperlora.train.evaluate import GroupLoss

    losses = json.loads((toy / "losses.json").read_text())
    return {int(k): {group: GroupLoss(**loss) for group, loss in r.items()} for k, r in losses.items()}


def _untrained_export(prepared, *, random_up: bool):
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
    return export_folder(gen, root / name)


def _untrained(prepared, *, random_up: bool):
    demo, prep, size, features, root = prepared
    export = _untrained_export(prepared, random_up=random_up)
    return demo.evaluate_toy(prep, export, features=features, seed=0)["training"]


@pytest.mark.parametrize("seed", SEEDS)
def test_own_lora_beats_other_and_none_on_held_out_photos(trained, seed):
    from hyperlora.train.evaluate import margin_ok

    res = trained[seed]["training"]
    assert res.identities == 8 and res.photos == 8 * 6
    assert margin_ok(res, margin=MARGIN), (seed, res.line(f"seed {seed}"), res.per_identity)
    # identities never trained on: their own LoRA still beats another one's and none (no margin asked: the
    # toy's 8 training identities teach the generator little about strangers; measured 0.03-0.06 % vs other)
    unseen = trained[seed]["unseen"]
    assert unseen.identities == 3 and unseen.own < min(unseen.other, unseen.none), unseen.line(f"unseen, seed {seed}")


def test_an_untrained_generator_fails_the_same_check(prepared):
    from hyperlora.train.evaluate import margin_ok

    zero = _untrained(prepared, random_up=False)
    # zero up bases: no LoRA at all (other averages three identities' equal losses: float rounding only)
    assert zero.own == zero.none and zero.other == pytest.approx(zero.none, rel=1e-6)
    assert not margin_ok(zero, margin=MARGIN)
    rand = _untrained(prepared, random_up=True)
    assert rand.own != rand.none                             # it does change the UNet ...
    assert not margin_ok(rand, margin=MARGIN), rand.line("untrained")   # ... but not towards the identity


# --------------------------------------------------------------------------------- identity in pictures


@pytest.fixture(scope="module")
def pictures(toy, prepared, trained):
    demo, prep, size, features, root = prepared
    return {k: demo.evaluate_pictures_toy(prep, toy / "exports" / f"seed{k}" / demo.MODEL_NAME,
                                          features=features, seeds=PICTURE_SEEDS) for k in SEEDS}


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "the toy decoder does not yet render what tells toy identities apart: even reconstructions of real toy photos "
    "retrieve their identity at chance (tests/train/test_idsim.py::test_toy_reconstructions_keep_the_identity, "
    "docs/training.md 'The toy VAE draws'), so generated pictures cannot; remove this mark when that test passes"))
@pytest.mark.parametrize("group", ["training", "unseen"])
@pytest.mark.parametrize("seed", SEEDS)
def test_identity_shows_in_generated_pictures(pictures, seed, group):
    res = pictures[seed]
    g = res.groups[group]
    assert g.identities == (res.identities[:8] if group == "training" else res.identities[8:])
    assert g.chance == pytest.approx(1 / 11) and g.faces > 0.8, g.faces      # the trained decoder draws faces
    assert all(s.pairs == len(PICTURE_SEEDS) * 3 for s in g.per_identity.values())
    summary = (f"seed {seed} {group}: {g.line()}; own-other {g.own_minus_other:+.4f} CI {g.own_minus_other_ci}; "
               f"retrieval own {g.retrieval_own:.2f} other {g.retrieval_other:.2f} none {g.retrieval_none:.2f}")
    assert g.own_minus_other_ci[0] > 0, summary
    assert g.retrieval_own > g.chance + RETRIEVAL_MARGIN, summary
    assert g.passes(retrieval_margin=RETRIEVAL_MARGIN)


def test_an_untrained_generator_fails_the_picture_check(prepared):
    demo, prep, size, features, root = prepared
    for random_up in (False, True):
        res = demo.evaluate_pictures_toy(prep, _untrained_export(prepared, random_up=random_up), features=features,
                                         seeds=PICTURE_SEEDS)
        for name, g in res.groups.items():
            assert not g.passes(retrieval_margin=RETRIEVAL_MARGIN), (random_up, name, g.line(), g.own_minus_other_ci)
            if not random_up:     # zero up bases: every LoRA picture is the no-LoRA picture
                assert g.own == g.none and g.own_minus_other == 0.0 and g.own_minus_other_ci == (0.0, 0.0)
