"""Train a HyperLoRA generator: the paper's three stages (and the optional distil stage) on prepared shards.

``python -m hyperlora.train fit --config FILE`` on a CPU, ``accelerate launch -m hyperlora.train fit
--config FILE`` on GPUs (DDP by default; FSDP / DeepSpeed through an accelerate config file: nothing here
launches processes).  :func:`fit` sets up the run and runs the loop over optimizer steps; the pieces live in:

* :mod:`hyperlora.train.stages`: the stages, one object each (name, trainable parts, scenarios, what the loss
  compares); :mod:`hyperlora.train.config` reads the schedule and each stage's parts from the fit JSON;
* :mod:`hyperlora.train.trainer`: one micro-batch (noise, the scenarios drawn, the loss, the backward);
* :mod:`hyperlora.train.engine`: freezing per stage, the loss weighting, what DDP / FSDP2 / DeepSpeed need;
* :mod:`hyperlora.train.data`: the samples, the deterministic batch plan, collate;
* :mod:`hyperlora.train.run_folder`: ``config.json`` checked on resume, ``loss.csv``, checkpoints, Ctrl-C;
* :mod:`hyperlora.train.monitor`: trackers and the held-out validation loss;
* :mod:`hyperlora.train.fit_samples`: the sample pictures (CUDA); :mod:`hyperlora.train.fit_cli`: the options;
* :mod:`hyperlora.train.export`: the released layout written at the end.

**What trains.** Only :class:`~hyperlora.train.hypernet.TrainableHyperLoRA` (resamplers, ID projector, ID
and Base bases), the parts of the current stage; the SDXL UNet is frozen (``requires_grad False``, eval).
One optimizer (a parameter group per part) and one engine wrapper serve all stages.

**Determinism.** Noise, timesteps and scenarios come from a generator seeded by (seed, process, micro-batch
index), the batches from a permutation seeded by (seed, epoch): a resumed run draws exactly what the
uninterrupted run would have drawn.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import SettingError
from ..spec import LoraModuleSpec
from . import engine, fit_cli, monitor
from .config import FitConfig, check_init_from
from .data import BatchPlan, PlanSampler, collate, open_dataset, sample_list
from .export import (STATE_FILE, arch_from_json, arch_to_json, export_folder, latest_checkpoint,
                     load_generator_from_checkpoint)
from .fit_samples import sample_images
from .hypernet import TrainableHyperLoRA, unet_modules
from .run_folder import (CSV_HEADER, LOSS_CSV, RESUME_FREE_KEYS, TEACHER_FILE, FitResult, StopFlag,
                         check_resume_config, load_teacher, save_checkpoint, truncate_csv, write_loss_rows)
from .stages import LOSS_NAMES, stage_named
from .trainer import Trainer

log = logging.getLogger(__name__)

OTHER_PHOTO_SEED = 500_009
"""Offset of the generator that picks the other photos (``id_photo`` "other"), apart from the noise's."""


# --------------------------------------------------------------------------------- fit


def _build_model(cfg: FitConfig, modules: tuple[LoraModuleSpec, ...], clip_dim: int) -> TrainableHyperLoRA:
    """A new generator for the UNet's attention ``modules`` (CLIP features of width ``clip_dim``) with the config's
    sizes and seed, or the released folder ``cfg.init_from`` (checked to be made for the same modules)."""
    if cfg.init_from:
        model = TrainableHyperLoRA.from_released(cfg.init_from)
        theirs = [(m.name, m.hidden_size, m.cross_attention_dim) for m in model.arch.modules]
        ours = [(m.name, m.hidden_size, m.cross_attention_dim) for m in modules]
        if theirs != ours:
            raise SettingError(f"init_from '{cfg.init_from}' was made for another UNet ({len(theirs)} modules vs "
                               f"{len(ours)} in the base model); use a folder trained for this base model.")
        return model
    m = cfg.model
    return TrainableHyperLoRA.new(modules, rank=m.rank, base_rank=m.base_rank or None, hyper_dim=m.hyper_dim,
                                  clip_dim=clip_dim, heads=m.heads, dim=m.dim, depth=m.depth, dim_head=m.dim_head,
                                  ff_mult=m.ff_mult, num_id_tokens=m.num_id_tokens, id_token_dim=m.id_token_dim,
                                  seed=cfg.seed)


def fit(cfg: FitConfig, *, resume: bool = True, dataset: torch.utils.data.Dataset | None = None,
        unet: nn.Module | None = None, noise_scheduler: Any = None,
        on_step: Callable[[int], None] | None = None,
        validation_dataset: torch.utils.data.Dataset | None = None) -> FitResult:
    """Train (or resume) the run of ``cfg``; see the module docstring.

    ``dataset`` / ``unet`` / ``noise_scheduler`` / ``validation_dataset`` override what ``cfg`` names (tests);
    ``on_step(step)`` is called after every optimizer step.  Returns a :class:`FitResult`; Ctrl-C stops after a
    checkpoint.  A tracker of ``cfg.trackers`` whose package is missing stops it at once
    (:class:`~hyperlora.errors.DependencyError`).
    """
    from accelerate import Accelerator

    check_init_from(cfg)          # a released folder (no Base-LoRA) with stage 1: one line, before any loading
    monitor.check_trackers(cfg.trackers)
    tracking: dict[str, Any] = {}
    if cfg.trackers:
        from accelerate.utils import ProjectConfiguration

        tracking = {"log_with": list(cfg.trackers),
                    "project_config": ProjectConfiguration(project_dir=cfg.out,
                                                           logging_dir=str(Path(cfg.out) / monitor.TENSORBOARD_DIR))}
    # several processes (torchrun / accelerate launch) on a machine without CUDA: DDP over gloo, not N
    # independent runs (Accelerate only picks the CPU process group when told the run is on the CPU)
    cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accel = Accelerator(cpu=cpu, mixed_precision=cfg.mixed_precision,
                        gradient_accumulation_steps=cfg.gradient_accumulation,
                        kwargs_handlers=[engine.ddp_kwargs()],   # unused parameters allowed, gradients as bucket views
                        **tracking)
    try:
        return _fit(cfg, accel, resume=resume, dataset=dataset, unet=unet, noise_scheduler=noise_scheduler,
                    on_step=on_step, validation_dataset=validation_dataset)
    except BaseException:
        end_trackers_after_error(accel)
        raise
    finally:
        _release_accelerator(accel)


@dataclass
class _Session:
    """A run set up for its loop (:func:`_set_up`): the frozen parts, the data, the engine-wrapped generator and
    its optimizer, and the counters a checkpoint resumes (optimizer ``step``, ``micro``-batch index)."""

    run: Path
    device: torch.device
    unet: nn.Module
    noise_scheduler: Any
    dataset: torch.utils.data.Dataset
    validation: monitor.Validation | None
    model: nn.Module                     # as the engine wrapped it: call it, never its methods
    optimizer: Any
    gen_model: TrainableHyperLoRA        # the same generator unwrapped
    trainer: Trainer
    step: int
    micro: int


def _fit(cfg: FitConfig, accel: Any, *, resume: bool, dataset: torch.utils.data.Dataset | None,
         unet: nn.Module | None, noise_scheduler: Any, on_step: Callable[[int], None] | None,
         validation_dataset: torch.utils.data.Dataset | None = None) -> FitResult:
    """:func:`fit` once its ``Accelerator`` exists: set the run up, then train."""
    ses = _set_up(cfg, accel, resume=resume, dataset=dataset, unet=unet, noise_scheduler=noise_scheduler,
                  validation_dataset=validation_dataset)
    return _train(cfg, accel, ses, on_step)


def _set_up(cfg: FitConfig, accel: Any, *, resume: bool, dataset: torch.utils.data.Dataset | None,
            unet: nn.Module | None, noise_scheduler: Any,
            validation_dataset: torch.utils.data.Dataset | None) -> _Session:
    """Load (or take) the frozen UNet, the noise schedule and the data; build or resume the generator; wrap it
    and its optimizer with ``accel``; on resume, load the checkpoint and cut the CSVs back to it."""
    run = Path(cfg.out)
    device = accel.device
    if resume and latest_checkpoint(run) is not None:
        check_resume_config(run, cfg)                       # every process: all stop alike
    if accel.is_main_process:
        run.mkdir(parents=True, exist_ok=True)
        (run / "config.json").write_text(json.dumps(cfg.to_json(), indent=2), encoding="utf-8")

    weight_dtype = torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float32
    if unet is None:
        from .frozen import load_unet

        unet = load_unet(Path(cfg.base_model), dtype=weight_dtype, device=device)
    else:
        unet = unet.to(device=device, dtype=weight_dtype)
    unet.requires_grad_(False).eval()
    if cfg.gradient_checkpointing:
        engine.check_checkpointing_support()
        unet.enable_gradient_checkpointing()
    if noise_scheduler is None:
        from .frozen import load_noise_scheduler

        noise_scheduler = load_noise_scheduler(Path(cfg.base_model))
    if dataset is None:
        dataset = open_dataset(cfg.shards, cfg.identities)
    if len(dataset) == 0:
        raise SettingError(f"the shards {cfg.shards} hold no samples; run prepare (or check 'identities').")
    clip_dim = int(torch.as_tensor(dataset[0]["clip_id"]).shape[-1])
    validation = None
    if cfg.validation_every > 0:
        validation = monitor.Validation(validation_dataset if validation_dataset is not None
                                        else monitor.open_validation_dataset(cfg), cfg, clip_dim=clip_dim)

    modules = unet_modules(unet)
    ckpt = latest_checkpoint(run) if resume else None
    if ckpt is not None:
        state = json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))
        model = TrainableHyperLoRA(arch_from_json(state["arch"]))
        if [m.name for m in model.arch.modules] != [m.name for m in modules]:
            raise SettingError(f"the checkpoint '{ckpt}' was made for another base model; use a new 'out' folder.")
    else:
        model = _build_model(cfg, modules, clip_dim)
        state = None
    model.to(device)
    # one group per part: a stage freezes the others by requires_grad and lr 0 (engine.enter_stage)
    optimizer = torch.optim.AdamW(engine.param_groups(model, cfg.lr, cfg.weight_decay), lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    if accel.distributed_type == "DEEPSPEED":          # DistributedType is a str enum
        # the shipped ZeRO-2 YAML leaves the micro-batch at "auto", which accelerate fills only from a DataLoader
        engine.fill_deepspeed_batch(accel.state.deepspeed_plugin, cfg.batch_size, cfg.gradient_accumulation)
    model, optimizer = accel.prepare(model, optimizer)
    gen_model: TrainableHyperLoRA = accel.unwrap_model(model)

    step = 0
    micro = 0
    if ckpt is not None and state is not None:
        accel.load_state(str(ckpt))
        step, micro = int(state["step"]), int(state["micro"])
        gen_model.distilled_base = float(state.get("distilled_base", 0.0))
        log.info("resumed from '%s' at step %d (stage %s)", ckpt, step, state["stage"])
        if accel.is_main_process:
            truncate_csv(run / LOSS_CSV, step)
            truncate_csv(run / monitor.VALIDATION_CSV, step)
    if cfg.trackers and accel.is_main_process:
        accel.init_trackers(cfg.name, config=monitor.tracker_config(cfg),
                            init_kwargs=monitor.tracker_init_kwargs(cfg.trackers, run, step))

    trainer = Trainer(unet, model, noise_scheduler, cfg)
    if ckpt is not None:
        trainer.teacher = load_teacher(ckpt, gen_model, device=device)
    return _Session(run=run, device=device, unet=unet, noise_scheduler=noise_scheduler, dataset=dataset,
                    validation=validation, model=model, optimizer=optimizer, gen_model=gen_model, trainer=trainer,
                    step=step, micro=micro)


def _train(cfg: FitConfig, accel: Any, ses: _Session, on_step: Callable[[int], None] | None) -> FitResult:
    """The loop over optimizer steps from ``ses.step`` to ``cfg.total_steps``: each stage's parts, the micro-batches
    of one step, the loss rows and monitoring, checkpoints, Ctrl-C; the export at the end."""
    from tqdm.auto import tqdm

    run, device, trainer, gen_model, model = ses.run, ses.device, ses.trainer, ses.gen_model, ses.model
    step, micro = ses.step, ses.micro
    plan = BatchPlan(len(ses.dataset), cfg.batch_size, seed=cfg.seed, rank=accel.process_index,
                     world=accel.num_processes)
    total = cfg.total_steps
    full_length = sum(n for _, n, _ in cfg.schedule())

    def save(step_: int, stage_: str) -> Path:
        return save_checkpoint(accel, model, gen_model, trainer.teacher, run, cfg, step=step_, micro=micro,
                               stage=stage_)

    other_photos = None
    if cfg.id_photo in ("other", "shuffled"):
        from .data import OtherPhotos

        other_photos = OtherPhotos(ses.dataset, across=cfg.id_photo == "shuffled")
        if cfg.id_photo == "shuffled":
            log.warning("id_photo 'shuffled': a control run, the ID branch reads another identity's photo")
        elif other_photos.singletons:
            log.warning("id_photo 'other': %d of %d samples are their identity's only photo and keep their own "
                        "ID features", other_photos.singletons, len(ses.dataset))
    # workers read ahead in the plan's order; a resumed run starts the sampler at its micro-batch counter
    loader = torch.utils.data.DataLoader(ses.dataset, batch_sampler=PlanSampler(plan, micro),
                                         num_workers=cfg.num_workers, collate_fn=sample_list)
    batches = iter(loader)
    stage, parts = cfg.stage_at(step)
    last: dict[str, float] = {}
    interrupted = False
    bar = tqdm(total=total, initial=step, disable=not accel.is_local_main_process, desc="fit", unit="step")
    with StopFlag() as stop:
        while step < total:
            stage, parts = cfg.stage_at(step)
            if stage_named(stage).uses_teacher and trainer.teacher is None:
                trainer.teacher = engine.plain_copy(gen_model)   # gathered on every process (FSDP2), no deepcopy
            lr = cfg.lr * (min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0)
            trainable = engine.enter_stage(gen_model, ses.optimizer, parts, lr)
            sums: dict[str, list[float]] = {}
            grad_norm: Any = None
            for _ in range(cfg.gradient_accumulation):
                samples = next(batches)
                seed = cfg.seed * 1_000_003 + accel.process_index * 7919 + micro
                if other_photos is not None:
                    samples = other_photos.apply(samples, plan.indices(micro),
                                                 torch.Generator().manual_seed(seed + OTHER_PHOTO_SEED))
                batch = collate(samples, device)
                gen = torch.Generator().manual_seed(seed)
                with accel.accumulate(model), accel.autocast():
                    res = trainer.loss(stage, batch, gen, accel.backward)
                    if accel.sync_gradients and cfg.max_grad_norm > 0:
                        grad_norm = accel.clip_grad_norm_([p for p in trainable if p.grad is not None],
                                                          cfg.max_grad_norm)
                    elif accel.sync_gradients and cfg.trackers:      # measured only: the gradients are scaled by 1
                        grad_norm = accel.clip_grad_norm_([p for p in trainable if p.grad is not None], math.inf)
                    ses.optimizer.step()
                    ses.optimizer.zero_grad(set_to_none=True)
                micro += 1
                for s, (v, n) in res.items():
                    acc = sums.setdefault(s, [0.0, 0])
                    acc[0] += v
                    acc[1] += n
            step += 1
            if stage_named(stage).uses_teacher and step >= full_length:
                gen_model.distilled_base = cfg.distill_base      # the whole distil stage ran
            last = _mean_losses(accel, sums, device)
            _report(cfg, accel, run, step, stage, last, lr, grad_norm)
            bar.update(1)
            bar.set_postfix(stage=stage, **{s: f"{v:.4f}" for s, v in last.items()})
            if not all(math.isfinite(v) for v in last.values()):
                raise SettingError(f"the loss became {last} at step {step}; lower 'lr' or use mixed_precision \"no\", "
                                   f"and resume from the last checkpoint.")
            if ses.validation is not None and step % cfg.validation_every == 0:
                _validate(cfg, accel, ses.validation, trainer, gen_model, run, step, stage)
            if on_step is not None:
                on_step(step)
            if cfg.sample_every and step % cfg.sample_every == 0 and torch.cuda.is_available():
                sample_images(cfg, gen_model, ses.unet, ses.noise_scheduler, ses.dataset,
                              run / "samples" / f"step-{step:06d}.png", device=device, is_main=accel.is_main_process)
            stop_now = stop.set
            if accel.num_processes > 1:
                flag = accel.reduce(torch.tensor([1.0 if stop.set else 0.0], device=device), "sum")
                stop_now = bool(flag.item() > 0)
            if stop_now:
                save(step, stage)
                interrupted = True
                break
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total:
                save(step, stage)
    bar.close()
    del batches, loader                      # stops the loader's worker processes
    export = None
    if not interrupted:
        save(step, stage)
        export = export_run(gen_model, run / "export" / cfg.name, is_main=accel.is_main_process)
    accel.wait_for_everyone()
    accel.end_training()
    return FitResult(run=run, steps=step, stage=stage, interrupted=interrupted, export=export, last_losses=last,
                     main_process=bool(accel.is_main_process))


def _mean_losses(accel: Any, sums: dict[str, list[float]], device: torch.device) -> dict[str, float]:
    """``{loss name: mean}`` of one optimizer step from this process's ``{name: [sum, count]}``; with several
    processes, summed over all of them first (every process calls it: a collective)."""
    if accel.num_processes > 1:
        # scenario sets differ between processes: reduce a fixed layout
        full = torch.zeros(2 * len(LOSS_NAMES), dtype=torch.float64, device=device)
        keys = list(LOSS_NAMES)
        for s, (v, n) in sums.items():
            full[2 * keys.index(s)] = v
            full[2 * keys.index(s) + 1] = n
        full = accel.reduce(full, "sum")
        sums = {k: [float(full[2 * i]), int(full[2 * i + 1])] for i, k in enumerate(keys) if full[2 * i + 1] > 0}
    return {s: v / max(n, 1) for s, (v, n) in sums.items()}


def _report(cfg: FitConfig, accel: Any, run: Path, step: int, stage: str, last: dict[str, float], lr: float,
            grad_norm: Any) -> None:
    """A step's losses into ``loss.csv`` (main process) and, with trackers, its scalars (every process calls it:
    the gradient norm may be a DTensor to gather)."""
    if accel.is_main_process:
        write_loss_rows(run / LOSS_CSV, step, stage, last, lr)
    if cfg.trackers:
        norm = monitor.scalar(grad_norm)                 # every process (a DTensor under FSDP2)
        accel.log(monitor.step_scalars(last, lr, norm), step=step)     # main process only


def _validate(cfg: FitConfig, accel: Any, validation: monitor.Validation, trainer: Trainer,
              gen_model: TrainableHyperLoRA, run: Path, step: int, stage: str) -> None:
    """The held-out loss after ``step``: ``validation.csv`` (main process) and the trackers; every process calls it."""
    held_out = validation.run(trainer, stage, gen_model, device=accel.device, autocast=accel.autocast)
    if accel.is_main_process:
        monitor.write_validation_rows(run / monitor.VALIDATION_CSV, step, stage, held_out)
    if cfg.trackers:
        accel.log({f"validation/{s}": v for s, v in sorted(held_out.items())}, step=step)


def export_run(model: TrainableHyperLoRA, folder: Path, *, is_main: bool) -> Path | None:
    """Export the (unwrapped) generator from the main process; every process must call it.

    Under FSDP2 the parameters are shards: they are gathered first, tensor by tensor onto the CPU, by all
    processes together; the main process exports a plain copy.  Returns the folder on the main process.
    """
    if engine.is_sharded(model):
        plain = engine.plain_copy(model, engine.full_state_dict(model, device="cpu"))
        return export_folder(plain, folder, distill_base=plain.distilled_base) if is_main else None
    return export_folder(model, folder, distill_base=model.distilled_base) if is_main else None


def end_trackers_after_error(accel: Any) -> None:
    """Close the experiment trackers of a fit that raised (no collective: the other processes may be gone): a W&B
    run is marked failed (exit code 1), TensorBoard's writer flushed.  Without this the W&B run stays open in this
    Python, and a later fit in it (the resume in a notebook or a test) logs into the dead run."""
    for tracker in list(getattr(accel, "trackers", None) or []):
        run = getattr(tracker, "run", None)
        try:
            if getattr(tracker, "name", "") == "wandb" and run is not None:
                run.finish(exit_code=1)
            else:
                tracker.finish()
        except Exception as e:           # noqa: BLE001 - closing a tracker must not hide the error that ended fit
            log.warning("could not close the tracker %s after the error: %s", getattr(tracker, "name", tracker), e)
    accel.trackers = []


def _release_accelerator(accel: Any) -> None:
    """In a single process, forget accelerate's process-wide state so a later ``fit`` in the same Python
    (the demo, tests, a notebook) may choose another mixed precision.  Launched runs end with the process."""
    if accel.num_processes == 1:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)


# --------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """``python -m hyperlora.train fit --config FILE ...`` (options: :func:`hyperlora.train.fit_cli.build_parser`):
    the exit code of :func:`hyperlora.train.fit_cli.run` training with :func:`fit`."""
    return fit_cli.run(argv, lambda cfg, resume: fit(cfg, resume=resume))    # fit looked up now (tests replace it)


__all__ = ["BatchPlan", "CSV_HEADER", "FitResult", "OTHER_PHOTO_SEED", "PlanSampler", "RESUME_FREE_KEYS", "TEACHER_FILE",
           "Trainer", "arch_from_json", "arch_to_json", "check_resume_config", "collate", "end_trackers_after_error",
           "export_run", "fit",
           "load_generator_from_checkpoint", "main", "sample_images"]
