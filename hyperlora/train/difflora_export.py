"""``python -m hyperlora.train difflora-export --run RUN --out FOLDER``: a difflora-fit run -> a DiffLoRA model folder.

The folder (``difflora.json`` + ``lae.safetensors`` + ``dit.safetensors``, ``docs/difflora-format.md``) is written
from the run's last checkpoint by :func:`hyperlora.train.difflora_fit.export`; load it with
:meth:`hyperlora.difflora.model.DiffLoraModel.from_folder`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import check_folder_option, run_command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hyperlora.train difflora-export",
                                     description="Write a DiffLoRA model folder from a difflora-fit run.")
    parser.add_argument("--run", type=Path, required=True, help="the difflora-fit run folder ('out' of its config)")
    parser.add_argument("--out", type=Path, required=True, help="the model folder to write (new or a DiffLoRA folder)")
    args = parser.parse_args(argv)
    from .difflora_fit import export

    def body() -> Path:
        check_folder_option(args.out, "--out")
        return export(args.run, args.out)

    code, folder = run_command("difflora-export", body)
    if folder is None:
        return code
    sys.stdout.write(f"difflora-export: wrote '{folder}'\n")
    return 0


__all__ = ["main"]
