"""``python -m hyperlora.train COMMAND ...``: one entry point for the training tools (:data:`COMMANDS`).

Each subcommand's own ``--help`` lists its options; the work is done by the ``main`` of the module
:data:`COMMANDS` names (``prepare.main``, ``fit.main``, ``difflora_fit.main``, ...), imported only when chosen,
so ``--help`` is instant.
"""

from __future__ import annotations

import importlib
import logging
import sys

COMMANDS = {
    "prepare": ("prepare", "turn photo folders / webdataset shards into training shards"),
    "fit": ("fit", "train a generator from shards (three stages); resumes from its run folder"),
    "export": ("export", "write a run's generator as a released-layout HyperLoRA folder"),
    "evaluate": ("evaluate_cli", "identity in generated pictures: ID-sim and retrieval, own / other / no LoRA"),
    "demo": ("demo", "the whole pipeline at toy scale on this CPU"),
    "difflora-dataset": ("difflora_dataset", "fit one plain LoRA per identity of shards (DiffLoRA's training set)"),
    "difflora-fit": ("difflora_fit", "train a DiffLoRA model (LAE, then DiT) on a LoRA dataset; resumes"),
    "difflora-export": ("difflora_export", "write a difflora-fit run as a DiffLoRA model folder"),
    "difflora-demo": ("difflora_demo", "the whole DiffLoRA chain at toy scale on this CPU"),
}


def _usage() -> str:
    lines = [f"usage: python -m hyperlora.train {{{','.join(COMMANDS)}}} [options]", "", "commands:"]
    lines += [f"  {name:16s} {what}" for name, (_, what) in COMMANDS.items()]
    lines += ["", "'python -m hyperlora.train COMMAND --help' lists a command's options."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        sys.stdout.write(_usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        sys.stderr.write(f"unknown command {name!r}; choose one of {', '.join(COMMANDS)}.\n\n" + _usage())
        return 2
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    module = importlib.import_module(f"hyperlora.train.{COMMANDS[name][0]}")
    code = module.main(rest)
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
