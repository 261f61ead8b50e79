"""``python -m hyperlora.train difflora-demo --out DIR``: the whole DiffLoRA chain at toy scale on this CPU.

Steps (each logged; the long ones show progress and stop on Ctrl-C):

1. **Toy set-up** (:func:`hyperlora.train.demo.prepare_toy`, the HyperLoRA demo's own): the ComfyUI ``models/``
   tree in ``DIR`` (stand-in AntelopeV2, tiny CLIP, tiny SDXL with the trained toy decoder), synthetic
   identities from the same generator as the HyperLoRA demo (its first identities are the same people),
   prepare into shards, and the base UNet's pre-training.
2. **LoRA dataset** (:func:`hyperlora.train.difflora_dataset.build_dataset`, ``difflora-dataset``): one plain
   LoRA per training identity, fitted on the frozen base UNet from its training photos, with its MIF file.
3. **DiffLoRA fit** (:func:`hyperlora.train.difflora_fit.fit`, ``difflora-fit``): the LAE, then the DiT.
4. **Export** (``difflora-export``) into ``DIR/difflora/<name>/``, where the DiffLoRA Loader finds it: a
   ComfyUI pointed at ``DIR`` runs the DiffLoRA nodes and workflows at once.
5. **Evaluation**, every LoRA made from the identity's *held-out reference photos* through the pack's face
   pipeline and :meth:`hyperlora.difflora.model.DiffLoraModel.loras_from_mif` (seed 0):

   * the LAE's reconstruction error of the dataset's LoRAs (relative Frobenius error of the weight deltas);
   * the denoising loss on the held-out evaluation photos with the identity's own DiffLoRA LoRA, another
     identity's and none (:func:`hyperlora.train.evaluate.group_loss`), for the training identities (their
     dataset LoRAs too, the target DiffLoRA learns) and the unseen ones;
   * identity in generated pictures (:func:`hyperlora.train.idsim.evaluate_lora_pictures`) for DiffLoRA, the
     HyperLoRA generator, the dataset's plain LoRAs (the ceiling; training identities) and those LoRAs
     reconstructed by the LAE (what the LAE keeps of identity), DiffLoRA's written as
     ``DIR/eval.png`` and ``DIR/eval.json``; the LAST line is ``difflora: id-sim own X, other Y`` (training
     identities).

How many identities, and why (:data:`FULL`): DiffLoRA learns a *distribution* of LoRAs, so it needs many
more identities than the HyperLoRA demo's 8 (that one learns a map from one person's photos to a LoRA and
has 100 photos per person to learn it).  24 training identities with 16 photos each is what fits the 15-minute
budget on two cores: each dataset LoRA costs about 10 s of one core (two processes split them), and 4 unseen
identities test whether the DiT learned the map from MIF to LoRA rather than 24 memorised answers.  Measured
results and the toy's limits: ``docs/difflora.md`` ("The toy demo").

``--quick`` shrinks everything for tests (seconds).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import SettingError, check_folder_option, run_command
from ..spec import DIFFLORA_DIR
from .demo import DemoSize

log = logging.getLogger(__name__)

MODEL_NAME = "difflora_toy"
"""Default name of the DiffLoRA model in the tree (``difflora/<MODEL_NAME>``)."""
WORK_NAME = "difflora_demo_work"
"""Default work folder (photos, shards, LoRA dataset, run) inside ``--out``."""
SUMMARY_FILE = "difflora_eval.json"
"""The demo's figures as JSON, in ``DIR``."""
LAST_LINE_PREFIX = "difflora: id-sim own"
"""The demo's last line starts so: ``difflora: id-sim own X, other Y``."""


@dataclass(frozen=True)
class DiffDemoSize:
    """How big a DiffLoRA demo run is (the toy set-up, then the DiffLoRA parts)."""

    toy: DemoSize                      # identities, photos, base pre-training (its ``stages`` are unused)
    lora_rank: int                     # rank of each identity's dataset LoRA
    lora_layers: tuple[str, ...]       # UNet projections the dataset LoRAs target (difflora_dataset.LAYERS names)
    lora_steps: int                    # fit steps per identity
    lora_lr: float
    lora_batch: int
    lae_steps: int
    dit_steps: int
    batch_size: int                    # LAE and DiT batch
    lae: Mapping[str, Any] = field(default_factory=dict)
    dit: Mapping[str, Any] = field(default_factory=dict)
    mif: Mapping[str, Any] = field(default_factory=dict)
    sample_steps: int = 20             # DiT sampling steps per LoRA
    picture_seeds: tuple[int, ...] = (0,)
    picture_prompts: int = 3           # how many of idsim's default prompts the picture check uses
    hyperlora_stages: tuple[int, int, int] = (1, 1, 1)   # the HyperLoRA generator trained beside it (fit stages)
    dataset_processes: int = 1         # processes that split the identities' LoRA fits (each fit is one thread)


FULL = DiffDemoSize(
    toy=DemoSize(identities=24, unseen=4, train_per_identity=16, reference_per_identity=2, evaluate_per_identity=4,
                 pretrain_steps=800, stages=(1, 1, 1)),
    lora_rank=4, lora_layers=("attn2.to_k", "attn2.to_v", "attn2.to_out_0"), lora_steps=60,
    lora_lr=3e-3, lora_batch=8, lae_steps=800, dit_steps=1500, batch_size=24,
    lae={"latent_channels": 8, "width": 64, "depth": 2, "heads": 4},
    dit={"width": 128, "depth": 4, "heads": 4}, mif={"arcface_tokens": 2, "width": 128},
    sample_steps=20, picture_seeds=(0,), picture_prompts=1, hyperlora_stages=(20, 100, 180), dataset_processes=2)
QUICK = DiffDemoSize(
    toy=DemoSize(identities=4, unseen=2, train_per_identity=4, reference_per_identity=1, evaluate_per_identity=2,
                 pretrain_steps=10, stages=(1, 1, 1)),
    lora_rank=2, lora_layers=("attn2.to_k", "attn2.to_v"), lora_steps=3, lora_lr=3e-3, lora_batch=4,
    lae_steps=4, dit_steps=4, batch_size=4,
    lae={"latent_channels": 4, "width": 16, "depth": 1, "heads": 2},
    dit={"width": 16, "depth": 1, "heads": 2}, mif={"arcface_tokens": 1, "width": 16},
    sample_steps=2, picture_seeds=(0,), picture_prompts=1, hyperlora_stages=(2, 2, 2), dataset_processes=2)


@dataclass
class DiffDemoResult:
    """What :func:`run_difflora_demo` made and measured."""

    tree: Path                         # the ComfyUI models/ folder
    export: Path                       # DIR/difflora/<name>
    identities: int                    # training identities (one dataset LoRA each)
    lae_error: float                   # mean relative Frobenius error of the LAE's reconstructions
    losses: dict[str, Any]             # "<generator> <group>" -> evaluate.GroupLoss (generator: difflora,
                                       # hyperlora, dataset, reconstructed; group: training, unseen)
    pictures: dict[str, Any]           # "difflora" / "hyperlora" / "dataset" / "reconstructed" -> idsim.PictureEval
    seconds_per_lora: dict[str, float]  # generator -> reference features -> one LoRA, mean seconds
    seconds: float
    hyperlora: Path | None = None      # DIR/hyper_lora/hyper_lora/<demo.MODEL_NAME>


def _fit_config(size: DiffDemoSize, data: Path, run: Path, name: str, seed: int) -> Any:
    from .difflora_fit import DiffLoraFitConfig

    every = max(1, (size.lae_steps + size.dit_steps) // 4)
    return DiffLoraFitConfig(data=str(data), out=str(run), name=name, lae_steps=size.lae_steps,
                             dit_steps=size.dit_steps, batch_size=size.batch_size, seed=seed,
                             checkpoint_every=every, lae=dict(size.lae), dit=dict(size.dit), mif=dict(size.mif))


def difflora_loras(model: Any, features: Mapping[str, Any], names: Sequence[str], *, steps: int,
                   seed: int = 0, guidance: float = 1.0) -> tuple[dict[str, dict[str, torch.Tensor]], float]:
    """Per identity: its reference features (``evaluate.Features``: ArcFace ``[N, 512]``, CLIP ``[N, L, E]``) ->
    MIF -> one DiffLoRA sample (``seed``); returns ``({name: kohya LoRA}, mean seconds per LoRA)``."""
    from ..difflora.condition import mixed_image_features

    spec = model.dit.mif_spec
    out: dict[str, dict[str, torch.Tensor]] = {}
    start = time.perf_counter()
    for name in names:
        f = features[name]
        mif = mixed_image_features(f.arcface, f.clip if spec.clip_tokens else None, spec)
        out[name] = dict(model.loras_from_mif(mif, seeds=[seed], steps=steps, guidance=guidance)[0])
    return out, (time.perf_counter() - start) / max(1, len(names))


def _dataset_job(job: tuple[dict[str, Any], str, int, int]) -> Any:
    """One process's share of the identities (``build_dataset`` with ``split = (rank, world)``)."""
    from .difflora_dataset import DatasetConfig, build_dataset

    cfg, out, rank, world = job
    return build_dataset(DatasetConfig(**cfg), Path(out), split=(rank, world))


def run_difflora_demo(out: Path, *, work: Path | None = None, size: DiffDemoSize = FULL, seed: int = 0,
                      name: str = MODEL_NAME, progress: bool = True) -> DiffDemoResult:
    """The demo (module docstring)."""
    from ..checkpoint import load_hyper_lora
    from ..difflora.model import DiffLoraModel
    from ..lora_functional import factors_from_lora
    from . import demo
    from .difflora_dataset import DatasetConfig, build_dataset
    from .difflora_fit import export, fit, load_dataset
    from .evaluate import group_loss, identity_loras
    from .idsim import DEFAULT_PROMPTS, evaluate_lora_pictures, write_report

    start = time.monotonic()
    out = Path(out)
    work = Path(work) if work is not None else out / WORK_NAME
    prep = demo.prepare_toy(out, work=work, size=size.toy, seed=seed, progress=progress)

    log.info("difflora-demo: the HyperLoRA generator on the same photos, for comparison (stages %s)",
             size.hyperlora_stages)
    trained = demo.train_toy(prep, work / "hyperlora_run", stages=size.hyperlora_stages, seed=seed)
    hyper_target = prep.tree.model(demo.MODEL_NAME)
    if hyper_target.exists():
        shutil.rmtree(hyper_target)
    shutil.copytree(trained, hyper_target)

    log.info("difflora-demo: one LoRA per training identity (%d identities, rank %d, %d steps each)",
             len(prep.data.train_identities), size.lora_rank, size.lora_steps)
    loras_dir = work / "loras"
    if loras_dir.exists():
        shutil.rmtree(loras_dir)
    dcfg = DatasetConfig(base_model=str(prep.tree.sdxl), shards=[str(prep.train_set.folder)], rank=size.lora_rank,
                         layers=list(size.lora_layers), steps=size.lora_steps, lr=size.lora_lr,
                         batch_size=size.lora_batch, seed=seed)
    if size.dataset_processes <= 1:
        built = [build_dataset(dcfg, loras_dir, unet=prep.unet, noise_scheduler=prep.scheduler, split=(0, 1))]
    else:      # each process reloads the base UNet the toy set-up saved; the files are the same as one process's
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        jobs = [(dcfg.to_json(), str(loras_dir), rank, size.dataset_processes)
                for rank in range(size.dataset_processes)]
        with ProcessPoolExecutor(max_workers=size.dataset_processes,
                                 mp_context=multiprocessing.get_context("spawn")) as pool:
            built = list(pool.map(_dataset_job, jobs))
    if any(b.interrupted for b in built):
        raise KeyboardInterrupt

    log.info("difflora-demo: DiffLoRA fit (LAE %d steps, then DiT %d steps)", size.lae_steps, size.dit_steps)
    data = load_dataset(loras_dir)
    result = fit(_fit_config(size, loras_dir, work / "run", name, seed), resume=False, data=data)
    if not result.finished:
        raise KeyboardInterrupt

    target = out / DIFFLORA_DIR / name
    log.info("difflora-demo: export to %s", target)
    if target.exists():
        shutil.rmtree(target)
    export(work / "run", target)

    log.info("difflora-demo: evaluation (every LoRA made from held-out reference photos)")
    model = DiffLoraModel.from_folder(target)
    lae_error = float(model.lae.reconstruction_report(data.loras)["mean"])
    features = demo.reference_features(prep)
    training, unseen = list(prep.data.train_identities), list(prep.data.unseen_identities)
    everyone = training + unseen
    per_lora: dict[str, float] = {}
    sampled, per_lora["difflora"] = difflora_loras(model, features, everyone, steps=size.sample_steps)
    factors = {"difflora": {n: factors_from_lora(lora) for n, lora in sampled.items()}}
    hyper_model = load_hyper_lora(hyper_target, dtype=torch.float32)
    clock = time.perf_counter()
    factors["hyperlora"] = identity_loras(hyper_model, {n: features[n] for n in everyone})
    per_lora["hyperlora"] = (time.perf_counter() - clock) / len(everyone)
    factors["dataset"] = {n: factors_from_lora(lora) for n, lora in zip(data.names, data.loras)}
    with torch.no_grad():      # the dataset's LoRAs through the LAE (encode, decode): what it keeps of identity
        rebuilt = model.lae.decode_loras(model.lae.encode(data.loras), dtype=torch.float32)
    factors["reconstructed"] = {n: factors_from_lora(lora) for n, lora in zip(data.names, rebuilt)}
    samples = [prep.eval_set[i] for i in range(len(prep.eval_set))]
    ac = prep.scheduler.alphas_cumprod
    prep.unet.eval()
    groups = {"training": training}
    if unseen:
        groups["unseen"] = unseen
    # every generator on the groups it has a LoRA for: the dataset's plain LoRAs (the ceiling, the best a generated
    # LoRA can do) and their LAE reconstructions exist for the training identities only
    covered = {gen: {g: names for g, names in groups.items() if len(names) >= 2 and all(n in f for n in names)}
               for gen, f in factors.items()}
    losses = {f"{gen} {g}": group_loss(prep.unet, ac, samples, factors[gen], names, seed=seed)
              for gen, gs in covered.items() for g, names in gs.items()}
    pictures = {gen: evaluate_lora_pictures(factors[gen], base=prep.tree.sdxl, antelope=prep.tree.antelope,
                                            references=prep.data.reference, groups=gs, seeds=size.picture_seeds,
                                            prompts=DEFAULT_PROMPTS[:size.picture_prompts], unet=prep.unet)
                for gen, gs in covered.items()}
    write_report(pictures["difflora"], out)
    res = DiffDemoResult(tree=out, export=target, identities=len(training), lae_error=lae_error, losses=losses,
                         pictures=pictures, seconds_per_lora=per_lora, seconds=time.monotonic() - start,
                         hyperlora=hyper_target)
    (out / SUMMARY_FILE).write_text(json.dumps(summary(res), indent=1), encoding="utf-8")
    return res


def summary(res: DiffDemoResult) -> dict[str, Any]:
    """The demo's figures as JSON (``DIR/difflora_eval.json``)."""
    losses = {k: {"own": v.own, "other": v.other, "none": v.none, "identities": v.identities, "photos": v.photos}
              for k, v in res.losses.items()}
    pics = {f"{gen} {k}": {"own": g.own, "other": g.other, "none": g.none, "own_minus_other": g.own_minus_other,
                           "own_minus_other_ci": list(g.own_minus_other_ci), "retrieval_own": g.retrieval_own,
                           "chance": g.chance, "faces": g.faces}
            for gen, pe in res.pictures.items() for k, g in pe.groups.items()}
    return {"format": "hyperlora.train.difflora_demo", "version": 1, "identities": res.identities,
            "lae_relative_error": res.lae_error, "denoising_loss": losses, "id_sim": pics,
            "seconds_per_lora": res.seconds_per_lora, "seconds": res.seconds}


def report_lines(res: DiffDemoResult) -> list[str]:
    """What the CLI prints: the side-by-side table, then, last, ``difflora: id-sim own X, other Y`` (DiffLoRA's
    LoRAs of the training identities)."""
    hyper = res.hyperlora.name if res.hyperlora else "-"
    lines = [(f"difflora-demo: models tree in {res.tree} (DiffLoRA model {res.export.name}, HyperLoRA model "
              f"{hyper}); {res.seconds:.0f} s"),
             (f"difflora-demo: {res.identities} training identities; LAE reconstruction error (relative Frobenius) "
              f"{res.lae_error:.4f}")]
    for key, loss in res.losses.items():
        lines.append(loss.line(f"difflora-demo, {key}"))
    for gen, pe in res.pictures.items():
        for group, g in pe.groups.items():
            lines.append(f"difflora-demo, {gen} {group}: {g.line()}; retrieval own {g.retrieval_own:.2f} "
                         f"(chance {g.chance:.2f})")
    lines.append("difflora-demo: one LoRA from reference features: " +
                 ", ".join(f"{gen} {sec:.3f} s" for gen, sec in res.seconds_per_lora.items()))
    lines.append(f"difflora-demo: identity in pictures (DiffLoRA): eval.png and eval.json in {res.tree}")
    g = res.pictures["difflora"].groups["training"]
    lines.append(f"{LAST_LINE_PREFIX} {g.own:.3f}, other {g.other:.3f}")
    return lines


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hyperlora.train difflora-demo",
                                description="The whole DiffLoRA chain at toy scale on this CPU (under 15 minutes "
                                            "on 2 cores).")
    p.add_argument("--out", type=Path, required=True,
                   help="folder to write as a ComfyUI models/ tree (the DiffLoRA model in difflora/, CLIP, AntelopeV2)")
    p.add_argument("--work", type=Path, help=f"folder for photos, shards, LoRAs and the run (default: OUT/{WORK_NAME})")
    p.add_argument("--quick", action="store_true", help="a tiny run (seconds): fewer identities, photos and steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default=MODEL_NAME, help="folder name of the DiffLoRA model in the tree")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> DiffDemoResult:
        check_folder_option(args.out, "--out")
        if args.work is not None:
            check_folder_option(args.work, "--work")
        if not args.name or "/" in args.name or "\\" in args.name or args.name in (".", ".."):
            raise SettingError(f"--name {args.name!r} must be a plain folder name (no slashes).")
        return run_difflora_demo(args.out, work=args.work, size=QUICK if args.quick else FULL, seed=args.seed,
                                 name=args.name)

    code, res = run_command("difflora-demo", body, interrupted="interrupted (run it again to start over)")
    if res is None:
        return code
    sys.stdout.write("\n".join(report_lines(res)) + "\n")
    sys.stdout.flush()
    return 0


__all__ = ["FULL", "LAST_LINE_PREFIX", "MODEL_NAME", "QUICK", "SUMMARY_FILE", "DiffDemoResult", "DiffDemoSize",
           "build_parser", "difflora_loras", "main", "report_lines", "run_difflora_demo", "summary"]
