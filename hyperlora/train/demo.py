"""``python -m hyperlora.train demo --out DIR``: the whole training pipeline at toy scale on a CPU.

Steps (each logged, long ones with a progress bar):

1. **Models tree** in ``DIR`` (a ComfyUI ``models/`` folder): the stand-in AntelopeV2 pack in
   ``insightface/models/antelopev2/``, the tiny CLIP vision folder in ``hyper_lora/clip_vit/<name>/``
   (+ ``hyper_lora/clip_processor/<name>_processor/``), the tiny SDXL (diffusers layout) in
   ``diffusers/hyper_lora_toy_sdxl/`` (:mod:`hyperlora.train.toy`), its VAE with the trained decoder
   (:mod:`hyperlora.train.toy.decoder`: trained once per machine, about 4.5 CPU-minutes, then cached).
2. **Synthetic identities** (:mod:`hyperlora.train.toy.faces`) in ``<work>/data``: training identities with
   training photos; for every identity (training and unseen) held-out reference and evaluation photos.
3. **prepare** (:func:`hyperlora.train.prepare.prepare`) of the training photos and of the evaluation photos
   into ``<work>/shards/{train,evaluate}``.  The A.5 thresholds are the paper's except the shorter side:
   toy photos are 128 px, so ``min_side`` is 128 (the paper's 768 would drop them all).
4. **Base model pre-training** (toy only): the random tiny UNet is first trained (2,000 steps by default)
   (whole UNet, epsilon loss, plain captions) on the training photos, so that it is a model of these photos
   and "no LoRA" is a sensible baseline (a random UNet's loss would be meaningless).  It is saved back into
   ``diffusers/hyper_lora_toy_sdxl/unet/`` and is the frozen base model of the next step.
5. **fit** (:func:`hyperlora.train.fit.fit`): all three stages with ``configs/fit_toy.json``'s settings,
   run folder ``<work>/run``; the export (released layout) is copied to ``hyper_lora/hyper_lora/<name>/``.
6. **Evaluation** (:mod:`hyperlora.train.evaluate`): the exported folder is loaded by the pack's loader,
   each identity's LoRA is made from its reference photos through the pack's face pipeline, and the mean
   denoising loss on the evaluation photos is printed for the unseen identities and, as the LAST line,
   ``demo: loss own X, other Y, none Z`` for the training identities; then identity in generated pictures
   (:mod:`hyperlora.train.idsim`, CPU DDIM samples scored by the pack's face pipeline): ``DIR/eval.png`` and
   ``DIR/eval.json``, and the last line gains ``; id-sim own X, other Y, none Z``.

``--quick`` shrinks everything (identities, photos, steps) for tests; ``--steps`` sets the fit length;
``--identities``, ``--pretrain-steps`` and ``--vae whole`` (the whole toy VAE trained, not only its decoder)
reproduce the larger set-up measured in docs/training.md ("All three together").
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import SettingError, check_folder_option, run_command
from ..spec import ANTELOPE_DIR, HYPER_LORA_DIR, clip_dir, clip_processor_dir, model_dir
from .idsim import write_report

log = logging.getLogger(__name__)

CLIP_NAME = "clip_vit_toy_tiny"
"""Name of the tiny CLIP vision folder in the tree (``hyper_lora/clip_vit/<CLIP_NAME>``)."""
SDXL_NAME = "hyper_lora_toy_sdxl"
"""Name of the tiny SDXL in the tree (``diffusers/<SDXL_NAME>``)."""
MODEL_NAME = "hyper_lora_toy"
"""Default name of the trained model (``hyper_lora/hyper_lora/<MODEL_NAME>``)."""
DEMO_MIN_SIDE = 128
"""A.5's shorter-side threshold lowered to the toy photo size (paper: 768)."""
WORK_NAME = "hyper_lora_demo_work"
"""Default work folder (data, shards, run) inside ``--out``."""
FIT_OVERRIDES: dict[str, Any] = {"lr": 1e-3, "batch_size": 32,
                                 "scenarios": {"recon": 0.8, "id_only": 0.1, "base_id": 0.1}}
"""What the demo changes in ``configs/fit_toy.json``: batch 32 at learning rate 1e-3, and the reconstruction
scenario drawn more often (the trigger-word regularisers keep 10 % each); the paper's probabilities stay the
default of the fit config.  Measured on the toy (docs/training.md, "The toy result"): at batch 8 and 3e-3
the ID tokens collapse to one LoRA for everybody (spread across identities 0.0007 after 1,900 steps), and
with 40 photos per identity instead of 100 the LoRAs learn the training photos rather than the people."""


@dataclass(frozen=True)
class DemoSize:
    """How big a demo run is."""

    identities: int
    unseen: int
    train_per_identity: int
    reference_per_identity: int
    evaluate_per_identity: int
    pretrain_steps: int
    stages: tuple[int, int, int]
    whole_vae: bool = False      # train the toy VAE's encoder too (toy.decoder.WHOLE): see docs/training.md


FULL = DemoSize(identities=8, unseen=3, train_per_identity=100, reference_per_identity=2, evaluate_per_identity=6,
                pretrain_steps=2000, stages=(50, 400, 700))
QUICK = DemoSize(identities=4, unseen=2, train_per_identity=4, reference_per_identity=1, evaluate_per_identity=2,
                 pretrain_steps=20, stages=(4, 4, 8))


@dataclass(frozen=True)
class Tree:
    """Where the demo puts the models (``root`` is the ComfyUI ``models/`` folder)."""

    root: Path

    @property
    def antelope(self) -> Path:
        return self.root / ANTELOPE_DIR

    @property
    def clip(self) -> Path:
        return self.root / clip_dir(CLIP_NAME)

    @property
    def clip_processor(self) -> Path:
        return self.root / clip_processor_dir(CLIP_NAME)

    @property
    def sdxl(self) -> Path:
        return self.root / "diffusers" / SDXL_NAME

    def model(self, name: str) -> Path:
        return self.root / model_dir(name)


def build_tree(out: Path, *, seed: int = 0) -> Tree:
    """Write the stand-in encoders and the tiny SDXL into ``out`` (see the module docstring)."""
    from ..standins import make_antelopev2, make_clip_folder
    from .toy.sdxl import tiny_sdxl_folder

    tree = Tree(Path(out))
    make_antelopev2(tree.antelope)
    make_clip_folder(tree.root / HYPER_LORA_DIR, name=CLIP_NAME, seed=seed)
    tiny_sdxl_folder(tree.sdxl, seed=seed)
    return tree


# --------------------------------------------------------------------------------- base model pre-training


def pretrain_unet(unet: nn.Module, dataset: Any, *, steps: int, batch_size: int = 16, lr: float = 1e-3,
                  seed: int = 0, alphas_cumprod: torch.Tensor, progress: bool = True) -> list[float]:
    """Train the whole (toy) UNet on ``dataset`` (shard samples: ``latents``, ``text_plain``, ``pooled_plain``,
    ``time_ids``) with SDXL's epsilon loss; returns the loss per step.  Leaves the UNet frozen and in eval mode."""
    from tqdm.auto import tqdm

    n = len(dataset)
    if n == 0:
        raise SettingError("no training samples to pre-train the toy UNet on; prepare kept no photo.")
    keys = ("latents", "text_plain", "pooled_plain", "time_ids")
    data = {k: torch.stack([torch.as_tensor(dataset[i][k]) for i in range(n)]).float() for k in keys}
    unet.requires_grad_(True).train()
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    ac = alphas_cumprod.float()
    losses: list[float] = []
    for step in tqdm(range(steps), desc="pre-train toy UNet", unit="step", disable=not progress):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=gen)
        x0 = data["latents"][idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, ac.shape[0], (x0.shape[0],), generator=gen)
        a = ac[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        for g in opt.param_groups:     # cosine decay to 10 %
            g["lr"] = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max(1, steps))))
        pred = unet(noisy, t, encoder_hidden_states=data["text_plain"][idx],
                    added_cond_kwargs={"text_embeds": data["pooled_plain"][idx], "time_ids": data["time_ids"][idx]}).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    unet.requires_grad_(False).eval()
    return losses


# --------------------------------------------------------------------------------- fit config


def toy_fit_config(*, base_model: Path, shards: Path, out: Path, name: str, stages: tuple[int, int, int],
                   seed: int = 0, overrides: dict[str, Any] | None = None) -> Any:
    """``configs/fit_toy.json`` with the demo's paths, stage lengths and seed (a :class:`FitConfig`);
    ``overrides``: other keys of the fit JSON to replace."""
    from .config import FitConfig

    raw = json.loads((Path(__file__).parent / "configs" / "fit_toy.json").read_text(encoding="utf-8"))
    raw.update(overrides or {})
    raw.update(base_model=str(base_model), shards=[str(shards)], out=str(out), name=name, seed=seed)
    raw["stages"] = [{"stage": i + 1, "steps": s} for i, s in enumerate(stages)]
    every = max(1, sum(stages) // 4)
    raw["checkpoint_every"] = every
    return FitConfig.from_dict(raw, where="demo fit config (configs/fit_toy.json)")


# --------------------------------------------------------------------------------- the demo


@dataclass
class Prepared:
    """Steps 1-4 done: the tree, the photos, the shards and the pre-trained base UNet."""

    tree: Tree
    data: Any           # toy.faces.ToyDataset
    train_set: Any      # data.ShardDataset of the training photos
    eval_set: Any       # data.ShardDataset of the evaluation photos
    unet: nn.Module     # the pre-trained toy base UNet (frozen, eval), also saved in the tree
    scheduler: Any      # the SDXL noise schedule (DDPM)


@dataclass
class DemoResult:
    tree: Tree
    export: Path
    training: Any       # evaluate.GroupLoss
    unseen: Any         # evaluate.GroupLoss or None
    seconds: float
    pictures: Any = None   # idsim.PictureEval (identity in generated pictures)


def prepare_toy(out: Path, *, work: Path | None = None, size: DemoSize = FULL, seed: int = 0,
                progress: bool = True) -> Prepared:
    """Demo steps 1-4: models tree, synthetic identities, prepare, base UNet pre-training."""
    from .data import ShardDataset
    from .frozen import load_noise_scheduler, load_unet
    from .prepare import Encoders, PrepareConfig, prepare
    from .toy.faces import make_toy_dataset
    from .toy.sdxl import TOY_SIZE

    out = Path(out)
    work = Path(work) if work is not None else out / WORK_NAME
    torch.manual_seed(seed)

    log.info("demo 1/6: models tree in %s", out)
    tree = build_tree(out, seed=seed)
    from .toy.decoder import WHOLE, DecoderTraining, install_decoder

    vae_settings = WHOLE if size.whole_vae else DecoderTraining()
    cached = install_decoder(tree.sdxl, seed=seed, settings=vae_settings, progress=progress)
    log.info("toy VAE %s trained to draw toy portraits: %s",
             "(encoder and decoder)" if size.whole_vae else "decoder (encoder unchanged)", cached)

    log.info("demo 2/6: synthetic identities in %s", work / "data")
    if (work / "data").exists():
        shutil.rmtree(work / "data")
    ds = make_toy_dataset(work / "data", identities=size.identities, unseen=size.unseen,
                          train_per_identity=size.train_per_identity,
                          reference_per_identity=size.reference_per_identity,
                          evaluate_per_identity=size.evaluate_per_identity, seed=seed)

    log.info("demo 3/6: prepare (training photos, evaluation photos)")
    pcfg = PrepareConfig(sdxl=tree.sdxl, clip=tree.clip, clip_processor=tree.clip_processor, antelope=tree.antelope,
                         aesthetic="none", min_side=DEMO_MIN_SIDE, size=TOY_SIZE, require_vit_l14=False)
    encoders = Encoders.load(pcfg)
    for part, folder in (("train", ds.train), ("evaluate", ds.evaluate)):
        target = work / "shards" / part
        if target.exists():
            shutil.rmtree(target)
        report = prepare([folder], target, pcfg, encoders=encoders, show_progress=progress)
        log.info("prepare %s: %s", part, report.report)
    del encoders
    train_set = ShardDataset(work / "shards" / "train")
    eval_set = ShardDataset(work / "shards" / "evaluate")
    if len(train_set) == 0 or len(eval_set) == 0:
        raise SettingError(f"prepare kept {len(train_set)} training and {len(eval_set)} evaluation photos; "
                           f"the demo needs some of both (see the prepare report above).")

    log.info("demo 4/6: pre-train the toy base UNet (%d steps) on %d training photos", size.pretrain_steps,
             len(train_set))
    scheduler = load_noise_scheduler(tree.sdxl)
    unet = load_unet(tree.sdxl)
    losses = pretrain_unet(unet, train_set, steps=size.pretrain_steps, seed=seed,
                           alphas_cumprod=scheduler.alphas_cumprod, progress=progress)
    if losses:
        k = max(1, len(losses) // 10)
        log.info("pre-training loss: first %.4f, last %.4f", sum(losses[:k]) / k, sum(losses[-k:]) / k)
    unet.save_pretrained(tree.sdxl / "unet")
    return Prepared(tree=tree, data=ds, train_set=train_set, eval_set=eval_set, unet=unet, scheduler=scheduler)


def train_toy(prep: Prepared, run: Path, *, stages: tuple[int, int, int], seed: int = 0,
              name: str = MODEL_NAME, overrides: dict[str, Any] | None = FIT_OVERRIDES) -> Path:
    """Demo step 5: fit all three stages into ``run`` (started afresh); returns the run's export folder."""
    from .fit import fit

    log.info("demo 5/6: fit, three stages %s", stages)
    if run.exists():
        shutil.rmtree(run)
    overrides = dict(overrides or {})
    if int(overrides.get("batch_size", 1)) > len(prep.train_set):    # --quick: fewer photos than one batch
        overrides["batch_size"] = len(prep.train_set)
    cfg = toy_fit_config(base_model=prep.tree.sdxl, shards=Path(prep.train_set.folder), out=run, name=name,
                         stages=stages, seed=seed, overrides=overrides)
    result = fit(cfg, resume=False, dataset=prep.train_set, unet=prep.unet, noise_scheduler=prep.scheduler)
    if result.export is None:
        raise SettingError("fit was interrupted; nothing was exported. Run the demo again.")
    log.info("fit done (losses at the end: %s)", {k: round(v, 4) for k, v in result.last_losses.items()})
    return result.export


def reference_features(prep: Prepared) -> dict[str, Any]:
    """Every identity's reference photos through the pack's face pipeline (evaluate.Features per identity)."""
    from .evaluate import reference_features_from_photos

    everyone = prep.data.train_identities + prep.data.unseen_identities
    return reference_features_from_photos(prep.data.reference, everyone, antelope=prep.tree.antelope,
                                          clip_folder=prep.tree.clip, clip_processor=prep.tree.clip_processor)


def evaluate_toy(prep: Prepared, export: Path, *, features: dict[str, Any] | None = None,
                 seed: int = 0) -> dict[str, Any]:
    """Demo step 6: ``{"training": GroupLoss, "unseen": GroupLoss (with two or more unseen identities)}``."""
    from .evaluate import evaluate_export

    log.info("demo 6/6: evaluate on held-out photos (own LoRA / another identity's / none)")
    features = features if features is not None else reference_features(prep)
    groups = {"training": prep.data.train_identities}
    if len(prep.data.unseen_identities) >= 2:
        groups["unseen"] = prep.data.unseen_identities
    samples = [prep.eval_set[i] for i in range(len(prep.eval_set))]
    return evaluate_export(export, prep.unet, prep.scheduler.alphas_cumprod, samples, features, groups, seed=seed)


def load_prepared(out: Path, work: Path) -> Prepared:
    """What :func:`prepare_toy` returned, read back from its models tree ``out`` and ``work`` folder (the
    pre-trained base UNet frozen, in eval mode)."""
    from .data import ShardDataset
    from .frozen import load_noise_scheduler, load_unet
    from .toy.faces import ToyDataset

    tree = Tree(Path(out))
    work = Path(work)
    return Prepared(tree=tree, data=ToyDataset.load(work / "data"), train_set=ShardDataset(work / "shards" / "train"),
                    eval_set=ShardDataset(work / "shards" / "evaluate"),
                    unet=load_unet(tree.sdxl).requires_grad_(False).eval(), scheduler=load_noise_scheduler(tree.sdxl))


def _seed_job(job: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """One seed of :func:`train_seeds` in a worker process: everything is reloaded from disk."""
    torch.set_num_threads(int(job["threads"]))
    prep = load_prepared(Path(job["tree"]), Path(job["work"]))
    seed = int(job["seed"])
    export = train_toy(prep, Path(job["run"]), stages=tuple(job["stages"]), seed=seed,  # type: ignore[arg-type]
                       name=str(job["name"]), overrides=job["overrides"])
    return seed, evaluate_toy(prep, export, features=job["features"], seed=0)


def train_seeds(prep: Prepared, runs: Path, seeds: tuple[int, ...], *, stages: tuple[int, int, int],
                processes: int = 1, name: str = MODEL_NAME, overrides: dict[str, Any] | None = FIT_OVERRIDES,
                features: dict[str, Any] | None = None) -> dict[int, dict[str, Any]]:
    """Demo steps 5-6 once per seed (run folders ``runs/seed<k>``): ``{seed: evaluate_toy(...)}``.

    ``processes`` > 1 trains that many seeds at once in worker processes (spawned, one torch thread each,
    everything reloaded from ``prep``'s folders), which a multi-core CPU finishes in about the time of one.
    ``features``: :func:`reference_features` of ``prep`` when already computed.
    """
    features = features if features is not None else reference_features(prep)
    if processes <= 1:
        return {k: evaluate_toy(prep, train_toy(prep, Path(runs) / f"seed{k}", stages=stages, seed=k, name=name,
                                                overrides=overrides), features=features, seed=0) for k in seeds}
    jobs = [{"tree": str(prep.tree.root), "work": str(prep.data.root.parent), "run": str(Path(runs) / f"seed{k}"),
             "seed": k, "stages": list(stages), "name": name, "overrides": overrides, "features": features,
             "threads": 1} for k in seeds]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        return dict(pool.map(_seed_job, jobs))


def run_demo(out: Path, *, work: Path | None = None, size: DemoSize = FULL, stages: tuple[int, int, int] | None = None,
             seed: int = 0, name: str = MODEL_NAME, progress: bool = True) -> DemoResult:
    """The demo (module docstring); returns the tree, the export and the evaluation."""
    start = time.monotonic()
    out = Path(out)
    work = Path(work) if work is not None else out / WORK_NAME
    prep = prepare_toy(out, work=work, size=size, seed=seed, progress=progress)
    trained = train_toy(prep, work / "run", stages=stages or size.stages, seed=seed, name=name)
    export = prep.tree.model(name)
    if export.exists():
        shutil.rmtree(export)
    shutil.copytree(trained, export)
    log.info("exported %s", export)
    features = reference_features(prep)
    res = evaluate_toy(prep, export, features=features, seed=seed)
    pictures = evaluate_pictures_toy(prep, export, features=features)
    write_report(pictures, out)
    return DemoResult(tree=prep.tree, export=export, training=res["training"], unseen=res.get("unseen"),
                      seconds=time.monotonic() - start, pictures=pictures)


def evaluate_pictures_toy(prep: Prepared, export: Path, *, features: dict[str, Any] | None = None,
                          seeds: tuple[int, ...] | None = None) -> Any:
    """Identity in generated pictures (:func:`hyperlora.train.idsim.evaluate_pictures`) of the toy's training and
    unseen identities, through the demo tree's models and the pre-trained base UNet; an ``idsim.PictureEval``."""
    from .idsim import DEFAULT_SEEDS, evaluate_pictures

    log.info("demo: identity in generated pictures (own LoRA / another identity's / none)")
    groups = {"training": prep.data.train_identities}
    if len(prep.data.unseen_identities) >= 1:
        groups["unseen"] = prep.data.unseen_identities
    return evaluate_pictures(export, base=prep.tree.sdxl, antelope=prep.tree.antelope, clip=prep.tree.clip,
                             clip_processor=prep.tree.clip_processor, references=prep.data.reference, groups=groups,
                             seeds=seeds or DEFAULT_SEEDS, unet=prep.unet,
                             features=features if features is not None else reference_features(prep))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hyperlora.train demo",
                                description="The whole training pipeline at toy scale on this CPU (about 8 minutes on 2 cores).")
    p.add_argument("--out", type=Path, required=True,
                   help="folder to write as a ComfyUI models/ tree (the trained model, CLIP, AntelopeV2)")
    p.add_argument("--work", type=Path, help=f"folder for photos, shards and the run (default: OUT/{WORK_NAME})")
    p.add_argument("--quick", action="store_true", help="a tiny run (seconds): fewer identities, photos and steps")
    p.add_argument("--steps", type=int, help="total fit steps, split over the three stages like the default")
    p.add_argument("--identities", type=int, help=f"training identities (default {FULL.identities})")
    p.add_argument("--pretrain-steps", type=int, help=f"base UNet pre-training steps (default {FULL.pretrain_steps})")
    p.add_argument("--vae", choices=("decoder", "whole"), default="decoder",
                   help="train the toy VAE's decoder only (default: existing latents stay valid) or the whole VAE "
                        "(its reconstructions keep the identity; docs/training.md, 'Tried since: the whole VAE')")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default=MODEL_NAME, help="folder name of the trained model in the tree")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    size = QUICK if args.quick else FULL
    for value, flag, least in ((args.identities, "--identities", 2), (args.pretrain_steps, "--pretrain-steps", 0)):
        if value is not None and value < least:
            raise SystemExit(f"demo: {flag} must be at least {least}")
    size = replace(size, identities=args.identities if args.identities is not None else size.identities,
                   pretrain_steps=args.pretrain_steps if args.pretrain_steps is not None else size.pretrain_steps,
                   whole_vae=args.vae == "whole")
    stages = None
    if args.steps is not None:
        if args.steps < 3:
            raise SystemExit("demo: --steps must be at least 3 (one per stage)")
        total = sum(size.stages)
        stages = tuple(max(1, round(args.steps * s / total)) for s in size.stages)

    def body() -> DemoResult:
        check_folder_option(args.out, "--out")
        if args.work is not None:
            check_folder_option(args.work, "--work")
        return run_demo(args.out, work=args.work, size=size, stages=stages, seed=args.seed, name=args.name)  # type: ignore[arg-type]

    code, res = run_command("demo", body, interrupted="interrupted")
    if res is None:
        return code
    sys.stdout.write(f"demo: models tree in {res.tree.root} (model {res.export.name}); {res.seconds:.0f} s\n")
    if res.pictures is not None:
        sys.stdout.write(f"demo: identity in pictures: eval.png and eval.json in {res.tree.root}\n")
    if res.unseen is not None:
        line = res.unseen.line("demo (unseen identities)")
        if res.pictures is not None and "unseen" in res.pictures.groups:
            line += "; " + res.pictures.groups["unseen"].line("id-sim")
        sys.stdout.write(line + "\n")
    last = res.training.line("demo")
    if res.pictures is not None:
        last += "; " + res.pictures.groups["training"].line("id-sim")
    sys.stdout.write(last + "\n")
    sys.stdout.flush()
    return 0


__all__ = ["CLIP_NAME", "DEMO_MIN_SIDE", "DemoResult", "DemoSize", "FIT_OVERRIDES", "FULL", "MODEL_NAME", "Prepared", "QUICK", "SDXL_NAME",
           "Tree", "build_parser", "build_tree", "evaluate_pictures_toy", "evaluate_toy", "load_prepared", "main", "prepare_toy", "pretrain_unet",
           "reference_features", "run_demo", "toy_fit_config", "train_seeds", "train_toy"]
