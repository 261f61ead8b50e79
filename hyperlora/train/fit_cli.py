"""The command line of ``fit``: its options, the config they make, and the exit code.

``python -m hyperlora.train fit --config FILE [--init-from DIR] [--out DIR] [--max-steps N] [--no-resume]
[--distill-base F --distill-steps N] [--trackers NAMES]`` (:func:`hyperlora.train.fit.main` runs
:func:`run` with :func:`hyperlora.train.fit.fit`).  Exit codes: 0 done, 2 a setting or file error (one line
on stderr), 130 interrupted by Ctrl-C after a checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from ..errors import HyperLoRAError, SettingError, check_folder_option, os_error_line
from .config import FitConfig, tracker_list
from .run_folder import FitResult


def build_parser() -> argparse.ArgumentParser:
    """The options of ``fit`` (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m hyperlora.train fit",
                                     description="Train a HyperLoRA generator (three stages) from prepared shards.")
    parser.add_argument("--config", type=Path, required=True, help="fit JSON (see hyperlora/train/configs/)")
    parser.add_argument("--init-from", type=Path, help="start from a released-layout HyperLoRA folder")
    parser.add_argument("--out", type=Path, help="run folder (overrides the config's 'out')")
    parser.add_argument("--max-steps", type=int, help="stop after this many optimizer steps in all")
    parser.add_argument("--no-resume", action="store_true", help="ignore checkpoints already in the run folder")
    parser.add_argument("--distill-base", type=float, help="after stage 3, fold this fraction of the Base-LoRA into "
                        "the ID-LoRA (the release used 0.25); the export then has no Base-LoRA")
    parser.add_argument("--distill-steps", type=int, help="optimizer steps of the distil stage (with --distill-base)")
    parser.add_argument("--trackers", metavar="NAMES", help="experiment trackers, comma-separated: tensorboard, wandb, "
                        "or none (overrides the config's 'trackers'; docs/training.md, Monitoring)")
    return parser


def config_from_args(args: argparse.Namespace) -> FitConfig:
    """The config file of ``args.config`` with the options that override it, checked; :class:`SettingError`
    (or another :class:`~hyperlora.errors.HyperLoRAError`) naming the option and the fix."""
    cfg = FitConfig.from_json(args.config)
    if args.init_from is not None:
        if not args.init_from.is_dir():
            raise SettingError(f"--init-from '{args.init_from}' is not a folder; give a released-layout "
                               f"HyperLoRA folder (the one holding hyper_lora_modules.json).")
        cfg.init_from = str(args.init_from)
    if args.out is not None:
        cfg.out = str(args.out)
    if args.trackers is not None:
        cfg.trackers = tracker_list(args.trackers.split(","), "--trackers")
    if args.max_steps is not None:
        if args.max_steps < 1:
            raise SettingError(f"--max-steps is {args.max_steps}; give a positive number of steps.")
        cfg.max_steps = args.max_steps
    if args.distill_base is not None or args.distill_steps is not None:
        raw = cfg.to_json()
        if args.distill_base is not None:
            raw["distill_base"] = args.distill_base
        if args.distill_steps is not None:
            raw["distill_steps"] = args.distill_steps
        cfg = FitConfig.from_dict(raw, where=f"{args.config} with --distill-base/--distill-steps")
    check_folder_option(cfg.out, "--out" if args.out is not None else f"'out' of {args.config}")
    return cfg


def run(argv: list[str] | None, train: Callable[[FitConfig, bool], FitResult]) -> int:
    """Parse ``argv``, call ``train(config, resume)`` and report: the exit code (0, 2 or 130, see the module
    docstring).  Setting and file errors become one ``fit: ...`` line on stderr."""
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = config_from_args(args)
        result = train(cfg, not args.no_resume)
    except HyperLoRAError as exc:
        sys.stderr.write(f"fit: {exc}\n")
        return 2
    except OSError as exc:
        sys.stderr.write(f"fit: {os_error_line(exc)}\n")
        return 2
    if result.interrupted:
        if result.main_process:
            sys.stdout.write(f"fit: interrupted at step {result.steps}; run the same command again to resume.\n")
        return 130
    if result.main_process:
        sys.stdout.write(f"fit: {result.steps} steps done; exported {result.export}\n")
    return 0


__all__ = ["build_parser", "config_from_args", "run"]
